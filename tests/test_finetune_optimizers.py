"""finetune/optimizers.py: the learning-rate warm-up, and each optimizer against the
tf.compat.v1.train optimizer whose checkpoints it must keep reading and writing."""
import numpy as np
import pytest
import tensorflow as tf

from finetune.optimizers import OPTIMIZERS, warmup_learning_rate


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
