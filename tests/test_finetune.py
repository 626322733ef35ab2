"""run_finetune.py: data, optimizers, the step, resume, crash safety, stopping, bad input.

Tiny models (conftest.TINY, n_ctx 64) and datasets made with numpy; most runs call main()
in-process; a few run it as a user would, to check exit codes, signals and stderr.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import cli
import model
import run_finetune
from conftest import TINY
from finetune import data as data_module
from finetune.loop import LoopConfig, train_loop
from finetune.optimizers import OPTIMIZERS, warmup_learning_rate
from finetune.run_dir import initial_values
from finetune.trainer import Trainer
from helpers import REPO, assert_usage_error, load_script, run_script
from model_dir import load_model_dir, read_tensors

EOT = 20572


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    """Two uint16 arrays, 800 tokens: 13 sequences of 64, the last one partial (32 tokens)."""
    path = tmp_path_factory.mktemp('data') / 'train.npz'
    rng = np.random.default_rng(0)
    np.savez(path, rng.integers(0, 20000, 500).astype(np.uint16),
             rng.integers(0, 20000, 300).astype(np.uint16))
    return path


def finetune(tmp_path, base, dataset, *args):
    """Run main() in-process; returns the exit code."""
    return run_finetune.main(['--dataset', str(dataset), '--base_model', str(base),
                              '--checkpoint_dir', str(tmp_path), '--no-xla', *map(str, args)])


def run_params(run_dir):
    found = load_model_dir(run_dir)
    return found.load_parameters()


# -- data ----------------------------------------------------------------------------

def test_sequences_read_arrays_in_order_and_pad_the_last(tmp_path):
    path = tmp_path / 'd.npz'
    first, second = np.arange(100, 250, dtype=np.uint16), np.arange(300, 330, dtype=np.int64)
    np.savez(path, first, second)
    seqs = data_module.load_sequences(path, n_ctx=64, n_vocab=TINY.n_vocab, pad_id=EOT)
    assert len(seqs) == 3  # 180 tokens
    assert all(isinstance(a, np.memmap) for a in seqs.arrays)  # never read into memory
    stream = np.concatenate([first, second])
    tokens, weights = seqs.batch([1, 2])
    assert tokens.dtype == np.int32
    assert tokens[0].tolist() == stream[64:128].tolist()
    assert tokens[1, :52].tolist() == stream[128:].tolist() and set(tokens[1, 52:]) == {EOT}
    assert weights[0].sum() == 63 and weights[1].sum() == 51  # padding is not trained on


def test_compressed_npz_also_loads(tmp_path):
    path = tmp_path / 'd.npz'
    np.savez_compressed(path, np.arange(70, dtype=np.int32))
    seqs = data_module.load_sequences(path, n_ctx=64, n_vocab=TINY.n_vocab, pad_id=EOT)
    assert seqs.read(1)[0][:6].tolist() == [64, 65, 66, 67, 68, 69]


def test_each_epoch_visits_every_sequence_once_in_a_new_order():
    count, size = 10, 3
    order = np.concatenate([data_module.batch_indices(step, size, count=count, seed=5)
                            for step in range(20)])  # 60 sequences: 6 epochs
    epochs = order.reshape(6, count)
    assert all(sorted(epoch) == list(range(count)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1
    assert np.array_equal(data_module.batch_indices(7, size, count=count, seed=5), order[21:24])


# -- optimizers ------------------------------------------------------------------------

def test_warmup_really_warms_up():
    lr = lambda step: warmup_learning_rate(step, learning_rate=1e-4, warmup_steps=100)
    assert lr(0) == pytest.approx(1e-10)
    assert lr(25) == pytest.approx(2.5e-5, rel=1e-4)
    assert lr(50) == pytest.approx(5e-5, rel=1e-4)
    assert lr(100) == lr(5000) == 1e-4
    assert warmup_learning_rate(0, learning_rate=1e-4, warmup_steps=0) == 1e-4


@pytest.mark.parametrize('name', ['adam', 'adagrad', 'sgd'])
def test_optimizers_match_tf1(name):
    """Three steps on a toy variable, against tf.compat.v1.train's optimizer."""
    v1 = tf.compat.v1
    start = np.array([[0.5, -1.0], [2.0, 0.1]], np.float32)
    grads = [np.array([[0.1, -0.2], [0.3, 0.05]], np.float32) * (k + 1) for k in range(3)]
    reference = {'adam': lambda: v1.train.AdamOptimizer(0.01, beta1=0.9, beta2=0.98, epsilon=1e-7),
                 'adagrad': lambda: v1.train.AdagradOptimizer(0.01),
                 'sgd': lambda: v1.train.GradientDescentOptimizer(0.01)}[name]
    with tf.Graph().as_default(), v1.Session() as sess:
        var = v1.get_variable('model/w', initializer=start)
        grad = v1.placeholder(tf.float32, start.shape)
        opt = reference()
        apply = opt.apply_gradients([(grad, var)])
        sess.run(v1.global_variables_initializer())
        for g in grads:
            sess.run(apply, {grad: g})
        expected = sess.run(var)
        slot_names = sorted(v.op.name for v in v1.global_variables() if v.op.name != 'model/w')
    optimizer = OPTIMIZERS[name]()
    state = {k: tf.Variable(f()) for k, f in optimizer.initial_state({'model/w': start.shape}).items()}
    assert sorted(state) == slot_names  # the same checkpoint names as TF1
    value = tf.Variable(start)
    for g in grads:
        slots = [state[f'model/w/{s}'] for s in optimizer.slot_suffixes]
        optimizer.apply(value, tf.constant(g), slots, {k: state[k].read_value() for k in state}, 0.01)
        for k, f in optimizer.scalar_factors.items():
            state[k].assign(state[k] * f)
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5, atol=1e-7)


