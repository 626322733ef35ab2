"""run_finetune.py under faults: huge learning rates, damaged datasets and checkpoints, two runs
on one directory, killed and failed saves, full disks, bad flag values.

Tiny models (conftest.TINY) and numpy datasets; main() in-process where the exit code and
stderr need no process of their own.
"""
import signal

import numpy as np
import pytest

import cli
import model
import run_finetune
from conftest import EOT, TINY
from finetune import data as data_module
from finetune.loop import LoopConfig, train_loop
from finetune.run_dir import lock_run_dir, saved_steps
from helpers import assert_usage_error, finetune, kill_while_saving, run_script, start_run, wait_for_line
from model_dir import NonFiniteTensorError, load_model_dir, read_tensors, save_checkpoint


@pytest.fixture(scope='module')
def dataset(tiny_dataset):
    """conftest's tiny_dataset: 800 tokens in two arrays, 13 sequences of 64."""
    return tiny_dataset


def step_of(prefix):
    return int(read_tensors(prefix, ['global_step'])['global_step'])


def all_finite(prefix):
    import tensorflow as tf
    reader = tf.train.load_checkpoint(prefix)
    return all(np.isfinite(reader.get_tensor(name)).all()
               for name, dtype in reader.get_variable_to_dtype_map().items() if dtype.is_floating)


# -- non-finite weights ----------------------------------------------------------------

@pytest.mark.parametrize('flag, value', [('--learning_rate', 'inf'), ('--learning_rate', 'nan'),
                                         ('--epochs', 'nan'), ('--epochs', 'inf')])
def test_non_finite_flag_values_are_refused_up_front(tmp_path, flag, value):
    with pytest.raises(cli.UsageError, match=f'{flag} must be a positive number'):
        run_finetune.main(['--dataset', 'nowhere.npz', '--checkpoint_dir', str(tmp_path), flag, value])


