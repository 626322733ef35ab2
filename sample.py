"""Sampling continuations from the network: the logits filters and the batched generation loop.

Layers, from the bottom:
- `filter_logits`, `top_k_filter`, `top_p_filter`, `suppress_token`: pure functions on
  logits [batch, vocab] that set excluded tokens to -inf (the original's rules: temperature
  divides the logits; top_p > 0 takes precedence over top_k; 0 disables each);
- `BatchSampler`: the compiled per-token step for one batch size, holding a key/value
  cache (`model.forward_cached`) that grows with the text, so each new token costs one
  token's work;
- `sample_batch`: continuations of a batch of contexts, each row stopping at end-of-text,
  at a token budget, at the end of the window, or when the caller says it has enough;
- `generate`: the simple entry point (token ids in, token ids out) for other modules;
- `generate_texts`: what gpt2-generate.py needs: character limits, several rounds of the
  window for long texts (re-fed with the most recent text), batches of samples.
"""
import dataclasses
import math

import numpy as np
import tensorflow as tf

import model
from model_dir import trace_then_wait

# How the original continues past one window: the last 256 characters of the text so far
# become the next context.
REFEED_CHARACTERS = 256
# The original retries a sample that ended before its first character, forever; we stop
# retrying after this many tries and keep the empty sample.
MAX_EMPTY_RETRIES = 10


def top_k_filter(logits, k):
    """Keep the k highest logits of each row (and any tied with the k-th); others -inf."""
    k = min(int(k), logits.shape[-1])
    kth = tf.math.top_k(logits, k=k, sorted=True).values[:, -1:]  # [batch, 1]
    return tf.where(logits < kth, tf.constant(-math.inf, logits.dtype), logits)


def top_p_filter(logits, p):
    """Keep the smallest set of highest logits whose probabilities sum to at least p (nucleus
    sampling, as the original: a token is kept while the mass of those above it is < p)."""
    ranked = tf.sort(logits, axis=-1, direction='DESCENDING')                 # [batch, vocab]
    mass_above = tf.cumsum(tf.nn.softmax(ranked, axis=-1), axis=-1, exclusive=True)
    lowest_kept = tf.reduce_min(tf.where(mass_above < p, ranked, math.inf), axis=-1, keepdims=True)
    return tf.where(logits < lowest_kept, tf.constant(-math.inf, logits.dtype), logits)


def filter_logits(logits, *, top_k=0, top_p=0.0, temperature=1.0):
    """Logits [batch, vocab] divided by temperature, then truncated by top_p (when > 0) or
    else top_k (when > 0). Excluded tokens get -inf; sampling renormalises the rest."""
    logits = logits / temperature
    if top_p > 0:
        return top_p_filter(logits, top_p)
    if top_k > 0:
        return top_k_filter(logits, top_k)
    return logits


def suppress_token(logits, token_id, rows):
    """Set `token_id`'s logit to -inf in the rows where `rows` [batch] (bool) is True."""
    is_token = tf.equal(tf.range(tf.shape(logits)[-1]), token_id)[None, :]   # [1, vocab]
    return tf.where(tf.logical_and(rows[:, None], is_token),
                    tf.constant(-math.inf, logits.dtype), logits)


def draw(logits, rng):
    """One token id a row from softmax(logits) [batch, vocab] (the Gumbel-max trick, which
    needs only uniform noise, so one seeded tf.random.Generator makes runs reproducible)."""
    tiny = np.finfo(np.float32).tiny  # > 0, so log(log) stays finite
    uniform = rng.uniform(tf.shape(logits), minval=tiny, maxval=1.0, dtype=tf.float32)
    return tf.argmax(logits - tf.math.log(-tf.math.log(uniform)), axis=-1, output_type=tf.int32)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How tokens are chosen; see `filter_logits`. min_length counts generated tokens.
    Checked when made: a ValueError (one line, naming the setting) for what cannot be honoured."""
    top_k: int = 40
    top_p: float = 0.0
    temperature: float = 1.0
    min_length: int = 0

    def __post_init__(self):
        if self.top_k < 0:
            raise ValueError(f'top_k must be 0 (no limit) or more, not {self.top_k}')
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f'top_p must be between 0 (off) and 1, not {self.top_p}')
        if not self.temperature > 0:
            raise ValueError(f'temperature must be greater than 0, not {self.temperature}')
        if self.min_length < 0:
            raise ValueError(f'min_length must be 0 or more, not {self.min_length}')

    def check_window(self, hparams):
        """Raise ValueError when min_length does not fit the model's window."""
        if self.min_length > hparams.n_ctx:
            raise ValueError(f'min_length must be between 0 and the model window '
                             f'({hparams.n_ctx} tokens), not {self.min_length}')


