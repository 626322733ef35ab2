"""finetune/trainer.py: one training step on the tiny model, with gradient accumulation,
and a step whose loss is not finite leaves the weights as they were."""
import numpy as np
import pytest

import model
from conftest import EOT, TINY
from finetune.data import load_sequences
from finetune.optimizers import OPTIMIZERS
from finetune.run_dir import initial_values
from finetune.trainer import Trainer
from model_dir import load_model_dir


def make_trainer(tiny_model_dir, optimizer='sgd', **kwargs):
    base = load_model_dir(tiny_model_dir)
    opt = OPTIMIZERS[optimizer]()
    return Trainer(hparams=base.hparams, optimizer=opt, initial=initial_values(base, None, opt), **kwargs)


@pytest.fixture(scope='module')
def sequences(tiny_dataset):
    return load_sequences(tiny_dataset, n_ctx=TINY.n_ctx, n_vocab=TINY.n_vocab, pad_id=EOT)


@pytest.mark.slow
def test_accumulated_gradient_equals_the_large_batch(tiny_model_dir, sequences):
    # Includes the padded last sequence, so the per-token normalisation is tested too.
    tokens, weights = sequences.batch([0, 3, 12, 5])
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


def test_a_non_finite_loss_is_not_applied(tiny_model_dir, sequences):
    trainer = make_trainer(tiny_model_dir, optimizer='adam')
    tokens, weights = sequences.batch([0, 1])
    before = {k: v.numpy().copy() for k, v in trainer.tensors().items()}
    weights[0, 3] = np.nan
    loss, applied = trainer.train_step(tokens[None], weights[None], learning_rate=0.1)
    assert not applied and np.isnan(loss)
    after = trainer.tensors()
    for name in before:
        if name != 'global_step':
            np.testing.assert_array_equal(after[name].numpy(), before[name], err_msg=name)
    assert trainer.step_number() == 1  # the batch is passed over, not retried
