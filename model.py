"""The GPT-2 network of the released gpt2ja checkpoints, built from plain TensorFlow ops.

The network is a pure function of a parameter dict (`'model/wte'` -> tensor or variable),
so the same code runs eagerly, inside `tf.function`, and in a `tf.compat.v1` graph. One
transformer block (`block`) serves every path, traced once a path (`traced_once`):
- `forward(params, tokens, hparams=...)`: logits and final hidden states of whole texts
  (scoring, vectors, TF1 graphs);
- `forward_cached(...)`: new tokens against a key/value cache (`KVCache`), for sampling;
- `training_hidden(...)`: hidden states with a backward pass that keeps less in memory.
`parameter_shapes(hparams)` is the table of variable names and shapes, exactly those of
the released checkpoints, so checkpoints move both ways between this project and TF1-style
code (`tf1_parameters`).

Architecture: pre-norm transformer blocks, learned positions, GELU (tanh form), layer-norm
epsilon 1e-5, unembedding tied to the token embedding.

Activations travel between the blocks flattened, [rows = batch * seq, n_embd], so that every
weight product is one 2-D matmul; only attention sees [batch, heads, seq, head_size].

Number format: the network computes in its weights' format. Given float32 weights it is
float32 throughout; given bfloat16 (or float16) weights, the products and activations use
that format while layer-norm statistics, attention's softmax and the residual stream stay
float32 (see precision.py); logits and hidden states come out in the weights' format.
"""
import collections
import dataclasses
import functools
import math

import numpy as np
import tensorflow as tf

SCOPE = 'model'
LAYER_NORM_EPSILON = 1e-5
# The sampler keeps wte only in this layout, [n_embd, n_vocab], under this name: the
# unembedding of a few rows reads it about twice as fast as wte's own [n_vocab, n_embd].
WTE_TRANSPOSED = f'{SCOPE}/wte:transposed'


@dataclasses.dataclass(frozen=True)
class HParams:
    """The sizes that define a GPT-2 network (the keys of `hparams.json`)."""
    n_vocab: int
    n_ctx: int
    n_embd: int
    n_head: int
    n_layer: int

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f'hparams {field.name} must be a positive integer, not {value!r}')
        if self.n_embd % self.n_head:
            raise ValueError(f'hparams n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})')

    @property
    def head_size(self):
        return self.n_embd // self.n_head

    def to_dict(self):
        return dataclasses.asdict(self)


# The released models. Both use n_ctx 1024 and the 20,573-token vocabulary.
RELEASED = {
    'gpt2ja-small': HParams(n_vocab=20573, n_ctx=1024, n_embd=768, n_head=12, n_layer=12),
    'gpt2ja-medium': HParams(n_vocab=20573, n_ctx=1024, n_embd=1024, n_head=16, n_layer=24),
}


def layer_shapes(n_embd):
    """One block's weights: name within the block -> shape. The 1x1 "conv" weights keep the
    original [1, in, out] shape."""
    e = n_embd
    return {
        'ln_1/g': (e,), 'ln_1/b': (e,),
        'attn/c_attn/w': (1, e, 3 * e), 'attn/c_attn/b': (3 * e,),
        'attn/c_proj/w': (1, e, e), 'attn/c_proj/b': (e,),
        'ln_2/g': (e,), 'ln_2/b': (e,),
        'mlp/c_fc/w': (1, e, 4 * e), 'mlp/c_fc/b': (4 * e,),
        'mlp/c_proj/w': (1, 4 * e, e), 'mlp/c_proj/b': (e,),
    }


def parameter_shapes(hparams):
    """Variable name -> shape, in the released checkpoints' naming and order."""
    e = hparams.n_embd
    shapes = {f'{SCOPE}/wpe': (hparams.n_ctx, e), f'{SCOPE}/wte': (hparams.n_vocab, e)}
    for layer in range(hparams.n_layer):
        shapes.update({f'{SCOPE}/h{layer}/{name}': shape for name, shape in layer_shapes(e).items()})
    shapes.update({f'{SCOPE}/ln_f/g': (e,), f'{SCOPE}/ln_f/b': (e,)})
    return shapes


