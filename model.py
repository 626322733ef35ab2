"""The GPT-2 network of the released gpt2ja checkpoints, built from plain TensorFlow ops.

The network is a pure function of a parameter dict (`'model/wte'` -> tensor or variable),
so the same code runs eagerly, inside `tf.function`, and in a `tf.compat.v1` graph:
- `forward(params, tokens, hparams=...)` computes logits, the final layer-normalised hidden
  states, and each layer's keys and values (for incremental decoding);
- `parameter_shapes(hparams)` is the table of variable names and shapes, exactly those of
  the released checkpoints, so checkpoints move both ways between this project and
  TF1-style code (`tf.compat.v1.train.Saver` over `model/...` variables);
- `tf1_parameters(hparams)` creates those variables in a TF1 graph.

Architecture: pre-norm transformer blocks, learned positions, GELU (tanh form), layer-norm
epsilon 1e-5, unembedding tied to the token embedding.
"""
import dataclasses
import math

import numpy as np
import tensorflow as tf

SCOPE = 'model'
LAYER_NORM_EPSILON = 1e-5


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


def parameter_shapes(hparams):
    """Variable name -> shape, in the released checkpoints' naming and order."""
    e, v = hparams.n_embd, hparams.n_vocab
    shapes = {f'{SCOPE}/wpe': (hparams.n_ctx, e), f'{SCOPE}/wte': (v, e)}
    for layer in range(hparams.n_layer):
        prefix = f'{SCOPE}/h{layer}'
        shapes.update({
            f'{prefix}/ln_1/g': (e,), f'{prefix}/ln_1/b': (e,),
            # The 1x1 "conv" weights keep the original [1, in, out] shape.
            f'{prefix}/attn/c_attn/w': (1, e, 3 * e), f'{prefix}/attn/c_attn/b': (3 * e,),
            f'{prefix}/attn/c_proj/w': (1, e, e), f'{prefix}/attn/c_proj/b': (e,),
            f'{prefix}/ln_2/g': (e,), f'{prefix}/ln_2/b': (e,),
            f'{prefix}/mlp/c_fc/w': (1, e, 4 * e), f'{prefix}/mlp/c_fc/b': (4 * e,),
            f'{prefix}/mlp/c_proj/w': (1, 4 * e, e), f'{prefix}/mlp/c_proj/b': (e,),
        })
    shapes.update({f'{SCOPE}/ln_f/g': (e,), f'{SCOPE}/ln_f/b': (e,)})
    return shapes


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


def gelu(x):
    return 0.5 * x * (1.0 + tf.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * tf.pow(x, 3))))


def layer_norm(x, g, b):
    """Normalise the last axis to mean 0 and variance 1, then scale by g and shift by b.
    The statistics and the normalisation are float32 whatever x's format (bfloat16's 8
    significant bits are too few for a variance over n_embd terms); the result is in g's
    format, the one the network computes in."""
    x32 = tf.cast(x, tf.float32)
    mean, variance = tf.nn.moments(x32, axes=[-1], keepdims=True)
    return tf.cast((x32 - mean) * tf.math.rsqrt(variance + LAYER_NORM_EPSILON), g.dtype) * g + b


def conv1d(x, w, b):
    """The original's 1x1 convolution, i.e. a dense layer: [..., nx] @ [1, nx, nf] -> [..., nf]."""
    return tf.tensordot(x, w[0], axes=1) + b


