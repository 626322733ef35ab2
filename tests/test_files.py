"""Output files appear whole or not at all, with the permissions a plain open() gives."""
import os

import pytest

from files import atomic_output, write_text_atomic


def test_a_written_file_has_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / 'out.txt', 'あ')
    finally:
        os.umask(old)
    assert (tmp_path / 'out.txt').read_text(encoding='utf-8') == 'あ'
    assert (tmp_path / 'out.txt').stat().st_mode & 0o777 == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / 'out.bin'
    target.write_bytes(b'old')
    with pytest.raises(RuntimeError):
        with atomic_output(target) as f:
            f.write(b'half')
            raise RuntimeError('interrupted')
    assert target.read_bytes() == b'old'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out.bin']
