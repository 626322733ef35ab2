"""run_finetune.py as a user runs it: whole runs that resume, save, stop on a signal and
survive a kill; the run directory as a model for every script and for TF1 code; bad input.

Most runs call main() in-process; a few run it in a child process, to check exit codes,
signals and stderr.
"""
import json
import signal

import numpy as np
import pytest
import tensorflow as tf

import cli
import model
from conftest import TINY
from helpers import assert_usage_error, finetune, kill_while_saving, load_script, run_script, start_run, wait_for_line
from model_dir import load_model_dir, read_tensors, save_model_dir


def run_params(run_dir):
    return load_model_dir(run_dir).load_parameters()


@pytest.mark.slow
def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path, tiny_model_dir, tiny_dataset):
    common = ['--batch_size', 2, '--seed', 3, '--learning_rate', 1e-3, '--warmup_steps', 2, '--save_every', 0]
    assert finetune(tmp_path, tiny_model_dir, tiny_dataset, '--run_name', 'straight', '--max_steps', 8, *common) == 0
    assert finetune(tmp_path, tiny_model_dir, tiny_dataset, '--run_name', 'resumed', '--max_steps', 4, *common) == 0
    assert finetune(tmp_path, tiny_model_dir, tiny_dataset, '--run_name', 'resumed', '--max_steps', 8, *common) == 0
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


@pytest.mark.slow
def test_the_run_directory_loads_as_a_model_and_in_tf1_code(tmp_path, tiny_model_dir, tiny_dataset):
    assert finetune(tmp_path, tiny_model_dir, tiny_dataset, '--run_name', 'r', '--max_steps', 3,
                    '--learning_rate', 1e-3, '--keep', 2, '--save_every', 1) == 0
    run_dir = tmp_path / 'r'
    assert sorted(p.name for p in run_dir.glob('*.index')) == ['model-2.index', 'model-3.index']
    state = (run_dir / 'checkpoint').read_text()
    assert state.startswith('model_checkpoint_path: "model-3"') and str(tmp_path) not in state
    assert list(run_dir.glob('events.out.tfevents.*'))
    found = load_model_dir(run_dir)  # hparams.json, vocabulary and checkpoint all there
    assert found.vocab_dir == run_dir and found.hparams == TINY
    tokens = np.array([[5, 300, 77, 600, 3]], np.int32)
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


@pytest.mark.slow
def test_the_run_directory_works_in_every_script(tmp_path, tiny_model_dir, tiny_dataset, capsys):
    assert finetune(tmp_path, tiny_model_dir, tiny_dataset, '--run_name', 'r', '--max_steps', 2,
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
                                                 '5', '--num_generate', '1', '--format', 'jsonl',
                                                 '--gpu', '-1']) == 0
    next_log_probs = log_probs[len(ids)].copy()
    next_log_probs[encoder.eot_id] = -np.inf  # --min_length forbids ending at once
    first_token = json.loads(capsys.readouterr().out)['tokens'][0]
    assert first_token == int(np.argmax(next_log_probs))  # greedy


@pytest.mark.slow
def test_validation_and_samples_are_printed(tmp_path, tiny_model_dir, tiny_dataset, capsys):
    assert finetune(tmp_path, tiny_model_dir, tiny_dataset, '--max_steps', 2, '--val_fraction', 0.25,
                    '--val_every', 2, '--sample_every', 2, '--sample_length', 5, '--batch_size', 2) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith('[2] val_loss='))
    loss = float(line.split('val_loss=')[1].split()[0])
    assert 5 < loss < 15 and f'val_ppl={np.exp(loss):.2f}'[:12] in line
    assert 'SAMPLE at step 2' in out


@pytest.mark.parametrize('case, fragments', [
    ('too_short', ['has 40 tokens', 'fewer than one sequence']),
    ('bad_ids', [f'id {TINY.n_vocab}', 'outside the vocabulary']),
    ('no_base', ['does not exist']),
    pytest.param('other_base', ['was made from the base model'], marks=pytest.mark.slow),  # trains first
])
def test_bad_input_is_one_line_before_training(tmp_path, tiny_model_dir, tiny_dataset, case, fragments):
    data, base = tiny_dataset, tiny_model_dir
    if case == 'too_short':
        data = tmp_path / 'short.npz'
        np.savez(data, np.arange(40, dtype=np.uint16))
    elif case == 'bad_ids':
        data = tmp_path / 'bad.npz'
        np.savez(data, np.array([1, 2, TINY.n_vocab] * 30, dtype=np.uint16))
    elif case == 'no_base':
        base = tmp_path / 'nowhere'
    else:
        other = tmp_path / 'other-base'
        save_model_dir(other, model.init_parameters(TINY, seed=2), TINY, vocab_dir=tiny_model_dir)
        assert finetune(tmp_path, tiny_model_dir, tiny_dataset, '--run_name', 'x', '--max_steps', 1) == 0
        base = other
    with pytest.raises(cli.UsageError) as error:
        finetune(tmp_path, base, data, '--run_name', 'x', '--max_steps', 1)
    assert all(f in str(error.value) for f in fragments), str(error.value)
    assert '\n' not in str(error.value)


# -- as a user runs it (subprocesses) --------------------------------------------------------

@pytest.mark.slow
def test_usage_error_and_clean_stderr(tmp_path, tiny_model_dir, tiny_dataset):
    result = run_script('run_finetune.py', '--dataset', tiny_dataset, '--base_model', tiny_model_dir,
                        '--checkpoint_dir', tmp_path, '--batch_size', 0)
    assert_usage_error(result, '--batch_size must be at least 1')
    result = run_script('run_finetune.py', '--dataset', tiny_dataset, '--base_model', tiny_model_dir,
                        '--checkpoint_dir', tmp_path, '--max_steps', 2, '--save_every', 0)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines.pop(0).startswith('precision: ')  # what --precision auto chose, and why
    assert lines[0].startswith('[1 | ') and ' loss=' in lines[0] and ' avg=' in lines[0]
    assert lines[1].startswith('[2 | ')
    assert len(lines) == 3 and lines[2].startswith('Saving ')  # nothing from TensorFlow


def test_sigterm_saves_once_and_exits_cleanly(tmp_path, tiny_model_dir, tiny_dataset):
    process = start_run(tmp_path, tiny_model_dir, tiny_dataset, '--max_steps', 100000, '--save_every', 0)
    wait_for_line(process.stderr, '[3 |')
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert err.count('Saving ') == 1 and 'Traceback' not in err
    step = read_tensors(load_model_dir(tmp_path / 'gpt2ja_finetune').checkpoint, ['global_step'])['global_step']
    assert step >= 3


@pytest.mark.slow
def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path, tiny_model_dir, tiny_dataset, capsys):
    # Killed while saving step 4, after the data file is in place and before its index is.
    kill_while_saving(tmp_path, tiny_model_dir, tiny_dataset, 'model-4.index',
                      '--max_steps', 6, '--save_every', 2, '--seed', 1)
    run_dir = tmp_path / 'gpt2ja_finetune'
    assert list(run_dir.glob('model-4.data-*'))  # the half-written checkpoint is there...
    assert load_model_dir(run_dir).checkpoint.endswith('model-2')  # ...but the previous one loads
    assert finetune(tmp_path, tiny_model_dir, tiny_dataset, '--max_steps', 6, '--save_every', 2, '--seed', 1) == 0
    assert 'Resuming' in capsys.readouterr().err
    assert not list(run_dir.glob('.tmp-*'))
    assert read_tensors(load_model_dir(run_dir).checkpoint, ['global_step'])['global_step'] == 6