def layer_weights(params, layer):
    """Block `layer`'s weights by their names within the block ('ln_1/g', 'mlp/c_fc/w', ...)."""
    prefix = f'{SCOPE}/h{layer}/'
    return {name[len(prefix):]: value for name, value in params.items() if name.startswith(prefix)}


def count_parameters(hparams):
    return sum(math.prod(shape) for shape in parameter_shapes(hparams).values())


def _initial_std(name):
    if name.endswith('/wpe'):
        return 0.01
    return 0.02


def init_parameters(hparams, *, seed=0):
    """Random parameters as GPT-2 initialises them (numpy float32), for new or test models."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in parameter_shapes(hparams).items():
        if name.endswith('/g'):
            params[name] = np.ones(shape, np.float32)
        elif name.endswith('/b'):
            params[name] = np.zeros(shape, np.float32)
        else:
            params[name] = rng.normal(0.0, _initial_std(name), shape).astype(np.float32)
    return params


def tf1_parameters(hparams, *, initial=None):
    """Create the network's variables in the current TF1 graph (tf.compat.v1.get_variable).

    `initial`, a dict of numpy arrays, gives initial values; else GPT-2's initialisers.
    Returns name -> variable; the variable names are the checkpoint names.
    """
    v1 = tf.compat.v1
    params = {}
    for name, shape in parameter_shapes(hparams).items():
        if initial is not None:
            init = v1.constant_initializer(initial[name])
        elif name.endswith('/g'):
            init = v1.ones_initializer()
        elif name.endswith('/b'):
            init = v1.zeros_initializer()
        else:
            init = v1.random_normal_initializer(stddev=_initial_std(name))
        params[name] = v1.get_variable(name, shape, dtype=tf.float32, initializer=init)
    return params


# --- the block ------------------------------------------------------------------------

def gelu(x):
    return 0.5 * x * (1.0 + tf.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * tf.pow(x, 3))))


def layer_norm(x, g, b):
    """Normalise the last axis to mean 0 and variance 1, then scale by g and shift by b.
    The statistics and the normalisation are float32 whatever x's format (bfloat16's 8
    significant bits are too few for a variance over n_embd terms); the result is in g's
    format, the one the network computes in."""
    x = tf.cast(x, tf.float32)
    mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
    return tf.cast((x - mean) * tf.math.rsqrt(variance + LAYER_NORM_EPSILON), g.dtype) * g + b


def dense(x, w, b):
    """The original's 1x1 convolution, a dense layer: x [rows, in] @ w [1, in, out] + b."""
    return tf.matmul(x, tf.reshape(w, w.shape[1:])) + b


def attention_input(w, x, *, norm=layer_norm):
    """The first half of a block: queries, keys and values of ln_1(x), [rows, 3 * n_embd]."""
    return dense(norm(x, w['ln_1/g'], w['ln_1/b']), w['attn/c_attn/w'], w['attn/c_attn/b'])


def block_output(w, x, a, *, activation=gelu, norm=layer_norm):
    """The second half of a block, after attention a [rows, n_embd]: projection, residual,
    ln_2, MLP, residual. Returns the block's output [rows, n_embd], in x's format (the
    residual stream, float32: see `embed`); the rest computes in the weights' format."""
    x = x + tf.cast(dense(a, w['attn/c_proj/w'], w['attn/c_proj/b']), x.dtype)
    h = activation(dense(norm(x, w['ln_2/g'], w['ln_2/b']), w['mlp/c_fc/w'], w['mlp/c_fc/b']))
    return x + tf.cast(dense(h, w['mlp/c_proj/w'], w['mlp/c_proj/b']), x.dtype)