def split_heads(x, n_head):
    """[batch, seq, features] -> [batch, heads, seq, features / heads]."""
    batch, seq = tf.shape(x)[0], tf.shape(x)[1]
    features = x.shape[-1]
    x = tf.reshape(x, [batch, seq, n_head, features // n_head])
    return tf.transpose(x, [0, 2, 1, 3])


def merge_heads(x):
    """[batch, heads, seq, head_size] -> [batch, seq, heads * head_size]."""
    x = tf.transpose(x, [0, 2, 1, 3])
    batch, seq = tf.shape(x)[0], tf.shape(x)[1]
    return tf.reshape(x, [batch, seq, x.shape[-2] * x.shape[-1]])


def embed(params, tokens, positions):
    """Token plus position embeddings [..., n_embd] of int tokens and positions (same shape).
    float32 whatever the weights' format: the residual stream that the blocks add to stays
    float32, so that small updates to it are not rounded away."""
    return tf.cast(tf.gather(params[f'{SCOPE}/wte'], tokens) + tf.gather(params[f'{SCOPE}/wpe'], positions),
                   tf.float32)


def causal_mask(query_length, key_length):
    """[query, key] booleans: query i (the last `query_length` of `key_length` positions) sees
    keys up to and including its own position."""
    i = tf.range(query_length)[:, None]
    j = tf.range(key_length)
    return i >= j - key_length + query_length


def masked_softmax(scores, mask):
    """Softmax over the last axis where `mask` is True (zero elsewhere), computed in float32
    whatever the scores' format; returns float32 probabilities."""
    scores = tf.cast(scores, tf.float32)
    return tf.nn.softmax(tf.where(mask, scores, tf.float32.min), axis=-1)


def attend(q, k, v, mask):
    """Scaled dot-product attention. q [b, h, t, d]; k, v [b, h, s, d]; mask broadcasts to
    [b, h, t, s] (True = may attend). Returns [b, h, t, d], in v's format."""
    scores = tf.matmul(q, k, transpose_b=True) * tf.math.rsqrt(tf.cast(q.shape[-1], q.dtype))
    return tf.matmul(tf.cast(masked_softmax(scores, mask), v.dtype), v)


def attention_heads(params, prefix, x, *, hparams):
    """The queries, keys and values of x [batch, seq, embd], each [batch, heads, seq, head_size]."""
    qkv = conv1d(x, params[f'{prefix}/c_attn/w'], params[f'{prefix}/c_attn/b'])
    return [split_heads(part, hparams.n_head) for part in tf.split(qkv, 3, axis=2)]


def attention_output(params, prefix, q, k, v, mask, *, attend_fn=None):
    """Attend q to k, v under `mask` (see `attend`; `attend_fn` replaces it) and project:
    [batch, seq, embd]."""
    a = merge_heads((attend_fn or attend)(q, k, v, mask))
    return conv1d(a, params[f'{prefix}/c_proj/w'], params[f'{prefix}/c_proj/b'])


def attention(params, prefix, x, *, past, hparams):
    """Masked self-attention of one block. x [batch, seq, embd]; past None or
    [batch, 2, heads, past_seq, head_size]. Returns (output [batch, seq, embd],
    present [batch, 2, heads, seq, head_size]: this call's keys and values)."""
    q, k, v = attention_heads(params, prefix, x, hparams=hparams)
    present = tf.stack([k, v], axis=1)
    if past is not None:
        past_k, past_v = tf.unstack(past, axis=1)
        k = tf.concat([past_k, k], axis=-2)
        v = tf.concat([past_v, v], axis=-2)
    mask = causal_mask(tf.shape(q)[2], tf.shape(k)[2])
    return attention_output(params, prefix, q, k, v, mask), present


def mlp(params, prefix, x, *, activation=gelu):
    h = activation(conv1d(x, params[f'{prefix}/c_fc/w'], params[f'{prefix}/c_fc/b']))
    return conv1d(h, params[f'{prefix}/c_proj/w'], params[f'{prefix}/c_proj/b'])


def block(params, prefix, x, *, past, hparams):
    """One pre-norm transformer block; returns (x, present) as `attention` does."""
    return residual_block(params, prefix, x, lambda h: attention(
        params, f'{prefix}/attn', h, past=past, hparams=hparams))


def residual_block(params, prefix, x, attend_fn):
    """A pre-norm block around any attention: `attend_fn(normalised x)` -> (output, extra).
    Returns (x, extra); forward() and forward_cached() differ only in their attention."""
    a, extra = attend_fn(layer_norm(x, params[f'{prefix}/ln_1/g'], params[f'{prefix}/ln_1/b']))
    x = x + tf.cast(a, x.dtype)
    h = mlp(params, f'{prefix}/mlp', layer_norm(x, params[f'{prefix}/ln_2/g'], params[f'{prefix}/ln_2/b']))
    return x + tf.cast(h, x.dtype), extra


def unembed(params, hidden, *, hparams, wte_transposed=None):
    """Logits [rows, n_vocab] of final hidden states [rows, n_embd] (tied to wte).

    wte_transposed: None, or wte as [n_embd, n_vocab] (e.g. a variable made once by the
    caller): a matmul with few rows reads that layout about twice as fast as wte's own.
    """
    # One 2-D matmul: the largest product in the network, and 2-D is the fastest path on
    # every backend.
    if wte_transposed is not None:
        return tf.matmul(hidden, wte_transposed)
    return tf.matmul(hidden, params[f'{SCOPE}/wte'], transpose_b=True)


def past_shape(hparams, *, batch_size=None, sequence=None):
    """Shape of the key/value cache: [batch, layers, 2, heads, sequence, head_size]."""
    return [batch_size, hparams.n_layer, 2, hparams.n_head, sequence, hparams.head_size]


def forward(params, tokens, *, hparams, past=None):
    """Run the network.

    tokens: int [batch, seq]; past: None or the `present` of earlier calls,
    [batch, layers, 2, heads, past_seq, head_size]; positions continue after past_seq.
    Returns a dict:
      logits  [batch, seq, n_vocab]  (float32)
      hidden  [batch, seq, n_embd]   final layer-normalised hidden states
      present [batch, layers, 2, heads, seq, head_size]  this call's keys and values
    """
    past_length = 0 if past is None else tf.shape(past)[-2]
    positions = past_length + tf.range(tf.shape(tokens)[1])
    x = embed(params, tokens, positions)
    pasts = tf.unstack(past, axis=1) if past is not None else [None] * hparams.n_layer
    presents = []
    for layer, layer_past in enumerate(pasts):
        x, present = block(params, f'{SCOPE}/h{layer}', x, past=layer_past, hparams=hparams)
        presents.append(present)
    hidden = layer_norm(x, params[f'{SCOPE}/ln_f/g'], params[f'{SCOPE}/ln_f/b'])
    batch, seq = tf.shape(tokens)[0], tf.shape(tokens)[1]
    flat = tf.reshape(hidden, [batch * seq, hparams.n_embd])
    logits = tf.reshape(unembed(params, flat, hparams=hparams), [batch, seq, hparams.n_vocab])
    return {'logits': logits, 'hidden': hidden, 'present': tf.stack(presents, axis=1)}


def gelu_derivative(x):
    """d gelu(x) / dx of the tanh form."""
    c = math.sqrt(2.0 / math.pi)
    t = tf.tanh(c * (x + 0.044715 * tf.pow(x, 3)))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - tf.square(t)) * c * (1.0 + 3 * 0.044715 * tf.square(x))


@tf.custom_gradient
def training_gelu(x):
    """`gelu` that keeps only its input for the backward pass: differentiated as written,
    gelu keeps five [seq, 4 * embd] intermediates a layer alive until the backward pass."""
    def grad(dy):
        # Without the dependency on dy, the executor could run this as soon as x exists, in
        # the forward pass, and keep its result alive just the same.
        with tf.control_dependencies([dy]):
            return dy * gelu_derivative(tf.identity(x))
    return gelu(x), grad


def training_attend(q, k, v, mask):
    """`attend` that keeps only q, k, v and its output for the backward pass, and recomputes
    the attention probabilities there: a layer's [batch, heads, seq, seq] probabilities (50 MB
    at gpt2ja-small and 1024 tokens) would otherwise stay alive from the forward pass to the
    backward pass, and they are the larger part of the activations; recomputing them costs
    two [seq, seq] products a layer, a few percent of a step. mask: [t, s] booleans."""
    scale = tf.math.rsqrt(tf.cast(q.shape[-1], q.dtype))

    def probabilities(q, k):  # float32 [b, h, t, s]; scaling q, not the larger scores
        return masked_softmax(tf.matmul(q * scale, k, transpose_b=True), mask)

    @tf.custom_gradient
    def core(q, k, v):
        out = tf.matmul(tf.cast(probabilities(q, k), v.dtype), v)

        def grad(dout):
            with tf.control_dependencies([dout]):  # recompute in the backward pass, not before
                probs = probabilities(tf.identity(q), tf.identity(k))
            dv = tf.matmul(tf.cast(probs, v.dtype), dout, transpose_a=True)
            # softmax backward, in float32: p * (dp - sum(p * dp)), where
            # sum(p * dp) = sum(dout * out).
            dprobs = tf.cast(tf.matmul(dout, v, transpose_b=True), tf.float32)
            row_sums = tf.reduce_sum(tf.cast(dout, tf.float32) * tf.cast(out, tf.float32), axis=-1, keepdims=True)
            dscores = tf.cast(probs * (dprobs - row_sums), q.dtype)
            dq = tf.matmul(dscores, k) * scale
            dk = tf.matmul(dscores, q * scale, transpose_a=True)
            return dq, dk, dv
        return out, grad

    return core(q, k, v)


def training_block(params, prefix, x, *, hparams):
    """`block` without the key/value cache, keeping less for the backward pass (see
    `training_attend`, `training_gelu`); the same values. (Not through `residual_block`,
    which the cached decoding shares.)"""
    h = layer_norm(x, params[f'{prefix}/ln_1/g'], params[f'{prefix}/ln_1/b'])
    q, k, v = attention_heads(params, f'{prefix}/attn', h, hparams=hparams)
    mask = causal_mask(tf.shape(q)[2], tf.shape(k)[2])
    x = x + tf.cast(attention_output(params, f'{prefix}/attn', q, k, v, mask, attend_fn=training_attend), x.dtype)
    h = layer_norm(x, params[f'{prefix}/ln_2/g'], params[f'{prefix}/ln_2/b'])
    return x + tf.cast(mlp(params, f'{prefix}/mlp', h, activation=training_gelu), x.dtype)


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


def training_hidden(params, tokens, *, hparams, recompute=False):
    """Final layer-normalised hidden states [batch, seq, n_embd] for training: `forward`
    without the key/value cache, keeping less for the backward pass (`training_block`).
    With `recompute`, each block's activations are recomputed in the backward pass instead of
    kept: about a third more compute for a fraction of the memory. `params` may hold
    variables or (cast) tensors."""
    positions = tf.range(tf.shape(tokens)[1])
    x = embed(params, tokens, positions)
    for layer in range(hparams.n_layer):
        prefix = f'{SCOPE}/h{layer}'
        names = [name for name in parameter_shapes(hparams) if name.startswith(prefix + '/')]
        # The block's weights go in as arguments, so the recomputation differentiates them
        # like any input instead of having to find captured variables.
        values = [tf.convert_to_tensor(params[name]) for name in names]

        def run_block(x, *values, prefix=prefix, names=names):
            return training_block(dict(zip(names, values)), prefix, x, hparams=hparams)

        x = (recomputed(run_block) if recompute else run_block)(x, *values)
    return layer_norm(x, params[f'{SCOPE}/ln_f/g'], params[f'{SCOPE}/ln_f/b'])


def kv_cache_shape(hparams, *, batch_size):
    """One layer's preallocated key/value cache: [2 (keys, values), batch, heads, n_ctx (slots),
    head_size]. Attention's own layout, so that the slots read feed its matmuls untransposed."""
    return [2, batch_size, hparams.n_head, hparams.n_ctx, hparams.head_size]


def new_kv_cache(hparams, *, batch_size):
    """A zero key/value cache for `forward_cached`: one float32 tf.Variable a layer.

    Variables, because they are updated in place: writing one token's keys and values costs
    one token's bytes, where a tensor passed in and out would be copied whole every step.
    """
    shape = kv_cache_shape(hparams, batch_size=batch_size)
    return [tf.Variable(tf.zeros(shape, tf.float32), trainable=False, name=f'kv_cache_h{layer}')
            for layer in range(hparams.n_layer)]


def cached_attention_mask(start, length, first_slot, end):
    """[batch, 1, length, end] booleans for queries at slots [start, start + length): each sees
    the slots from its row's `first_slot` [batch] (earlier ones hold left padding) up to its own."""
    query = start + tf.range(length)[:, None]      # [length, 1]
    key = tf.range(end)[None, :]                   # [1, end]
    causal = (key <= query)[None]                  # [1, length, end]
    not_padding = key[None] >= first_slot[:, None, None]  # [batch, 1, end]
    return tf.logical_and(causal, not_padding)[:, None]


def update_kv_cache(layer_cache, k, v, start, *, read_length=None):
    """Write k, v [batch, heads, seq, head_size] at slots [start, start + seq) of one layer's
    cache; return its first slots' keys and values, each [batch, heads, slots, head_size]:
    start + seq slots, or `read_length` (a static count, for XLA) when given.

    ScatterNdUpdate writes in place (a strided-slice assign would copy the whole cache), and
    after a scatter TensorFlow copies the whole variable on a plain read, so the filled slots
    are read by a gather along the slot axis (batch_dims: one gather for every key and value
    row), which copies only them.
    """
    new = tf.stack([k, v])                                          # [2, batch, heads, seq, head_size]
    outer = tf.shape(new)[:4]                                       # [2, batch, heads, seq]
    index = [tf.range(n) for n in tf.unstack(outer)]
    index[3] += start
    where = tf.stack(tf.meshgrid(*index, indexing='ij'), axis=-1)  # [2, batch, heads, seq, 4]
    tf.raw_ops.ResourceScatterNdUpdate(ref=layer_cache.handle, indices=where, updates=new)
    if read_length is None:
        slots = tf.broadcast_to(tf.range(start + tf.shape(k)[2]), tf.concat([outer[:3], [start + outer[3]]], 0))
        rows = tf.raw_ops.ResourceGather(resource=layer_cache.handle, indices=slots,
                                         dtype=layer_cache.dtype, batch_dims=3)
    else:  # XLA reads variables in place, so a static slice is free
        rows = layer_cache[:, :, :, :read_length]
    return rows[0], rows[1]


def forward_cached(params, tokens, *, hparams, cache, start, first_slot=None, read_length=None,
                   wte_transposed=None, dense=None):
    """Run the network on new tokens against a preallocated key/value cache.

    tokens: int [batch, seq], placed at cache slots [start, start + seq) (start + seq <= n_ctx);
    cache: `new_kv_cache(...)`; this call writes the new keys and values into it and attends
      over slots [0, start + seq) only, so a token's cost grows with the text only through
      attention (a small share of the weights' cost), not through recomputation;
    first_slot: None or int [batch]: slots before it hold left padding in that row (rows with
      shorter contexts); its token at slot s has position s - first_slot;
    read_length: None, or a static number of slots (>= start + seq) to attend over, masked
      beyond the position: static shapes, as XLA needs;
    wte_transposed: see `unembed`;
    dense: None, or `DensePieces(hparams)`: run the parts that do not depend on the cache
      length (layer norms, projections, MLPs, unembedding) through its XLA-compiled functions,
      and only the cache write and attention in plain TensorFlow (see DensePieces).
    Same math as `forward` (they share the blocks). Returns a dict:
      logits [batch, n_vocab] at the last new token; hidden [batch, seq, n_embd].
    """
    tokens = tf.convert_to_tensor(tokens, tf.int32)
    batch, length = tf.shape(tokens)[0], tf.shape(tokens)[1]
    start = tf.convert_to_tensor(start, tf.int32)
    if first_slot is None:
        first_slot = tf.zeros([batch], tf.int32)
    positions = tf.maximum(start + tf.range(length)[None, :] - first_slot[:, None], 0)  # [batch, seq]
    x = tf.gather(params[f'{SCOPE}/wte'], tokens) + tf.gather(params[f'{SCOPE}/wpe'], positions)
    mask = cached_attention_mask(start, length, first_slot, start + length if read_length is None else read_length)
    if dense is not None:
        return dense.forward(params, x, cache=cache, start=start, mask=mask, read_length=read_length,
                             wte_transposed=wte_transposed)

    def cached_attention(layer_cache, prefix):
        def attend_with_cache(h):
            q, k, v = attention_heads(params, prefix, h, hparams=hparams)
            keys, values = update_kv_cache(layer_cache, k, v, start, read_length=read_length)
            return attention_output(params, prefix, q, keys, values, mask), None
        return attend_with_cache

    for layer, layer_cache in enumerate(cache):
        prefix = f'{SCOPE}/h{layer}'
        x, _ = residual_block(params, prefix, x, cached_attention(layer_cache, f'{prefix}/attn'))
    hidden = layer_norm(x, params[f'{SCOPE}/ln_f/g'], params[f'{SCOPE}/ln_f/b'])
    logits = unembed(params, hidden[:, -1], hparams=hparams, wte_transposed=wte_transposed)
    return {'logits': logits, 'hidden': hidden}


def _block_tail(x, a, w):
    """The rest of a block after attention: x + c_proj(a), then the MLP's residual.
    w: (attn c_proj w, b, ln_2 g, b, mlp c_fc w, b, mlp c_proj w, b)."""
    x = x + conv1d(a, w[0], w[1])
    return x + conv1d(gelu(conv1d(layer_norm(x, w[2], w[3]), w[4], w[5])), w[6], w[7])


def _block_head(x, w, n_head):
    """A block's attention inputs: q, k, v of ln_1(x), each [batch, heads, seq, head_size].
    w: (ln_1 g, b, attn c_attn w, b)."""
    qkv = conv1d(layer_norm(x, w[0], w[1]), w[2], w[3])
    return [split_heads(part, n_head) for part in tf.split(qkv, 3, axis=2)]


class DensePieces:
    """XLA-compiled pieces of `forward_cached` that do not depend on the cache length.

    A step's attention reads a growing number of cache slots (a dynamic shape, which XLA
    would compile once per length), but everything else in it has the static shape
    [batch, seq, n_embd]. Three compiled functions, each reused by every layer with that
    layer's weights as arguments, so they compile once per input shape (per batch size for
    the one-token step), not per layer or per cache length:
    - head: ln_1 and c_attn of layer 0 -> q, k, v;
    - middle: the tail of layer i (c_proj, residual, ln_2, MLP, residual) and the head of
      layer i + 1 -> x, q, k, v;
    - last: the tail of the last layer, ln_f and the unembedding -> logits of the last token.
    The cache write and attention over the filled slots stay in plain TensorFlow.
    """

    def __init__(self, hparams):
        n_head = hparams.n_head
        self.head = tf.function(lambda x, w: _block_head(x, w, n_head), jit_compile=True)

        def middle(x, a, tail, head):
            x = _block_tail(x, a, tail)
            return [x] + _block_head(x, head, n_head)
        self.middle = tf.function(middle, jit_compile=True)
        self.last = tf.function(self._last, jit_compile=True)

    @staticmethod
    def _last(x, a, tail, ln_f, wte_transposed):
        hidden = layer_norm(_block_tail(x, a, tail)[:, -1], ln_f[0], ln_f[1])
        return tf.matmul(hidden, wte_transposed)

    @staticmethod
    def _head_weights(params, prefix):
        return (params[f'{prefix}/ln_1/g'], params[f'{prefix}/ln_1/b'],
                params[f'{prefix}/attn/c_attn/w'], params[f'{prefix}/attn/c_attn/b'])

    @staticmethod
    def _tail_weights(params, prefix):
        return tuple(params[f'{prefix}/{name}'] for name in (
            'attn/c_proj/w', 'attn/c_proj/b', 'ln_2/g', 'ln_2/b',
            'mlp/c_fc/w', 'mlp/c_fc/b', 'mlp/c_proj/w', 'mlp/c_proj/b'))

    def forward(self, params, x, *, cache, start, mask, read_length, wte_transposed):
        """forward_cached's network from the embedded tokens x on; returns its dict (hidden
        is None: the compiled pieces keep only the last token's)."""
        if wte_transposed is None:
            wte_transposed = tf.transpose(params[f'{SCOPE}/wte'])
        read = lambda w: tuple(tf.convert_to_tensor(v) for v in w)  # noqa: E731
        q, k, v = self.head(x, read(self._head_weights(params, f'{SCOPE}/h0')))
        n_layer = len(cache)
        for layer, layer_cache in enumerate(cache):
            keys, values = update_kv_cache(layer_cache, k, v, start, read_length=read_length)
            a = merge_heads(attend(q, keys, values, mask))
            tail = read(self._tail_weights(params, f'{SCOPE}/h{layer}'))
            if layer + 1 < n_layer:
                x, q, k, v = self.middle(x, a, tail, read(self._head_weights(params, f'{SCOPE}/h{layer + 1}')))
            else:
                logits = self.last(x, a, tail, read((params[f'{SCOPE}/ln_f/g'], params[f'{SCOPE}/ln_f/b'])),
                                   tf.convert_to_tensor(wte_transposed))
        return {'logits': logits, 'hidden': None}

