"""Shared fixtures: where ../shared is, tiny models made with the project's own code.

Tests that need ../shared (the vocabulary, the reference data) skip with a reason where it
is absent; everything else runs anywhere.
"""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
sys.path.insert(0, str(REPO))

import cli  # noqa: E402

tf = cli.prepare_tensorflow()  # silences TensorFlow for the whole test session

from model import HParams, init_parameters  # noqa: E402
from model_dir import save_model_dir  # noqa: E402

# Two layers, four heads, a short window: big enough to catch indexing and masking bugs,
# small enough to build in milliseconds.
TINY = HParams(n_vocab=20573, n_ctx=64, n_embd=32, n_head=4, n_layer=2)


def _require(path, what):
    if not path.exists():
        pytest.skip(f'{what} not found at {path}: these tests need ../shared beside the checkout')
    return path


@pytest.fixture(scope='session')
def shared_dir():
    return _require(SHARED, '../shared')


@pytest.fixture(scope='session')
def vocab_dir():
    return _require(SHARED / 'vocab', '../shared/vocab')


@pytest.fixture(scope='session')
def reference_dir():
    return _require(SHARED / 'reference', '../shared/reference')


@pytest.fixture(scope='session')
def tiny_model_dir(tmp_path_factory, vocab_dir):
    """A tiny random model directory in the released layout, vocabulary included."""
    directory = tmp_path_factory.mktemp('tiny-model')
    save_model_dir(directory, init_parameters(TINY, seed=1), TINY, step=0, vocab_dir=vocab_dir)
    return directory


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
