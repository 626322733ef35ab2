"""What makes the scripts start fast and stay lean: loading, the sampler's weights, progress, --xla."""
import io

import numpy as np
import pytest
import tensorflow as tf

import cli
import model
import sample
from conftest import TINY
from helpers import load_script, run_main
from model_dir import load_model_dir


class Terminal:
    """A stream that says it is a terminal and keeps what is written."""

    def __init__(self):
        self.text = ''

    def write(self, text):
        self.text += text
        return len(text)

    def flush(self):
        pass

    def isatty(self):
        return True


def test_loading_one_tensor_at_a_time_reads_the_checkpoints_values(tiny_model_dir):
    loaded = load_model_dir(tiny_model_dir)
    loaders = loaded.parameter_loaders()
    expected = loaded.load_parameters()
    assert list(loaders) == list(expected)
    for name, load in loaders.items():
        np.testing.assert_array_equal(load().numpy(), expected[name], err_msg=name)


def test_the_sampler_holds_one_copy_of_the_weights(tiny_model_dir):
    loaded = load_model_dir(tiny_model_dir)
    params = sample.decoding_parameters(loaded.parameter_loaders())
    held = sum(int(np.prod(value.shape)) for value in params.values())
    assert held == model.count_parameters(TINY)
    assert 'model/wte' not in params  # only its transposed layout
    np.testing.assert_array_equal(params[model.WTE_TRANSPOSED].numpy(), loaded.load_parameters()['model/wte'].T)
    assert sample.decoding_parameters(params) is params  # made once, shared by every sampler


# Shapes no other test uses, so that the block's traces counted here are this test's own.
THREE_LAYERS = model.HParams(n_vocab=50, n_ctx=16, n_embd=24, n_head=2, n_layer=3)


def block_calls(graph):
    return [op for op in graph.get_operations() if op.type in ('PartitionedCall', 'StatefulPartitionedCall')]


def test_whole_texts_trace_the_block_once_and_give_the_eager_logits():
    params = model.init_parameters(THREE_LAYERS, seed=1)
    tokens = np.random.default_rng(0).integers(0, THREE_LAYERS.n_vocab, size=(2, 9)).astype(np.int32)
    traces = model._traced_text_block.tracing_count()
    logits = tf.function(lambda t: model.forward(params, t, hparams=THREE_LAYERS)['logits'], autograph=False)
    graph = logits.get_concrete_function(tf.TensorSpec([None, None], tf.int32)).graph
    assert model._traced_text_block.tracing_count() == traces + 1
    assert len(block_calls(graph)) == THREE_LAYERS.n_layer
    np.testing.assert_allclose(logits(tokens), model.forward(params, tokens, hparams=THREE_LAYERS)['logits'],
                               rtol=1e-5, atol=1e-5)


def test_the_sampling_step_traces_the_cached_block_once():
    traces = model._traced_cached_block.tracing_count()
    sampler = sample.BatchSampler(model.init_parameters(THREE_LAYERS, seed=1), THREE_LAYERS, batch_size=2,
                                  settings=sample.Settings(top_k=1), eot_id=THREE_LAYERS.n_vocab - 1,
                                  rng=tf.random.Generator.from_seed(0))
    sampler.start([[1, 2, 3], [4]], [False, False])
    assert model._traced_cached_block.tracing_count() == traces + 1
    assert len(block_calls(sampler._advance.get_concrete_function().graph)) == THREE_LAYERS.n_layer


