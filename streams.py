"""Streams for the batch scripts: text read one line at a time, lazily, from a file or stdin
with line-numbered errors; progress on stderr; output files that appear complete or not at all
(`atomic_output`), such as a matrix written row by row as `.npy`.

Lines are split as Python's text mode splits them (\\n, \\r\\n or \\r), so scripts see the same
lines as the original's `for line in open(file)`. Bytes that are not UTF-8 are a one-line
UsageError naming the line (`errors='strict'`) or become U+FFFD (`errors='replace'`).
"""
import contextlib
import glob
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from cli import UsageError

STDIN = '-'
ERROR_MODES = ('strict', 'replace')
_LINE_BREAK = re.compile('\r\n|\r|\n')
UTF8_BOM = b'\xef\xbb\xbf'
DEFAULT_BATCH_SIZE = 32  # scoring.DEFAULT_BATCH_SIZE; here so that flags need no TensorFlow
# More lines than fit on a screen: only then is a progress bar worth showing.
SCREENFUL = 50


def add_batch_flags(parser, *, unit):
    """--batch_size and --errors, the flags of every script that runs a file of texts."""
    parser.add_argument('--batch_size', type=int, default=DEFAULT_BATCH_SIZE,
                        help=f'{unit} per batch; long {unit} go in smaller batches')
    parser.add_argument('--errors', choices=ERROR_MODES, default='strict',
                        help='input that is not UTF-8: strict stops with the line number; '
                             'replace reads bad bytes as U+FFFD')


def check_batch_flags(args):
    if args.batch_size < 1:
        raise UsageError(f'--batch_size must be at least 1, not {args.batch_size}')


def read_ahead_for(path):
    """Texts to read before the first batch runs: one at a time when a person is typing
    into stdin (each answer comes back at once), else the batching default."""
    return 1 if path == STDIN and sys.stdin.isatty() else None


def input_name(path):
    return 'stdin' if path == STDIN else path


@contextlib.contextmanager
def open_binary(path):
    """The byte stream of `path`, or of stdin for '-'; unreadable files are UsageErrors."""
    if path == STDIN:
        yield sys.stdin.buffer
        return
    try:
        stream = open(path, 'rb')
    except IsADirectoryError:
        raise UsageError(f'{path} is a directory, not a text file') from None
    except OSError as exc:
        raise UsageError(f'cannot read {path}: {exc.strerror or exc}') from None
    with stream:
        yield stream


def decode_line(data, line_number, *, name, errors='strict'):
    try:
        return data.decode('utf-8', errors=errors)
    except UnicodeDecodeError as exc:
        raise UsageError(f'{name}: line {line_number} is not UTF-8 (byte 0x{data[exc.start]:02x} at '
                         f'byte {exc.start + 1}); convert the file to UTF-8 or pass --errors replace') from None


def read_lines(stream, *, name, errors='strict'):
    """Yield the lines of a byte stream as str, without their line breaks, as they arrive.
    A UTF-8 byte-order mark at the very start is not text and is dropped."""
    number = 0
    try:
        for data in stream:
            number += 1
            if number == 1:
                data = data.removeprefix(UTF8_BOM)
            text = decode_line(data, number, name=name, errors=errors)
            text = text[:-2] if text.endswith('\r\n') else text[:-1] if text[-1:] in '\r\n' else text
            # A lone '\r' inside is a line break too (text mode's universal newlines).
            yield from _LINE_BREAK.split(text)
    except OSError as exc:
        raise UsageError(f'cannot read {name}: {exc.strerror or exc}') from None


def count_lines(path):
    """Number of lines in a regular file (None for stdin, no path, or an unreadable file)."""
    if path is None or path == STDIN:
        return None
    try:
        with open(path, 'rb') as stream:
            count, last = 0, b''
            while chunk := stream.read(1 << 20):
                count += chunk.count(b'\n')
                last = chunk
            return count + (1 if last and not last.endswith(b'\n') else 0)
    except OSError:
        return None


def progress_bar(path, *, unit='line'):
    """A tqdm bar on stderr over the lines of `path`, shown only when `path` is a file with more
    than a screenful of lines and stderr is a terminal (progress lines would litter a log)."""
    from tqdm import tqdm
    total = count_lines(path)
    show = total is not None and total > SCREENFUL and sys.stderr.isatty()
    return tqdm(total=total, unit=unit, file=sys.stderr, disable=not show, dynamic_ncols=True)


def check_output_path(path, *, overwrite=False):
    """Refuse before any work starts what would fail or destroy data at the end."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f'--output {path} is a directory; give a file name such as vectors.npy')
    if not path.parent.is_dir():
        raise UsageError(f'--output {path}: the directory {path.parent} does not exist')
    if path.exists() and not overwrite:
        raise UsageError(f'--output {path} exists; pass --overwrite to replace it')


@contextlib.contextmanager
def atomic_output(path, mode='wb', **open_kwargs):
    """A file to write `path` through: a temporary beside it, renamed over `path` only when the
    block completes, so readers (and a crash) see the old file or the whole new one, never
    half. On an exception the temporary is removed and `path` is untouched. The file gets the
    permissions a plain open() would have given it (mkstemp makes temporaries private)."""
    path = Path(path)
    remove_stale_temporaries(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f'.tmp-{path.name}-{os.getpid()}-')
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o666 & ~current_umask())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def remove_stale_temporaries(path):
    """Remove the temporaries of `path` that killed writers left (their process is gone)."""
    for temp in Path(path).parent.glob(f'.tmp-{glob.escape(Path(path).name)}-*-*'):
        pid = temp.name[len(f'.tmp-{Path(path).name}-'):].split('-', 1)[0]
        if pid.isdigit() and not _process_exists(int(pid)):
            temp.unlink(missing_ok=True)


def _process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # alive, another user's
    return True


def write_text_atomic(path, text):
    """Replace `path` with `text` (UTF-8) through `atomic_output`."""
    with atomic_output(path, 'w', encoding='utf-8') as f:
        f.write(text)


def current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def save_npy_rows(path, rows, *, dtype=np.float32):
    """Write `rows` (equal-length vectors, an iterable consumed lazily) as an [n, width] `.npy`
    matrix. Rows go to a scratch file first, since the header needs n; the matrix is then
    written through `atomic_output`, so `path` is complete or untouched. Returns n (0 writes
    nothing)."""
    path = Path(path)
    dtype = np.dtype(dtype).newbyteorder('<')
    count, width = 0, None
    with tempfile.TemporaryFile(dir=path.parent) as raw:
        for row in rows:
            row = np.asarray(row, dtype).ravel()
            if width is not None and row.size != width:
                raise ValueError(f'row {count} has {row.size} values, not {width}')
            width = row.size
            raw.write(row.tobytes())
            count += 1
        if count:
            raw.seek(0)
            with atomic_output(path) as out:
                np.lib.format.write_array_header_1_0(out, {
                    'descr': np.lib.format.dtype_to_descr(dtype), 'fortran_order': False,
                    'shape': (count, width)})
                shutil.copyfileobj(raw, out, 1 << 20)
    return count
