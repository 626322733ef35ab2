"""Batched scoring and vectors: the same numbers as one text at a time, in input order, lazily."""
import itertools

import numpy as np
import pytest

import scoring
from conftest import EOT, TINY
from model import forward, init_parameters


class FakeEncoder:
    """Texts of space-separated ids: lets tests choose token sequences exactly."""
    eot_id = EOT

    def encode(self, text):
        return [int(word) for word in text.split()]

    def decode(self, ids):
        return ''.join(f'<{i}>' for i in ids)


@pytest.fixture(scope='module')
def tiny_params():
    return init_parameters(TINY, seed=3)


@pytest.fixture(scope='module')
def runner(tiny_params):
    return scoring.ModelRunner(tiny_params, TINY)


def window_logprobs(params, sequence):
    """Log-probabilities of sequence[1:], each given all before it: one unbatched pass."""
    logits = forward(params, [sequence[:-1]], hparams=TINY)['logits'][0].numpy().astype(np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return logits[np.arange(len(sequence) - 1), sequence[1:]] - log_z


def direct_logprobs(params, tokens):
    """Log-probabilities of `tokens` after <|endoftext|>, as the original computed them."""
    return window_logprobs(params, [EOT] + list(tokens))


def random_texts(count, *, seed, max_length=40):
    rng = np.random.default_rng(seed)
    return [' '.join(map(str, rng.integers(0, EOT, rng.integers(1, max_length))))
            for _ in range(count)]


def test_short_sequences_are_one_window_as_the_original_scored_them():
    assert scoring.score_windows(1, 64) == []
    assert scoring.score_windows(10, 64) == [(0, 10, 1)]
    assert scoring.score_windows(64, 64) == [(0, 64, 1)]


@pytest.mark.parametrize('length', [65, 100, 200, 1000])
def test_windows_score_every_position_once_with_at_least_half_the_context(length):
    n_ctx, stride = 64, scoring.window_stride(64)
    scored = []
    for start, end, first in scoring.score_windows(length, n_ctx):
        assert end - start <= n_ctx
        for position in range(first, end):
            # Conditioned on sequence[start:position]: at most n_ctx-1, at least n_ctx-stride.
            assert n_ctx - stride <= position - start <= n_ctx - 1 or start == 0
            scored.append(position)
    assert scored == list(range(1, length))


def test_batches_respect_the_row_and_token_limits():
    lengths = [5, 60, 33, 8, 8, 64, 1, 20] * 5
    batches = scoring.plan_batches(lengths, batch_size=4, n_ctx=64, max_tokens=128)
    assert sorted(itertools.chain(*batches)) == list(range(len(lengths)))
    for batch in batches:
        width = scoring.padded_length(max(lengths[i] for i in batch), 64)
        assert len(batch) <= 4
        assert len(batch) == 1 or len(batch) * width <= 128


def test_results_come_in_input_order_and_input_is_read_lazily():
    consumed = []

    def items():
        for i in itertools.count():  # endless, like a pipe
            consumed.append(i)
            yield i

    results = scoring.ordered_batches(
        items(), rows_of=lambda i: [[0] * (1 + (i * 7919) % 50)] * (i % 3),
        run_rows=lambda rows: [len(row) for row in rows],
        finish=lambda i, results: (i, results), batch_size=4, n_ctx=64, read_ahead=16)
    first = list(itertools.islice(results, 40))
    assert [i for i, _ in first] == list(range(40))
    assert all(r == [1 + (i * 7919) % 50] * (i % 3) for i, r in first)
    assert len(consumed) <= 48 + 1


def test_batched_scores_equal_one_text_at_a_time(runner, tiny_params):
    texts = random_texts(23, seed=1)
    batched = list(scoring.score_texts(runner, FakeEncoder(), texts, batch_size=8))
    single = list(scoring.score_texts(runner, FakeEncoder(), texts, batch_size=1))
    assert [s.text for s in batched] == texts
    for b, s, text in zip(batched, single, texts):
        tokens = FakeEncoder().encode(text) + [EOT]
        assert b.tokens == tokens
        np.testing.assert_allclose(b.logprobs, s.logprobs, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(b.logprobs, direct_logprobs(tiny_params, tokens), rtol=1e-4, atol=1e-4)
        assert b.total == pytest.approx(float(np.sum(b.logprobs, dtype=np.float64)))


def test_exclude_end_drops_the_end_token_and_empty_texts_score_zero(runner):
    with_end, without, empty = scoring.score_texts(runner, FakeEncoder(), ['5 6 7', '5 6 7', ''],
                                                   exclude_end=True)
    assert without.tokens == [5, 6, 7] and len(without.logprobs) == 3
    assert empty.tokens == [] and empty.total == 0 and np.isnan(empty.perplexity)


def test_a_line_longer_than_the_context_is_scored_with_a_sliding_window(runner, tiny_params):
    tokens = list(np.random.default_rng(2).integers(0, EOT, 150))
    text = ' '.join(map(str, tokens))
    [scored] = scoring.score_texts(runner, FakeEncoder(), [text])
    assert scored.tokens == tokens + [EOT]
    assert len(scored.logprobs) == 151 and np.all(np.isfinite(scored.logprobs))
    # The first window is the prefix scored directly: each token sees everything before it.
    prefix = tokens[:TINY.n_ctx - 1]
    np.testing.assert_allclose(scored.logprobs[:len(prefix)], direct_logprobs(tiny_params, prefix),
                               rtol=1e-4, atol=1e-4)
    # The second window starts `stride` on and scores the positions after the first window.
    n_ctx, stride = TINY.n_ctx, scoring.window_stride(TINY.n_ctx)
    second = window_logprobs(tiny_params, ([EOT] + tokens)[stride:stride + n_ctx])
    np.testing.assert_allclose(scored.logprobs[n_ctx - 1:stride + n_ctx - 1], second[n_ctx - stride - 1:],
                               rtol=1e-4, atol=1e-4)


def test_vectors_batched_equal_direct_and_pool_last_or_mean(runner, tiny_params):
    texts = random_texts(11, seed=4)
    last = list(scoring.transform_texts(runner, FakeEncoder(), texts, batch_size=4))
    mean = list(scoring.transform_texts(runner, FakeEncoder(), texts, pooling='mean', batch_size=4))
    for text, v_last, v_mean in zip(texts, last, mean):
        hidden = forward(tiny_params, [FakeEncoder().encode(text)], hparams=TINY)['hidden'][0].numpy()
        assert v_last.dtype == np.float32 and v_last.shape == (TINY.n_embd,)
        np.testing.assert_allclose(v_last, hidden[-1], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(v_mean, hidden.mean(0), rtol=1e-4, atol=1e-4)


def test_a_context_longer_than_the_model_uses_its_last_tokens(runner, tiny_params):
    tokens = list(np.random.default_rng(5).integers(0, EOT, 100))
    [vector] = scoring.transform_texts(runner, FakeEncoder(), [' '.join(map(str, tokens))])
    hidden = forward(tiny_params, [tokens[-TINY.n_ctx:]], hparams=TINY)['hidden'][0, -1].numpy()
    np.testing.assert_allclose(vector, hidden, rtol=1e-4, atol=1e-4)


def test_output_formats_are_the_originals():
    scored = scoring.ScoredText('猫', [5, EOT], np.array([-1.234567, -20.5], np.float32))
    text = lambda token: FakeEncoder().decode([token])
    assert scoring.format_score(scored, text) == '猫\t-21.735\n'
    assert scoring.format_score(scored, text, with_tokens=True) == (
        f'猫\t-21.735\n<5>\t-1.2346\n<{EOT}>\t-20.5\n\n')
    assert scoring.format_score(scored, text, with_perplexity=True) == '猫\t-21.735\t52433\n'
    assert scoring.format_vector(np.array([0.1, -2], np.float32)) == str([float(np.float32(0.1)), -2.0])