@pytest.mark.parametrize('script_name, args', [
    ('gpt2-score.py', ['-']),
    ('gpt2-transform.py', ['--context', 'あいう']),
    ('gpt2-generate.py', ['--context', 'あいう', '--max_length', '3', '--seed', '1']),
])
def test_the_inference_scripts_skip_the_graph_optimiser(script_name, args, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr('sys.stdin', io.TextIOWrapper(io.BytesIO('あいう\n'.encode())))
    assert not tf.config.optimizer.get_experimental_options().get('disable_meta_optimizer', False)
    run_main(load_script(script_name), capsys, '--model', tiny_model_dir, *args)
    assert tf.config.optimizer.get_experimental_options()['disable_meta_optimizer']


def test_progress_counts_characters_and_finishes_samples_that_end_early(monkeypatch):
    import sys
    monkeypatch.setattr(sys, 'stderr', Terminal())
    script = load_script('gpt2-generate.py')
    progress = script.CharacterProgress(2, 10, show=True)
    progress.update(0, 'abc')
    progress.update(0, 'abcdef')
    progress.update(1, 'xy')
    assert progress.bar.n == 8
    progress.finish_sample(sample.TextSample(index=1, context=[], text='xy'))  # ended at 2 of 10
    progress.finish_sample(sample.TextSample(index=0, context=[], text='abcdefghij'))
    assert progress.bar.n == progress.bar.total == 20


@pytest.mark.parametrize('stderr_is_terminal', [True, False])
def test_generation_shows_progress_only_on_a_terminal(tiny_model_dir, monkeypatch, capsys, stderr_is_terminal):
    import sys
    script = load_script('gpt2-generate.py')
    terminal = Terminal()
    if stderr_is_terminal:
        monkeypatch.setattr(sys, 'stderr', terminal)
    assert script.main(['--model', str(tiny_model_dir), '--num_generate', '2', '--max_length', '30',
                        '--seed', '1']) == 0
    assert capsys.readouterr().out.count('========') == 1
    if stderr_is_terminal:
        assert 'char' in terminal.text and '/60' in terminal.text
    else:
        assert capsys.readouterr().err == ''


@pytest.mark.parametrize('script_name, required', [
    ('gpt2-generate.py', []), ('run_finetune.py', ['--dataset', 'x.npz'])])
def test_xla_is_spelled_the_same_in_every_script(script_name, required):
    parser = load_script(script_name).build_parser()
    assert parser.parse_args(required).xla is False
    assert parser.parse_args(required + ['--xla']).xla is True
    assert parser.parse_args(required + ['--xla', '--no-xla']).xla is False


# --- parameters filled in the background while the functions are traced ------------------

def test_loading_in_the_background_fills_the_decoders_variables(tiny_model_dir):
    loaded = load_model_dir(tiny_model_dir)
    loading = sample.start_loading_decoding_parameters(loaded)
    loading.wait()
    expected = sample.decoding_parameters(loaded.parameter_loaders())
    assert list(loading.variables) == list(expected)  # the same names: wte only transposed
    for name, variable in loading.variables.items():
        np.testing.assert_array_equal(variable.numpy(), expected[name].numpy(), err_msg=name)


@pytest.mark.parametrize('without_private_api', [False, True])
def test_background_loading_works_without_tensorflows_private_uninitialized_variable(
        tiny_model_dir, monkeypatch, without_private_api):
    from tensorflow.python.ops import resource_variable_ops
    if without_private_api:
        monkeypatch.delattr(resource_variable_ops, 'UninitializedVariable')
    loaded = load_model_dir(tiny_model_dir)
    loading = sample.start_loading_decoding_parameters(loaded)
    loading.wait()
    expected = sample.decoding_parameters(loaded.parameter_loaders())
    for name, variable in loading.variables.items():
        np.testing.assert_array_equal(variable.numpy(), expected[name].numpy(), err_msg=name)


@pytest.mark.parametrize('precision', ['float32', 'bfloat16'])
def test_generation_is_the_same_with_the_weights_loaded_in_the_background(tiny_model_dir, precision):
    loaded = load_model_dir(tiny_model_dir)
    encoder = loaded.load_encoder()
    settings = sample.Settings(top_k=5)

    def texts(params, **ready):
        samples = sample.generate_texts(params, loaded.hparams, encoder, [encoder.eot_id], num_samples=3,
                                        max_length=20, settings=settings, batch_size=2, seed=7,
                                        precision=precision, **ready)
        return [(s.tokens, s.text) for s in samples]

    loading = sample.start_loading_decoding_parameters(loaded, precision=precision)
    assert texts(loading.variables, parameters_ready=loading.wait) == texts(loaded.parameter_loaders())


@pytest.mark.parametrize('precision', ['float32', 'bfloat16'])
def test_scores_and_vectors_are_the_same_with_the_weights_loaded_in_the_background(tiny_model_dir, precision):
    import scoring
    loaded = load_model_dir(tiny_model_dir)
    encoder = loaded.load_encoder()
    texts = ['猫が鳴く', 'あいうえお', '犬']
    read_first = scoring.ModelRunner(loaded.parameter_loaders(), loaded.hparams, precision=precision)
    results = []
    for job in ('score', 'vectors'):
        loading = loaded.start_loading(dtype=precision)
        runner = scoring.ModelRunner(loading.variables, loaded.hparams, precision=precision,
                                     parameters_ready=loading.wait)
        if job == 'score':
            got, want = (list(scoring.score_texts(r, encoder, texts)) for r in (runner, read_first))
            results += [(a.logprobs, b.logprobs) for a, b in zip(got, want)]
        else:
            got, want = (list(scoring.transform_texts(r, encoder, texts)) for r in (runner, read_first))
            results += list(zip(got, want))
    for got, want in results:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('script_name, args', [
    ('gpt2-generate.py', ['--num_generate', '1', '--max_length', '5', '--seed', '1']),
    ('gpt2-score.py', ['-']),
    ('gpt2-transform.py', ['--context', '猫']),
])
def test_a_damaged_checkpoint_is_still_one_line_with_background_loading(tmp_path, tiny_model_dir, capfd,
                                                                        monkeypatch, script_name, args):
    import io
    import shutil
    from helpers import assert_usage_error, run_as_script
    damaged = tmp_path / 'model'
    shutil.copytree(tiny_model_dir, damaged)
    data = next(damaged.glob('model-0.data-*'))
    data.write_bytes(data.read_bytes()[:1000])  # the index (shapes) reads; the weights do not
    monkeypatch.setattr('sys.stdin', io.TextIOWrapper(io.BytesIO('猫\n'.encode())))
    result = run_as_script(load_script(script_name).main, ['--model', damaged, *args], capfd)
    assert_usage_error(result, 'unreadable')


@pytest.mark.parametrize('accumulate', [1, 2])
def test_training_is_the_same_with_the_state_filled_while_the_step_traces(tiny_model_dir, tiny_dataset, accumulate):
    import tensorflow as tf
    from finetune.data import load_sequences
    from finetune.optimizers import make_optimizer
    from finetune.run_dir import initial_values
    from finetune.trainer import Trainer
    base = load_model_dir(tiny_model_dir)
    data = load_sequences(tiny_dataset, n_ctx=TINY.n_ctx, n_vocab=TINY.n_vocab, pad_id=TINY.n_vocab - 1)
    tokens, weights = data.batch([0, 1, 2, 3])
    tokens, weights = tokens.reshape(accumulate, -1, TINY.n_ctx), weights.reshape(accumulate, -1, TINY.n_ctx - 1)

    def train(strategy):
        optimizer = make_optimizer('adam')
        trainer = Trainer(hparams=TINY, optimizer=optimizer, strategy=strategy,
                          initial=initial_values(base, None, optimizer))
        trainer.trace_step(accumulate=accumulate, batch_size=tokens.shape[1])
        losses = [trainer.train_step(tokens, weights, learning_rate=1e-3) for _ in range(2)]
        return losses, {name: value.numpy() for name, value in trainer.tensors().items()}

    # The default strategy fills its variables in the background; a one-device strategy
    # creates them from their values, as before.
    filled_losses, filled = train(None)
    plain_losses, plain = train(tf.distribute.OneDeviceStrategy('/cpu:0'))
    assert filled_losses == plain_losses
    assert list(filled) == list(plain)
    for name in plain:
        np.testing.assert_array_equal(filled[name], plain[name], err_msg=name)


def test_fine_tuning_from_a_damaged_checkpoint_is_one_line(tmp_path, tiny_model_dir, tiny_dataset, capfd):
    import shutil
    from helpers import run_as_script
    damaged = tmp_path / 'model'
    shutil.copytree(tiny_model_dir, damaged)
    data = next(damaged.glob('model-0.data-*'))
    data.write_bytes(data.read_bytes()[:1000])
    result = run_as_script(load_script('run_finetune.py').main,
                           ['--dataset', tiny_dataset, '--base_model', damaged, '--no-xla', '--max_steps', '1',
                            '--checkpoint_dir', tmp_path / 'runs'], capfd)
    # After the line announcing the precision: the error, as one line.
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith('script: error: checkpoint')
    assert 'unreadable' in result.stderr.strip().splitlines()[-1]


def test_fine_tuning_keeps_the_graph_optimiser_less_its_idle_passes(tmp_path, tiny_model_dir, tiny_dataset, capfd):
    from helpers import run_as_script
    result = run_as_script(load_script('run_finetune.py').main,
                           ['--dataset', tiny_dataset, '--base_model', tiny_model_dir, '--no-xla', '--max_steps', '1',
                            '--checkpoint_dir', tmp_path / 'runs'], capfd)
    assert result.returncode == 0, result.stderr
    options = tf.config.optimizer.get_experimental_options()
    assert not options.get('disable_meta_optimizer', False)
    assert all(options[name] is False for name in cli.IDLE_GRAPH_PASSES)
    # The passes that change the step's graph (the remapper's fusions make it faster) stay on.
    assert all(options.get(name, True) for name in ('remapping', 'arithmetic_optimization', 'dependency_optimization'))


@pytest.mark.slow
def test_the_inference_scripts_end_at_once_with_all_their_output(tmp_path, tiny_model_dir):
    """They skip the interpreter's teardown (cli.exit_without_teardown): what they print
    through a pipe and write to files is still all there, and the exit code is theirs."""
    import subprocess
    import sys
    from helpers import REPO, assert_usage_error, run_script
    lines = [f'猫が{i}匹いる' for i in range(300)]
    result = run_script('gpt2-score.py', '--model', tiny_model_dir, '--gpu', '-1', '-', stdin='\n'.join(lines) + '\n')
    assert result.returncode == 0 and result.stderr == '', result.stderr
    assert [line.split('\t')[0] for line in result.stdout.splitlines()] == lines

    samples = tmp_path / 'samples.txt'
    result = run_script('gpt2-generate.py', '--model', tiny_model_dir, '--gpu', '-1', '--context', '猫',
                        '--num_generate', '3', '--max_length', '20', '--seed', '1', '--output_file', samples)
    assert result.returncode == 0, result.stderr
    written = samples.read_text(encoding='utf-8')
    assert result.stdout == '' and len(written.split('========\n')) == 3 and written.endswith('\n'), written

    # A reader that stops early (`... | head -n 1`): a quiet exit 0, as before.
    child = subprocess.Popen([sys.executable, 'gpt2-transform.py', '--model', str(tiny_model_dir), '--gpu', '-1',
                              '--input', '-'], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    child.stdin.write(('\n'.join(lines) + '\n').encode())
    child.stdin.close()
    assert child.stdout.readline().startswith(b'[')
    child.stdout.close()
    assert child.wait(timeout=120) == 0
    assert child.stderr.read() == b''

    assert_usage_error(run_script('gpt2-transform.py', '--model', tmp_path / 'nowhere', '--context', '猫'),
                       'does not exist')
