"""The .npz of token ids: written by `python -m encoder`, read by fine-tuning and `--decode`.

An .npz is a zip archive of .npy arrays. The one reader here, `read_token_arrays`, gives the
arrays in one order (arr_0, arr_1, ... by number, as np.savez names them; arrays with other
names after those, in file order), each a 1-D integer array, memory-mapped where the archive
stores it uncompressed, so a corpus larger than memory trains. Before anything is used, every
member's CRC is checked (a damaged file is refused rather than trained on) and every array
must be 1-D integers; each problem is one line (`TokenArrayError`, a usage error).
"""
import re
import zipfile
from pathlib import Path

import numpy as np

from cli import UsageError
from files import atomic_output

ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
_ARRAY_NUMBER = re.compile(r'arr_(\d+)\.npy')


class TokenArrayError(UsageError):
    """A file that does not hold token arrays; the message names the file and says why."""


def write_npz(dst, arrays):
    """Write `arrays` as arr_0, arr_1, ... of an .npz (as np.savez) one at a time, through a
    temporary file beside `dst` that replaces it only once complete."""
    dst = Path(dst)
    if dst.is_dir():
        raise UsageError(f'--dst_file {dst} is a folder')
    try:
        with atomic_output(dst) as tmp, zipfile.ZipFile(tmp, 'w', zipfile.ZIP_STORED) as npz:
            for index, array in enumerate(arrays):
                # A fixed time stamp, so the same corpus always gives the same bytes.
                member = zipfile.ZipInfo(f'arr_{index}.npy', date_time=ZIP_DATE_TIME)
                with npz.open(member, 'w', force_zip64=True) as f:
                    np.lib.format.write_array(f, array, allow_pickle=False)
    except OSError as exc:
        raise UsageError(f'cannot write {dst}: {exc.strerror or exc}') from None


def _member_order(infos):
    """arr_N members by N, then the others in file order."""
    def key(position_info):
        position, info = position_info
        match = _ARRAY_NUMBER.fullmatch(info.filename)
        return (0, int(match.group(1))) if match else (1, position)
    return [info for _, info in sorted(enumerate(infos), key=key)]


def _read_header(stream):
    """(shape, fortran_order, dtype) of the .npy at the stream's position."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(stream)
    return np.lib.format.read_array_header_3_0(stream)  # version check of its own: ValueError


def _data_offset(path, info):
    """Where a stored (uncompressed) member's .npy starts in the file."""
    with open(path, 'rb') as f:
        # The local file header: 30 fixed bytes, then the name and an extra field whose
        # lengths (at offsets 26 and 28) may differ from the central directory's copy.
        f.seek(info.header_offset)
        header = f.read(30)
        return (info.header_offset + 30 + int.from_bytes(header[26:28], 'little')
                + int.from_bytes(header[28:30], 'little'))


def _read_member(path, archive, info):
    """One member as a 1-D integer array (memory-mapped where stored uncompressed)."""
    name = info.filename[:-len('.npy')]
    with archive.open(info) as stream:
        shape, fortran_order, dtype = _read_header(stream)
    if dtype.hasobject:
        raise TokenArrayError(f'{path}: {name} holds Python objects (pickled data), not token ids')
    if not np.issubdtype(dtype, np.integer):
        raise TokenArrayError(f'{path}: {name} holds {dtype} values, not token ids (integers)')
    if len(shape) != 1:
        dims = 'x'.join(map(str, shape)) or 'a single value'
        raise TokenArrayError(f'{path}: {name} is a {len(shape)}-D array ({dims}); token arrays '
                              f'are 1-D, one id after the other, as python -m encoder writes them')
    if info.compress_type != zipfile.ZIP_STORED:
        with archive.open(info) as stream:
            return np.lib.format.read_array(stream, allow_pickle=False)
    with open(path, 'rb') as f:
        f.seek(_data_offset(path, info))
        _read_header(f)
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode='r', offset=offset, shape=shape,
                     order='F' if fortran_order else 'C')


def read_token_arrays(path):
    """The token arrays of the .npz at `path`, checked, in order (see the module's docstring)."""
    path = Path(path)
    if not path.exists():
        raise TokenArrayError(f'{path} does not exist; make one with python -m encoder')
    if path.is_dir():
        raise TokenArrayError(f'{path} is a directory, not an .npz file')
    try:
        with open(path, 'rb') as f:
            magic = f.read(6)
        if magic == b'\x93NUMPY':
            raise TokenArrayError(f'{path} is a single .npy array, not an .npz archive of token '
                                  f'arrays; save it with np.savez or make it with python -m encoder')
        with zipfile.ZipFile(path) as archive:
            members = _member_order([i for i in archive.infolist() if i.filename.endswith('.npy')])
            if not members:
                raise TokenArrayError(f'{path} holds no arrays')
            damaged = archive.testzip()
            if damaged is not None:
                raise TokenArrayError(f'{path} is damaged: the data of {damaged[:-len(".npy")]} '
                                      f'does not match its checksum; make the file again')
            return [_read_member(path, archive, info) for info in members]
    except zipfile.BadZipFile as exc:
        raise TokenArrayError(f'{path} is not an .npz (zip) archive ({exc}); make one with '
                              f'python -m encoder') from None
    except (OSError, ValueError, EOFError) as exc:
        raise TokenArrayError(f'cannot read {path} as an .npz of token ids: '
                              f'{getattr(exc, "strerror", None) or exc}') from None
