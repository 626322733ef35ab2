"""gpt2-score, gpt2-transform and gpt2-generate under faults: unreadable model directories,
undecodable arguments, closed or full outputs, read-only and full disks, odd vocabularies,
byte-order marks, a terminal shared by results and the progress bar, missing GPUs.

Run: python3 -m pytest -q tests/test_script_faults.py
"""
import fcntl
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios

import pytest

import cli
from helpers import REPO, assert_usage_error, load_script, run_script
from model_dir import load_model_dir
from privileges import in_child_as_nobody, public_temp_dir


@pytest.fixture(scope='module')
def score_main():
    return load_script('gpt2-score.py').main


@pytest.mark.slow
def test_a_model_directory_without_read_permission_is_one_line(tiny_model_dir):
    with public_temp_dir() as parent:
        locked = parent / 'model'
        shutil.copytree(tiny_model_dir, locked)
        locked.chmod(0o000)
        message = in_child_as_nobody(lambda: load_model_dir(locked))
    assert 'cannot read the model directory' in message and 'permission denied' in message, message


@pytest.mark.slow
@pytest.mark.parametrize('script', ['gpt2-transform.py', 'gpt2-generate.py'])
def test_an_undecodable_context_is_one_line(tiny_model_dir, script):
    result = subprocess.run([sys.executable, script, '--model', str(tiny_model_dir), '--gpu', '-1',
                             '--context', b'abc\xff'], cwd=REPO, capture_output=True, text=True)
    assert_usage_error(result, '--context is not valid UTF-8', 'byte 0xff at character 4')


@pytest.mark.slow
def test_score_to_a_full_disk_is_one_line(tiny_model_dir):
    with open('/dev/full', 'w') as full:
        result = subprocess.run([sys.executable, 'gpt2-score.py', '--model', str(tiny_model_dir),
                                 '--gpu', '-1', '-'], cwd=REPO, input='猫\n犬\n', stdout=full,
                                stderr=subprocess.PIPE, text=True)
    assert_usage_error(result, 'cannot write the results to standard output', 'No space left on device')


@pytest.mark.slow
def test_score_with_stdout_closed_is_one_line(tiny_model_dir):
    result = subprocess.run([sys.executable, 'gpt2-score.py', '--model', str(tiny_model_dir), '-'],
                            cwd=REPO, input='猫\n', stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL, preexec_fn=lambda: os.close(1))
    assert_usage_error(result, 'standard output is closed')



@pytest.mark.slow
def test_transform_output_on_a_read_only_disk_is_refused_first(tmp_path, tiny_model_dir, small_disk):
    disk = small_disk('size=64k,ro')
    lines = tmp_path / 'texts.txt'
    lines.write_text('猫\n', encoding='utf-8')
    result = run_script('gpt2-transform.py', '--model', tiny_model_dir, '--gpu', '-1', '--input', lines,
                        '--output', disk / 'v.npy')
    assert_usage_error(result, '--output', 'cannot create files in', 'Read-only file system')


@pytest.mark.slow
def test_transform_output_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, tiny_model_dir, small_disk):
    disk = small_disk('size=8k')
    lines = tmp_path / 'texts.txt'
    lines.write_text(''.join(f'猫{i}\n' for i in range(200)), encoding='utf-8')  # 200 x 128 bytes
    result = run_script('gpt2-transform.py', '--model', tiny_model_dir, '--gpu', '-1', '--input', lines,
                        '--output', disk / 'v.npy')
    assert_usage_error(result, 'cannot write --output', 'No space left on device')
    assert list(disk.iterdir()) == []


@pytest.mark.slow
def test_generate_output_file_that_cannot_be_written_is_refused_before_loading(tmp_path, small_disk):
    disk = small_disk('size=64k,ro')
    # The model does not exist: the output is checked first.
    result = run_script('gpt2-generate.py', '--model', tmp_path / 'nowhere', '--gpu', '-1',
                        '--output_file', disk / 'out.txt')
    assert_usage_error(result, '--output_file', 'Read-only file system')


@pytest.mark.slow
def test_an_output_file_in_a_directory_nobody_may_write_is_refused():
    with public_temp_dir() as parent:
        message = in_child_as_nobody(lambda: cli.check_output_file('--output', parent / 'v.npy'))
    assert 'cannot create files in' in message and 'Permission denied' in message, message


