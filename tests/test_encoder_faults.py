"""`python -m encoder` under faults: killed mid-run, stale temporaries, unreadable folders, and
`--decode` of files that are not token arrays.

Run: python3 -m pytest -q tests/test_encoder_faults.py
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cli
from encoder.__main__ import main
from encoder.corpus import find_text_files
from encoder.npz import read_token_arrays
from helpers import REPO
from privileges import in_child_as_nobody, public_temp_dir


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / 'src'
    for number in range(6):
        (src / f'part{number // 3}').mkdir(parents=True, exist_ok=True)
        (src / f'part{number // 3}' / f'{number}.txt').write_text('吾輩は猫である。' * 20, encoding='utf-8')
    return src


def encode(synthetic_vocab_dir, *args):
    return main([*map(str, args), '--vocab', str(synthetic_vocab_dir), '--quiet'])


# Encoding the third chunk: say so and wait, so that the test can signal a run mid-way.
PAUSE_IN_ENCODING = '''
import sys, time
import encoder.corpus as corpus
_encode = corpus._encode_chunk
calls = []
def _pausing(item):
    calls.append(1)
    if len(calls) == 3:
        print('PAUSED IN ENCODING', file=sys.stderr, flush=True)
        time.sleep(600)
    return _encode(item)
corpus._encode_chunk = _pausing
'''


@pytest.mark.slow
@pytest.mark.parametrize('processes', [1, 2])
def test_sigterm_removes_the_temporary_output(tmp_path, synthetic_vocab_dir, corpus, processes):
    dst = tmp_path / 'out.npz'
    code = PAUSE_IN_ENCODING + 'import cli, encoder.__main__ as m; cli.run_main(m.main, prog="python -m encoder")'
    process = subprocess.Popen(
        [sys.executable, '-c', code, '--src_dir', str(corpus), '--dst_file', str(dst), '--vocab',
         str(synthetic_vocab_dir), '--combine', '10', '--num_process', str(processes), '--quiet'],
        cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        assert 'PAUSED IN ENCODING' in line, line + process.stderr.read()
        time.sleep(0.2)
        assert list(tmp_path.glob('.tmp-out.npz-*'))  # the output is being written
        process.send_signal(signal.SIGTERM)
        err = process.communicate(timeout=60)[1]
    finally:
        process.kill()
    assert process.returncode == 143, err
    assert err.strip() == 'python -m encoder: terminated'
    assert not list(tmp_path.glob('.tmp-*')) and not dst.exists()


def dead_pid():
    child = subprocess.Popen([sys.executable, '-c', 'pass'])
    child.wait()
    return child.pid


def test_a_later_run_removes_what_a_killed_run_left(tmp_path, synthetic_vocab_dir, corpus):
    stale = tmp_path / f'.tmp-out.npz-{dead_pid()}-abcd1234'
    live = tmp_path / f'.tmp-out.npz-{os.getpid()}-efgh5678'  # a writer still at work
    other = tmp_path / f'.tmp-other.npz-{dead_pid()}-abcd1234'  # another file's: not ours to judge
    for path in (stale, live, other):
        path.write_bytes(b'x' * 1000)
    assert encode(synthetic_vocab_dir, '--src_dir', corpus, '--dst_file', tmp_path / 'out.npz') == 0
    assert not stale.exists() and live.exists() and other.exists()
    assert len(read_token_arrays(tmp_path / 'out.npz')) == 1


def refuse_to_list(monkeypatch, folder):
    real_scandir = os.scandir

    def scandir(path='.'):
        if Path(path) == folder:
            raise PermissionError(13, 'Permission denied', str(path))
        return real_scandir(path)
    monkeypatch.setattr(os, 'scandir', scandir)


def test_an_unreadable_folder_stops_the_run(tmp_path, synthetic_vocab_dir, corpus, monkeypatch):
    refuse_to_list(monkeypatch, corpus / 'part1')
    with pytest.raises(cli.UsageError, match=r'cannot read the folder .*part1: Permission denied'):
        encode(synthetic_vocab_dir, '--src_dir', corpus, '--dst_file', tmp_path / 'out.npz')
    assert not (tmp_path / 'out.npz').exists()


def test_an_unreadable_folder_is_skipped_on_request(tmp_path, synthetic_vocab_dir, corpus, monkeypatch, capsys):
    refuse_to_list(monkeypatch, corpus / 'part1')
    assert encode(synthetic_vocab_dir, '--src_dir', corpus, '--dst_file', tmp_path / 'out.npz',
                  '--on_bad_file', 'skip') == 0
    assert 'skipping the folder' in capsys.readouterr().err
    assert [p.name for p in find_text_files(corpus, 'skip')] == ['0.txt', '1.txt', '2.txt']


@pytest.mark.slow
def test_a_folder_without_read_permission_really_is_reported():
    with public_temp_dir() as corpus:
        for name in ('readable', 'locked'):
            (corpus / name).mkdir()
            (corpus / name / 'a.txt').write_text('猫', encoding='utf-8')
        (corpus / 'locked').chmod(0o000)
        message = in_child_as_nobody(lambda: find_text_files(corpus, 'stop'))
    assert 'cannot read the folder' in message and 'Permission denied' in message, message


# -- --decode ------------------------------------------------------------------------------

def not_token_arrays(tmp_path):
    cases = {}
    cases['float'] = tmp_path / 'float.npz'
    np.savez(cases['float'], np.array([1.5, 2.0], np.float32))
    cases['2-D'] = tmp_path / 'matrix.npz'
    np.savez(cases['2-D'], np.zeros((3, 4), np.uint16))
    cases['npy'] = tmp_path / 'plain.npy'
    np.save(cases['npy'], np.arange(5, dtype=np.uint16))
    cases['text'] = tmp_path / 'notes.npz'
    cases['text'].write_text('hello\n')
    cases['objects'] = tmp_path / 'objects.npz'
    np.savez(cases['objects'], np.array([{'a': 1}], dtype=object))
    damaged = tmp_path / 'damaged.npz'
    np.savez(damaged, np.arange(3000, dtype=np.uint16))
    data = bytearray(damaged.read_bytes())
    data[1000:5000] = bytes(4000)
    damaged.write_bytes(bytes(data))
    cases['damaged'] = damaged
    return cases


EXPECTED = {'float': 'holds float32 values, not token ids', '2-D': 'is a 2-D array (3x4)',
            'npy': 'is a single .npy array, not an .npz', 'text': 'is not an .npz (zip) archive',
            'objects': 'holds Python objects', 'damaged': 'is damaged: the data of arr_0'}


@pytest.mark.parametrize('case', list(EXPECTED))
def test_decode_of_what_is_not_token_arrays_is_one_line(tmp_path, synthetic_vocab_dir, case):
    path = not_token_arrays(tmp_path)[case]
    with pytest.raises(cli.UsageError) as error:
        encode(synthetic_vocab_dir, '--decode', path)
    assert EXPECTED[case] in str(error.value) and '\n' not in str(error.value), str(error.value)


@pytest.mark.slow
def test_decode_errors_exit_2_without_a_traceback(tmp_path, synthetic_vocab_dir):
    for path in not_token_arrays(tmp_path).values():
        result = subprocess.run([sys.executable, '-m', 'encoder', '--decode', str(path), '--vocab',
                                 str(synthetic_vocab_dir)], cwd=REPO, capture_output=True, text=True)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_arrays_are_read_by_number_then_by_file_order(tmp_path):
    path = tmp_path / 'd.npz'
    np.savez(path, **{'arr_10': np.array([10]), 'arr_2': np.array([2]), 'extra': np.array([99])})
    assert [int(a[0]) for a in read_token_arrays(path)] == [2, 10, 99]