def block(w, x, attention, *, activation=gelu, norm=layer_norm):
    """One pre-norm transformer block. w: its weights (`layer_weights`); x [rows, n_embd];
    attention(qkv [rows, 3 * n_embd]) -> [rows, n_embd], the only part that differs between
    whole texts, the cache and training; activation and norm: `gelu` and `layer_norm`, or
    the training path's versions of them."""
    return block_output(w, x, attention(attention_input(w, x, norm=norm)), activation=activation, norm=norm)


# Every layer runs the same block on its own weights, so each path traces its block once, as
# a function that every layer calls with its weights as arguments, rather than once a layer:
# tracing (Python building the graph op by op) is most of a script's start-up, and this cuts
# it about n_layer-fold. TensorFlow inlines the calls when it optimises the caller's graph,
# so what runs is the same graph, with the same numbers and speed, as n_layer copies.
# Called eagerly, the block runs op by op as before (there is no graph to keep small, and a
# trace per new number of rows would cost more than it saves).
def traced_once(fn):
    traced = tf.function(fn, autograph=False)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return (fn if tf.executing_eagerly() else traced)(*args, **kwargs)
    call.tracing_count = traced.experimental_get_tracing_count
    return call


def layer_tensors(params, layer):
    """`layer_weights` as tensors, to pass to a traced block (a variable is read here, in the
    caller's graph)."""
    return {name: tf.convert_to_tensor(value) for name, value in layer_weights(params, layer).items()}


def split_heads(qkv, batch, n_head):
    """qkv [batch * seq, 3 * n_embd] -> [3 (q, k, v), batch, heads, seq, head_size]."""
    head_size = qkv.shape[-1] // (3 * n_head)
    return tf.transpose(tf.reshape(qkv, [batch, -1, 3, n_head, head_size]), [2, 0, 3, 1, 4])


def merge_heads(a):
    """[batch, heads, seq, head_size] -> [batch * seq, heads * head_size]."""
    return tf.reshape(tf.transpose(a, [0, 2, 1, 3]), [-1, a.shape[1] * a.shape[3]])


def masked_softmax(scores, mask):
    """Softmax over the last axis where `mask` is True (zero elsewhere), in float32 whatever
    the scores' format; returns float32 probabilities."""
    scores = tf.cast(scores, tf.float32)
    return tf.nn.softmax(tf.where(mask, scores, tf.float32.min), axis=-1)


def attend(q, k, v, mask):
    """Scaled dot-product attention. q [b, h, t, d]; k, v [b, h, s, d]; mask broadcasts to
    [b, h, t, s] (True = may attend). Returns [b, h, t, d], in v's format."""
    # Scaling q [t, d], not the scores [t, s]: a pass over the smaller tensor.
    scores = tf.matmul(q * tf.math.rsqrt(tf.cast(q.shape[-1], q.dtype)), k, transpose_b=True)
    return tf.matmul(tf.cast(masked_softmax(scores, mask), v.dtype), v)


def causal_mask(length):
    """[query, key] booleans: each position sees itself and the positions before it."""
    return tf.range(length)[:, None] >= tf.range(length)[None, :]


def causal_attention(batch, n_head, *, attend_fn=attend):
    """Self-attention of whole texts: the `attention` of `block` for [batch, seq] inputs."""
    def attention(qkv):
        q, k, v = tf.unstack(split_heads(qkv, batch, n_head))
        return merge_heads(attend_fn(q, k, v, causal_mask(tf.shape(q)[2])))
    return attention


def text_block(w, x, batch, n_head):
    """`block` with causal self-attention over whole texts: x [batch * seq, n_embd]."""
    return block(w, x, causal_attention(batch, n_head))


_traced_text_block = traced_once(text_block)


