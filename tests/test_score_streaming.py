"""Input that arrives slowly: each answer comes out as soon as its line is in, while input
that arrives all at once still runs in full batches."""
import os
import select
import subprocess
import sys
import threading
import time

import pytest

import scoring
from helpers import REPO

# Long enough never to be reached when streaming works; the test fails by reaching it.
WAIT_LIMIT_S = 20


def scored_lengths(items, *, batch_size=4, read_ahead=None):
    """ordered_batches over `items` with one row an item; yields each item back."""
    return scoring.ordered_batches(items, rows_of=lambda item: [[0] * 5],
                                   run_rows=lambda rows: [len(row) for row in rows],
                                   finish=lambda item, results: item,
                                   batch_size=batch_size, n_ctx=64, read_ahead=read_ahead)


def test_an_item_is_finished_before_the_next_one_arrives():
    first_done = threading.Event()
    waited = []

    def slow_source():  # like `(echo A; sleep 15; echo B) |`
        yield 'A'
        waited.append(first_done.wait(WAIT_LIMIT_S))  # the next line comes after A's answer
        yield 'B'

    results = []
    for item in scored_lengths(slow_source()):
        results.append(item)
        first_done.set()
    assert results == ['A', 'B']
    assert waited == [True], 'A was held back until B arrived'


def test_input_that_arrives_at_once_runs_in_full_batches():
    sizes = []
    results = scoring.ordered_batches(
        iter(range(64)), rows_of=lambda item: [[0] * 5],
        run_rows=lambda rows: sizes.append(len(rows)) or [1] * len(rows),
        finish=lambda item, results: item, batch_size=8, n_ctx=64)
    assert list(results) == list(range(64))
    assert sizes == [8] * 8


def test_an_error_in_the_input_comes_after_the_items_before_it():
    def failing_source():
        yield 'A'
        yield 'B'
        raise ValueError('line 3 is bad')

    results = []
    with pytest.raises(ValueError, match='line 3'):
        for item in scored_lengths(failing_source()):
            results.append(item)
    assert results == ['A', 'B']


@pytest.mark.slow
def test_score_script_answers_a_line_while_the_pipe_is_still_open(tiny_model_dir):
    process = subprocess.Popen(
        [sys.executable, 'gpt2-score.py', '--model', str(tiny_model_dir), '--gpu', '-1', '-'],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONUNBUFFERED='1'))
    try:
        process.stdin.write('猫が鳴いた\n'.encode())
        process.stdin.flush()
        began = time.monotonic()
        ready, _, _ = select.select([process.stdout], [], [], 120)  # start-up included
        assert ready, 'no answer while the input stayed open'
        first = process.stdout.readline().decode()
        assert first.startswith('猫が鳴いた\t')
        process.stdin.write('犬\n'.encode())
        process.stdin.close()
        rest = process.stdout.read().decode()
        assert process.wait(60) == 0, process.stderr.read().decode()
        assert rest.startswith('犬\t') and rest.count('\n') == 1
        assert time.monotonic() - began < 120
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
