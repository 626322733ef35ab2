"""finetune/data.py: an .npz of token ids read as n_ctx-token training sequences, and the
order in which each epoch visits them."""
import numpy as np

from conftest import EOT, TINY
from finetune.data import batch_indices, load_sequences


def test_sequences_read_arrays_in_order_and_pad_the_last(tmp_path):
    path = tmp_path / 'd.npz'
    first, second = np.arange(100, 250, dtype=np.uint16), np.arange(300, 330, dtype=np.int64)
    np.savez(path, first, second)
    seqs = load_sequences(path, n_ctx=64, n_vocab=TINY.n_vocab, pad_id=EOT)
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
    seqs = load_sequences(path, n_ctx=64, n_vocab=TINY.n_vocab, pad_id=EOT)
    assert seqs.read(1)[0][:6].tolist() == [64, 65, 66, 67, 68, 69]


def test_each_epoch_visits_every_sequence_once_in_a_new_order():
    count, size = 10, 3
    order = np.concatenate([batch_indices(step, size, count=count, seed=5)
                            for step in range(20)])  # 60 sequences: 6 epochs
    epochs = order.reshape(6, count)
    assert all(sorted(epoch) == list(range(count)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1
    assert np.array_equal(batch_indices(7, size, count=count, seed=5), order[21:24])
