"""Running the model over many texts at once: per-token log-probabilities and text vectors.

`gpt2-score.py` and `gpt2-transform.py` are front-ends to this module. It
  - packs token lists into right-padded [batch, time] batches and runs them through one
    traced `tf.function` per job (padding on the right never changes the real positions'
    results, because attention is causal);
  - reads its input lazily, groups a read-ahead window of texts by length so that a batch
    holds rows of similar length (little padding), and gives results back in input order
    as soon as the earliest pending text is done (`ordered_batches`); when the input pauses
    (a pipe fed slowly), what has arrived runs at once instead of waiting for a full window;
  - scores texts longer than the model's context with a sliding window (`score_windows`).

Numbers: log-probabilities are logit - logsumexp(logits) in float32 (a log-softmax, which
stays finite where log(softmax) underflows); totals are summed as the original script
summed them (Python floats, in token order), so printed figures agree digit for digit.
"""
import dataclasses
import math
import queue
import threading

import numpy as np
import tensorflow as tf

from model import forward
from model_dir import trace_then_wait
from streams import DEFAULT_BATCH_SIZE

# Rows x padded length of one batch. Bounds the [batch, time, vocab] logits of scoring:
# 4096 x 20573 float32 is 340 MB, twice that with the log-softmax beside it. More does not
# run faster: it already fills a GPU with the small model, and a CPU is compute-bound anyway.
MAX_BATCH_TOKENS = 4096
# Padded lengths are multiples of this, so batches of similar rows share shapes.
LENGTH_QUANTUM = 4
# The fixed cost of running one batch (a call, kernels too small to fill the cores), in
# tokens of work: the price at which splitting a batch to save padding pays.
BATCH_OVERHEAD_TOKENS = 64
# Texts read ahead = batch_size x this: the pool that is grouped by length. Memory is
# bounded by it, and the first results appear after at most this many texts.
READ_AHEAD_BATCHES = 8
# When the input has been silent this long, what has arrived is run without waiting for a
# full read-ahead: a pipe that pauses (a person, a slow producer) gets each answer as soon as
# its line is in, while a file, read far faster than this, still fills whole batches.
INPUT_PAUSE_SECONDS = 0.05
POOLINGS = ('last', 'mean')