# -- the training step -------------------------------------------------------------------

def make_trainer(tiny_model_dir, optimizer='sgd', **kwargs):
    base = load_model_dir(tiny_model_dir)
    opt = OPTIMIZERS[optimizer]()
    return Trainer(hparams=base.hparams, optimizer=opt, initial=initial_values(base, None, opt), **kwargs)


def test_accumulated_gradient_equals_the_large_batch(tiny_model_dir, dataset):
    seqs = data_module.load_sequences(dataset, n_ctx=TINY.n_ctx, n_vocab=TINY.n_vocab, pad_id=EOT)
    # Includes the padded last sequence, so the per-token normalisation is tested too.
    tokens, weights = seqs.batch([0, 3, 12, 5])
    lr = 1.0  # SGD: new weights = old - lr * gradient, so equal weights mean equal gradients
    large = make_trainer(tiny_model_dir)
    loss_large, _ = large.train_step(tokens[None], weights[None], learning_rate=lr)
    accumulated = make_trainer(tiny_model_dir)
    loss_acc, _ = accumulated.train_step(tokens.reshape(2, 2, -1), weights.reshape(2, 2, -1),
                                         learning_rate=lr)
    assert loss_acc == pytest.approx(loss_large, rel=1e-5)
    start = model.init_parameters(TINY, seed=1)
    for name, value in large.parameter_values().items():
        moved = start[name] - value.numpy()
        np.testing.assert_allclose(start[name] - accumulated.parameter_values()[name].numpy(), moved,
                                   rtol=1e-3, atol=1e-6)
    assert np.abs(start['model/wte'] - large.parameter_values()['model/wte'].numpy()).max() > 0


def test_a_non_finite_loss_is_not_applied(tiny_model_dir, dataset):
    trainer = make_trainer(tiny_model_dir, optimizer='adam')
    seqs = data_module.load_sequences(dataset, n_ctx=TINY.n_ctx, n_vocab=TINY.n_vocab, pad_id=EOT)
    tokens, weights = seqs.batch([0, 1])
    before = {k: v.numpy().copy() for k, v in trainer.tensors().items()}
    weights[0, 3] = np.nan
    loss, applied = trainer.train_step(tokens[None], weights[None], learning_rate=0.1)
    assert not applied and np.isnan(loss)
    after = trainer.tensors()
    for name in before:
        if name != 'global_step':
            np.testing.assert_array_equal(after[name].numpy(), before[name], err_msg=name)
    assert trainer.step_number() == 1  # the batch is passed over, not retried


class FakeTrainer:
    """train_step fails (non-finite) at the given steps; no TensorFlow."""

    def __init__(self, bad_steps):
        self.step, self.bad_steps, self.learning_rates = 0, set(bad_steps), []

    def step_number(self):
        return self.step

    def train_step(self, tokens, weights, *, learning_rate, loss_scale):
        self.learning_rates.append(learning_rate)
        self.step += 1
        bad = self.step in self.bad_steps
        return (float('nan') if bad else 1.0), not bad


def loop_on(fake, dataset, **config):
    seqs = data_module.load_sequences(dataset, n_ctx=TINY.n_ctx, n_vocab=TINY.n_vocab, pad_id=EOT)
    saved = []
    result = train_loop(fake, seqs, LoopConfig(batch_size=1, **config), save=saved.append)
    return result, saved