def embed(params, tokens, positions):
    """Token plus position embeddings, [batch * seq, n_embd]. tokens, positions int [batch, seq].
    float32 whatever the weights' format: the residual stream that the blocks add to stays
    float32, so that small updates to it are not rounded away."""
    tokens, positions = tf.reshape(tokens, [-1]), tf.reshape(positions, [-1])
    if WTE_TRANSPOSED in params:
        words = tf.transpose(tf.gather(params[WTE_TRANSPOSED], tokens, axis=1))
    else:
        words = tf.gather(params[f'{SCOPE}/wte'], tokens)
    return tf.cast(words + tf.gather(params[f'{SCOPE}/wpe'], positions), tf.float32)


def unembed(params, hidden):
    """Logits [rows, n_vocab] of final hidden states [rows, n_embd] (tied to wte)."""
    if WTE_TRANSPOSED in params:
        return tf.matmul(hidden, params[WTE_TRANSPOSED])
    return tf.matmul(hidden, params[f'{SCOPE}/wte'], transpose_b=True)


def final_norm(params, x):
    return layer_norm(x, params[f'{SCOPE}/ln_f/g'], params[f'{SCOPE}/ln_f/b'])


def forward(params, tokens, *, hparams, block=_traced_text_block):
    """Run the network over whole texts, tokens int [batch, seq]. Returns a dict:
      logits [batch, seq, n_vocab]; hidden [batch, seq, n_embd], the final layer-normalised
      hidden states (the text vectors).
    block: what each layer runs, (weights, x, batch, n_head) -> x; `text_block` writes every
      layer into the graph in line, as the original's model() did (the benchmarks' baseline:
      tf.gradients differentiates calls of the traced block into function calls of their
      own, which keep more memory)."""
    tokens = tf.cast(tokens, tf.int32)
    batch, seq = tf.shape(tokens)[0], tf.shape(tokens)[1]
    x = embed(params, tokens, tf.broadcast_to(tf.range(seq), [batch, seq]))
    for layer in range(hparams.n_layer):
        x = block(layer_tensors(params, layer), x, batch, hparams.n_head)
    hidden = final_norm(params, x)
    logits = unembed(params, hidden)
    return {'logits': tf.reshape(logits, [batch, seq, hparams.n_vocab]),
            'hidden': tf.reshape(hidden, [batch, seq, hparams.n_embd])}


# --- the key/value cache ----------------------------------------------------------------

class KVCache:
    """Each layer's keys and values of the tokens seen so far, for one batch of rows.

    One variable a layer, [2 (keys, values), batch, heads, capacity (slots), head_size]:
    attention's own layout, so the slots read feed its matmuls untransposed. Variables,
    because they are written in place: a step writes one token's keys and values, where a
    tensor passed in and out would be copied whole every step.

    The slot axis holds what the text needs, not the whole window: `capacity` slots (the
    window's n_ctx, or room for `slots` as `grown_capacity` rounds it), grown by `reserve`
    between calls. The variables declare that axis of unknown size, so a function traced
    against the cache reads and writes the grown variables without being traced again.
    """

    def __init__(self, hparams, *, batch_size, dtype=tf.float32, slots=None):
        self.batch_size, self.n_head, self.n_ctx = batch_size, hparams.n_head, hparams.n_ctx
        self.capacity = hparams.n_ctx if slots is None else grown_capacity(0, slots, n_ctx=hparams.n_ctx)
        shape = [2, batch_size, hparams.n_head, self.capacity, hparams.head_size]
        any_capacity = tf.TensorShape(shape[:3] + [None] + shape[4:])
        self.layers = [tf.Variable(tf.zeros(shape, dtype), shape=any_capacity, trainable=False,
                                   name=f'kv_cache_h{layer}')
                       for layer in range(hparams.n_layer)]

    def reserve(self, slots):
        """Make room for slots [0, slots) (at most n_ctx), keeping the filled ones. Eager only:
        a traced function cannot change the variables' sizes."""
        if slots <= self.capacity:
            return
        if slots > self.n_ctx:
            raise ValueError(f'{slots} cache slots asked for; the window has {self.n_ctx}')
        capacity = grown_capacity(self.capacity, slots, n_ctx=self.n_ctx)
        grow = [[0, 0]] * 3 + [[0, capacity - self.capacity]] + [[0, 0]]
        # One layer at a time: the old and the new copy of a single layer are alive together.
        for variable in self.layers:
            variable.assign(tf.pad(variable, grow))
        self.capacity = capacity

    def step(self, start, length, first_slot):
        """What every layer's attention needs for `length` new tokens at slots
        [start, start + length), built once a call (`CacheStep`); a row attends over slots
        [0, start + length), except its slots before its `first_slot` [batch] (left padding)."""
        b, h, end = self.batch_size, self.n_head, start + length
        # ScatterNdUpdate writes in place (a sliced assign would copy the whole cache):
        # indices [2, b, h, length, 4], one (kv, row, head, slot) per new key or value.
        write_at = tf.stack(tf.meshgrid(tf.range(2), tf.range(b), tf.range(h), start + tf.range(length),
                                        indexing='ij'), axis=-1)
        # After a scatter, a plain read of the variable copies it whole; a gather along the
        # slot axis copies only the filled slots. indices [2, b, h, end]: slot numbers.
        read_slots = tf.broadcast_to(tf.range(end), [2, b, h, end])
        query = start + tf.range(length)[:, None]                      # [length, 1]
        key = tf.range(end)[None, :]                                   # [1, end]
        not_padding = key[None] >= first_slot[:, None, None]           # [b, 1, end]
        mask = tf.logical_and(key <= query, not_padding)[:, None]      # [b, 1, length, end]
        return CacheStep(write_at, read_slots, mask)


