"""Running a piece of a test without root's privileges: tests run as root, who may read and
write anything, so permission faults are checked in a forked child that becomes nobody."""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

import cli

NOBODY = 65534


def in_child_as_nobody(function):
    """Run `function()` in a forked child with the uid and gid of nobody; returns the text of
    the UsageError it raised ('' if none). Skips unless the tests run as root."""
    if os.getuid() != 0:
        pytest.skip('needs root, to drop privileges to nobody')
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        message = ''
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            function()
        except cli.UsageError as exc:
            message = str(exc)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            message = f'UNEXPECTED {type(exc).__name__}: {exc}'
        os.write(write, message.encode('utf-8', 'replace'))
        os._exit(0)
    os.close(write)
    with os.fdopen(read, 'rb') as pipe:
        message = pipe.read().decode('utf-8')
    os.waitpid(pid, 0)
    return message


@contextlib.contextmanager
def public_temp_dir():
    """A temporary folder that nobody may enter (pytest's own are private to root)."""
    path = Path(tempfile.mkdtemp(prefix='gpt2ja-test-'))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