def decoding_parameters(params, *, precision='float32'):
    """`params` as the sampler reads them (`model.decoding_parameters`, in `precision`: see
    precision.py), made once: pass the result to every BatchSampler of a run. Parameters
    already converted pass through."""
    if model.WTE_TRANSPOSED in params:
        return params
    return model.decoding_parameters(params, dtype=tf.as_dtype(precision))


def start_loading_decoding_parameters(loaded, *, precision='float32'):
    """`decoding_parameters` of a model directory (`model_dir.ModelDir`), as variables filled
    from its checkpoint in the background: pass `.variables` as the params and `.wait` as
    `parameters_ready`, so that the step is traced while the weights are read."""
    return loaded.start_loading(dtype=precision, transposed={f'{model.SCOPE}/wte': model.WTE_TRANSPOSED})


class BatchSampler:
    """The compiled sampling step of one model for a fixed batch size.

    Holds the key/value cache (`model.KVCache`): `start(contexts)` runs the contexts through
    the network and samples each row's first token; `step(tokens, slot)` feeds the previous
    tokens at cache slot `slot` and samples the next. A step attends over the slots filled so
    far only, so its cost hardly grows with the text. The contexts and the steps go through
    one traced function ([batch, any length] tokens), traced once. The cache holds the slots
    that `start` expects the text to need and grows (`KVCache.reserve`) when a step needs more.

    params: `decoding_parameters(...)` (or anything it takes: then converted here).
    xla: compile the network's fixed-shape parts of a step with XLA (`model.CompiledBlocks`,
    compiled once per batch size; the contexts then take a second, plain traced function).
    parameters_ready: called after tracing, before the first run (see
    `start_loading_decoding_parameters`).
    """

    def __init__(self, params, hparams, *, batch_size, settings, eot_id, rng, xla=False,
                 parameters_ready=None):
        self.hparams, self.batch_size = hparams, batch_size
        self._parameters_ready = parameters_ready
        self.settings, self.eot_id, self.rng = settings, eot_id, rng
        self.params = decoding_parameters(params)
        self.cache = model.KVCache(hparams, batch_size=batch_size, slots=0,
                                   dtype=self.params[model.WTE_TRANSPOSED].dtype)
        self._first_slot = tf.Variable(tf.zeros([batch_size], tf.int32), trainable=False)
        signature = [tf.TensorSpec([batch_size, None], tf.int32), tf.TensorSpec([], tf.int32),
                     tf.TensorSpec([batch_size], tf.bool)]
        self._advance = tf.function(self._advance_graph, input_signature=signature, autograph=False)
        self._step = self._advance
        if xla:
            blocks = model.CompiledBlocks()
            self._step = tf.function(lambda tokens, slot, no_eot: self._advance_graph(tokens, slot, no_eot, blocks),
                                     input_signature=signature, autograph=False)

    def _advance_graph(self, tokens, slot, no_eot, blocks=model.run_blocks):
        """tokens [batch, length] at cache slots [slot, slot + length) -> the next token [batch]."""
        logits = model.forward_cached(self.params, tokens, hparams=self.hparams, cache=self.cache,
                                      start=slot, first_slot=self._first_slot, blocks=blocks)
        logits = suppress_token(logits, self.eot_id, no_eot)
        s = self.settings
        return draw(filter_logits(logits, top_k=s.top_k, top_p=s.top_p, temperature=s.temperature), self.rng)

    def start(self, contexts, no_eot, *, new_tokens=None):
        """Left-pad `contexts` (lists of ids, 1..n_ctx long) to one length, fill the cache,
        and sample the first tokens. Returns (first tokens [batch] numpy, next free slot).
        new_tokens: how many tokens the longest row may get, where known: the cache makes
        room for them now rather than growing as they come."""
        length = max(len(c) for c in contexts)
        self.cache.reserve(min(length + (new_tokens or 1), self.hparams.n_ctx))
        padded = np.zeros([self.batch_size, length], np.int32)
        first_slot = np.full([self.batch_size], length, np.int32)
        for row, context in enumerate(contexts):
            padded[row, length - len(context):] = context
            first_slot[row] = length - len(context)
        self._first_slot.assign(first_slot)
        self._parameters_ready = trace_then_wait(self._advance, self._parameters_ready)
        return self._advance(padded, np.int32(0), np.asarray(no_eot)).numpy(), length

    def step(self, tokens, slot, no_eot):
        tokens = np.asarray(tokens, np.int32)[:, None]
        self.cache.reserve(slot + 1)
        return self._step(tokens, np.int32(slot), np.asarray(no_eot)).numpy()