# KVCache.step's tensors: write_at int [2, batch, heads, length, 4]; read_slots int
# [2, batch, heads, end]; mask bool [batch, 1, length, end].
CacheStep = collections.namedtuple('CacheStep', 'write_at read_slots mask')


def cached_attention(variable, step, batch, n_head):
    """The `attention` of `block` against one layer's cache `variable`: writes the new
    tokens' keys and values at their slots and attends over the filled ones (step: a
    `CacheStep`)."""
    def attention(qkv):
        q_k_v = split_heads(qkv, batch, n_head)                        # [3, b, h, length, d]
        tf.raw_ops.ResourceScatterNdUpdate(ref=variable.handle, indices=step.write_at, updates=q_k_v[1:])
        k, v = tf.unstack(tf.raw_ops.ResourceGather(
            resource=variable.handle, indices=step.read_slots, dtype=variable.dtype, batch_dims=3))
        return merge_heads(attend(q_k_v[0], k, v, step.mask))
    return attention


def cached_block(w, x, variable, step, batch, n_head):
    """`block` for new tokens against one layer's cache: x [batch * length, n_embd]."""
    return block(w, x, cached_attention(variable, step, batch, n_head))


_traced_cached_block = traced_once(cached_block)


def grown_capacity(capacity, slots, *, n_ctx):
    """The capacity to grow a cache of `capacity` slots to, to hold `slots`: `slots` rounded
    up to a multiple of n_ctx / 16 (so short texts share a few sizes), at least twice
    `capacity` (so a text that grows to fill the window is copied at most four times), at most
    n_ctx."""
    unit = -(-n_ctx // 16)
    return min(n_ctx, max(2 * capacity, -(-slots // unit) * unit))


def run_blocks(params, x, cache, step):
    """x [batch * length, n_embd] through every block, each against its layer's cache."""
    for layer, variable in enumerate(cache.layers):
        x = _traced_cached_block(layer_tensors(params, layer), x, variable, step, cache.batch_size, cache.n_head)
    return x


class CompiledBlocks:
    """`run_blocks` with the parts whose shapes do not depend on the cache (everything but
    attention: layer norms, projections, MLP, for [rows, n_embd]) compiled by XLA, which fuses
    their small element-wise ops. Attention reads a growing number of slots (a new shape every
    step) and stays plain TensorFlow. Three compiled functions, each called by every layer
    with that layer's weights as arguments, so each compiles once per number of rows:
    `attention_input` of the first block; `block_output` of block i followed by
    `attention_input` of block i + 1; `block_output` of the last block.
    """

    def __init__(self):
        self._first = tf.function(attention_input, jit_compile=True)
        self._between = tf.function(_output_then_input, jit_compile=True)
        self._last = tf.function(block_output, jit_compile=True)

    def __call__(self, params, x, cache, step):
        attentions = [cached_attention(variable, step, cache.batch_size, cache.n_head) for variable in cache.layers]
        weights = [layer_tensors(params, layer) for layer in range(len(attentions))]
        qkv = self._first(weights[0], x)
        for layer, attention in enumerate(attentions[:-1]):
            x, qkv = self._between(weights[layer], weights[layer + 1], x, attention(qkv))
        return self._last(weights[-1], x, attentions[-1](qkv))


def _output_then_input(w, w_next, x, a):
    x = block_output(w, x, a)
    return x, attention_input(w_next, x)


def forward_cached(params, tokens, *, hparams, cache, start, first_slot=None, blocks=run_blocks):
    """Run the network on new tokens against a key/value cache; logits [batch, n_vocab] of
    each row's last new token.

    tokens: int [batch, seq], placed at cache slots [start, start + seq) (start + seq at most
      the cache's capacity: see `KVCache.reserve`);
      a token costs one token's work whatever the length of the text before it;
    cache: a KVCache; first_slot: None or int [batch]: slots before it hold left padding in
      that row (rows with shorter contexts); its token at slot s has position s - first_slot;
    blocks: `run_blocks` or a `CompiledBlocks()`.
    """
    tokens = tf.cast(tokens, tf.int32)
    length = tf.shape(tokens)[1]
    start = tf.convert_to_tensor(start, tf.int32)
    if first_slot is None:
        first_slot = tf.zeros([cache.batch_size], tf.int32)
    positions = tf.maximum(start + tf.range(length)[None, :] - first_slot[:, None], 0)  # [batch, seq]
    x = blocks(params, embed(params, tokens, positions), cache, cache.step(start, length, first_slot))
    last = tf.reshape(x, [cache.batch_size, length, hparams.n_embd])[:, -1]
    return tf.cast(unembed(params, final_norm(params, last)), tf.float32)


def decoding_parameters(params, *, dtype=tf.float32):
    """The parameters as variables, as the cached decoder reads them: wte only transposed
    (WTE_TRANSPOSED), every one in `dtype` (the format the decoder computes in). Variables,
    so that traced steps read them in place rather than holding constants. Takes a dict of
    arrays, tensors or zero-argument functions returning them, and creates one variable at a
    time."""
    variables = {}
    for name, value in params.items():
        value = tf.cast(value() if callable(value) else value, dtype)
        if name == f'{SCOPE}/wte':
            name, value = WTE_TRANSPOSED, tf.transpose(value)
        variables[name] = tf.Variable(value, trainable=False)
        del value
    return variables


# --- training -----------------------------------------------------------------------------
# The same block, with pieces whose hand-written backward passes keep less in memory or
# take fewer passes (tests/test_model.py checks them against differentiating `forward`).

# GELU's tanh form, 0.5 x (1 + tanh(c (x + a x^3))), is x sigmoid(2 c (x + a x^3)): the same
# function in fewer element-wise passes over [rows, 4 * n_embd], for its derivative too.
GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


def gelu_derivative(x):
    """d gelu(x) / dx of the tanh form: s (1 + x (1 - s) (2 c + 6 c a x^2)), where
    s = sigmoid(2 c (x + a x^3))."""
    x2 = tf.square(x)
    s = tf.sigmoid(x * (2 * GELU_C + 2 * GELU_C * GELU_A * x2))
    return s * (1.0 + x * (1.0 - s) * (2 * GELU_C + 6 * GELU_C * GELU_A * x2))


def _gelu_sigmoid_form(x):
    return x * tf.sigmoid(x * (2 * GELU_C + 2 * GELU_C * GELU_A * tf.square(x)))


def _gelu_backward(x, dy):
    return dy * gelu_derivative(x)


# Compiled by XLA, which fuses each into one pass over [rows, 4 * n_embd]; as separate
# TensorFlow ops, each multiplication and addition is a pass of its own.
_compiled_gelu = tf.function(_gelu_sigmoid_form, jit_compile=True, autograph=False)
_compiled_gelu_backward = tf.function(_gelu_backward, jit_compile=True, autograph=False)


@tf.custom_gradient
def training_gelu(x):
    """`gelu` that keeps only its input for the backward pass: differentiated as written,
    gelu keeps five [rows, 4 * embd] intermediates a layer alive until the backward pass."""
    def grad(dy):
        # Without the dependency on dy, the executor could run this as soon as x exists, in
        # the forward pass, and keep its result alive just the same.
        with tf.control_dependencies([dy]):
            return _compiled_gelu_backward(tf.identity(x), dy)
    return _compiled_gelu(x), grad


def training_attend(q, k, v, mask):
    """`attend` that keeps only q, k, v and its output for the backward pass, and recomputes
    the attention probabilities there: a layer's [batch, heads, seq, seq] probabilities (50 MB
    at gpt2ja-small and 1024 tokens) would otherwise stay alive from the forward pass to the
    backward pass, and they are the larger part of the activations. mask: [t, s] booleans."""
    scale = tf.math.rsqrt(tf.cast(q.shape[-1], q.dtype))

    def probabilities(q, k):  # float32 [b, h, t, s]; scaling q, not the larger scores
        return masked_softmax(tf.matmul(q * scale, k, transpose_b=True), mask)

    @tf.custom_gradient
    def core(q, k, v):
        out = tf.matmul(tf.cast(probabilities(q, k), v.dtype), v)

        def grad(dout):
            with tf.control_dependencies([dout]):  # recompute in the backward pass, not before
                probs = probabilities(tf.identity(q), tf.identity(k))
            probs = tf.cast(probs, v.dtype)
            dv = tf.matmul(probs, dout, transpose_a=True)
            # softmax backward: p * (dp - sum(p * dp)), where sum(p * dp) = sum(dout * out),
            # a float32 sum over head_size. The [t, s] products stay in the compute format:
            # dp comes out of a product in it, and dscores goes into two more.
            dprobs = tf.matmul(dout, v, transpose_b=True)
            row_sums = tf.reduce_sum(tf.cast(dout, tf.float32) * tf.cast(out, tf.float32), axis=-1, keepdims=True)
            dscores = probs * (dprobs - tf.cast(row_sums, dprobs.dtype))
            dq = tf.matmul(dscores, k) * scale
            dk = tf.matmul(dscores, q * scale, transpose_a=True)
            return dq, dk, dv
        return out, grad

    return core(q, k, v)


@tf.custom_gradient
def training_layer_norm(x, g, b):
    """`layer_norm` with a hand-written backward pass: differentiated as written, its
    statistics' gradients take about twice as many passes over [rows, n_embd]."""
    x32 = tf.cast(x, tf.float32)
    mean, variance = tf.nn.moments(x32, axes=[-1], keepdims=True)
    rstd = tf.math.rsqrt(variance + LAYER_NORM_EPSILON)  # [rows, 1]
    normal = (x32 - mean) * rstd                           # float32 [rows, n_embd]

    def grad(dy):
        dnormal = tf.cast(dy * g, tf.float32)
        dx = rstd * (dnormal - tf.reduce_mean(dnormal, axis=-1, keepdims=True)
                     - normal * tf.reduce_mean(dnormal * normal, axis=-1, keepdims=True))
        return (tf.cast(dx, x.dtype), tf.reduce_sum(dy * tf.cast(normal, g.dtype), axis=0),
                tf.reduce_sum(dy, axis=0))
    return tf.cast(normal, g.dtype) * g + b, grad


def causal_blocks_attend(q, k, v, mask, *, blocks=4, attend_fn=training_attend):
    """Causal self-attention by query blocks, each against the keys up to its own end
    (mask: the causal [t, t] booleans): the scores above the diagonal blocks, all masked
    out, are never computed (with 4 blocks, 6 of the 16 blocks of the [t, t] square).
    Where t is not known or not a multiple of `blocks`, the whole square as `attend_fn`
    computes it."""
    t = q.shape[2]
    if t is None or t % blocks:
        return attend_fn(q, k, v, mask)
    size = t // blocks
    q, k, v = (tf.split(x, blocks, axis=2) for x in (q, k, v))
    # Keys and values up to a block's end as a concatenation of blocks, not a slice of k
    # and v: a slice's gradient is a zero-padded copy of the whole of k or v.
    outs = [attend_fn(q[i], tf.concat(k[:i + 1], axis=2), tf.concat(v[:i + 1], axis=2),
                      mask[i * size:(i + 1) * size, :(i + 1) * size])
            for i in range(blocks)]
    return tf.concat(outs, axis=2)


def recomputed(fn):
    """fn(x, *weights) -> y, whose backward pass recomputes fn's activations from its inputs
    instead of keeping them (what tf.recompute_grad does, without its per-call overhead)."""
    @tf.custom_gradient
    def wrapped(x, *weights):
        def grad(dy):
            with tf.control_dependencies([dy]):  # recompute in the backward pass, not before
                inputs = [tf.identity(t) for t in (x, *weights)]
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                y = fn(*inputs)
            return tape.gradient(y, inputs, output_gradients=dy)
        return fn(x, *weights), grad
    return wrapped


def _training_block(w, x, *, batch, n_head):
    """`block` with the training pieces; w: one layer's weights as tensors, x [rows, n_embd]."""
    attention = causal_attention(batch, n_head, attend_fn=causal_blocks_attend)
    return block(w, x, attention, activation=training_gelu, norm=training_layer_norm)


# Traced once (`traced_once`), the block's backward pass is also built once for all layers,
# where the tape used to differentiate every copy.
_traced_training_block = traced_once(_training_block)


def training_hidden(params, tokens, *, hparams, recompute=False):
    """Final layer-normalised hidden states [batch, seq, n_embd] for training: `forward`'s,
    through the same blocks, keeping less for the backward pass (`training_attend`,
    `training_gelu`) and taking fewer passes (`training_layer_norm`). With `recompute`,
    each block's activations are recomputed in the backward pass instead of kept: about a
    third more compute for a fraction of the memory.
    `params` may hold variables or (cast) tensors."""
    tokens = tf.cast(tokens, tf.int32)
    # Sizes known when traced stay Python ints, so that attention's shapes are static.
    batch, seq = (size if size is not None else tf.shape(tokens)[axis] for axis, size in enumerate(tokens.shape))
    x = embed(params, tokens, tf.broadcast_to(tf.range(seq), [batch, seq]))
    # With `recompute`, the block is traced inline: called as the traced function there
    # (once in the forward pass, again under the recomputation's tape), a step held 0.3 GB
    # more at its peak, and the first step came no sooner.
    block_fn = _training_block if recompute else _traced_training_block
    for layer in range(hparams.n_layer):
        weights = layer_tensors(params, layer)
        names = list(weights)

        # The block's weights go in as arguments, so the recomputation differentiates them
        # like any input instead of having to find captured variables.
        def run_block(x, *values, names=names):
            return block_fn(dict(zip(names, values)), x, batch=batch, n_head=hparams.n_head)

        x = (recomputed(run_block) if recompute else run_block)(x, *weights.values())
    final = training_layer_norm(x, params[f'{SCOPE}/ln_f/g'], params[f'{SCOPE}/ln_f/b'])
    return tf.reshape(final, [batch, seq, hparams.n_embd])
