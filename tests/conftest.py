"""Shared constants and fixtures: tiny models on a synthetic vocabulary, made with the
project's own code, and where the shared data (../shared) is.

Only tests that compare against the reference data, or the encoder against the released
vocabulary, need the shared data; they skip with a reason where it is absent. The shared
data is looked for in $GPT2JA_SHARED, else beside the checkout.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get('GPT2JA_SHARED') or REPO.parent / 'shared')
sys.path.insert(0, str(REPO))

import cli  # noqa: E402

tf = cli.prepare_tensorflow()  # silences TensorFlow for the whole test session

from model import RELEASED, HParams, init_parameters  # noqa: E402
from model_dir import save_model_dir  # noqa: E402
from synthetic_vocab import synthetic_tokens, write_synthetic_vocab  # noqa: E402

# The model of `tiny_model_dir`: two layers, four heads, a short window, big enough to
# catch indexing and masking bugs, small enough to build in milliseconds; its vocabulary
# is the synthetic one.
TINY = HParams(n_vocab=len(synthetic_tokens()), n_ctx=64, n_embd=32, n_head=4, n_layer=2)
EOT = TINY.n_vocab - 1  # <|endoftext|>: the last entry of the synthetic vocabulary
# TINY's sizes on the released vocabulary (20,573 entries), for the few tests that need its
# size or its tokens: the model of `real_vocab_model_dir`.
TINY_RELEASED_VOCAB = dataclasses.replace(TINY, n_vocab=RELEASED['gpt2ja-small'].n_vocab)
# For tests of the network and the sampler that need no encoder: a vocabulary small
# enough that sampling statistics over every token are cheap.
SMALL_VOCAB = HParams(n_vocab=97, n_ctx=32, n_embd=32, n_head=4, n_layer=3)


def _require(path, what):
    if not path.exists():
        pytest.skip(f'{what} not found at {path}: these tests need ../shared beside the '
                    'checkout (or $GPT2JA_SHARED)')
    return path


@pytest.fixture(autouse=True)
def graph_optimiser_restored():
    """The scripts set TensorFlow's graph optimiser for their whole process (off for
    inference, some passes off for training); run in-process here, they must not leave it
    so for the tests that follow them."""
    # TensorFlow's defaults: every pass on, the optimiser not disabled.
    settings = {'disable_meta_optimizer': False, **{name: True for name in cli.IDLE_GRAPH_PASSES}}
    before = {**settings, **tf.config.optimizer.get_experimental_options()}
    yield
    tf.config.optimizer.set_experimental_options({name: before[name] for name in settings})


@pytest.fixture(scope='session')
def shared_dir():
    return _require(SHARED, 'the shared data')


@pytest.fixture(scope='session')
def vocab_dir():
    """The released vocabulary (ja-bpe.txt, emoji.json) from the shared data."""
    return _require(SHARED / 'vocab', 'the released vocabulary')


@pytest.fixture(scope='session')
def reference_dir():
    return _require(SHARED / 'reference', 'the reference data')


@pytest.fixture(scope='session')
def reference_expected(reference_dir):
    """What the original code gave with the tiny-a checkpoint: token ids and log-probabilities
    ('score'), vectors ('transform') and greedy continuations ('greedy')."""
    return json.loads((reference_dir / 'tiny-a-expected.json').read_text(encoding='utf-8'))


@pytest.fixture(scope='session')
def synthetic_vocab_dir(tmp_path_factory):
    """A small vocabulary (tests/synthetic_vocab.py) in the released files' format."""
    return write_synthetic_vocab(tmp_path_factory.mktemp('synthetic-vocab'))


@pytest.fixture(scope='session')
def synthetic_encoder(synthetic_vocab_dir):
    from encoder import get_encoder
    return get_encoder(synthetic_vocab_dir)


@pytest.fixture(scope='session')
def tiny_model_dir(tmp_path_factory, synthetic_vocab_dir):
    """A tiny random model directory (TINY, seed 1) in the released layout, its synthetic
    vocabulary included. Shared by the whole session: copy it before changing it."""
    directory = tmp_path_factory.mktemp('tiny-model')
    save_model_dir(directory, init_parameters(TINY, seed=1), TINY, step=0,
                   vocab_dir=synthetic_vocab_dir)
    return directory


@pytest.fixture(scope='session')
def real_vocab_model_dir(tmp_path_factory, vocab_dir):
    """A tiny random model directory (TINY_RELEASED_VOCAB, seed 1) with the released
    vocabulary; skipped without the shared data. Copy it before changing it."""
    directory = tmp_path_factory.mktemp('tiny-model-released-vocab')
    save_model_dir(directory, init_parameters(TINY_RELEASED_VOCAB, seed=1), TINY_RELEASED_VOCAB,
                   step=0, vocab_dir=vocab_dir)
    return directory


@pytest.fixture(scope='session')
def tiny_dataset(tmp_path_factory):
    """A training set for TINY: an .npz of two uint16 arrays, 800 random ids of the synthetic
    vocabulary (no end-of-text), so 13 sequences of 64 tokens, the last one partial (32)."""
    path = tmp_path_factory.mktemp('data') / 'train.npz'
    rng = np.random.default_rng(0)
    np.savez(path, rng.integers(0, EOT, 500).astype(np.uint16),
             rng.integers(0, EOT, 300).astype(np.uint16))
    return path


@pytest.fixture(scope='session', autouse=True)
def no_network(tmp_path_factory):
    """No test fetches from the internet or touches the user's model cache: fetching is off
    and $GPT2JA_HOME is an empty folder (tests/test_fetch.py turns it on, against a local
    server)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('GPT2JA_OFFLINE', '1')
        patch.setenv('GPT2JA_HOME', str(tmp_path_factory.mktemp('gpt2ja-home')))
        patch.delenv('GPT2JA_MIRROR', raising=False)
        yield


@pytest.fixture
def no_vocab_env(monkeypatch):
    """No $GPT2JA_VOCAB_DIR, so vocabulary lookup depends on the test alone."""
    monkeypatch.delenv('GPT2JA_VOCAB_DIR', raising=False)
    return os.environ


@pytest.fixture
def small_disk(tmp_path):
    """mount(options) -> a tiny tmpfs mounted with them ('size=64k,ro'), for full and
    read-only disks; skips where mounting is not allowed (it needs root)."""
    mounted = []

    def mount(options):
        point = tmp_path / f'disk{len(mounted)}'
        point.mkdir()
        if shutil.which('mount') is None or subprocess.run(
                ['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(point)],
                capture_output=True).returncode != 0:
            pytest.skip('cannot mount a small tmpfs here (needs root)')
        mounted.append(point)
        return point
    yield mount
    for point in mounted:
        subprocess.run(['umount', str(point)], check=False)