def test_a_non_finite_tensor_is_never_saved(tmp_path):
    with pytest.raises(NonFiniteTensorError, match='model/b'):
        save_checkpoint(tmp_path, {'model/a': np.ones(3, np.float32),
                                   'model/b': np.array([1, np.inf], np.float32)}, step=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_huge_learning_rate_saves_nothing_broken_and_claims_no_good_step(
        tmp_path, tiny_model_dir, dataset, capsys):
    # The first update already ruins the weights; every later loss is NaN.
    code = finetune(tmp_path, tiny_model_dir, dataset, '--learning_rate', 1e30, '--max_steps', 20,
                    '--save_every', 1, '--max_bad_steps', 2)
    err = capsys.readouterr().err
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert 'no checkpoint of this run is known to give a finite loss' in line, err
    assert 'holds the last' not in err
    run_dir = tmp_path / 'gpt2ja_finetune'
    for step in saved_steps(run_dir):
        assert all_finite(str(run_dir / f'model-{step}'))


@pytest.mark.slow
def test_weights_made_infinite_by_an_update_are_not_saved(tmp_path, tiny_model_dir, dataset, capsys):
    # Adam's first step scales the rate by sqrt(1 - 0.98) / (1 - 0.9) = 1.41: 3e38 overflows
    # float32 in the update itself, and the weights hold infinities.
    code = finetune(tmp_path, tiny_model_dir, dataset, '--learning_rate', 3e38,
                    '--max_steps', 3, '--save_every', 1)
    err = capsys.readouterr().err
    assert code == 1
    assert 'the update made the weights NaN or infinite' in err
    assert saved_steps(tmp_path / 'gpt2ja_finetune') == []


class ScriptedTrainer:
    """Steps whose loss is non-finite at given steps; no TensorFlow."""

    def __init__(self, bad_steps, start=0):
        self.step, self.bad_steps = start, set(bad_steps)

    def step_number(self):
        return self.step

    def train_step(self, tokens, weights, *, learning_rate, loss_scale):
        self.step += 1
        bad = self.step in self.bad_steps
        return (float('nan') if bad else 1.0), not bad


def test_the_good_step_is_the_newest_save_that_then_gave_a_finite_loss(dataset):
    seqs = data_module.load_sequences(dataset, n_ctx=TINY.n_ctx, n_vocab=TINY.n_vocab, pad_id=EOT)
    saved = []
    result = train_loop(ScriptedTrainer({5, 9, 10, 11}), seqs,
                        LoopConfig(batch_size=1, max_steps=50, save_every=4, max_bad_steps=3),
                        save=saved.append)
    # Saved at 4 (then step 6 applied: good) and 8 (then 9, 10, 11 failed: suspect).
    assert result.reason == 'non-finite' and result.step == 11
    assert saved == [4, 8] and result.good_step == 4


# -- the dataset -----------------------------------------------------------------------

@pytest.mark.slow
def test_a_damaged_dataset_is_refused(tmp_path, tiny_model_dir, dataset):
    damaged = tmp_path / 'damaged.npz'
    data = bytearray(dataset.read_bytes())
    data[200:600] = bytes(400)  # inside arr_0's tokens
    damaged.write_bytes(bytes(data))
    with pytest.raises(cli.UsageError, match='damaged') as error:
        finetune(tmp_path, tiny_model_dir, damaged, '--max_steps', 1)
    assert 'arr_0' in str(error.value)


# -- the run directory -----------------------------------------------------------------

@pytest.mark.slow
def test_a_second_run_on_a_live_run_directory_refuses_and_deletes_nothing(tmp_path, tiny_model_dir, dataset):
    first = start_run(tmp_path, tiny_model_dir, dataset, '--max_steps', 100000, '--save_every', 2)
    try:
        wait_for_line(first.stderr, 'Saving ')
        run_dir = tmp_path / 'gpt2ja_finetune'
        (run_dir / '.tmp-model-99-1').mkdir()  # as if the first run were saving right now
        with pytest.raises(cli.UsageError) as error:
            finetune(tmp_path, tiny_model_dir, dataset, '--max_steps', 3)
        assert f'in use by another run (process {first.pid})' in str(error.value)
        assert (run_dir / '.tmp-model-99-1').is_dir()
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert 'Traceback' not in err


def test_the_lock_is_released_when_the_run_ends(tmp_path):
    with lock_run_dir(tmp_path / 'run'):
        pass
    with lock_run_dir(tmp_path / 'run'):
        pass


@pytest.mark.slow
@pytest.mark.parametrize('damage', ['truncate', 'flip'])
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, tiny_model_dir, dataset, capsys, damage):
    assert finetune(tmp_path, tiny_model_dir, dataset, '--max_steps', 4, '--save_every', 2) == 0
    run_dir = tmp_path / 'gpt2ja_finetune'
    assert saved_steps(run_dir) == [2, 4]
    data_file = next(run_dir.glob('model-4.data-*'))
    data = bytearray(data_file.read_bytes())
    if damage == 'truncate':
        data = data[:len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xff
    data_file.write_bytes(bytes(data))
    capsys.readouterr()
    assert finetune(tmp_path, tiny_model_dir, dataset, '--max_steps', 6, '--save_every', 2) == 0
    err = capsys.readouterr().err
    assert 'model-4 is damaged' in err and 'resuming from model-2' in err
    assert 'Resuming' in err and 'at step 2' in err
    assert step_of(load_model_dir(run_dir).checkpoint) == 6


@pytest.mark.slow
def test_a_damaged_index_alone_is_a_one_line_error(tmp_path, tiny_model_dir, dataset):
    assert finetune(tmp_path, tiny_model_dir, dataset, '--max_steps', 1) == 0
    index = tmp_path / 'gpt2ja_finetune' / 'model-1.index'
    index.write_bytes(index.read_bytes()[:20])
    with pytest.raises(cli.UsageError, match='no intact checkpoint to resume from'):
        finetune(tmp_path, tiny_model_dir, dataset, '--max_steps', 2)


@pytest.mark.slow
def test_killed_in_the_first_save_the_next_run_starts_fresh(tmp_path, tiny_model_dir, dataset, capsys):
    kill_while_saving(tmp_path, tiny_model_dir, dataset, 'model-1.index', '--max_steps', 3, '--save_every', 1)
    run_dir = tmp_path / 'gpt2ja_finetune'
    assert list(run_dir.glob('.tmp-*'))
    assert finetune(tmp_path, tiny_model_dir, dataset, '--max_steps', 2) == 0
    assert 'Resuming' not in capsys.readouterr().err
    assert not list(run_dir.glob('.tmp-*'))
    assert step_of(load_model_dir(run_dir).checkpoint) == 2


@pytest.mark.slow
def test_a_failed_save_leaves_the_previous_checkpoints_and_no_temporary(tmp_path, tiny_model_dir, dataset,
                                                                       monkeypatch):
    assert finetune(tmp_path, tiny_model_dir, dataset, '--max_steps', 2, '--save_every', 2) == 0
    import tensorflow as tf
    real_save = tf.raw_ops.SaveV2

    def full_disk(**kwargs):
        real_save(**kwargs)  # the files are there, half written as far as anyone knows...
        raise tf.errors.ResourceExhaustedError(None, None, 'No space left on device')
    monkeypatch.setattr(tf.raw_ops, 'SaveV2', full_disk)
    with pytest.raises(cli.UsageError) as error:
        finetune(tmp_path, tiny_model_dir, dataset, '--max_steps', 4, '--save_every', 2)
    assert 'No space left on device' in str(error.value)
    assert 'saved before are intact' in str(error.value)
    run_dir = tmp_path / 'gpt2ja_finetune'
    assert not list(run_dir.glob('.tmp-*'))
    assert saved_steps(run_dir) == [2] and step_of(load_model_dir(run_dir).checkpoint) == 2



@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_line(tmp_path, tiny_model_dir, dataset, small_disk):
    tiny_filesystem = small_disk('size=5m')  # room for the vocabulary and one small checkpoint
    # With Adam, three copies of the weights: about 1.7 MiB a checkpoint for this model.
    small = model.HParams(n_vocab=TINY.n_vocab, n_ctx=64, n_embd=64, n_head=2, n_layer=2)
    base = tmp_path / 'small-base'
    from model_dir import save_model_dir
    save_model_dir(base, model.init_parameters(small, seed=3), small, vocab_dir=tiny_model_dir)
    result = run_script('run_finetune.py', '--dataset', dataset, '--base_model', base,
                        '--checkpoint_dir', tiny_filesystem, '--no-xla', '--max_steps', 6,
                        '--save_every', 1, '--keep', 0)
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert 'cannot save checkpoint' in last and last.endswith(
        'No space left on device; the checkpoints saved before are intact'), last
    run_dir = tiny_filesystem / 'gpt2ja_finetune'
    steps = saved_steps(run_dir)
    assert steps, 'the disk was too small for even one checkpoint'
    assert not list(run_dir.glob('.tmp-*'))
    assert step_of(load_model_dir(run_dir).checkpoint) == steps[-1]


@pytest.mark.slow
def test_a_disk_too_full_for_the_vocabulary_leaves_no_partial_copy(real_vocab_model_dir, dataset, small_disk):
    disk = small_disk('size=64k')  # the released ja-bpe.txt is twice that
    result = run_script('run_finetune.py', '--dataset', dataset, '--base_model', real_vocab_model_dir,
                        '--checkpoint_dir', disk, '--max_steps', 1)
    assert_usage_error(result, 'cannot write to the run directory', 'No space left on device')
    assert not (disk / 'gpt2ja_finetune' / 'ja-bpe.txt').exists()
    assert not list((disk / 'gpt2ja_finetune').glob('.tmp-*'))


@pytest.mark.slow
def test_resuming_a_finished_run_says_there_is_nothing_to_do(tmp_path, tiny_model_dir, dataset, capsys):
    assert finetune(tmp_path, tiny_model_dir, dataset, '--max_steps', 2) == 0
    capsys.readouterr()
    assert finetune(tmp_path, tiny_model_dir, dataset, '--max_steps', 2) == 0
    err = capsys.readouterr().err
    assert 'Nothing to do' in err and 'at step 2' in err and '--max_steps' in err


@pytest.mark.slow
def test_a_checkpoint_dir_that_is_a_file_is_one_line(tmp_path, tiny_model_dir, dataset):
    (tmp_path / 'file').write_text('x')
    result = run_script('run_finetune.py', '--dataset', dataset, '--base_model', tiny_model_dir,
                        '--checkpoint_dir', tmp_path / 'file', '--max_steps', 1)
    assert_usage_error(result, '--checkpoint_dir', 'is not a directory')
    with pytest.raises(cli.UsageError, match='cannot create the run directory'):
        finetune(tmp_path / 'file' / 'below', tiny_model_dir, dataset, '--max_steps', 1)


@pytest.mark.slow
def test_a_read_only_checkpoint_dir_is_one_line(tmp_path, tiny_model_dir, dataset, monkeypatch):
    # Tests run as root, who may write anywhere: the refusal is simulated at mkdir.
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, 'Permission denied', str(self))
    monkeypatch.setattr('pathlib.Path.mkdir', refuse)
    with pytest.raises(cli.UsageError, match='cannot create the run directory .*Permission denied'):
        finetune(tmp_path / 'read-only', tiny_model_dir, dataset, '--max_steps', 1)


@pytest.mark.slow
def test_a_read_only_disk_as_checkpoint_dir_is_one_line(tiny_model_dir, dataset, small_disk):
    disk = small_disk('size=64k,ro')
    result = run_script('run_finetune.py', '--dataset', dataset, '--base_model', tiny_model_dir,
                        '--checkpoint_dir', disk, '--max_steps', 1)
    assert_usage_error(result, 'cannot create the run directory', 'Read-only file system')


def test_help_shows_no_none_defaults():
    text = run_finetune.build_parser().format_help()
    assert '(default: None)' not in text and '(default: searched for)' not in text