def test_several_non_finite_steps_in_a_row_stop_the_run(dataset):
    result, saved = loop_on(FakeTrainer({3, 5, 6, 7}), dataset, max_steps=50, max_bad_steps=3,
                            save_every=4)
    assert result.reason == 'non-finite' and result.step == 7
    assert saved == [4, 7]  # weights were never changed by a bad step: step 7 is the last good state
    result, _ = loop_on(FakeTrainer({3, 5}), dataset, max_steps=10, max_bad_steps=2)
    assert result.reason == 'finished' and result.step == 10


def test_the_loop_passes_the_warmup_learning_rate(dataset):
    fake = FakeTrainer(())
    loop_on(fake, dataset, max_steps=6, learning_rate=1e-3, warmup_steps=4, save_every=0)
    assert fake.learning_rates == pytest.approx([1e-10, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3], rel=1e-5)


# -- whole runs ------------------------------------------------------------------------

def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path, tiny_model_dir, dataset):
    common = ['--batch_size', 2, '--seed', 3, '--learning_rate', 1e-3, '--warmup_steps', 2, '--save_every', 0]
    assert finetune(tmp_path, tiny_model_dir, dataset, '--run_name', 'straight', '--max_steps', 8, *common) == 0
    assert finetune(tmp_path, tiny_model_dir, dataset, '--run_name', 'resumed', '--max_steps', 4, *common) == 0
    assert finetune(tmp_path, tiny_model_dir, dataset, '--run_name', 'resumed', '--max_steps', 8, *common) == 0
    straight = read_tensors(load_model_dir(tmp_path / 'straight').checkpoint, ['model/wte/Adam_1', 'global_step'])
    resumed = read_tensors(load_model_dir(tmp_path / 'resumed').checkpoint, ['model/wte/Adam_1', 'global_step'])
    assert straight['global_step'] == resumed['global_step'] == 8
    np.testing.assert_allclose(resumed['model/wte/Adam_1'], straight['model/wte/Adam_1'], rtol=1e-4, atol=1e-12)
    a, b = run_params(tmp_path / 'straight'), run_params(tmp_path / 'resumed')
    start = model.init_parameters(TINY, seed=1)
    assert np.abs(a['model/h0/mlp/c_fc/w'] - start['model/h0/mlp/c_fc/w']).max() > 1e-4  # it trained
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert sorted(p.name for p in (tmp_path / 'resumed').glob('*.index')) == ['model-4.index', 'model-8.index']
    assert (tmp_path / 'resumed' / 'counter').read_text().strip() == '8'


def test_the_run_directory_loads_as_a_model_and_in_tf1_code(tmp_path, tiny_model_dir, dataset):
    assert finetune(tmp_path, tiny_model_dir, dataset, '--run_name', 'r', '--max_steps', 3,
                    '--learning_rate', 1e-3, '--keep', 2, '--save_every', 1) == 0
    run_dir = tmp_path / 'r'
    assert sorted(p.name for p in run_dir.glob('*.index')) == ['model-2.index', 'model-3.index']
    state = (run_dir / 'checkpoint').read_text()
    assert state.startswith('model_checkpoint_path: "model-3"') and str(tmp_path) not in state
    assert list(run_dir.glob('events.out.tfevents.*'))
    found = load_model_dir(run_dir)  # hparams.json, vocabulary and checkpoint all there
    assert found.vocab_dir == run_dir and found.hparams == TINY
    tokens = np.array([[5, 900, 77, 12000, 3]], np.int32)
    ours = model.forward(found.load_parameters(), tokens, hparams=TINY)['logits'].numpy()
    v1 = tf.compat.v1
    with tf.Graph().as_default(), v1.Session() as sess:
        params = model.tf1_parameters(TINY)
        logits = model.forward(params, tf.constant(tokens), hparams=TINY)['logits']
        v1.train.Saver(var_list=params).restore(sess, v1.train.latest_checkpoint(str(run_dir)))
        theirs = sess.run(logits)
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5)
    assert not np.allclose(ours, model.forward(model.init_parameters(TINY, seed=1), tokens,
                                               hparams=TINY)['logits'].numpy())


