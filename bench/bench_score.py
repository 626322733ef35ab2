"""Benchmark scoring: paragraphs and sentences against the short-line rate and the matmul ceiling.

    python bench/bench_score.py [--lines 256] [--precisions float32,bfloat16] [--batch1]

Everything is measured in one process, on a gpt2ja-small-sized model with random weights
(speed does not depend on the weights), after a warm-up, for each precision:
- the ceiling: `tf.matmul` of the model's own shape, [1024, 768] x [768, 3072];
- short lines: batches of 32 random 32-token rows straight through `ModelRunner` (no text,
  no padding), the batched rate the texts are compared with;
- N paragraphs (one line of ../shared/corpus/aozora each, about 100 tokens) and N sentences
  (cut at 。, about 30 tokens) through `scoring.score_texts`, as gpt2-score.py runs them;
  with --batch1, also one line at a time.
Model FLOPs are 2 x parameters a scored token (attention's own products not counted). Times
are wall-clock; "CPU ms/token" is the process's CPU time, which other programs running on
the machine disturb less, so compare rows by it when the machine is shared.
"""
import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
sys.path.insert(0, str(REPO))

import cli  # noqa: E402

MATMUL_SHAPE = (1024, 768, 3072)
SHORT_LINES = (32, 32)  # rows x tokens


def corpus_lines(count, unit='paragraph'):
    lines = []
    for path in sorted((SHARED / 'corpus' / 'aozora').glob('*.txt')):
        paragraphs = [line.strip() for line in path.read_text(encoding='utf-8').splitlines() if line.strip()]
        if unit == 'sentence':
            paragraphs = [s + '。' for p in paragraphs for s in p.split('。') if s.strip()]
        lines += paragraphs
    if len(lines) < count:
        raise SystemExit(f'only {len(lines)} lines in the corpus, asked for {count}')
    return lines[:count]


def timed(fn, repeats=1):
    """(wall seconds, CPU seconds) of `repeats` calls of fn, after one untimed call."""
    fn()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def matmul_rate(tf, dtype):
    m, k, n = MATMUL_SHAPE
    a, b = tf.cast(tf.random.normal([m, k]), dtype), tf.cast(tf.random.normal([k, n]), dtype)
    matmul = tf.function(lambda a, b: tf.matmul(a, b))
    wall, _ = timed(lambda: matmul(a, b).numpy(), repeats=20)
    return 2 * m * k * n * 20 / wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--lines', type=int, default=256, help='lines of each kind to score')
    parser.add_argument('--batch_size', type=int, default=None, help='default: the scripts\' default')
    parser.add_argument('--precisions', default='float32,bfloat16', help='comma-separated')
    parser.add_argument('--batch1', action='store_true', help='also score one line at a time')
    parser.add_argument('--model_size', default='gpt2ja-small', help='a key of model.RELEASED')
    parser.add_argument('--vocab', default=str(SHARED / 'vocab'), help='vocabulary directory')
    parser.add_argument('--gpu', default='-1', help='-1 for CPU')
    args = parser.parse_args()
    tf = cli.prepare_tensorflow(gpu=args.gpu)
    import numpy as np

    import model
    import scoring
    from encoder import get_encoder

    hparams = model.RELEASED[args.model_size]
    flops_per_token = 2 * model.count_parameters(hparams)
    encoder = get_encoder(args.vocab)
    batch_size = args.batch_size or scoring.DEFAULT_BATCH_SIZE
    params = model.init_parameters(hparams)
    texts = {unit: corpus_lines(args.lines, unit) for unit in ('paragraph', 'sentence')}
    print(f'model {args.model_size}, random weights; devices '
          f'{[d.name for d in tf.config.list_logical_devices()]}; batch size {batch_size}')
    for unit, lines in texts.items():
        tokens = [len(encoder.encode(text)) + 1 for text in lines]
        print(f'{unit}s: {len(lines)} lines, {sum(tokens)} tokens scored '
              f'(median {int(np.median(tokens))}, max {max(tokens)})')
    print('\n| precision | what | tokens/s | CPU ms/token | model GFLOP/s | % of matmul | % of short lines |')
    print('|---|---|---|---|---|---|---|')
    rng = np.random.default_rng(0)
    rows, width = SHORT_LINES
    short = [(list(rng.integers(0, hparams.n_vocab, width)),) * 2 for _ in range(rows)]
    results = {}
    for precision in args.precisions.split(','):
        ceiling = matmul_rate(tf, precision)
        runner = scoring.ModelRunner(params, hparams, precision=precision)
        wall, cpu = timed(lambda: runner.target_logprobs(short), repeats=4)
        short_rate = 4 * rows * width / wall

        def row(what, count, wall, cpu):
            rate = count / wall
            print(f'| {precision} | {what} | {rate:.0f} | {1000 * cpu / count:.2f} | '
                  f'{rate * flops_per_token / 1e9:.0f} | {100 * rate * flops_per_token / ceiling:.0f}% | '
                  f'{100 * rate / short_rate:.0f}% |', flush=True)
            return rate

        print(f'| {precision} | matmul {MATMUL_SHAPE[0]}x{MATMUL_SHAPE[1]}x{MATMUL_SHAPE[2]} | | | '
              f'{ceiling / 1e9:.0f} | 100% | |')
        row(f'short lines, {rows} x {width} tokens', 4 * rows * width, wall, cpu)
        for unit, lines in texts.items():
            count = sum(len(encoder.encode(text)) + 1 for text in lines)
            sizes = (batch_size, 1) if args.batch1 else (batch_size,)
            for size in sizes:
                wall, cpu = timed(lambda: list(scoring.score_texts(runner, encoder, lines, batch_size=size)))
                label = f'{len(lines)} {unit}s, batch {size}'
                results[precision, unit, size] = row(label, count, wall, cpu)
        runner = None  # free its weights before the next precision loads
    for unit in texts:
        if ('float32', unit, batch_size) in results and ('bfloat16', unit, batch_size) in results:
            print(f'\nbfloat16 / float32, {unit}s: '
                  f'{results["bfloat16", unit, batch_size] / results["float32", unit, batch_size]:.2f}x')


if __name__ == '__main__':
    main()
