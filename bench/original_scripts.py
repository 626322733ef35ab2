"""What the original gpt2-japanese scripts did per call, for end-to-end comparisons.

    python bench/original_scripts.py generate --model DIR [--num_generate 3] [--max_length 100]
    python bench/original_scripts.py score --model DIR FILE

Not the original code: the same algorithm and the same work per call, on this project's
network (model.py's block, in a tf.compat.v1 graph restored by a Saver), as the original
gpt2-generate.py and gpt2-score.py ran it:
- generate: one graph sampling a fixed n_ctx // 2 = 512 tokens in a tf.while_loop whose
  key/value cache is the concatenation of every step's keys and values (it grows, and is
  copied, each step); batch 1; no early stop: a sample is decoded after all 512 tokens, cut
  at the first <|endoftext|>, and run again from its last 256 characters while it has
  fewer than max_length characters; top_k 40 by default;
- score: one session.run per line, batch 1, softmax then log of the picked probabilities.
Output formats are the original's (samples separated by "========"; "text<TAB>total").
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402


def concatenating_attention(batch, n_head, past_k, past_v, presents):
    """The original's attention with a past: keys and values of earlier tokens (past_k,
    past_v [batch, heads, past, head_size], or None) concatenated with this call's;
    appends this call's (k, v) to `presents`."""
    import tensorflow as tf

    import model

    def attention(qkv):
        q, k, v = tf.unstack(model.split_heads(qkv, batch, n_head))
        presents.append((k, v))
        if past_k is not None:
            k, v = tf.concat([past_k, k], axis=2), tf.concat([past_v, v], axis=2)
        t, s = tf.shape(q)[2], tf.shape(k)[2]
        mask = tf.range(t)[:, None] + s - t >= tf.range(s)[None, :]
        return model.merge_heads(model.attend(q, k, v, mask))
    return attention


def network_with_past(params, tokens, past, hparams):
    """Logits of the last token [batch, n_vocab] and this call's keys and values
    [layers, 2, batch, heads, seq, head_size]; past: the same layout for earlier tokens or None."""
    import tensorflow as tf

    import model
    batch, seq = tf.shape(tokens)[0], tf.shape(tokens)[1]
    past_length = 0 if past is None else tf.shape(past)[4]
    positions = tf.broadcast_to(past_length + tf.range(seq), [batch, seq])
    x = model.embed(params, tokens, positions)
    presents = []
    for layer in range(hparams.n_layer):
        past_k = past_v = None
        if past is not None:
            past_k, past_v = past[layer, 0], past[layer, 1]
        attention = concatenating_attention(batch, hparams.n_head, past_k, past_v, presents)
        x = model.block(model.layer_weights(params, layer), x, attention)
    hidden = model.final_norm(params, x)
    last = tf.reshape(hidden, [batch, seq, hparams.n_embd])[:, -1]
    present = tf.stack([tf.stack(kv) for kv in presents])
    return model.unembed(params, last), present


def sampling_graph(params, context, hparams, *, length, top_k):
    """Tokens [1, context + length]: `length` tokens sampled after `context` [1, None]."""
    import tensorflow as tf
    v1 = tf.compat.v1
    _, past = network_with_past(params, context[:, :-1], None, hparams)

    def body(past, previous, output):
        logits, present = network_with_past(params, previous[:, None], past, hparams)
        if top_k:
            kth = tf.math.top_k(logits, k=top_k).values[:, -1:]
            logits = tf.where(logits < kth, -1e10 * tf.ones_like(logits), logits)
        drawn = v1.multinomial(logits, num_samples=1, output_dtype=tf.int32)
        return [tf.concat([past, present], axis=4), drawn[:, 0], tf.concat([output, drawn], axis=1)]

    e, h = hparams.n_embd, hparams.n_head
    past_shape = tf.TensorShape([hparams.n_layer, 2, 1, h, None, e // h])
    _, _, tokens = tf.while_loop(lambda *_: True, body, [past, context[:, -1], context],
                                 shape_invariants=[past_shape, tf.TensorShape([1]), tf.TensorShape([1, None])],
                                 maximum_iterations=length, back_prop=False)
    return tokens


def generate(args, loaded, encoder, tf):
    import model
    hparams = loaded.hparams
    length = hparams.n_ctx // 2
    with tf.compat.v1.Session(graph=tf.Graph()) as session:
        context = tf.compat.v1.placeholder(tf.int32, [1, None])
        tokens = sampling_graph(model.tf1_parameters(hparams), context, hparams, length=length,
                                top_k=args.top_k)
        tf.compat.v1.train.Saver().restore(session, loaded.checkpoint)
        samples = []
        for _ in range(args.num_generate):
            text, prompt = '', args.context
            while True:
                ids = encoder.encode(prompt)[-length:]
                out = session.run(tokens, {context: [ids]})[0, len(ids):]
                piece = encoder.decode(out.tolist())
                ended = '<|endoftext|>' in piece
                text += piece.split('<|endoftext|>')[0]
                if (ended or len(text) > args.max_length) and text:
                    break
                prompt = text[-256:] or args.context
            samples.append(text[:args.max_length])
    sys.stdout.write('========\n'.join(s + '\n' for s in samples))


def score(args, loaded, encoder, tf):
    import model
    hparams = loaded.hparams
    with open(args.input_file, encoding='utf-8') as stream:
        texts = [line.strip() for line in stream if line.strip()]
    with tf.compat.v1.Session(graph=tf.Graph()) as session:
        tokens = tf.compat.v1.placeholder(tf.int32, [None])
        logits = model.forward(model.tf1_parameters(hparams), tokens[None, :-1], hparams=hparams,
                               block=model.text_block)['logits'][0]
        probs = tf.nn.softmax(logits)
        picked = tf.gather_nd(probs, tf.stack([tf.range(tf.shape(tokens)[0] - 1), tokens[1:]], axis=-1))
        logprobs = tf.math.log(picked)
        tf.compat.v1.train.Saver().restore(session, loaded.checkpoint)
        eot = encoder.eot_id
        for text in texts:
            ids = encoder.encode(text) + [eot]
            values = session.run(logprobs, {tokens: [eot] + ids}).tolist()
            print('%s\t%.5g' % (text, sum(values)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('command', choices=('generate', 'score'))
    parser.add_argument('input_file', nargs='?')
    parser.add_argument('--model', required=True)
    parser.add_argument('--vocab')
    parser.add_argument('--context', default='<|endoftext|>')
    parser.add_argument('--num_generate', type=int, default=5)
    parser.add_argument('--max_length', type=int, default=500)
    parser.add_argument('--top_k', type=int, default=40)
    args = parser.parse_intermixed_args()
    tf = cli.prepare_tensorflow()
    tf.compat.v1.disable_eager_execution()
    from model_dir import load_model_dir
    loaded = load_model_dir(args.model, vocab_dir=args.vocab)
    encoder = loaded.load_encoder()
    (generate if args.command == 'generate' else score)(args, loaded, encoder, tf)


if __name__ == '__main__':
    main()
