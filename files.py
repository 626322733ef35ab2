"""Output files that appear whole or not at all: written through a temporary beside the
target and renamed over it only when complete, so readers (and a crash) see the old file or
the new one, never half. Plain files; no command-line concerns.

    with atomic_output(path) as f: ...        # any file, binary by default
    write_text_atomic(path, text)             # a small text file
    save_npy_rows(path, rows)                 # an [n, width] .npy matrix from rows as they come
"""
import contextlib
import glob
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def atomic_output(path, mode='wb', **open_kwargs):
    """A file to write `path` through: a temporary beside it, renamed over `path` only when the
    block completes, so readers (and a crash) see the old file or the whole new one, never
    half. On an exception the temporary is removed and `path` is untouched. The file gets the
    permissions a plain open() would have given it (mkstemp makes temporaries private)."""
    path = Path(path)
    remove_stale_temporaries(path)
    # The writer's pid in the name tells a later writer whether this temporary is still live.
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