def test_empty_emoji_tables_are_a_vocabulary_without_emoji(tmp_path, tiny_model_dir, score_main, capsys):
    vocab = tmp_path / 'vocab'
    vocab.mkdir()
    shutil.copy(tiny_model_dir / 'ja-bpe.txt', vocab)
    (vocab / 'emoji.json').write_text('{"emoji": {}, "emoji_inv": {}}', encoding='utf-8')
    texts = tmp_path / 'texts.txt'
    texts.write_text('猫です\n', encoding='utf-8')
    assert score_main(['--model', str(tiny_model_dir), '--vocab', str(vocab), str(texts)]) == 0
    assert capsys.readouterr().out.startswith('猫です\t')


def test_a_byte_order_mark_is_not_scored(tmp_path, tiny_model_dir, score_main, capsys):
    plain, marked = tmp_path / 'plain.txt', tmp_path / 'marked.txt'
    plain.write_bytes('猫です\n犬\n'.encode('utf-8'))
    marked.write_bytes(b'\xef\xbb\xbf' + plain.read_bytes())
    assert score_main(['--model', str(tiny_model_dir), '--tokens', str(plain)]) == 0
    expected = capsys.readouterr().out
    assert score_main(['--model', str(tiny_model_dir), '--tokens', str(marked)]) == 0
    assert capsys.readouterr().out == expected


def screen(output):
    """The lines a terminal shows after `output`: '\\r' returns to the start of the line."""
    lines, line, column = [], [], 0
    for char in re.sub(r'\x1b\[[0-9;]*[A-Za-z]', '', output):
        if char == '\n':
            lines.append(''.join(line).rstrip())
            line, column = [], 0
        elif char == '\r':
            column = 0
        else:
            line[column:column + 1] = [char]
            column += 1
    return lines + [''.join(line).rstrip()]


@pytest.mark.slow
def test_score_results_and_the_bar_do_not_mix_on_a_terminal(tmp_path, tiny_model_dir):
    texts = tmp_path / 'texts.txt'
    texts.write_text(''.join(f'猫{i}\n' for i in range(80)), encoding='utf-8')  # a bar: > 50 lines
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 100, 0, 0))  # rows, columns
    process = subprocess.Popen([sys.executable, 'gpt2-score.py', '--model', str(tiny_model_dir),
                                '--gpu', '-1', '--batch_size', '4', str(texts)], cwd=REPO,
                               stdout=terminal, stderr=terminal, stdin=subprocess.DEVNULL)
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=120)
    os.close(controller)
    shown = screen(b''.join(chunks).decode('utf-8', 'replace'))
    assert any('80/80' in line for line in shown), shown  # the bar was there
    results = [line for line in shown if '\t' in line]
    assert len(results) == 80 and all(re.fullmatch(r'猫\d+\t-[\d.]+', line) for line in results), shown


def test_a_gpu_asked_for_but_missing_is_one_note(tiny_model_dir, score_main, tmp_path, monkeypatch, capsys):
    import tensorflow as tf
    if tf.config.list_physical_devices('GPU'):
        pytest.skip('this machine has a GPU')
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')
    texts = tmp_path / 'texts.txt'
    texts.write_text('猫\n', encoding='utf-8')
    assert score_main(['--model', str(tiny_model_dir), '--gpu', '0', str(texts)]) == 0
    err = capsys.readouterr().err
    assert err.count('note: --gpu 0 asked for 1 GPU(s) but TensorFlow sees no GPU') == 1, err
    for quiet in ([], ['--gpu', '-1']):
        assert score_main(['--model', str(tiny_model_dir), *quiet, str(texts)]) == 0
        assert capsys.readouterr().err == ''


@pytest.mark.slow
def test_the_encoder_bench_describes_itself_in_full():
    result = subprocess.run([sys.executable, 'bench/bench_encoder.py', '--help'], cwd=REPO,
                            capture_output=True, text=True)
    description = ' '.join(result.stdout.split('\n\n')[1].split())
    assert description.endswith('(the figures of report/encoder.md).'), description