# Why a row of a batch stopped.
END_OF_TEXT = 'end_of_text'   # it sampled <|endoftext|> (not included in its tokens)
MAX_TOKENS = 'max_tokens'     # it has the tokens asked for
WINDOW = 'window'             # the context window is full
ENOUGH = 'enough'             # the caller's `enough` said so (e.g. enough characters)


def sample_batch(sampler, contexts, *, max_tokens, generated_before=None, enough=None):
    """Continuations of up to `sampler.batch_size` contexts, sampled together.

    max_tokens: the most tokens a row may get (int, a list a row, or None: the window's);
    generated_before: tokens each row already has from earlier rounds (counts for min_length);
    enough(row, tokens) -> bool: asked after each new token of a running row (a hook for
      character limits and streaming); True stops the row.
    Stops as soon as every row has stopped. Returns [(tokens, reason)] a context.
    """
    n_rows, n_ctx = len(contexts), sampler.hparams.n_ctx
    if max_tokens is None:
        max_tokens = math.inf
    budgets = max_tokens if isinstance(max_tokens, (list, tuple)) else [max_tokens] * n_rows
    before = list(generated_before or [0] * n_rows)
    padding = sampler.batch_size - n_rows
    contexts = [list(c) for c in contexts] + [[sampler.eot_id]] * padding
    outputs = [[] for _ in range(n_rows)]
    reasons = [None] * n_rows + [MAX_TOKENS] * padding   # padding rows are stopped from the start

    def no_eot():
        min_length = sampler.settings.min_length
        return np.array([reasons[r] is None and before[r] + len(outputs[r]) < min_length
                         for r in range(sampler.batch_size)])

    largest_budget = max(budgets)
    tokens, slot = sampler.start(contexts, no_eot(),
                                 new_tokens=None if math.isinf(largest_budget) else largest_budget)
    while True:
        for row in range(n_rows):
            if reasons[row] is None:
                reasons[row] = _take_token(int(tokens[row]), outputs[row], row, sampler.eot_id,
                                           budgets[row], enough, window_full=slot >= n_ctx)
        if all(reason is not None for reason in reasons):
            return list(zip(outputs, reasons[:n_rows]))
        tokens = sampler.step(tokens, slot, no_eot())
        slot += 1


def _take_token(token, output, row, eot_id, budget, enough, *, window_full):
    """Append a row's new token; return why the row stops now, or None."""
    if token == eot_id:
        return END_OF_TEXT
    output.append(token)
    if len(output) >= budget:
        return MAX_TOKENS
    if enough is not None and enough(row, output):
        return ENOUGH
    if window_full:  # the token was sampled, but there is no slot left to feed it back
        return WINDOW
    return None


def make_rng(seed):
    """The random generator of one run: seeded (reproducible) or from the OS."""
    if seed is None:
        return tf.random.Generator.from_non_deterministic_state()
    return tf.random.Generator.from_seed(seed)


def generate(params, hparams, context_tokens, *, max_tokens, batch_size=1, top_k=40, top_p=0.0,
             temperature=1.0, min_length=0, eot_id, seed=None, xla=False):
    """Sample `batch_size` continuations of one context (a list of token ids), together.

    Each continuation is a list of ids, cut before the first end-of-text (`eot_id`), at most
    `max_tokens` long, and ends where the window (hparams.n_ctx) is full. The context keeps
    its last n_ctx - 1 tokens. See `filter_logits` for top_k, top_p and temperature;
    min_length forbids end-of-text in the first min_length tokens. Same seed, same output.
    xla: see BatchSampler.
    """
    settings = Settings(top_k=top_k, top_p=top_p, temperature=temperature, min_length=min_length)
    settings.check_window(hparams)
    context = list(context_tokens)[-(hparams.n_ctx - 1):] or [eot_id]
    sampler = BatchSampler(params, hparams, batch_size=batch_size, settings=settings,
                           eot_id=eot_id, rng=make_rng(seed), xla=xla)
    return [tokens for tokens, _ in sample_batch(sampler, [context] * batch_size, max_tokens=max_tokens)]


