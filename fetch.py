"""Fetching the released gpt2ja models and their vocabulary into a local cache.

    from fetch import locate_model
    directory = locate_model('gpt2ja-small', verify=check)   # fetched on first use only

`locate_model` is where every `--model` / `--base_model` value is resolved: an existing
directory is used as it is; a released name (gpt2ja-small, gpt2ja-medium) is looked up in
the cache and fetched there when absent; a local `.tar.bz2` is unpacked into the cache once.

The cache is `$GPT2JA_HOME` (default `$XDG_CACHE_HOME/gpt2ja`, i.e. ~/.cache/gpt2ja):
    NAME/        a complete model directory of a released model, its vocabulary included
    vocab/       ja-bpe.txt and emoji.json, checked against their SHA-256 pins
    local/       models unpacked from local archives
A directory or vocabulary file there appears only complete: downloads go to a `.part` file
beside the destination (resumed with an HTTP Range request by a later run), archives are
unpacked into a `.tmp-*` directory, checked by the caller's `verify` (the model loader) and
moved into place with one rename, all under a lock per name, so that a second process
waits for the first and then uses its copy, and Ctrl-C leaves nothing a later run takes
for complete.

Sources: the original project's addresses (below), or `$GPT2JA_MIRROR` (a URL, `file:` too)
serving NAME.tar.bz2, ja-bpe.txt and emoji.json. `$GPT2JA_OFFLINE=1` turns fetching off.
"""
import contextlib
import dataclasses
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Callable, Mapping, Tuple

from cli import UsageError

# http.client, urllib.request and tarfile are imported where a fetch or an unpacking needs
# them: every script imports this module, and most runs find their model in place.

try:
    import fcntl
except ImportError:  # Windows: fetching works, but two processes must not fetch at once
    fcntl = None

# The names of model.RELEASED, written here because this module runs without TensorFlow.
RELEASED_MODELS = ('gpt2ja-small', 'gpt2ja-medium')
# The original project's addresses: the primary, then the spare.
MODEL_URLS = ('https://www.nama.ne.jp/models/{name}.tar.bz2',
              'http://ailab.nama.ne.jp/models/{name}.tar.bz2')
VOCAB_URLS = ('https://raw.githubusercontent.com/tanreinama/gpt2-japanese/master/{name}',)
# The vocabulary every released model was trained with; any other bytes give other ids.
VOCAB_SHA256 = {
    'ja-bpe.txt': '89d4732745dfb91282ca4202f8b64c0fc25f090399030ca246e8866ffcc3c9e4',
    'emoji.json': '9f317e0456bf67a5d6b07b306a44def1ab166dfcc83b79b335b26217be0a6169',
}
ARCHIVE_SUFFIXES = ('.tar.bz2', '.tbz2', '.tar.gz', '.tgz', '.tar.xz', '.txz', '.tar')

HOME_ENV = 'GPT2JA_HOME'
MIRROR_ENV = 'GPT2JA_MIRROR'
OFFLINE_ENV = 'GPT2JA_OFFLINE'
VOCAB_SUBDIR = 'vocab'
LOCAL_SUBDIR = 'local'
LOCK_SUBDIR = '.locks'
FETCH_COMMAND = 'python3 gpt2-fetch.py'

CHUNK_BYTES = 1 << 20
# Unpacking needs the archive and the unpacked files on disk at once; the released
# archives hold float32 weights, which bzip2 hardly shrinks.
ARCHIVE_SPACE_FACTOR = 2


class FetchError(UsageError):
    """A model or vocabulary that cannot be fetched; the message says why and what to do."""


class _Retry(Exception):
    """A failure worth trying the same address again for (connection lost, 5xx, timeout)."""


class _NextAddress(Exception):
    """A failure that trying the same address again cannot fix (404, 403, ...)."""


def _default_home():
    cache = os.environ.get('XDG_CACHE_HOME') or os.path.join('~', '.cache')
    return Path(cache).expanduser() / 'gpt2ja'


def _is_true(value):
    return (value or '').strip().lower() in ('1', 'true', 'yes', 'on')


