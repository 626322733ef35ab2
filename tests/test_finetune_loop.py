"""finetune/loop.py: when the training loop stops, what it saves, and the learning rate it
passes each step, with a stand-in trainer (no TensorFlow)."""
import pytest

from conftest import EOT, TINY
from finetune.data import load_sequences
from finetune.loop import LoopConfig, train_loop


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
    seqs = load_sequences(dataset, n_ctx=TINY.n_ctx, n_vocab=TINY.n_vocab, pad_id=EOT)
    saved = []
    result = train_loop(fake, seqs, LoopConfig(batch_size=1, **config), save=saved.append)
    return result, saved


def test_several_non_finite_steps_in_a_row_stop_the_run(tiny_dataset):
    result, saved = loop_on(FakeTrainer({3, 5, 6, 7}), tiny_dataset, max_steps=50, max_bad_steps=3,
                            save_every=4)
    assert result.reason == 'non-finite' and result.step == 7
    assert saved == [4]  # weights that gave only non-finite losses since are not saved
    result, _ = loop_on(FakeTrainer({3, 5}), tiny_dataset, max_steps=10, max_bad_steps=2)
    assert result.reason == 'finished' and result.step == 10


def test_the_loop_passes_the_warmup_learning_rate(tiny_dataset):
    fake = FakeTrainer(())
    loop_on(fake, tiny_dataset, max_steps=6, learning_rate=1e-3, warmup_steps=4, save_every=0)
    assert fake.learning_rates == pytest.approx([1e-10, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3], rel=1e-5)