def tf1_outputs(run_dir, tokens):
    """Log-probabilities [seq, vocab] and final hidden states [seq, embd] of `tokens`, from a
    plain TF1 graph restored with tf.compat.v1.train.Saver: what TF1-style code sees."""
    v1 = tf.compat.v1
    with tf.Graph().as_default(), v1.Session() as sess:
        params = model.tf1_parameters(TINY)
        out = model.forward(params, tf.constant([tokens]), hparams=TINY)
        v1.train.Saver(var_list=params).restore(sess, v1.train.latest_checkpoint(str(run_dir)))
        log_probs, hidden = sess.run([tf.nn.log_softmax(out['logits'])[0], out['hidden'][0]])
    return log_probs, hidden


def test_the_run_directory_works_in_every_script(tmp_path, tiny_model_dir, dataset, capsys):
    assert finetune(tmp_path, tiny_model_dir, dataset, '--run_name', 'r', '--max_steps', 2,
                    '--learning_rate', 1e-3) == 0
    run_dir, text = tmp_path / 'r', '今日は晴れ。'
    capsys.readouterr()
    encoder = load_model_dir(run_dir).load_encoder()
    ids = encoder.encode(text)
    log_probs, hidden = tf1_outputs(run_dir, [encoder.eot_id] + ids)
    targets = ids + [encoder.eot_id]
    expected_total = sum(float(log_probs[i, t]) for i, t in enumerate(targets))

    lines = tmp_path / 'lines.txt'
    lines.write_text(text + '\n', encoding='utf-8')
    assert load_script('gpt2-score.py').main(['--model', str(run_dir), str(lines), '--gpu', '-1']) == 0
    printed_text, printed_total = capsys.readouterr().out.rstrip('\n').split('\t')
    assert printed_text == text
    assert float(printed_total) == pytest.approx(expected_total, rel=1e-4)

    assert load_script('gpt2-transform.py').main(['--model', str(run_dir), '--context', text,
                                                  '--gpu', '-1']) == 0
    vector = json.loads(capsys.readouterr().out)
    _, context_hidden = tf1_outputs(run_dir, ids)
    np.testing.assert_allclose(vector, context_hidden[-1], rtol=1e-4, atol=1e-5)

    assert load_script('gpt2-generate.py').main(['--model', str(run_dir), '--context', text,
                                                 '--top_k', '1', '--min_length', '5', '--max_length',
                                                 '5', '--num_generate', '1', '--gpu', '-1']) == 0
    next_log_probs = log_probs[len(ids)].copy()
    next_log_probs[encoder.eot_id] = -np.inf  # --min_length forbids ending at once
    greedy = encoder.decode([int(np.argmax(next_log_probs))])  # the first greedy token
    assert capsys.readouterr().out.startswith(greedy[:1])


def test_validation_and_samples_are_printed(tmp_path, tiny_model_dir, dataset, capsys):
    assert finetune(tmp_path, tiny_model_dir, dataset, '--max_steps', 2, '--val_fraction', 0.25,
                    '--val_every', 2, '--sample_every', 2, '--sample_length', 5, '--batch_size', 2) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith('[2] val_loss='))
    loss = float(line.split('val_loss=')[1].split()[0])
    assert 5 < loss < 15 and f'val_ppl={np.exp(loss):.2f}'[:12] in line
    assert 'SAMPLE at step 2' in out


@pytest.mark.parametrize('case, fragments', [
    ('too_short', ['has 40 tokens', 'fewer than one sequence']),
    ('bad_ids', ['id 20573', 'outside the vocabulary']),
    ('no_base', ['does not exist']),
    ('other_base', ['was made from the base model']),
])
def test_bad_input_is_one_line_before_training(tmp_path, tiny_model_dir, dataset, case, fragments):
    data, base = dataset, tiny_model_dir
    if case == 'too_short':
        data = tmp_path / 'short.npz'
        np.savez(data, np.arange(40, dtype=np.uint16))
    elif case == 'bad_ids':
        data = tmp_path / 'bad.npz'
        np.savez(data, np.array([1, 2, 20573] * 30, dtype=np.uint16))
    elif case == 'no_base':
        base = tmp_path / 'nowhere'
    else:
        other = tmp_path / 'other-base'
        from model_dir import save_model_dir
        save_model_dir(other, model.init_parameters(TINY, seed=2), TINY, vocab_dir=tiny_model_dir)
        assert finetune(tmp_path, tiny_model_dir, dataset, '--run_name', 'x', '--max_steps', 1) == 0
        base = other
    with pytest.raises(cli.UsageError) as error:
        finetune(tmp_path, base, data, '--run_name', 'x', '--max_steps', 1)
    assert all(f in str(error.value) for f in fragments), str(error.value)
    assert '\n' not in str(error.value)