@dataclasses.dataclass(frozen=True)
class Settings:
    """Where the cache is, where files come from, and how hard to try."""
    home: Path
    model_urls: Tuple[str, ...] = MODEL_URLS  # templates with {name}, tried in order
    vocab_urls: Tuple[str, ...] = VOCAB_URLS
    offline: bool = False
    vocab_sha256: Mapping[str, str] = None  # None: VOCAB_SHA256
    attempts: int = 3  # per address, before the next address
    backoff: float = 1.0  # seconds before the 2nd attempt, doubled for each further one
    timeout: float = 30.0  # seconds a connection may stay silent
    sleep: Callable[[float], None] = time.sleep

    @classmethod
    def from_env(cls, environ=None):
        environ = os.environ if environ is None else environ
        home = Path(environ[HOME_ENV]).expanduser() if environ.get(HOME_ENV) else _default_home()
        mirror = (environ.get(MIRROR_ENV) or '').strip().rstrip('/')
        if mirror and '://' not in mirror:  # a folder holding the files
            mirror = Path(mirror).expanduser().resolve().as_uri()
        urls = {}
        if mirror:
            urls = dict(model_urls=(mirror + '/{name}.tar.bz2',), vocab_urls=(mirror + '/{name}',))
        return cls(home=home, offline=_is_true(environ.get(OFFLINE_ENV)), **urls)

    @property
    def pins(self):
        return VOCAB_SHA256 if self.vocab_sha256 is None else self.vocab_sha256


def is_released(name):
    return str(name) in RELEASED_MODELS


def archive_stem(path):
    """`gpt2ja-small` for `.../gpt2ja-small.tar.bz2`; None when the name is not an archive's."""
    name = Path(path).name
    for suffix in ARCHIVE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)]
    return None


# ---------------------------------------------------------------- resolving --model

def locate_model(spec, *, verify, settings=None):
    """The model directory that a `--model` value names.

    spec: a directory (used as is), a released name with no such directory here (the cached
    copy, fetched on first use), or an archive file (unpacked into the cache once).
    verify(directory): raises when `directory` is not a loadable model; it runs before
    anything fetched or unpacked is moved into place. Anything else is returned unchanged
    for the loader to report.
    """
    path = Path(spec)
    if path.is_dir():
        return path
    if path.is_file():
        return unpack_local_archive(path, verify=verify, settings=settings)
    if is_released(spec):
        return fetch_model(str(spec), verify=verify, settings=settings)
    return path


def cached_model_path(name, settings=None):
    """Where the released model `name` is (or would be) in the cache."""
    return (settings or Settings.from_env()).home / name


def fetch_model(name, *, verify, settings=None):
    """The cached directory of the released model `name`, fetched with its vocabulary when
    absent. Raises FetchError (offline, unreachable, refused by `verify`)."""
    settings = settings or Settings.from_env()
    if not is_released(name):
        raise FetchError(f'{name} is not a released model; the released models are '
                         f'{", ".join(RELEASED_MODELS)}')
    target = settings.home / name
    if target.is_dir():
        return target
    if settings.offline:
        raise FetchError(f'{name} is not in {settings.home} and ${OFFLINE_ENV} is set, so it '
                         f'is not fetched: unset it, or fetch it where there is internet '
                         f'(`{FETCH_COMMAND} {name}`) and copy it to {target}, or pass --model DIR')
    with _cache_errors(settings.home), _locked(settings.home, name):
        if target.is_dir():  # fetched by another process while this one waited
            return target
        _clear_leftovers(settings.home, name)
        vocab_dir = fetch_vocab(settings)
        archive = settings.home / f'{name}.tar.bz2'
        if not archive.is_file():  # a complete archive stays only when unpacking was interrupted
            _download([u.format(name=name) for u in settings.model_urls], archive,
                      what=name, show_as=target, settings=settings,
                      space_factor=ARCHIVE_SPACE_FACTOR)
        try:
            install_archive(archive, target, verify=verify, vocab_dir=vocab_dir,
                            pins=settings.pins, what=name)
        except UsageError:
            archive.unlink(missing_ok=True)  # a bad archive must be fetched again, not reused
            raise
        archive.unlink()
    return target


def fetch_vocab(settings=None):
    """The cache's vocabulary directory, the files fetched and checked against their pins
    when absent. Raises FetchError (offline, unreachable, a file that is not the pinned one)."""
    settings = settings or Settings.from_env()
    target = settings.home / VOCAB_SUBDIR
    missing = [name for name in settings.pins if not (target / name).is_file()]
    if not missing:
        return target
    if settings.offline:
        raise FetchError(f'the vocabulary ({", ".join(missing)}) is not in {target} and '
                         f'${OFFLINE_ENV} is set, so it is not fetched: unset it, or fetch it '
                         f'where there is internet (`{FETCH_COMMAND} vocab`) and copy it to '
                         f'{target}, or pass --vocab DIR')
    with _cache_errors(settings.home), _locked(settings.home, VOCAB_SUBDIR):
        for name in missing:
            if not (target / name).is_file():
                _download([u.format(name=name) for u in settings.vocab_urls], target / name,
                          what=f'the vocabulary file {name}', show_as=target / name,
                          settings=settings, sha256=settings.pins[name])
    return target