def window_stride(n_ctx):
    """How far the scoring window moves along a long text: half the context, so every token
    past the first window is conditioned on between n_ctx/2 and n_ctx-1 tokens before it."""
    return max(1, n_ctx // 2)


def score_windows(length, n_ctx, stride=None):
    """Windows over a sequence of `length` tokens (the start token included) whose positions
    1..length-1 are to be scored. Each is (start, end, first): the model reads
    sequence[start:end-1] and predicts sequence[start+1:end]; positions `first`..end-1 are
    kept from it (the earlier ones came from the window before, with more context).

    A window spans n_ctx positions, so a token is conditioned on up to n_ctx-1 tokens;
    a sequence of up to n_ctx tokens is one window, exactly as the original scored it.
    """
    stride = stride or window_stride(n_ctx)
    if not 0 < stride < n_ctx:
        raise ValueError(f'stride must be in 1..{n_ctx - 1}, not {stride}')
    if length < 2:
        return []
    start, end = 0, min(n_ctx, length)
    windows = [(start, end, 1)]
    while end < length:
        start += stride
        windows.append((start, min(start + n_ctx, length), end))
        end = windows[-1][1]
    return windows


def padded_length(length, n_ctx):
    return min(n_ctx, -(-length // LENGTH_QUANTUM) * LENGTH_QUANTUM)


def pad_rows(rows, width):
    """Token lists -> int32 [len(rows), width], right-padded with 0."""
    batch = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        batch[i, :len(row)] = row
    return batch


def plan_batches(lengths, *, batch_size, n_ctx, max_tokens=MAX_BATCH_TOKENS):
    """Split row indices, longest first, into batches of at most `batch_size` rows and
    `max_tokens` padded tokens (a single row is always allowed). Of all such splits of the
    rows sorted by length, the one with the least work: padded tokens plus
    BATCH_OVERHEAD_TOKENS a batch (a batch that saves less padding than that costs more than
    it gains). Returns lists of indices."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    widths = [padded_length(lengths[i], n_ctx) for i in order]  # non-increasing
    # least[j]: the least work for order[:j]; first[j]: where its last batch starts.
    least, first = [0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end - 1, max(end - batch_size, 0) - 1, -1):
            rows = end - start
            if rows > 1 and rows * widths[start] > max_tokens:
                break  # wider still with more rows
            work = least[start] + rows * widths[start] + BATCH_OVERHEAD_TOKENS
            if work < least[end]:
                least[end], first[end] = work, start
    batches, end = [], len(order)
    while end:
        batches.append(order[first[end]:end])
        end = first[end]
    return batches[::-1]


class ModelRunner:
    """The model's parameters and the traced functions that run it over padded batches.

    params: name -> array or tensor, or a zero-argument function returning one
    (`ModelDir.parameter_loaders()`: read one at a time, so no second copy is held), or
    variables of the compute format, held as they are (`ModelDir.start_loading`).
    precision: 'float32', or 'bfloat16' / 'float16' (see precision.py): the parameters are
    held in that format and the network computes in it; log-probabilities and vectors come
    out float32 either way.
    parameters_ready: called once the first job's function is traced, before it runs: the
    variables may still be being filled while it traces (`Filling.wait`)."""

    def __init__(self, params, hparams, *, precision='float32', parameters_ready=None):
        self.hparams = hparams
        self.compute_dtype = tf.as_dtype(precision)
        self._params = {name: value if isinstance(value, tf.Variable) else
                        tf.cast(value() if callable(value) else value, self.compute_dtype)
                        for name, value in params.items()}
        self._parameters_ready = parameters_ready
        tokens = tf.TensorSpec([None, None], tf.int32)
        # One input signature each: any batch and length runs through the same graph.
        self._logprobs_fn = tf.function(self._target_logprobs, input_signature=[tokens, tokens], autograph=False)
        self._vectors_fn = tf.function(self._pooled_hidden, autograph=False,
                                       input_signature=[tokens, tf.TensorSpec([None], tf.int32)])

    def _target_logprobs(self, inputs, targets):
        """inputs, targets [batch, time] -> log P(targets[b, t] | inputs[b, :t+1]) [batch, time]."""
        logits = forward(self._params, inputs, hparams=self.hparams)['logits']  # [batch, time, vocab]
        logits = tf.cast(logits, tf.float32)
        picked = tf.gather(logits, targets, batch_dims=2)  # [batch, time]
        return picked - tf.reduce_logsumexp(logits, axis=-1)

    def _pooled_hidden(self, tokens, lengths):
        """tokens [batch, time], lengths [batch] -> (last, mean), each [batch, n_embd]: the final
        layer-normalised hidden state at each row's last real token, and its mean over them."""
        hidden = forward(self._params, tokens, hparams=self.hparams)['hidden']  # [batch, time, embd]
        hidden = tf.cast(hidden, tf.float32)
        last = tf.gather(hidden, lengths - 1, batch_dims=1)
        mask = tf.sequence_mask(lengths, tf.shape(tokens)[1], dtype=hidden.dtype)[:, :, None]
        mean = tf.reduce_sum(hidden * mask, axis=1) / tf.cast(lengths, hidden.dtype)[:, None]
        return last, mean

    def _traced(self, function):
        """`function`, traced, once the parameters are ready to be read."""
        self._parameters_ready = trace_then_wait(function, self._parameters_ready)
        return function

    def target_logprobs(self, rows):
        """rows: (inputs, targets) token-list pairs of equal length, each at most n_ctx long.
        Returns one float32 array of log-probabilities per row."""
        width = padded_length(max(len(inputs) for inputs, _ in rows), self.hparams.n_ctx)
        result = self._traced(self._logprobs_fn)(pad_rows([inputs for inputs, _ in rows], width),
                                   pad_rows([targets for _, targets in rows], width)).numpy()
        return [result[i, :len(inputs)] for i, (inputs, _) in enumerate(rows)]

    def vectors(self, rows, *, pooling='last'):
        """rows: non-empty token lists of at most n_ctx. Returns one float32 [n_embd] per row."""
        lengths = np.array([len(row) for row in rows], np.int32)
        last, mean = self._traced(self._vectors_fn)(pad_rows(rows, padded_length(lengths.max(), self.hparams.n_ctx)),
                                      lengths)
        return list((last if pooling == 'last' else mean).numpy())


class ArrivedItems:
    """Items of an iterable as they arrive: `take(limit)` returns what can be had without
    waiting for a pause in the input. A helper thread does the reading (which may block, on a
    pipe), one item on request, so nothing is read beyond what was asked for plus the one
    item being waited on; an exception raised by the iterable is raised by `take`, after the
    items before it."""

    _END = object()

    def __init__(self, items, *, pause=INPUT_PAUSE_SECONDS):
        self._items = iter(items)
        self._pause = pause
        self._requests = threading.Semaphore(0)
        self._arrived = queue.SimpleQueue()
        self._waiting = False  # a request is out that has not been answered yet
        self._stopped = False
        self._finished = False
        self._failure = None  # what the iterable raised, once the items before it are taken
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            self._requests.acquire()
            if self._stopped:
                return
            try:
                self._arrived.put((True, next(self._items)))
            except StopIteration:
                self._arrived.put((False, None))
                return
            except BaseException as exc:  # noqa: B036 -- handed to the consumer, raised there
                self._arrived.put((False, exc))
                return

    def _next(self, timeout):
        if not self._waiting:
            self._requests.release()
            self._waiting = True
        item = self._arrived.get(timeout=timeout)  # raises queue.Empty after a pause
        self._waiting = False
        return item

    def take(self, limit):
        """Up to `limit` items: waits for the first, then takes more until the input pauses.
        Returns [] at the end of the input."""
        chunk = []
        while not self._finished and len(chunk) < limit:
            try:
                is_item, item = self._next(self._pause if chunk else None)
            except queue.Empty:
                break
            if is_item:
                chunk.append(item)
            else:
                self._finished, self._failure = True, item
        if not chunk and self._failure is not None:
            raise self._failure
        return chunk

    def close(self):
        self._stopped = True
        self._requests.release()


def ordered_batches(items, rows_of, run_rows, finish, *, batch_size, n_ctx, row_length=len,
                    max_tokens=MAX_BATCH_TOKENS, read_ahead=None, pause=INPUT_PAUSE_SECONDS):
    """Yield `finish(item, results)` for each of `items`, in input order, streaming.

    rows_of(item) -> the rows (token sequences, or (inputs, targets) pairs) the item needs;
    run_rows(rows) -> one result per row; `results` are the item's rows' results in order;
    row_length(row) -> the padded dimension a row needs.
    Items are taken as they arrive, up to `read_ahead` at a time (never all at once: `items`
    may be endless), or fewer when the input pauses for `pause` seconds (see ArrivedItems);
    their rows are grouped by length into batches, and each item is finished as soon as it
    and every item before it are done.
    """
    read_ahead = read_ahead or batch_size * READ_AHEAD_BATCHES
    arrived = ArrivedItems(items, pause=pause)
    try:
        while chunk := arrived.take(read_ahead):
            yield from _finished_in_order(chunk, rows_of, run_rows, finish, batch_size=batch_size,
                                          n_ctx=n_ctx, row_length=row_length, max_tokens=max_tokens)
    finally:
        arrived.close()


def _finished_in_order(chunk, rows_of, run_rows, finish, *, batch_size, n_ctx, row_length, max_tokens):
    """ordered_batches for one chunk of items, all of them in memory."""
    rows, owners, results = [], [], []
    for index, item in enumerate(chunk):
        item_rows = rows_of(item)
        results.append([None] * len(item_rows))
        rows.extend(item_rows)
        owners.extend((index, position) for position in range(len(item_rows)))
    pending = [len(item_results) for item_results in results]
    done = 0

    def finished():
        nonlocal done
        while done < len(chunk) and pending[done] == 0:
            yield finish(chunk[done], results[done])
            chunk[done] = results[done] = None  # let finished items go
            done += 1

    yield from finished()
    lengths = [row_length(row) for row in rows]
    for batch in plan_batches(lengths, batch_size=batch_size, n_ctx=n_ctx, max_tokens=max_tokens):
        for row_index, result in zip(batch, run_rows([rows[i] for i in batch])):
            index, position = owners[row_index]
            results[index][position] = result
            pending[index] -= 1
        yield from finished()


@dataclasses.dataclass(frozen=True)
class ScoredText:
    """One scored text: the ids scored (the end token last unless excluded) and the natural
    log-probability of each given the ones before it (the first given <|endoftext|>)."""
    text: str
    tokens: list
    logprobs: np.ndarray  # float32 [len(tokens)]

    @property
    def total(self):
        # As the original: Python floats summed in order, so '%.5g' prints the same digits.
        return sum(self.logprobs.tolist())

    @property
    def perplexity(self):
        return math.exp(-self.total / len(self.tokens)) if self.tokens else math.nan


def score_rows(tokens, *, start_token, n_ctx):
    """The (inputs, targets) rows that score `tokens` after `start_token`, one per window,
    with how many leading results of each row to drop (already scored with more context)."""
    sequence = [start_token] + list(tokens)
    return [(sequence[start:end - 1], sequence[start + 1:end], first - start - 1)
            for start, end, first in score_windows(len(sequence), n_ctx)]


def score_texts(runner, encoder, texts, *, exclude_end=False, batch_size=DEFAULT_BATCH_SIZE,
                max_tokens=MAX_BATCH_TOKENS, read_ahead=None):
    """Yield a ScoredText for each of `texts` (an iterable, read lazily), in order."""
    n_ctx = runner.hparams.n_ctx

    def encoded():
        for text in texts:
            tokens = encoder.encode(text)
            yield text, tokens if exclude_end else tokens + [encoder.eot_id]

    def rows_of(item):
        return score_rows(item[1], start_token=encoder.eot_id, n_ctx=n_ctx)

    def run_rows(rows):
        results = runner.target_logprobs([(inputs, targets) for inputs, targets, _ in rows])
        return [result[drop:] for result, (_, _, drop) in zip(results, rows)]

    def finish(item, results):
        logprobs = np.concatenate(results) if results else np.zeros(0, np.float32)
        return ScoredText(item[0], item[1], logprobs)

    yield from ordered_batches(encoded(), rows_of, run_rows, finish, batch_size=batch_size,
                               n_ctx=n_ctx, row_length=lambda row: len(row[0]),
                               max_tokens=max_tokens, read_ahead=read_ahead)


def vector_tokens(tokens, n_ctx):
    """The tokens a vector is computed from: the last n_ctx of them (the model sees no more)."""
    return list(tokens)[-n_ctx:]


def transform_texts(runner, encoder, texts, *, pooling='last', batch_size=DEFAULT_BATCH_SIZE,
                    max_tokens=MAX_BATCH_TOKENS, read_ahead=None):
    """Yield a float32 [n_embd] vector for each of `texts` (read lazily), in order.
    Every text must encode to at least one token."""
    if pooling not in POOLINGS:
        raise ValueError(f'pooling must be one of {POOLINGS}, not {pooling!r}')
    n_ctx = runner.hparams.n_ctx
    encoded = (vector_tokens(encoder.encode(text), n_ctx) for text in texts)
    yield from ordered_batches(encoded, lambda tokens: [tokens],
                               lambda rows: runner.vectors(rows, pooling=pooling),
                               lambda tokens, results: results[0],
                               batch_size=batch_size, n_ctx=n_ctx, max_tokens=max_tokens,
                               read_ahead=read_ahead)


# Output formats. The text ones are the original scripts', byte for byte.

def format_score(scored, token_text, *, with_tokens=False, with_perplexity=False):
    """`text<TAB>total` (with `<TAB>perplexity` if asked), then with_tokens: one
    `token<TAB>logprob` line per token and an empty line. token_text(id) -> str."""
    head = '%s\t%.5g' % (scored.text, scored.total)
    if with_perplexity:
        head += '\t%.5g' % scored.perplexity
    if not with_tokens:
        return head + '\n'
    lines = [head] + ['%s\t%.5g' % (token_text(token), logprob)
                      for token, logprob in zip(scored.tokens, scored.logprobs.tolist())]
    return '\n'.join(lines) + '\n\n'


def score_record(scored, token_text):
    """The JSON-lines record of one scored text (perplexity null for no tokens)."""
    perplexity = scored.perplexity
    return {'text': scored.text, 'total': scored.total, 'n_tokens': len(scored.tokens),
            'perplexity': None if math.isnan(perplexity) else perplexity,
            'tokens': [{'id': int(token), 'text': token_text(token), 'logprob': logprob}
                       for token, logprob in zip(scored.tokens, scored.logprobs.tolist())]}


def format_vector(vector):
    """A vector as the original printed it: the Python list of its float32 values."""
    return str(np.asarray(vector, np.float32).tolist())
