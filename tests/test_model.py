"""The network: checkpoint naming, incremental decoding, and TF1 compatibility."""
import numpy as np
import pytest
import tensorflow as tf

import model
from conftest import SMALL_VOCAB, TINY
from model import HParams, forward, init_parameters, parameter_shapes
from model_dir import load_model_dir, save_model_dir


def test_released_sizes_have_the_published_parameter_counts():
    # wte (20573 x e) + wpe (1024 x e) + layers x (12 e^2 + 13 e) + ln_f (2 e), worked by hand.
    assert model.count_parameters(model.RELEASED['gpt2ja-small']) == 101_642_496
    assert model.count_parameters(model.RELEASED['gpt2ja-medium']) == 324_426_752


def test_variable_names_and_shapes_match_the_reference_checkpoint(reference_dir):
    reader = tf.train.load_checkpoint(str(reference_dir / 'tiny-a' / 'model-1200'))
    network = {name: tuple(shape) for name, shape in reader.get_variable_to_shape_map().items()
               if name.startswith('model/') and '/Adam' not in name}
    hparams = HParams(n_vocab=20573, n_ctx=128, n_embd=64, n_head=4, n_layer=2)
    assert network == parameter_shapes(hparams)


def test_incremental_decoding_with_the_cache_equals_recomputing():
    params = init_parameters(SMALL_VOCAB, seed=3)
    tokens = np.random.default_rng(0).integers(0, SMALL_VOCAB.n_vocab, size=(2, 12))
    full = forward(params, tokens, hparams=SMALL_VOCAB)['logits'].numpy()
    # A prefix of 5 tokens, then one token at a time through the cache.
    cache = model.KVCache(SMALL_VOCAB, batch_size=2)
    logits = [model.forward_cached(params, tokens[:, :5], hparams=SMALL_VOCAB, cache=cache, start=0)]
    for position in range(5, tokens.shape[1]):
        logits.append(model.forward_cached(params, tokens[:, position:position + 1], hparams=SMALL_VOCAB,
                                           cache=cache, start=position))
    np.testing.assert_allclose(np.stack(logits, axis=1), full[:, 4:], rtol=1e-4, atol=1e-4)


def test_a_token_never_sees_later_tokens():
    params = init_parameters(SMALL_VOCAB, seed=4)
    a = forward(params, [[5, 6, 7, 8]], hparams=SMALL_VOCAB)['logits'].numpy()
    b = forward(params, [[5, 6, 9, 1]], hparams=SMALL_VOCAB)['logits'].numpy()
    np.testing.assert_allclose(a[:, :2], b[:, :2], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[:, 2:], b[:, 2:])


@pytest.mark.slow
def test_forward_runs_inside_tf_function_with_unknown_lengths():
    params = {k: tf.constant(v) for k, v in init_parameters(SMALL_VOCAB, seed=5).items()}
    traced = tf.function(lambda t: forward(params, t, hparams=SMALL_VOCAB)['logits'],
                         input_signature=[tf.TensorSpec([None, None], tf.int32)])
    eager = forward(params, tf.constant([[1, 2, 3]]), hparams=SMALL_VOCAB)['logits']
    np.testing.assert_allclose(traced(tf.constant([[1, 2, 3]])).numpy(), eager.numpy(), rtol=1e-5)


def test_saved_checkpoint_loads_in_tf1_saver_code(tmp_path):
    params = init_parameters(SMALL_VOCAB, seed=6)
    prefix = save_model_dir(tmp_path, params, SMALL_VOCAB, step=7)
    tokens = [[3, 1, 4, 1, 5]]
    expected = forward(params, tokens, hparams=SMALL_VOCAB)['logits'].numpy()
    # TF1-style: variables made by get_variable, restored by a plain Saver.
    with tf.Graph().as_default():
        variables = model.tf1_parameters(SMALL_VOCAB)
        context = tf.compat.v1.placeholder(tf.int32, [None, None])
        logits = forward(variables, context, hparams=SMALL_VOCAB)['logits']
        saver = tf.compat.v1.train.Saver(var_list=tf.compat.v1.global_variables())
        with tf.compat.v1.Session() as session:
            saver.restore(session, tf.train.latest_checkpoint(str(tmp_path)))
            got = session.run(logits, {context: tokens})
    assert prefix.endswith('model-7')
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_tf1_saver_checkpoint_loads_here(tmp_path):
    initial = init_parameters(SMALL_VOCAB, seed=8)
    with tf.Graph().as_default():
        model.tf1_parameters(SMALL_VOCAB, initial=initial)
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            saver.save(session, str(tmp_path / 'model'), global_step=3)
    loaded = load_model_dir(tmp_path, need_vocab=False, n_head=4)
    assert loaded.hparams == SMALL_VOCAB
    params = loaded.load_parameters()
    for name, value in initial.items():
        np.testing.assert_array_equal(params[name], value)


@pytest.mark.parametrize('bad', [dict(n_embd=30, n_head=4), dict(n_layer=0)])
def test_inconsistent_hparams_are_refused(bad):
    values = TINY.to_dict()
    values.update(bad)
    with pytest.raises(ValueError):
        HParams(**values)


@pytest.mark.slow
@pytest.mark.parametrize('recompute', [False, True])
def test_training_path_has_the_plain_networks_loss_and_gradients(recompute):
    # training_hidden recomputes attention probabilities (and with `recompute` whole blocks)
    # in its hand-written backward pass: same values and gradients as differentiating forward().
    params = {k: tf.constant(v) for k, v in init_parameters(SMALL_VOCAB, seed=6).items()}
    tokens = tf.constant(np.random.default_rng(1).integers(0, SMALL_VOCAB.n_vocab, size=(2, 16)))

    def gradients(hidden_of):
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss = tf.reduce_sum(tf.sin(hidden_of(params)))  # any loss that weights each position
        return loss, tape.gradient(loss, params)

    expected_loss, expected = gradients(lambda p: forward(p, tokens, hparams=SMALL_VOCAB)['hidden'])
    for run in (lambda f: f(), lambda f: tf.function(f)()):  # eagerly and as a graph
        loss, actual = run(lambda: gradients(lambda p: model.training_hidden(
            p, tokens, hparams=SMALL_VOCAB, recompute=recompute)))
        np.testing.assert_allclose(loss.numpy(), expected_loss.numpy(), rtol=1e-5)
        for name in params:
            want = tf.convert_to_tensor(expected[name]).numpy()
            np.testing.assert_allclose(tf.convert_to_tensor(actual[name]).numpy(), want,
                                       rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=name)


@pytest.mark.parametrize('blocks, length', [(2, 16), (4, 16), (2, 15)])
def test_attention_by_query_blocks_equals_the_whole_square(blocks, length):
    # causal_blocks_attend skips the score blocks above the diagonal (15 tokens: not a
    # multiple of 2, so computed whole): same output and gradients as training_attend.
    q, k, v, dout = (tf.constant(np.random.default_rng(seed).normal(size=(2, 3, length, 8)), tf.float32)
                     for seed in range(4))
    mask = model.causal_mask(length)

    def gradients(attend):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out = attend(q, k, v, mask)
        return [out] + tape.gradient(out, [q, k, v], output_gradients=dout)

    expected = gradients(model.training_attend)
    actual = gradients(lambda *args: model.causal_blocks_attend(*args, blocks=blocks))
    for got, want in zip(actual, expected):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
