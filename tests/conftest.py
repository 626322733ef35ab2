"""Shared test fixtures: where the shared data (../shared beside the checkout) lives.

Tests that need the vocabulary or the reference data are skipped, with the reason,
where ../shared is absent.
"""
from pathlib import Path

import pytest

SHARED_DIR = Path(__file__).resolve().parents[1].parent / 'shared'


@pytest.fixture(scope='session')
def shared_dir():
    if not SHARED_DIR.is_dir():
        pytest.skip(f'../shared not found: {SHARED_DIR}')
    return SHARED_DIR


@pytest.fixture(scope='session')
def vocab_dir(shared_dir):
    path = shared_dir / 'vocab'
    if not ((path / 'ja-bpe.txt').is_file() and (path / 'emoji.json').is_file()):
        pytest.skip(f'../shared/vocab not found: {path}')
    return path