# -- as a user runs it (subprocesses) --------------------------------------------------------

def test_usage_error_and_clean_stderr(tmp_path, tiny_model_dir, dataset):
    result = run_script('run_finetune.py', '--dataset', dataset, '--base_model', tiny_model_dir,
                        '--checkpoint_dir', tmp_path, '--batch_size', 0)
    assert_usage_error(result, '--batch_size must be at least 1')
    result = run_script('run_finetune.py', '--dataset', dataset, '--base_model', tiny_model_dir,
                        '--checkpoint_dir', tmp_path, '--max_steps', 2, '--save_every', 0)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines.pop(0).startswith('precision: ')  # what --precision auto chose, and why
    assert lines[0].startswith('[1 | ') and ' loss=' in lines[0] and ' avg=' in lines[0]
    assert lines[1].startswith('[2 | ')
    assert len(lines) == 3 and lines[2].startswith('Saving ')  # nothing from TensorFlow


def start_run(tmp_path, base, dataset, *args, prelude=''):
    code = prelude + 'import cli, run_finetune; cli.run_main(run_finetune.main)'
    return subprocess.Popen(
        [sys.executable, '-c', code, '--dataset', str(dataset), '--base_model', str(base),
         '--checkpoint_dir', str(tmp_path), '--no-xla', *map(str, args)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED='1'))


def wait_for_line(stream, fragment, timeout=60):
    deadline, seen = time.time() + timeout, []
    while time.time() < deadline:
        line = stream.readline()
        seen.append(line)
        if fragment in line:
            return line
        if not line:
            break
    raise AssertionError(f'{fragment!r} not seen in {seen}')


def test_sigterm_saves_once_and_exits_cleanly(tmp_path, tiny_model_dir, dataset):
    process = start_run(tmp_path, tiny_model_dir, dataset, '--max_steps', 100000, '--save_every', 0)
    wait_for_line(process.stderr, '[3 |')
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert err.count('Saving ') == 1 and 'Traceback' not in err
    step = read_tensors(load_model_dir(tmp_path / 'gpt2ja_finetune').checkpoint, ['global_step'])['global_step']
    assert step >= 3


# While saving step 4, after the data file is in place and before its index is: pause, so the
# test can kill -9 the process at the most delicate moment of a save.
PAUSE_IN_SAVE = '''
import os, sys, time
_replace = os.replace
def _pausing_replace(src, dst):
    if str(dst).endswith('model-4.index'):
        print('PAUSED IN SAVE', flush=True)
        time.sleep(600)
    return _replace(src, dst)
os.replace = _pausing_replace
'''


def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path, tiny_model_dir, dataset, capsys):
    process = start_run(tmp_path, tiny_model_dir, dataset, '--max_steps', 6, '--save_every', 2,
                        '--seed', 1, prelude=PAUSE_IN_SAVE)
    try:
        wait_for_line(process.stdout, 'PAUSED IN SAVE')
    finally:
        process.kill()
        process.communicate(timeout=30)
    run_dir = tmp_path / 'gpt2ja_finetune'
    assert list(run_dir.glob('model-4.data-*'))  # the half-written checkpoint is there...
    assert load_model_dir(run_dir).checkpoint.endswith('model-2')  # ...but the previous one loads
    assert finetune(tmp_path, tiny_model_dir, dataset, '--max_steps', 6, '--save_every', 2, '--seed', 1) == 0
    assert 'Resuming' in capsys.readouterr().err
    assert not list(run_dir.glob('.tmp-*'))
    assert read_tensors(load_model_dir(run_dir).checkpoint, ['global_step'])['global_step'] == 6


def test_process_memory_settings(monkeypatch):
    # run_finetune.py tunes glibc malloc always, and with --recompute turns oneDNN off unless
    # the environment already says otherwise (finetune.memory; measured in report/finetune.md).
    from finetune import memory
    if sys.platform.startswith('linux'):
        assert memory.tune_malloc()
    monkeypatch.delenv('TF_ENABLE_ONEDNN_OPTS', raising=False)
    memory.prepare_process(recompute=False)
    assert 'TF_ENABLE_ONEDNN_OPTS' not in os.environ
    memory.prepare_process(recompute=True)
    assert os.environ['TF_ENABLE_ONEDNN_OPTS'] == '0'
    monkeypatch.setenv('TF_ENABLE_ONEDNN_OPTS', '1')
    memory.prepare_process(recompute=True)
    assert os.environ['TF_ENABLE_ONEDNN_OPTS'] == '1'
