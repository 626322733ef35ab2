"""Encoding a folder of .txt files into an .npz of token ids, and decoding one back to text.

Used by `python -m encoder` (encoder/__main__.py); the .npz format itself (writing, and the
checked reader that fine-tuning uses too) is encoder/npz.py. The output matches the original
gpt2-japanese `encode_bpe.py`: every file's text followed by `<|endoftext|>`, gathered
file after file into a chunk until the chunk holds at least `combine` characters (the
end-of-text tags counted), each chunk one array `arr_0`, `arr_1`, ... in file order.
Only the last chunk may be shorter. Unlike the original, the order does not depend on
the number of processes, the last chunk is cleaned like the others with --clean_text,
and no chunk is written twice.

Ids are stored as uint16 (all ids are below 65,536), a quarter of the original's int64.
Readers that expect int64 work unchanged for loading, slicing, concatenating and feeding
a model; cast with `.astype(np.int64)` before arithmetic that may leave 0..65535.
"""
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cli import UsageError
from encoder.bpe import END_OF_TEXT, get_encoder
from encoder.npz import read_token_arrays, write_npz

ID_DTYPE = np.uint16
# Chunks a worker takes at a time: taking them one at a time, the workers wait on the pool's
# hand-offs (figures: report/encoder.md).
CHUNKS_PER_TASK = 4


@dataclass
class TextFile:
    """One file's UTF-8 bytes, checked to decode, and its length in characters.

    The bytes, not the decoded text, travel to the worker processes: pickling a str would
    re-encode it to UTF-8 in the parent, which already reads the corpus and writes the .npz."""
    data: bytes
    characters: int

    @classmethod
    def of(cls, text):
        return cls(text.encode('utf-8'), len(text))


EOT_FILE = TextFile.of(END_OF_TEXT)


@dataclass
class Chunk:
    """Whole files, each followed by `<|endoftext|>`, to be encoded as one array."""
    data: bytes  # UTF-8
    characters: int
    files: int


@dataclass
class Totals:
    files: int = 0
    characters: int = 0
    tokens: int = 0
    skipped: int = 0


def npz_path(dst_file):
    """`dst_file` with `.npz` appended if absent, as np.savez names its output."""
    path = Path(dst_file)
    return path if path.name.endswith('.npz') else path.with_name(path.name + '.npz')


def find_text_files(src_dir, on_bad_file='stop'):
    """Every .txt file under `src_dir`, recursively, sorted by path. A folder that cannot be
    read stops everything, or is skipped with a warning (`on_bad_file='skip'`)."""
    src = Path(src_dir)
    if not src.is_dir():
        raise UsageError(f'--src_dir {src_dir}: no such folder')

    def unreadable(exc):
        if on_bad_file == 'stop':
            raise UsageError(f'cannot read the folder {exc.filename}: {exc.strerror}; nothing was '
                             f'written (--on_bad_file skip leaves it out)')
        print(f'skipping the folder {exc.filename}: {exc.strerror}', file=sys.stderr)

    files = sorted(Path(folder) / name for folder, _, names in os.walk(src, onerror=unreadable)
                   for name in names if name.endswith('.txt') and (Path(folder) / name).is_file())
    if not files:
        raise UsageError(f'--src_dir {src_dir}: no .txt files in it')
    return files


def read_text_files(files, on_bad_file, totals):
    """A TextFile for each file; a file that is not UTF-8 stops everything or is skipped."""
    for path in files:
        try:
            data = path.read_bytes()
            yield TextFile(data, len(data.decode('utf-8')))
        except UnicodeDecodeError as exc:
            if on_bad_file == 'stop':
                raise UsageError(f'{path} is not UTF-8 ({exc.reason} at byte {exc.start}); '
                                 'nothing was written (--on_bad_file skip leaves it out)')
            print(f'skipping {path}: not UTF-8', file=sys.stderr)
            totals.skipped += 1
        except OSError as exc:
            raise UsageError(f'cannot read {path}: {exc.strerror}') from None


