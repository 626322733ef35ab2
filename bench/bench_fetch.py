"""Benchmark of a first fetch apart from the network: a checkpoint with a released model's
shapes (random float32 weights, as incompressible as trained ones) packed as NAME.tar.bz2,
served on 127.0.0.1 and fetched with fetch.fetch_model: the seconds for the download over
loopback, the unpacking and the loader's check, and the MB/s they come to. Prints a Markdown
table (the figures of report/models.md).

    python3 bench/bench_fetch.py [--model_size gpt2ja-small] [--layers 2]

--layers keeps the embeddings and that many blocks (the rates do not depend on it); the last
column scales the time to the whole model's size.
"""
import argparse
import dataclasses
import http.server
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cli  # noqa: E402

OUT = REPO / 'bench' / 'out' / 'fetch'


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--model_size', default='gpt2ja-small', choices=['gpt2ja-small', 'gpt2ja-medium'])
    parser.add_argument('--layers', type=int, default=2, help='blocks kept (all: the whole model)')
    return parser.parse_args()


def build_archive(hparams, name):
    """NAME.tar.bz2 of a random checkpoint with these shapes, made once and kept in OUT."""
    import model
    from model_dir import save_checkpoint
    archive = OUT / f'{name}-{hparams.n_layer}.tar.bz2'
    if archive.is_file():
        return archive
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / name
        save_checkpoint(folder, model.init_parameters(hparams, seed=0), step=0)
        with tarfile.open(f'{archive}.tmp', 'w:bz2') as tar:
            tar.add(folder, arcname=name)
    Path(f'{archive}.tmp').rename(archive)
    return archive


def serve(folder):
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(folder), **k)
    http.server.SimpleHTTPRequestHandler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f'http://127.0.0.1:{httpd.server_address[1]}'


def main():
    args = parse_args()
    cli.prepare_tensorflow(gpu='-1')
    import fetch
    import model
    from model_dir import check_loads

    full = model.RELEASED[args.model_size]
    hparams = dataclasses.replace(full, n_layer=min(args.layers, full.n_layer))
    archive = build_archive(hparams, args.model_size)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        site = scratch / 'site'
        site.mkdir()
        shutil.copyfile(archive, site / f'{args.model_size}.tar.bz2')
        vocab = {}
        for name in fetch.VOCAB_SHA256:  # a stand-in vocabulary of the right size
            data = ('\n'.join(f'tok{i}' for i in range(hparams.n_vocab)) if name == 'ja-bpe.txt'
                    else '{"emoji": {}, "emoji_inv": {}}').encode()
            (site / name).write_bytes(data)
            vocab[name] = fetch.hashlib.sha256(data).hexdigest()
        httpd, url = serve(site)
        settings = fetch.Settings(home=scratch / 'home', model_urls=(url + '/{name}.tar.bz2',),
                                  vocab_urls=(url + '/{name}',), vocab_sha256=vocab)
        timings = {}
        timed_verify = lambda directory: timings.setdefault('check', seconds(check_loads, directory))
        original_extract = fetch.extract_safely
        fetch.extract_safely = lambda *a, **k: timings.setdefault('unpack', seconds(original_extract, *a, **k))
        start = time.perf_counter()
        fetch.fetch_model(args.model_size, verify=timed_verify, settings=settings)
        total = time.perf_counter() - start
        fetch.extract_safely = original_extract
        httpd.shutdown()
    size_mb = archive.stat().st_size / 1e6
    full_mb = model.count_parameters(full) * 4 / 1e6
    download = total - timings['unpack'] - timings['check']
    print('| model (layers kept) | archive MB | download over loopback s | unpack s (MB/s) | '
          'check s (MB/s) | whole fetch s | scaled to the whole model s |')
    print('|---|---|---|---|---|---|---|')
    print(f'| {args.model_size} ({hparams.n_layer} of {full.n_layer}) | {size_mb:.0f} | {download:.1f} | '
          f'{timings["unpack"]:.1f} ({size_mb / timings["unpack"]:.1f}) | '
          f'{timings["check"]:.1f} ({size_mb / timings["check"]:.0f}) | {total:.1f} | '
          f'{total * full_mb / size_mb:.0f} |')


def seconds(function, *args, **kwargs):
    start = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - start


if __name__ == '__main__':
    main()
