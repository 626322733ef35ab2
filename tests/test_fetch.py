"""Fetching released models and the vocabulary (fetch.py, gpt2-fetch.py, the --model
resolution of every script), against a local HTTP server: no test reaches the internet.

Run: python3 -m pytest -q tests/test_fetch.py
"""
import dataclasses
import hashlib
import http.server
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

import encoder.vocab
import fetch
from conftest import REPO
from helpers import assert_usage_error, load_script, run_script
from model import HParams, init_parameters
from model_dir import check_loads, load_model_dir, save_model_dir

NAME = 'gpt2ja-small'
ARCHIVE_PATH = f'/{NAME}.tar.bz2'
SMALL = HParams(n_vocab=64, n_ctx=16, n_embd=8, n_head=2, n_layer=1)
VOCAB_FILES = tuple(fetch.VOCAB_SHA256)


# ---------------------------------------------------------------- a local server

class Handler(http.server.BaseHTTPRequestHandler):
    """Serves `server.files` with HTTP Range, and misbehaves where the test says."""

    def do_GET(self):
        server = self.server
        wanted = self.headers.get('Range')
        with server.lock:
            server.requests.append((self.path, wanted))
            failing = self.path in server.failing
            drop = self.path in server.drop_once
            server.drop_once.discard(self.path)
        if failing:
            self.send_error(503)
            return
        if self.path not in server.files:
            self.send_error(404)
            return
        body = server.files[self.path]
        start = int(wanted.split('=')[1].split('-')[0]) if wanted else 0
        if start >= len(body) > 0:
            self.send_response(416)
            self.send_header('Content-Range', f'bytes */{len(body)}')
            self.end_headers()
            return
        self.send_response(206 if wanted else 200)
        if wanted:
            self.send_header('Content-Range', f'bytes {start}-{len(body) - 1}/{len(body)}')
        self.send_header('Content-Length', str(len(body) - start))
        self.end_headers()
        gate = server.gates.get(self.path)
        if gate is not None:
            gate.wait(60)
        data = body[start:]
        if drop:  # the connection breaks halfway through
            self.wfile.write(data[:len(data) // 2])
            self.close_connection = True
            return
        stall = server.stalls.get(self.path)
        if stall is not None:  # half now, the rest when the test says
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            server.half_sent.set()
            stall.wait(60)
            data = data[len(data) // 2:]
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    httpd.daemon_threads = True
    httpd.files, httpd.requests, httpd.failing, httpd.drop_once, httpd.gates = {}, [], set(), set(), {}
    httpd.stalls, httpd.half_sent = {}, threading.Event()
    httpd.lock = threading.Lock()
    httpd.url = f'http://127.0.0.1:{httpd.server_address[1]}'
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    for gate in [*httpd.gates.values(), *httpd.stalls.values()]:
        gate.set()
    httpd.shutdown()
    httpd.server_close()


def requested(server, path):
    return [wanted for got, wanted in server.requests if got == path]


# ---------------------------------------------------------------- a release to serve

def synthetic_vocab(size):
    """Files of the right shape for loading (sizes are checked, not tokens)."""
    return {'ja-bpe.txt': '\n'.join(f'tok{i}' for i in range(size)).encode(),
            'emoji.json': json.dumps({'emoji': {}, 'emoji_inv': {}}).encode()}


def pins_of(files):
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def pack(model_files, *, folder=NAME, extra=()):
    """A .tar.bz2 of `model_files` (name -> bytes), under `folder` (None: at the top), then
    the `extra` TarInfo members."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w:bz2') as tar:
        for name, data in sorted(model_files.items()):
            info = tarfile.TarInfo(f'{folder}/{name}' if folder else name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b'x' * info.size) if info.isfile() else None)
    return buffer.getvalue()


def checkpoint_files(directory):
    """The files of a model directory, as a release archive holds them: no vocabulary."""
    return {p.name: p.read_bytes() for p in Path(directory).iterdir()
            if p.is_file() and p.name not in VOCAB_FILES}


@pytest.fixture(scope='module')
def release(tmp_path_factory):
    """A small model's checkpoint files and a synthetic vocabulary, as a release has them."""
    directory = tmp_path_factory.mktemp('release')
    save_model_dir(directory, init_parameters(SMALL, seed=0), SMALL, step=0)
    return checkpoint_files(directory), synthetic_vocab(SMALL.n_vocab)


def serve(server, release, *, archive=None):
    model_files, vocab = release
    server.files[ARCHIVE_PATH] = archive if archive is not None else pack(model_files)
    for name, data in vocab.items():
        server.files[f'/{name}'] = data


class Sleeps(list):
    def __call__(self, seconds):
        self.append(seconds)


def settings_for(server, home, vocab, **changes):
    values = dict(home=home, model_urls=(server.url + '/{name}.tar.bz2',),
                  vocab_urls=(server.url + '/{name}',), vocab_sha256=pins_of(vocab),
                  backoff=0.01, sleep=Sleeps())
    values.update(changes)
    return fetch.Settings(**values)


def leftovers(home):
    """What a failed or interrupted fetch must not leave: partial files and directories."""
    return sorted(str(p.relative_to(home)) for p in Path(home).rglob('*')
                  if p.name.endswith('.part') or p.name.startswith('.tmp-'))


@pytest.fixture
def use_server(server, tmp_path, monkeypatch):
    """The environment a user behind a mirror has: GPT2JA_MIRROR, an empty GPT2JA_HOME."""
    monkeypatch.setenv('GPT2JA_MIRROR', server.url)
    monkeypatch.setenv('GPT2JA_HOME', str(tmp_path / 'home'))
    monkeypatch.delenv('GPT2JA_OFFLINE', raising=False)
    monkeypatch.delenv('GPT2JA_VOCAB_DIR', raising=False)
    monkeypatch.setattr(encoder.vocab, 'PACKAGE_DIR', tmp_path / 'encoder')  # nor one dropped there
    monkeypatch.chdir(tmp_path)  # no directory named gpt2ja-small here
    return tmp_path / 'home'


# ---------------------------------------------------------------- first use, second use

def test_first_use_fetches_and_scores_as_the_directory_does(tiny_model_dir, server, use_server,
                                                            monkeypatch, capsys, tmp_path):
    vocab = {name: (tiny_model_dir / name).read_bytes() for name in VOCAB_FILES}
    serve(server, (checkpoint_files(tiny_model_dir), vocab))
    monkeypatch.setattr(fetch, 'VOCAB_SHA256', pins_of(vocab))
    texts = tmp_path / 'texts.txt'
    texts.write_text('吾輩は猫である。\n名前はまだ無い。\n', encoding='utf-8')
    score = load_script('gpt2-score.py')

    assert score.main(['--model', NAME, str(texts)]) == 0
    fetched = capsys.readouterr()
    assert score.main(['--model', str(tiny_model_dir), str(texts)]) == 0
    assert fetched.out == capsys.readouterr().out
    said = [line for line in fetched.err.splitlines() if line.startswith(f'fetching {NAME} ')]
    assert len(said) == 1 and str(use_server / NAME) in said[0]
    assert re.search(r' \(\d+(\.\d)? [KMG]?B\) from http://127\.0\.0\.1', said[0]), said[0]
    assert sorted(p.name for p in (use_server / NAME).iterdir()) == sorted(
        p.name for p in tiny_model_dir.iterdir())
    assert leftovers(use_server) == [] and not (use_server / f'{NAME}.tar.bz2').exists()

    server.requests.clear()
    assert score.main(['--model', NAME, str(texts)]) == 0
    assert capsys.readouterr().out == fetched.out
    assert server.requests == []


def test_a_second_run_fetches_nothing(server, release, tmp_path, capsys):
    serve(server, release)
    settings = settings_for(server, tmp_path, release[1])
    first = fetch.fetch_model(NAME, verify=check_loads, settings=settings)
    assert len(requested(server, ARCHIVE_PATH)) == 1
    server.requests.clear()
    capsys.readouterr()
    assert fetch.fetch_model(NAME, verify=check_loads, settings=settings) == first
    assert server.requests == [] and capsys.readouterr().err == ''
    assert load_model_dir(first).hparams == SMALL


@pytest.mark.parametrize('folder', [NAME, None], ids=['under-a-folder', 'at-the-top'])
def test_archive_files_may_be_at_the_top_or_under_one_folder(server, release, tmp_path, folder):
    serve(server, release, archive=pack(release[0], folder=folder))
    found = fetch.fetch_model(NAME, verify=check_loads, settings=settings_for(server, tmp_path, release[1]))
    assert found == tmp_path / NAME
    assert (found / 'hparams.json').is_file() and (found / 'ja-bpe.txt').is_file()


# ---------------------------------------------------------------- interrupted, unreachable

def test_a_connection_dropped_halfway_is_resumed(server, release, tmp_path):
    serve(server, release)
    server.drop_once.add(ARCHIVE_PATH)
    settings = settings_for(server, tmp_path, release[1])
    found = fetch.fetch_model(NAME, verify=check_loads, settings=settings)
    ranges = requested(server, ARCHIVE_PATH)
    assert len(ranges) == 2 and ranges[0] is None
    assert ranges[1] == f'bytes={len(server.files[ARCHIVE_PATH]) // 2}-'
    assert settings.sleep == []  # it got bytes, so it resumes at once
    assert load_model_dir(found).hparams == SMALL and leftovers(tmp_path) == []


def test_a_download_interrupted_in_an_earlier_run_is_resumed(server, release, tmp_path):
    serve(server, release)
    archive = server.files[ARCHIVE_PATH]
    (tmp_path / f'{NAME}.tar.bz2.part').write_bytes(archive[:1000])
    fetch.fetch_model(NAME, verify=check_loads, settings=settings_for(server, tmp_path, release[1]))
    assert requested(server, ARCHIVE_PATH) == ['bytes=1000-']


def test_a_404_on_the_primary_falls_back_to_the_spare(server, release, tmp_path):
    serve(server, release)
    settings = settings_for(server, tmp_path, release[1], model_urls=(
        server.url + '/primary/{name}.tar.bz2', server.url + '/{name}.tar.bz2'))
    assert fetch.fetch_model(NAME, verify=check_loads, settings=settings).is_dir()
    assert len(requested(server, f'/primary{ARCHIVE_PATH}')) == 1  # a 404 is not retried
    assert len(requested(server, ARCHIVE_PATH)) == 1 and settings.sleep == []


def test_a_failing_primary_is_retried_with_backoff_then_the_spare(server, release, tmp_path):
    serve(server, release)
    server.failing.add(f'/primary{ARCHIVE_PATH}')
    settings = settings_for(server, tmp_path, release[1], attempts=3, backoff=0.5, model_urls=(
        server.url + '/primary/{name}.tar.bz2', server.url + '/{name}.tar.bz2'))
    assert fetch.fetch_model(NAME, verify=check_loads, settings=settings).is_dir()
    assert len(requested(server, f'/primary{ARCHIVE_PATH}')) == 3
    assert settings.sleep == [0.5, 1.0]


def test_no_address_working_is_one_error_naming_each(server, release, tmp_path):
    serve(server, release)
    del server.files[ARCHIVE_PATH]
    with pytest.raises(fetch.FetchError, match=r'could not fetch gpt2ja-small \(http.*404'):
        fetch.fetch_model(NAME, verify=check_loads, settings=settings_for(server, tmp_path, release[1]))
    assert not (tmp_path / NAME).exists() and leftovers(tmp_path) == []


def test_ctrl_c_while_unpacking_leaves_no_model_and_keeps_the_download(server, release, tmp_path):
    serve(server, release)
    settings = settings_for(server, tmp_path, release[1])

    def interrupted(directory):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fetch.fetch_model(NAME, verify=interrupted, settings=settings)
    assert not (tmp_path / NAME).exists() and leftovers(tmp_path) == []
    server.requests.clear()
    assert fetch.fetch_model(NAME, verify=check_loads, settings=settings).is_dir()
    assert requested(server, ARCHIVE_PATH) == []  # the complete download was used
    assert not (tmp_path / f'{NAME}.tar.bz2').exists()


def test_too_little_disk_space_is_refused_before_downloading(server, release, tmp_path, monkeypatch):
    serve(server, release)
    settings = settings_for(server, tmp_path, release[1])
    fetch.fetch_vocab(settings)
    monkeypatch.setattr(fetch.shutil, 'disk_usage', lambda path: type('Usage', (), {'free': 100})())
    with pytest.raises(fetch.FetchError, match='not enough disk space'):
        fetch.fetch_model(NAME, verify=check_loads, settings=settings)
    assert leftovers(tmp_path) == [] and not (tmp_path / NAME).exists()


def test_a_mirror_may_be_a_local_folder(release, tmp_path):
    model_files, vocab = release
    mirror = tmp_path / 'usb stick'
    mirror.mkdir()
    (mirror / f'{NAME}.tar.bz2').write_bytes(pack(model_files))
    for name, data in vocab.items():
        (mirror / name).write_bytes(data)
    settings = fetch.Settings.from_env({'GPT2JA_MIRROR': str(mirror), 'GPT2JA_HOME': str(tmp_path / 'home')})
    settings = dataclasses.replace(settings, vocab_sha256=pins_of(vocab))
    # A file: address ignores Range, so a partial download starts again from the beginning.
    (tmp_path / 'home').mkdir()
    (tmp_path / 'home' / f'{NAME}.tar.bz2.part').write_bytes(b'not the archive')
    found = fetch.fetch_model(NAME, verify=check_loads, settings=settings)
    assert load_model_dir(found).hparams == SMALL and leftovers(tmp_path / 'home') == []


def test_a_cache_that_cannot_be_written_is_one_error(server, release, tmp_path):
    serve(server, release)
    home = tmp_path / 'a file'
    home.write_text('')
    with pytest.raises(fetch.FetchError, match='cannot write .*GPT2JA_HOME'):
        fetch.fetch_model(NAME, verify=check_loads, settings=settings_for(server, home, release[1]))


# ---------------------------------------------------------------- refused

def test_a_tampered_vocabulary_is_refused_and_nothing_is_left(server, release, tmp_path):
    serve(server, release)
    server.files['/ja-bpe.txt'] = server.files['/ja-bpe.txt'].replace(b'tok7', b'tok8')
    with pytest.raises(fetch.FetchError, match='ja-bpe.txt .* SHA-256'):
        fetch.fetch_model(NAME, verify=check_loads, settings=settings_for(server, tmp_path, release[1]))
    assert not (tmp_path / NAME).exists() and not (tmp_path / 'vocab' / 'ja-bpe.txt').exists()
    assert leftovers(tmp_path) == [] and requested(server, ARCHIVE_PATH) == []


def test_a_corrupt_archive_is_refused_and_fetched_anew_next_time(server, release, tmp_path):
    good = pack(release[0])
    middle = len(good) // 2
    serve(server, release, archive=good[:middle] + bytes([good[middle] ^ 0xFF]) + good[middle + 1:])
    settings = settings_for(server, tmp_path, release[1])
    with pytest.raises(fetch.FetchError, match='cannot unpack'):
        fetch.fetch_model(NAME, verify=check_loads, settings=settings)
    assert not (tmp_path / NAME).exists() and leftovers(tmp_path) == []
    assert not (tmp_path / f'{NAME}.tar.bz2').exists()
    server.files[ARCHIVE_PATH] = good
    assert load_model_dir(fetch.fetch_model(NAME, verify=check_loads, settings=settings)).hparams == SMALL


def _member(name, *, kind=tarfile.REGTYPE, link=''):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, 4 if kind == tarfile.REGTYPE else 0
    return info


ESCAPED = '/tmp/gpt2ja-test-escaped.txt'
UNSAFE = {
    'dot-dot': [_member(f'{NAME}/../../escaped.txt')],
    'absolute': [_member(ESCAPED)],
    'symlink-outside': [_member(f'{NAME}/escaped', kind=tarfile.SYMTYPE, link='../../..')],
    'hardlink-outside': [_member(f'{NAME}/escaped', kind=tarfile.LNKTYPE, link='../escaped.txt')],
    'device': [_member(f'{NAME}/escaped', kind=tarfile.CHRTYPE)],
    # Each link alone stays inside; together they lead out: up = the top, out = up/..
    'symlink-chain': [_member(f'{NAME}/up', kind=tarfile.SYMTYPE, link='..'),
                      _member(f'{NAME}/out', kind=tarfile.SYMTYPE, link='up/..'),
                      _member(f'{NAME}/out/escaped.txt')],
}


@pytest.mark.parametrize('how', UNSAFE)
def test_an_archive_with_members_outside_is_refused(server, release, tmp_path, how):
    serve(server, release, archive=pack(release[0], extra=UNSAFE[how]))
    home = tmp_path / 'home' / 'cache'
    with pytest.raises(fetch.FetchError, match='is refused'):
        fetch.fetch_model(NAME, verify=check_loads, settings=settings_for(server, home, release[1]))
    assert not (home / NAME).exists() and leftovers(home) == []
    assert not (home / f'{NAME}.tar.bz2').exists()  # fetched again next time, not reused
    assert not list(tmp_path.rglob('escaped*')) and not Path(ESCAPED).exists()


def test_links_inside_the_archive_are_kept():
    assert fetch.unsafe_member_reason(_member('m/a', kind=tarfile.SYMTYPE, link='b')) is None
    assert fetch.unsafe_member_reason(_member('m/d/a', kind=tarfile.SYMTYPE, link='../b')) is None
    assert fetch.unsafe_member_reason(_member('m/a', kind=tarfile.LNKTYPE, link='m/b')) is None


# ---------------------------------------------------------------- two at once, offline, local

WORKER = '''
import dataclasses, json, sys
sys.path.insert(0, sys.argv[1])
import cli, fetch
def verify(directory):
    cli.prepare_tensorflow()
    from model_dir import check_loads
    check_loads(directory)
settings = fetch.Settings.from_env()
settings = dataclasses.replace(settings, vocab_sha256=json.loads(sys.argv[2]))
print(fetch.fetch_model('gpt2ja-small', verify=verify, settings=settings))
'''


@pytest.mark.slow
def test_two_processes_fetching_at_once_end_with_one_good_copy(server, release, tmp_path):
    serve(server, release)
    gate = server.gates[ARCHIVE_PATH] = threading.Event()  # holds the first download open
    env = dict(GPT2JA_HOME=str(tmp_path), GPT2JA_MIRROR=server.url, GPT2JA_OFFLINE='',
               PYTHONUNBUFFERED='1')
    command = [sys.executable, '-c', WORKER, str(REPO), json.dumps(pins_of(release[1]))]
    spawn = lambda: subprocess.Popen(command, env={**os.environ, **env},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = spawn()
    for _ in range(600):
        if requested(server, ARCHIVE_PATH) or first.poll() is not None:
            break
        threading.Event().wait(0.05)
    second = spawn()
    waiting = second.stderr.readline()  # the second says it waits, then waits
    gate.set()
    out1, err1 = first.communicate(timeout=120)
    out2, err2 = second.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, (err1, waiting + err2)
    assert waiting.startswith('waiting for another process fetching gpt2ja-small')
    assert out1 == out2 == f'{tmp_path / NAME}\n'
    assert len(requested(server, ARCHIVE_PATH)) == 1 and 'fetching' not in err2
    assert load_model_dir(tmp_path / NAME).hparams == SMALL and leftovers(tmp_path) == []


@pytest.mark.slow
def test_ctrl_c_while_downloading_leaves_a_part_that_the_next_run_resumes(server, release, tmp_path):
    serve(server, release)
    server.stalls[ARCHIVE_PATH] = threading.Event()
    env = dict(GPT2JA_HOME=str(tmp_path), GPT2JA_MIRROR=server.url, GPT2JA_OFFLINE='')
    worker = subprocess.Popen([sys.executable, '-c', WORKER, str(REPO), json.dumps(pins_of(release[1]))],
                              env={**os.environ, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    part = tmp_path / f'{NAME}.tar.bz2.part'
    assert server.half_sent.wait(60)
    for _ in range(600):  # until the worker has the first half
        if part.exists() and part.stat().st_size > 0:
            break
        threading.Event().wait(0.05)
    worker.send_signal(signal.SIGINT)
    worker.communicate(timeout=60)
    assert worker.returncode != 0 and not (tmp_path / NAME).exists()
    kept = part.stat().st_size if part.exists() else 0
    assert 0 < kept <= len(server.files[ARCHIVE_PATH]) // 2
    del server.stalls[ARCHIVE_PATH]
    server.requests.clear()
    found = fetch.fetch_model(NAME, verify=check_loads, settings=settings_for(server, tmp_path, release[1]))
    assert requested(server, ARCHIVE_PATH) == [f'bytes={kept}-' if kept else None]
    assert load_model_dir(found).hparams == SMALL and leftovers(tmp_path) == []


@pytest.mark.slow
def test_offline_with_nothing_cached_is_one_line_and_exit_2(tmp_path):
    env = {'GPT2JA_OFFLINE': '1', 'GPT2JA_HOME': str(tmp_path)}
    result = run_script('gpt2-score.py', '--model', NAME, '-', stdin='', env=env)
    assert_usage_error(result, NAME, 'GPT2JA_OFFLINE', 'gpt2-fetch.py')
    result = run_script('gpt2-fetch.py', 'vocab', stdin='', env=env)
    assert_usage_error(result, 'vocabulary', 'GPT2JA_OFFLINE')
    assert list(tmp_path.iterdir()) in ([], [tmp_path / '.locks'])


def test_a_local_archive_is_unpacked_once_and_used(release, tmp_path, monkeypatch, capsys):
    model_files, vocab = release
    archive = tmp_path / 'downloads' / f'{NAME}.tar.bz2'
    archive.parent.mkdir()
    archive.write_bytes(pack({**model_files, **vocab}))
    monkeypatch.setenv('GPT2JA_HOME', str(tmp_path / 'home'))
    loaded = load_model_dir(str(archive))
    assert loaded.hparams == SMALL and loaded.path.parent == tmp_path / 'home' / 'local'
    assert 'unpacking' in capsys.readouterr().err
    stamp = loaded.path.stat().st_mtime_ns
    again = load_model_dir(str(archive))
    assert again.path == loaded.path and again.path.stat().st_mtime_ns == stamp
    assert capsys.readouterr().err == '' and archive.is_file()


# ---------------------------------------------------------------- the vocabulary

def test_the_real_vocabulary_matches_its_pins(server, vocab_dir, tmp_path):
    for name in VOCAB_FILES:
        server.files[f'/{name}'] = (vocab_dir / name).read_bytes()
    settings = fetch.Settings(home=tmp_path, vocab_urls=(server.url + '/{name}',))
    assert settings.pins == fetch.VOCAB_SHA256
    found = fetch.fetch_vocab(settings)
    for name in VOCAB_FILES:
        assert (found / name).read_bytes() == (vocab_dir / name).read_bytes()


def test_the_encoder_command_finds_or_fetches_its_vocabulary(tiny_model_dir, server, use_server,
                                                             monkeypatch, tmp_path):
    from encoder.__main__ import main as encode
    corpus = tmp_path / 'corpus'
    corpus.mkdir()
    (corpus / 'a.txt').write_text('吾輩は猫である。名前はまだ無い。\n', encoding='utf-8')
    common = ['--src_dir', str(corpus), '--num_process', '1', '--quiet']
    # The README's layout: the vocabulary in the model directory.
    assert encode([*common, '--dst_file', str(tmp_path / 'a'), '--model', str(tiny_model_dir)]) == 0
    assert server.requests == []
    # A fresh machine: the vocabulary is fetched, the model is not.
    vocab = {name: (tiny_model_dir / name).read_bytes() for name in VOCAB_FILES}
    serve(server, (checkpoint_files(tiny_model_dir), vocab))
    monkeypatch.setattr(fetch, 'VOCAB_SHA256', pins_of(vocab))
    assert encode([*common, '--dst_file', str(tmp_path / 'b')]) == 0
    assert encode([*common, '--dst_file', str(tmp_path / 'c'), '--model', NAME]) == 0
    assert sorted(path for path, _ in server.requests) == ['/emoji.json', '/ja-bpe.txt']
    with np.load(tmp_path / 'a.npz') as a, np.load(tmp_path / 'b.npz') as b, np.load(tmp_path / 'c.npz') as c:
        assert [list(a[k]) for k in a.files] == [list(b[k]) for k in b.files] == [list(c[k]) for k in c.files]


# ---------------------------------------------------------------- the fetch command

def test_the_fetch_command_fills_a_cache_that_works_offline(server, release, use_server, monkeypatch,
                                                            capsys, tmp_path):
    serve(server, release)
    monkeypatch.setattr(fetch, 'VOCAB_SHA256', pins_of(release[1]))
    command = load_script('gpt2-fetch.py')
    dest = tmp_path / 'image'
    assert command.main([NAME, 'vocab', '--dest', str(dest)]) == 0
    assert capsys.readouterr().out.splitlines() == [str(dest / NAME), str(dest / 'vocab')]
    server.requests.clear()
    assert command.main([NAME, '--dest', str(dest)]) == 0
    assert server.requests == [] and capsys.readouterr().out == f'{dest / NAME}\n'
    monkeypatch.setenv('GPT2JA_OFFLINE', '1')
    monkeypatch.setenv('GPT2JA_HOME', str(dest))
    assert load_model_dir(NAME).path == dest / NAME


@pytest.mark.slow
def test_the_fetch_command_has_help():
    result = run_script('gpt2-fetch.py', '--help')
    assert result.returncode == 0 and 'GPT2JA_MIRROR' in result.stdout and '--dest' in result.stdout


def test_the_fetchable_names_are_the_released_models():
    import model
    assert set(fetch.RELEASED_MODELS) == set(model.RELEASED)