def unpack_local_archive(archive, *, verify, settings=None):
    """A local model archive, unpacked into the cache the first time and reused after.

    The cache entry is named after the archive and its identity (path, size, time), so a
    replaced archive is unpacked again and two archives of the same name do not collide.
    """
    import tarfile
    settings = settings or Settings.from_env()
    archive = Path(archive).resolve()
    stem = archive_stem(archive)
    try:
        is_archive = stem is not None and tarfile.is_tarfile(archive)
        stat = archive.stat()
    except OSError as exc:
        raise FetchError(f'cannot read {archive}: {exc.strerror or exc}') from None
    if not is_archive:
        raise FetchError(f'{archive} is a file but not a model archive (.tar.bz2, .tar.gz, '
                         f'.tar); --model takes a model directory, a released name or an archive')
    identity = f'{archive}\0{stat.st_size}\0{stat.st_mtime_ns}'.encode('utf-8', 'surrogateescape')
    key = f'{stem}-{hashlib.sha256(identity).hexdigest()[:12]}'
    target = settings.home / LOCAL_SUBDIR / key
    if target.is_dir():
        return target
    with _cache_errors(settings.home), _locked(settings.home, f'{LOCAL_SUBDIR}-{key}'):
        if target.is_dir():
            return target
        _clear_leftovers(target.parent, key)
        print(f'unpacking {archive} into {target}', file=sys.stderr)
        install_archive(archive, target, verify=verify, vocab_dir=None, pins=None, what=stem)
    return target


# ---------------------------------------------------------------- unpacking

