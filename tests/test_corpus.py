"""`python -m encoder`: a folder of .txt files to an .npz of token ids and back.

Run: python3 -m pytest -q tests/test_corpus.py
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from encoder import get_encoder
from encoder.__main__ import main
from encoder.corpus import TextFile, gather_chunks

REPO = Path(__file__).resolve().parents[1]
EOT = '<|endoftext|>'
FILES = {'b/2.txt': '吾輩は猫である。\n名前はまだ無い。', 'a.txt': 'すもももももも 😀\r\n',
         'b/1.txt': '', 'c/d/3.txt': '2020年8月20日に1,980円', 'notes.md': 'not a .txt file'}
IN_ORDER = ['a.txt', 'b/1.txt', 'b/2.txt', 'c/d/3.txt']  # sorted by path


@pytest.fixture(scope='module')
def encoder(vocab_dir):
    return get_encoder(vocab_dir)


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / 'src'
    for name, text in FILES.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text, encoding='utf-8')
    return src


def run(vocab_dir, *args):
    """Run the CLI in this process; its exit code (0 when it returns normally)."""
    try:
        main([*map(str, args), '--vocab', str(vocab_dir), '--quiet'])
    except SystemExit as exc:
        return exc.code
    return 0


def run_cli(vocab_dir, *args):
    """Run the CLI as a user does, through run_main: (exit code, stderr)."""
    result = subprocess.run([sys.executable, '-m', 'encoder', *map(str, args), '--vocab',
                             str(vocab_dir), '--quiet'], cwd=REPO, capture_output=True,
                            text=True)
    return result.returncode, result.stderr


def arrays_of(npz_file):
    with np.load(npz_file) as npz:
        assert npz.files == [f'arr_{i}' for i in range(len(npz.files))]
        return [npz[name] for name in npz.files]


def test_chunks_close_once_they_reach_combine_characters():
    texts = ['a' * 10, 'b' * 5, 'c' * 100, 'd']
    chunks = list(gather_chunks([TextFile.of(text) for text in texts], combine=30))
    assert [c.data.decode() for c in chunks] == ['a' * 10 + EOT + 'b' * 5 + EOT, 'c' * 100 + EOT, 'd' + EOT]
    assert [c.files for c in chunks] == [2, 1, 1]
    assert [c.characters for c in chunks] == [len(c.data.decode()) for c in chunks]


def test_folder_is_encoded_in_path_order_with_end_of_text_after_each_file(
        corpus, tmp_path, vocab_dir, encoder):
    assert run(vocab_dir, '--src_dir', corpus, '--dst_file', tmp_path / 'out', '--combine', 1) == 0
    arrays = arrays_of(tmp_path / 'out.npz')  # '.npz' appended, as np.savez does
    assert [a.dtype for a in arrays] == [np.uint16] * 4  # combine 1: one file a chunk
    for array, name in zip(arrays, IN_ORDER):
        assert array.tolist() == encoder.encode(FILES[name] + EOT)


def test_one_chunk_when_combine_is_large(corpus, tmp_path, vocab_dir, encoder):
    assert run(vocab_dir, '--src_dir', corpus, '--dst_file', tmp_path / 'out.npz',
               '--clean_text') == 0
    [array] = arrays_of(tmp_path / 'out.npz')
    text = ''.join(FILES[name] + EOT for name in IN_ORDER)
    assert array.tolist() == encoder.encode(text, clean=True)


def test_output_does_not_depend_on_the_number_of_processes(tmp_path, vocab_dir, shared_dir):
    src = shared_dir / 'corpus' / 'aozora'
    for processes in (1, 2):
        assert run(vocab_dir, '--src_dir', src, '--dst_file', tmp_path / f'{processes}.npz',
                   '--combine', 20000, '--num_process', processes) == 0
    assert (tmp_path / '1.npz').read_bytes() == (tmp_path / '2.npz').read_bytes()
    assert len(arrays_of(tmp_path / '1.npz')) > 2


def test_readers_of_the_original_int64_arrays_still_work(corpus, tmp_path, vocab_dir, encoder):
    assert run(vocab_dir, '--src_dir', corpus, '--dst_file', tmp_path / 'out', '--combine', 1) == 0
    arrays = arrays_of(tmp_path / 'out.npz')
    as_int64 = [np.load(tmp_path / 'out.npz')[f'arr_{i}'].astype(np.int64) for i in range(4)]
    assert [a.tolist() for a in as_int64] == [a.tolist() for a in arrays]
    # As the fine-tuner does: concatenate the chunks, cut windows, stack a batch.
    tokens = np.concatenate(arrays)
    assert np.concatenate([tokens, np.array([encoder.eot_id])]).dtype == np.int64
    batch = np.stack([tokens[i:i + 5] for i in (0, 3)]).astype(np.int32)
    assert batch.shape == (2, 5) and batch.tolist()[0] == tokens[:5].tolist()
    assert (tokens.astype(np.int64) - 20000).min() < 0  # the cast keeps differences right
    assert encoder.decode(tokens.tolist()) == encoder.decode(np.concatenate(as_int64).tolist())


def test_decode_prints_the_text_back(corpus, tmp_path, vocab_dir, encoder, capsys):
    assert run(vocab_dir, '--src_dir', corpus, '--dst_file', tmp_path / 'out', '--combine', 1) == 0
    capsys.readouterr()
    assert run(vocab_dir, '--decode', tmp_path / 'out.npz') == 0
    expected = ''.join(encoder.decode(encoder.encode(FILES[n] + EOT)) for n in IN_ORDER)
    assert capsys.readouterr().out == expected


def test_file_not_utf8_stops_before_anything_is_written(corpus, tmp_path, vocab_dir):
    (corpus / 'b' / 'latin1.txt').write_bytes('café'.encode('latin-1'))
    dst = tmp_path / 'out.npz'
    dst.write_bytes(b'previous contents')
    code, stderr = run_cli(vocab_dir, '--src_dir', corpus, '--dst_file', dst)
    assert code == 2
    assert 'latin1.txt is not UTF-8' in stderr and len(stderr.strip().splitlines()) == 1
    assert dst.read_bytes() == b'previous contents'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out.npz', 'src']  # no temp file


def test_file_not_utf8_is_skipped_on_request(corpus, tmp_path, vocab_dir, encoder, capsys):
    (corpus / 'b' / 'latin1.txt').write_bytes('café'.encode('latin-1'))
    assert run(vocab_dir, '--src_dir', corpus, '--dst_file', tmp_path / 'out', '--combine', 1,
               '--on_bad_file', 'skip') == 0
    assert 'skipping' in capsys.readouterr().err
    assert len(arrays_of(tmp_path / 'out.npz')) == 4


@pytest.mark.parametrize('make_src, message', [
    (lambda tmp: tmp / 'missing', 'no such folder'),
    (lambda tmp: tmp, 'no .txt files'),
])
def test_missing_or_empty_folder_is_a_one_line_error(tmp_path, vocab_dir, make_src, message):
    (tmp_path / 'readme.md').write_text('no text files here')
    code, stderr = run_cli(vocab_dir, '--src_dir', make_src(tmp_path), '--dst_file',
                           tmp_path / 'out')
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1


def test_unwritable_destination_is_a_one_line_error(corpus, tmp_path, vocab_dir):
    code, stderr = run_cli(vocab_dir, '--src_dir', corpus, '--dst_file',
                           tmp_path / 'no' / 'such' / 'folder' / 'out')
    assert code == 2 and 'cannot write' in stderr and len(stderr.strip().splitlines()) == 1


def test_cli_does_not_import_tensorflow(corpus, tmp_path, vocab_dir):
    code = (f'import sys; from encoder.__main__ import main; '
            f'main(["--src_dir", {str(corpus)!r}, "--dst_file", {str(tmp_path / "o")!r}, '
            f'"--vocab", {str(vocab_dir)!r}, "--quiet", "--num_process", "2"]); '
            f'print(sorted(m for m in sys.modules if m.startswith("tensorflow")))')
    result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == '[]'
