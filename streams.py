"""The batch scripts' input and its flags: text read one line at a time, lazily, from a file
or stdin with line-numbered errors; progress on stderr; --batch_size and --errors. (Checking
an output path before any work: cli.check_output_file; writing output files: files.py.)

Lines are split as Python's text mode splits them (\\n, \\r\\n or \\r), so scripts see the same
lines as the original's `for line in open(file)`. Bytes that are not UTF-8 are a one-line
UsageError naming the line (`errors='strict'`) or become U+FFFD (`errors='replace'`).
"""
import contextlib
import re
import sys

from cli import UsageError

STDIN = '-'
ERROR_MODES = ('strict', 'replace')
_LINE_BREAK = re.compile('\r\n|\r|\n')
UTF8_BOM = b'\xef\xbb\xbf'
# The default --batch_size, also scoring's default; defined here, not in scoring.py, so that
# parsing the flags needs no TensorFlow.
DEFAULT_BATCH_SIZE = 32
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

