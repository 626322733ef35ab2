"""The training data: token arrays from the encoder's .npz, cut into n_ctx-token sequences.

The arrays come from encoder/npz.py's reader: checked (checksums, 1-D integers), in order
(arr_0, arr_1, ...), memory-mapped where the .npz stores them uncompressed (`np.savez`, what
`python -m encoder` writes), so a corpus larger than memory trains. Tokens are never turned
into Python objects.

The arrays are read in order as one stream of tokens, cut into consecutive sequences of
n_ctx tokens; the last, partial one is padded with the end-of-text id, and the padding is not
trained on (its loss weight is 0). The order of sequences is a pure function of (seed, epoch),
so a resumed run sees exactly the batches an uninterrupted run would have.
"""
import dataclasses
import functools
import math

import numpy as np

from cli import UsageError
from encoder.npz import read_token_arrays


class DatasetError(UsageError):
    """A dataset that cannot be trained on; the message says why."""


@dataclasses.dataclass(frozen=True)
class TokenSequences:
    """A token stream (several arrays read as one) cut into `n_ctx`-token sequences.

    `first` and `count` select a range of the sequences (the training or validation part).
    """
    arrays: tuple
    n_ctx: int
    pad_id: int
    first: int = 0
    count: int = None

    def __post_init__(self):
        if self.count is None:
            object.__setattr__(self, 'count', math.ceil(self.total_tokens / self.n_ctx) - self.first)

    @functools.cached_property
    def _starts(self):
        return np.concatenate([[0], np.cumsum([len(a) for a in self.arrays])])

    @property
    def total_tokens(self):
        return int(self._starts[-1])

    def __len__(self):
        return self.count

    def split(self, first, count):
        return dataclasses.replace(self, first=self.first + first, count=count)

    def read(self, index):
        """Sequence `index`: (tokens int32 [n_ctx], number of real tokens before padding)."""
        start = (self.first + index) * self.n_ctx
        end = min(start + self.n_ctx, self.total_tokens)
        pieces = []
        for array, array_start in zip(self.arrays, self._starts[:-1]):
            lo, hi = max(start - array_start, 0), min(end - array_start, len(array))
            if lo < hi:
                pieces.append(np.asarray(array[lo:hi], dtype=np.int32))
        tokens = np.full(self.n_ctx, self.pad_id, dtype=np.int32)
        real = end - start
        tokens[:real] = np.concatenate(pieces)
        return tokens, real

    def batch(self, indices):
        """(tokens int32 [len(indices), n_ctx], weights float32 [len(indices), n_ctx - 1]):
        weight 1 for each next-token target that is real text, 0 for padding."""
        tokens = np.empty((len(indices), self.n_ctx), np.int32)
        weights = np.zeros((len(indices), self.n_ctx - 1), np.float32)
        for row, index in enumerate(indices):
            tokens[row], real = self.read(int(index))
            weights[row, :real - 1] = 1.0
        return tokens, weights


def check_token_ids(arrays, n_vocab, path):
    """Every id is in 0..n_vocab-1 (checked array by array, in chunks, without copies)."""
    for number, array in enumerate(arrays):
        for start in range(0, len(array), 1 << 24):
            chunk = array[start:start + (1 << 24)]
            low, high = int(chunk.min()), int(chunk.max())
            if low < 0 or high >= n_vocab:
                bad = high if high >= n_vocab else low
                raise DatasetError(f'dataset {path}: array {number} holds the id {bad}, outside the '
                                   f'vocabulary of {n_vocab} tokens (0..{n_vocab - 1}); was it made '
                                   f'with this model\'s vocabulary?')


def load_sequences(path, *, n_ctx, n_vocab, pad_id):
    """The dataset at `path` as TokenSequences, checked: ids in the vocabulary, and at least
    one full sequence of tokens."""
    arrays = read_token_arrays(path)
    total = sum(len(a) for a in arrays)
    if total < n_ctx:
        raise DatasetError(f'dataset {path} has {total} tokens, fewer than one sequence of '
                           f'{n_ctx} (the model\'s n_ctx); give it more text')
    check_token_ids(arrays, n_vocab, path)
    return TokenSequences(tuple(arrays), n_ctx=n_ctx, pad_id=pad_id)


def split_validation(sequences, fraction):
    """(training, validation): the last `fraction` (0 < fraction < 1, as run_finetune.py
    checks) of the sequences, at least one, held out."""
    held_out = max(1, round(len(sequences) * fraction))
    if held_out >= len(sequences):
        raise DatasetError(f'--val_fraction {fraction} leaves no training data: the dataset has '
                           f'only {len(sequences)} sequences')
    kept = len(sequences) - held_out
    return sequences.split(0, kept), sequences.split(kept, held_out)


@functools.lru_cache(maxsize=4)
def epoch_order(seed, epoch, count):
    """The shuffled order of `count` sequences in `epoch`: a pure function of its arguments."""
    return np.random.default_rng([seed, epoch]).permutation(count)


def batch_indices(step, size, *, count, seed):
    """Which sequences make the `size`-sequence batch of `step` (0-based): epochs of shuffled
    sequences laid end to end, so any step's batch is known without replaying the ones before."""
    positions = step * size + np.arange(size)
    epochs, within = np.divmod(positions, count)
    return np.array([epoch_order(seed, int(e), count)[i] for e, i in zip(epochs, within)])