def install_archive(archive, target, *, verify, vocab_dir, pins, what):
    """Unpack `archive` beside `target`, add the vocabulary, `verify` it, rename it into place.

    vocab_dir: where to copy ja-bpe.txt and emoji.json from when the archive lacks them
    (None: leave them out). pins: file name -> SHA-256 that vocabulary files the archive
    does hold must match (None: not checked). Nothing is left behind when any step fails.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f'.tmp-{target.name}-', dir=target.parent))
    try:
        extract_safely(archive, scratch, what=what)
        root = model_root(scratch)
        for name, digest in (pins or {}).items():
            if (root / name).is_file() and _sha256(root / name) != digest:
                raise FetchError(f'the archive {archive} holds a {name} that is not the released '
                                 f'vocabulary (SHA-256 differs); nothing was kept')
        if vocab_dir is not None:
            for name in VOCAB_SHA256:
                if not (root / name).exists():
                    shutil.copyfile(Path(vocab_dir) / name, root / name)
        try:
            verify(root)
        except UsageError as exc:
            raise FetchError(f'{what} from {archive} does not load, so nothing was kept: {exc}') from None
        os.rename(root, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def model_root(directory):
    """The folder of an unpacked archive that holds the model: the top, or its one folder."""
    entries = [p for p in Path(directory).iterdir() if not p.name.startswith('._')]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return Path(directory)


def unsafe_member_reason(member):
    """Why extracting `member` could write outside the destination, or None when it cannot."""
    name = member.name
    parts = PurePosixPath(name.replace('\\', '/')).parts
    if name.startswith(('/', '\\')) or (parts and ':' in parts[0]):
        return 'an absolute path'
    if '..' in parts:
        return 'a ".." path'
    if member.issym() or member.islnk():
        link = member.linkname.replace('\\', '/')
        base = PurePosixPath(name).parent if member.issym() else PurePosixPath('.')
        if link.startswith('/') or not _stays_inside(base / link):
            return f'a link leading outside ({member.linkname})'
    elif not (member.isfile() or member.isdir()):
        return 'a device or other special file'
    return None


def _resolves_outside(member, destination):
    """Why `member` would land outside `destination` through links already unpacked there
    (a chain of links can leave where each link alone stays inside), or None."""
    root = os.path.realpath(destination)
    paths = [member.name]
    if member.issym():
        paths.append(os.path.join(os.path.dirname(member.name), member.linkname))
    elif member.islnk():
        paths.append(member.linkname)
    for path in paths:
        full = os.path.realpath(os.path.join(root, path))
        if os.path.commonpath([root, full]) != root:
            return f'a path leading outside through links ({path})'
    return None


def _stays_inside(relative):
    depth = 0
    for part in PurePosixPath(relative).parts:
        depth += -1 if part == '..' else (0 if part == '.' else 1)
        if depth < 0:
            return False
    return True


def extract_safely(archive, destination, *, what):
    """Extract `archive` into `destination`, refusing it at the first member that could
    write outside (absolute paths, `..`, links leading outside, device files).

    Members are checked here whatever this Python's tarfile offers; where it has the 'data'
    extraction filter (3.11.4+, 3.12+), that filter applies as well.
    """
    import tarfile
    from tqdm import tqdm
    extra = {'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}
    filter_errors = getattr(tarfile, 'FilterError', ())  # what the 'data' filter refuses
    try:
        with tarfile.open(archive, 'r:*') as tar, \
                tqdm(desc=f'unpacking {what}', unit='B', unit_scale=True, unit_divisor=1024,
                     file=sys.stderr, disable=None, leave=False) as progress:
            # One pass over the stream: a compressed archive is not read twice.
            for member in tar:
                reason = unsafe_member_reason(member) or _resolves_outside(member, destination)
                if reason is not None:
                    raise FetchError(f'the archive {archive} is refused: its member '
                                     f'{member.name!r} is {reason}; nothing was kept')
                tar.extract(member, destination, **extra)
                progress.update(member.size)
    except filter_errors as exc:
        raise FetchError(f'the archive {archive} is refused: {exc}; nothing was kept') from None
    except (tarfile.TarError, EOFError, OSError, ValueError, KeyError) as exc:
        raise FetchError(f'cannot unpack {archive} (truncated or corrupt?): {exc}; '
                         f'nothing was kept') from None


def _clear_leftovers(directory, name):
    """Remove what an interrupted unpacking of `name` left (only the lock holder may)."""
    for stale in Path(directory).glob(f'.tmp-{name}-*'):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _cache_errors(home):
    """A cache that cannot be written (permissions, a full disk) is one line, not a traceback."""
    try:
        yield
    except OSError as exc:
        where = exc.filename or home
        raise FetchError(f'cannot write {where}: {exc.strerror or exc}; make {home} writable '
                         f'or set ${HOME_ENV} to a folder that is') from None


@contextlib.contextmanager
def _locked(home, name):
    """Hold the cache's lock for `name`; a second process waits here, saying so once."""
    lock_path = Path(home) / LOCK_SUBDIR / f'{name}.lock'
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(lock_path, 'a+b') as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f'waiting for another process fetching {name} into {home}', file=sys.stderr,
                  flush=True)
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


# ---------------------------------------------------------------- downloading

