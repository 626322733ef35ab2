"""The tiny-a reference checkpoint reproduces the original code's scores, vectors and greedy text."""
import numpy as np
import pytest
import tensorflow as tf

from model import forward
from model_dir import load_model_dir


@pytest.fixture(scope='module')
def tiny_a(reference_dir, vocab_dir):
    loaded = load_model_dir(reference_dir / 'tiny-a', vocab_dir=vocab_dir)
    return loaded, loaded.load_parameters()


def test_scores_match_the_reference(tiny_a, reference_expected):
    loaded, params = tiny_a
    eot = loaded.hparams.n_vocab - 1
    for case in reference_expected['score']:
        inputs = [eot] + case['tokens'][:-1]
        log_probs = tf.nn.log_softmax(forward(params, [inputs], hparams=loaded.hparams)['logits'])[0]
        got = [float(log_probs[i, token]) for i, token in enumerate(case['tokens'])]
        np.testing.assert_allclose(got, case['logprobs'], rtol=1e-4, atol=1e-4)
        assert sum(got) == pytest.approx(case['total'], rel=1e-4)


def test_vectors_match_the_reference(tiny_a, reference_expected):
    loaded, params = tiny_a
    for case in reference_expected['transform']:
        hidden = forward(params, [case['tokens']], hparams=loaded.hparams)['hidden'][0, -1]
        np.testing.assert_allclose(hidden.numpy(), case['vector'], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_greedy_continuations_match_the_reference(tiny_a, reference_expected):
    loaded, params = tiny_a
    for case in reference_expected['greedy']:
        tokens = list(case['context_tokens'])
        for _ in range(len(case['continuation'])):
            logits = forward(params, [tokens], hparams=loaded.hparams)['logits'][0, -1]
            tokens.append(int(tf.argmax(logits)))
        assert tokens[len(case['context_tokens']):] == case['continuation']