def fit_context(tokens, hparams):
    """The end of a context that leaves half the window for generating (as the original
    does: at most n_ctx // 2 tokens). Returns (tokens kept, number dropped)."""
    keep = hparams.n_ctx // 2
    tokens = list(tokens)
    if len(tokens) <= keep:
        return tokens, 0
    return tokens[-keep:], len(tokens) - keep


@dataclasses.dataclass
class TextSample:
    """One sample of `generate_texts`: its text (at most max_length characters, cut before
    the first end-of-text), all tokens generated for it, and why it stopped."""
    index: int
    context: list                 # the context of the next round
    tokens: list = dataclasses.field(default_factory=list)
    text: str = ''
    stop_reason: str = None       # END_OF_TEXT or 'max_length'
    empty_tries: int = 0


MAX_LENGTH = 'max_length'


def generate_texts(params, hparams, encoder, context_tokens, *, num_samples, max_length,
                   settings, batch_size=8, seed=None, xla=False, precision='float32', on_text=None,
                   on_done=None, parameters_ready=None):
    """`num_samples` texts continuing `context_tokens`, sampled `batch_size` at a time.

    A sample ends at end-of-text or once it has `max_length` characters (its text is cut
    there; at most one token more is generated). When the window fills first, the sample
    goes on in a new round whose context is its last REFEED_CHARACTERS characters, as the
    original does. A sample that ends before its first character is retried (as the
    original does, up to MAX_EMPTY_RETRIES times).
    params: see `decoding_parameters` (converted once here otherwise, to `precision`);
    on_text(index, text): called as a sample's text grows (streaming, progress);
    on_done(sample): called as each sample finishes;
    parameters_ready: see BatchSampler.
    Returns the TextSamples in order.
    """
    params = decoding_parameters(params, precision=precision)
    first_context = fit_context(context_tokens, hparams)[0] or [encoder.eot_id]
    rng, samplers = make_rng(seed), {}
    samples = [TextSample(index=i, context=first_context) for i in range(num_samples)]
    pending = list(samples)
    while pending:
        group, pending = pending[:batch_size], pending[batch_size:]
        if len(group) not in samplers:
            samplers[len(group)] = BatchSampler(params, hparams, batch_size=len(group), settings=settings,
                                                eot_id=encoder.eot_id, rng=rng, xla=xla,
                                                parameters_ready=parameters_ready)

        def enough(row, new_tokens, group=group):
            text = encoder.decode(group[row].tokens + new_tokens)
            if on_text is not None:
                on_text(group[row].index, text[:max_length])
            return len(text) >= max_length

        results = sample_batch(samplers[len(group)], [s.context for s in group], max_tokens=None,
                               generated_before=[len(s.tokens) for s in group], enough=enough)
        for sample, (new_tokens, reason) in zip(group, results):
            if _finish_round(sample, new_tokens, reason, encoder, hparams, first_context, max_length):
                if on_done is not None:
                    on_done(sample)
            else:
                pending.append(sample)
    return samples


def _finish_round(sample, new_tokens, reason, encoder, hparams, first_context, max_length):
    """Record one round of a sample; True when the sample is finished, else set up its next
    round (a retry or the continuation past the window)."""
    sample.tokens += new_tokens
    text = encoder.decode(sample.tokens)
    if reason == END_OF_TEXT and not text and sample.empty_tries < MAX_EMPTY_RETRIES:
        sample.empty_tries += 1
        sample.tokens, sample.context = [], first_context
        return False
    if reason == WINDOW and len(text) < max_length:
        refeed = encoder.encode(text[-REFEED_CHARACTERS:]) if text else first_context
        sample.context = fit_context(refeed, hparams)[0]
        return False
    sample.text = text[:max_length]
    sample.stop_reason = END_OF_TEXT if reason == END_OF_TEXT else MAX_LENGTH
    return True