def gather_chunks(text_files, combine):
    """Chunks of whole TextFiles, each followed by `<|endoftext|>`: a chunk is closed as
    soon as it holds at least `combine` characters; the last one may hold fewer."""
    parts, length = [], 0
    for text_file in text_files:
        parts += [text_file.data, EOT_FILE.data]
        length += text_file.characters + EOT_FILE.characters
        if length >= combine:
            yield Chunk(b''.join(parts), length, len(parts) // 2)
            parts, length = [], 0
    if parts:
        yield Chunk(b''.join(parts), length, len(parts) // 2)


_worker_encoder = None


def _start_worker(vocab_dir):
    global _worker_encoder
    _worker_encoder = get_encoder(vocab_dir)


def _start_pool_worker(vocab_dir):
    # The pool ends its workers with SIGTERM: they need no clean-up of their own (the parent
    # removes the temporary output), and the parent's handler would print tracebacks here.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _start_worker(vocab_dir)


def _encode_chunk(data_and_clean):
    data, clean = data_and_clean
    return np.array(_worker_encoder.encode(data.decode('utf-8'), clean=clean), dtype=ID_DTYPE)


def encode_in_order(chunks, *, vocab_dir, clean, num_process):
    """(chunk, ids) for each chunk, in order, encoded by `num_process` processes.

    At most 2 x CHUNKS_PER_TASK chunks per process are read ahead, so memory is bounded by
    the chunk size and the number of processes, not by the size of the corpus.
    """
    if num_process == 1:
        _start_worker(vocab_dir)
        for chunk in chunks:
            yield chunk, _encode_chunk((chunk.data, clean))
        return
    slots = threading.Semaphore(2 * num_process * CHUNKS_PER_TASK)
    pending = []  # the chunks handed to the pool, oldest first

    def tasks():
        for chunk in chunks:
            slots.acquire()
            pending.append(chunk)
            yield chunk.data, clean

    with multiprocessing.Pool(num_process, _start_pool_worker, (vocab_dir,)) as pool:
        for ids in pool.imap(_encode_chunk, tasks(), chunksize=CHUNKS_PER_TASK):
            slots.release()
            yield pending.pop(0), ids


def encode_folder(src_dir, dst_file, *, vocab_dir, combine=50000, clean=False,
                  num_process=1, on_bad_file='stop', progress=True):
    """Encode every .txt under `src_dir` into `dst_file` (.npz); returns the Totals."""
    files = find_text_files(src_dir, on_bad_file)
    dst = npz_path(dst_file)
    totals = Totals()
    texts = read_text_files(files, on_bad_file, totals)
    chunks = gather_chunks(texts, combine)

    def arrays():
        # The bar starts with the first chunk, after the destination proved writable.
        with tqdm(total=len(files), unit='file', file=sys.stderr, disable=not progress) as bar:
            for chunk, ids in encode_in_order(chunks, vocab_dir=vocab_dir, clean=clean,
                                              num_process=num_process):
                totals.files += chunk.files
                totals.characters += chunk.characters
                totals.tokens += len(ids)
                bar.update(chunk.files)
                bar.set_postfix(characters=totals.characters, refresh=False)
                yield ids

    write_npz(dst, arrays())
    return totals


def decode_npz(npz_file, encoder, out):
    """Write the text of each array of `npz_file`, in order, to `out`."""
    for number, array in enumerate(read_token_arrays(npz_file)):
        if array.size and (array.min() < 0 or array.max() >= len(encoder)):
            raise UsageError(f'{npz_file}: array {number} holds ids outside the vocabulary '
                             f'(0..{len(encoder) - 1})')
        out.write(encoder.decode(array.tolist()))


def summary_line(totals, seconds, dst):
    skipped = f', {totals.skipped} skipped (not UTF-8)' if totals.skipped else ''
    return (f'{totals.files} files{skipped}, {totals.characters:,} characters, '
            f'{totals.tokens:,} tokens in {seconds:.1f} s -> {dst}')


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    return function(*args, **kwargs), time.perf_counter() - start
