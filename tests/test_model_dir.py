"""Loading a model directory: finding the checkpoint, the sizes and the vocabulary, and the
one-line errors for every way a directory can be wrong."""
import json
import shutil

import numpy as np
import pytest

from conftest import TINY
from encoder.vocab import VocabularyError
from helpers import assert_usage_error, run_as_script
from model import HParams, init_parameters
from model_dir import ModelDirError, load_model_dir, save_checkpoint, save_model_dir
from synthetic_vocab import write_synthetic_vocab


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir):
    """A copy of the tiny model directory, for tests that change or damage it."""
    return shutil.copytree(tiny_model_dir, tmp_path / 'model')


def test_loads_a_saved_model_dir(model_copy, no_vocab_env):
    loaded = load_model_dir(model_copy)
    assert loaded.hparams == TINY
    assert loaded.vocab_dir == model_copy
    np.testing.assert_array_equal(loaded.load_parameters()['model/wte'],
                                  init_parameters(TINY, seed=1)['model/wte'])


def test_loads_without_hparams_and_with_a_foreign_checkpoint_path(model_copy, no_vocab_env):
    (model_copy / 'hparams.json').unlink()
    (model_copy / 'checkpoint').write_text(
        'model_checkpoint_path: "/home/someone/else/model-0"\n'
        'all_model_checkpoint_paths: "/home/someone/else/model-0"\n')
    loaded = load_model_dir(model_copy, n_head=TINY.n_head)
    assert loaded.hparams == TINY
    assert loaded.checkpoint == str(model_copy / 'model-0')


def test_without_checkpoint_file_the_newest_step_wins(model_copy):
    params = init_parameters(TINY, seed=2)
    save_model_dir(model_copy, params, TINY, step=10)
    save_model_dir(model_copy, init_parameters(TINY, seed=3), TINY, step=9)
    (model_copy / 'checkpoint').unlink()
    assert load_model_dir(model_copy).checkpoint.endswith('model-10')


def test_without_hparams_n_head_assumes_64_wide_heads_unless_given(tmp_path):
    wide = HParams(n_vocab=50, n_ctx=16, n_embd=128, n_head=8, n_layer=1)
    save_checkpoint(tmp_path, init_parameters(wide), step=0)
    assert load_model_dir(tmp_path, need_vocab=False).hparams.n_head == 2
    assert load_model_dir(tmp_path, need_vocab=False, n_head=8).hparams == wide


def test_reference_checkpoint_with_optimizer_slots_loads(reference_dir, vocab_dir):
    loaded = load_model_dir(reference_dir / 'tiny-a', vocab_dir=vocab_dir)
    params = loaded.load_parameters()
    assert not any('Adam' in name or 'global_step' in name or 'beta' in name for name in params)
    assert loaded.hparams.n_layer == 2 and loaded.hparams.n_ctx == 128


def test_vocabulary_search_order(model_copy, tmp_path, monkeypatch):
    for name in ('ja-bpe.txt', 'emoji.json'):
        (model_copy / name).unlink()
    vocab_dir = write_synthetic_vocab(tmp_path / 'vocab')
    monkeypatch.setenv('GPT2JA_VOCAB_DIR', str(vocab_dir))
    assert load_model_dir(model_copy).vocab_dir == vocab_dir
    with pytest.raises(VocabularyError, match='--vocab'):
        load_model_dir(model_copy, vocab_dir=tmp_path / 'nowhere')


def _damage(directory, how):
    if how == 'missing directory':
        shutil.rmtree(directory)
    elif how == 'no checkpoint':
        for path in directory.glob('model-*'):
            path.unlink()
    elif how == 'truncated index':
        index = directory / 'model-0.index'
        index.write_bytes(index.read_bytes()[:40])
    elif how == 'truncated data':
        data = next(directory.glob('model-0.data-*'))
        data.write_bytes(data.read_bytes()[:1000])
    elif how == 'vocabulary size':
        vocab = directory / 'ja-bpe.txt'
        vocab.write_text('\n'.join(vocab.read_text(encoding='utf-8').split('\n')[:-5]), encoding='utf-8')
    elif how == 'contradicting hparams':
        (directory / 'hparams.json').write_text(json.dumps(dict(TINY.to_dict(), n_layer=3)))
    elif how == 'missing variable':
        params = init_parameters(TINY, seed=1)
        del params['model/h1/mlp/c_fc/b']
        for path in directory.glob('model-*'):
            path.unlink()
        save_checkpoint(directory, params, step=0)


# (how the directory is damaged, words the one-line error must contain)
DAMAGE = [
    ('missing directory', 'does not exist'),
    ('no checkpoint', 'no checkpoint'),
    ('truncated index', 'unreadable'),
    ('truncated data', 'unreadable'),
    ('vocabulary size', 'entries'),
    ('contradicting hparams', 'contradicts'),
    ('missing variable', 'model/h1/mlp/c_fc/b'),
]


@pytest.mark.parametrize('how, words', DAMAGE)
def test_each_bad_directory_is_one_line_and_exit_code_2(model_copy, capfd, how, words):
    _damage(model_copy, how)
    # The way every script loads: load_model_dir (parameters too) under cli.run_main.
    result = run_as_script(lambda argv: load_model_dir(model_copy).load_parameters() and 0, [], capfd)
    assert_usage_error(result, words)


def test_errors_are_usage_errors(model_copy):
    _damage(model_copy, 'no checkpoint')
    with pytest.raises(ModelDirError):
        load_model_dir(model_copy)
