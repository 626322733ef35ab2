"""A short sample from the model being trained (`--sample_every`), to watch what it learns.

Until the project's sampling module (`sample.generate`) is merged, this is a minimal top-k
loop over model.forward with the key/value cache; it runs on the host's copy of the weights.
"""
import numpy as np
import tensorflow as tf

import model


def sample_tokens(params, hparams, *, start_id, length, top_k=40, seed=0):
    """`length` token ids continuing [start_id], each drawn from the top_k most likely."""
    rng = np.random.default_rng(seed)
    tokens, past, produced = np.array([[start_id]], np.int32), None, []
    for _ in range(min(length, hparams.n_ctx - 1)):
        out = model.forward(params, tokens, hparams=hparams, past=past)
        past = out['present'] if past is None else tf.concat([past, out['present']], axis=-2)
        logits = out['logits'][0, -1].numpy().astype(np.float64)
        best = np.argpartition(-logits, top_k)[:top_k]
        probs = np.exp(logits[best] - logits[best].max())
        token = int(rng.choice(best, p=probs / probs.sum()))
        produced.append(token)
        tokens = np.array([[token]], np.int32)
    return produced


def decode_for_display(ids, vocab_dir):
    """Text of `ids` through the project's encoder; its raw tokens joined where the encoder
    is not available."""
    try:
        from encoder import get_encoder
        return get_encoder(vocab_dir).decode(ids)
    except ImportError:
        from encoder.vocab import read_vocab
        vocab = read_vocab(vocab_dir)
        return ''.join(vocab[i] for i in ids)