def _download(urls, target, *, what, show_as, settings, sha256=None, space_factor=1):
    """Download into `target` from the first of `urls` that works: through `target.part`
    beside it (kept and resumed after an interruption), renamed into place only once
    complete and, when `sha256` is given, matching it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + '.part')
    said = []

    def announce(size, url):
        if not said:  # one line, however many tries and addresses it takes
            print(f'fetching {what} ({size}) from {url} into {show_as}', file=sys.stderr, flush=True)
            said.append(url)

    failures = []
    for url in urls:
        try:
            _download_with_retries(url, part, what=what, settings=settings,
                                   space_factor=space_factor, announce=announce)
        except _NextAddress as exc:
            failures.append(f'{url}: {exc}')
            continue
        if sha256 is not None and _sha256(part) != sha256:
            part.unlink()
            raise FetchError(f'{what} from {url} is not the released file (its SHA-256 is not '
                             f'{sha256}), so it was not kept; check ${MIRROR_ENV} or the proxy')
        os.replace(part, target)
        return
    raise FetchError(f'could not fetch {what} ({"; ".join(failures)}); check the connection, '
                     f'or fetch it elsewhere (`{FETCH_COMMAND}`) and set ${HOME_ENV} or '
                     f'${MIRROR_ENV}')


def _download_with_retries(url, part, *, settings, **kwargs):
    """Try `url` until `part` is complete; _NextAddress once trying again is pointless.

    A try that got some bytes before failing is resumed at once; one that got none waits
    `backoff`, then twice that, ... and counts towards `settings.attempts`.
    """
    attempt = 0
    while True:
        before = _size(part)
        try:
            return _download_once(url, part, settings=settings, **kwargs)
        except _Retry as exc:
            if _size(part) > before:
                continue
            attempt += 1
            if attempt >= settings.attempts:
                raise _NextAddress(f'{exc} ({attempt} tries)') from None
            settings.sleep(settings.backoff * 2 ** (attempt - 1))


def _download_once(url, part, *, what, settings, space_factor, announce):
    """One request for `url`, appended to `part` from where it ends (HTTP Range)."""
    import http.client
    import urllib.error
    import urllib.request
    offset = _size(part)
    request = urllib.request.Request(url, headers={'User-Agent': 'gpt2-japanese'})
    if offset:
        request.add_header('Range', f'bytes={offset}-')
    try:
        response = urllib.request.urlopen(request, timeout=settings.timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset and _range_total(exc.headers.get('Content-Range')) == offset:
            return  # the part was complete already
        if exc.code == 416:
            part.unlink()
            raise _Retry('the partial download did not match the file; starting again') from None
        if exc.code in (408, 429) or exc.code >= 500:
            raise _Retry(f'HTTP {exc.code} {exc.reason}') from None
        raise _NextAddress(f'HTTP {exc.code} {exc.reason}') from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, FileNotFoundError):  # a file: mirror without the file
            raise _NextAddress('no such file') from None
        raise _Retry(str(exc.reason)) from None
    except (OSError, http.client.HTTPException) as exc:
        raise _Retry(str(exc) or type(exc).__name__) from None
    with response:
        if (response.getcode() or 200) == 206:  # file: URLs have no status code
            content_range = response.headers.get('Content-Range')
            total = _range_total(content_range)
            if _range_start(content_range) != offset:
                part.unlink()
                raise _Retry('the server resumed at another place; starting again')
        else:  # the whole file (a server may ignore Range): start from the beginning
            offset = 0
            length = response.headers.get('Content-Length')
            total = int(length) if length and length.isdigit() else None
        if total is not None:
            _check_free_space(part.parent, (total - offset) * space_factor, what=what)
        announce(_human_size(total) if total is not None else 'size unknown', url)
        _copy_to_part(response, part, offset=offset, total=total, what=what)


def _copy_to_part(response, part, *, offset, total, what):
    import http.client
    from tqdm import tqdm
    written = offset
    # read1: what has arrived (up to a chunk), so that an interruption keeps all of it.
    read = getattr(response, 'read1', response.read)
    with open(part, 'ab' if offset else 'wb') as out, \
            tqdm(total=total, initial=offset, desc=what, unit='B', unit_scale=True,
                 unit_divisor=1024, file=sys.stderr, disable=None, leave=False) as progress:
        while True:
            try:
                chunk = read(CHUNK_BYTES)
            except (OSError, http.client.HTTPException) as exc:
                raise _Retry(f'connection lost after {written} bytes '
                             f'({str(exc) or type(exc).__name__})') from None
            if not chunk:
                break
            try:
                out.write(chunk)
                out.flush()  # a killed process keeps all it received, for the next run
            except OSError as exc:
                raise FetchError(f'cannot write {part}: {exc.strerror or exc}') from None
            written += len(chunk)
            progress.update(len(chunk))
    if total is not None and written != total:
        raise _Retry(f'connection closed after {written} of {total} bytes')


def _size(path):
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _check_free_space(directory, needed, *, what):
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise FetchError(f'not enough disk space for {what} in {directory}: it needs about '
                         f'{_human_size(needed)}, {_human_size(free)} are free; free some '
                         f'space or point ${HOME_ENV} at a larger disk')


def _range_total(content_range):
    """TOTAL of a Content-Range `bytes START-END/TOTAL` or `bytes */TOTAL`, else None."""
    if not content_range or '/' not in content_range:
        return None
    total = content_range.rsplit('/', 1)[1].strip()
    return int(total) if total.isdigit() else None


def _range_start(content_range):
    try:
        return int(content_range.split()[1].split('-')[0])
    except (AttributeError, IndexError, ValueError):
        return None


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b''):
            digest.update(block)
    return digest.hexdigest()


def _human_size(size):
    for unit in ('B', 'KB', 'MB', 'GB'):
        if size < 1000 or unit == 'GB':
            return f'{size:.0f} {unit}' if unit == 'B' else f'{size:.1f} {unit}'
        size /= 1000
