"""Benchmark: batched scoring vs one line at a time through the same graph.

    python bench/bench_score.py [--lines 256] [--batch_size 32] [--vocab ../shared/vocab]

Scores N texts from ../shared/corpus/aozora with a gpt2ja-small-sized model with random
weights (no real checkpoint needed: speed does not depend on the weights), first with
batch_size 1, then batched, in one process, and prints lines per second for each and their
ratio. Two kinds of line are measured (--unit): whole paragraphs (about 100 tokens each) and
sentences (cut at 。, about 25 tokens: the length people compare phrasings at). Both runs are
warmed up first so tracing is not timed. The target (issue 4) is a ratio of at least 4.
"""
import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
sys.path.insert(0, str(REPO))

import cli  # noqa: E402


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


def timed_run(runner, encoder, texts, batch_size):
    import scoring
    start = time.perf_counter()
    results = list(scoring.score_texts(runner, encoder, texts, batch_size=batch_size))
    return time.perf_counter() - start, results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--lines', type=int, default=256, help='lines to score')
    parser.add_argument('--batch_size', type=int, default=None, help='batched run (default: scoring default)')
    parser.add_argument('--model_size', default='gpt2ja-small', help='a key of model.RELEASED')
    parser.add_argument('--vocab', default=str(SHARED / 'vocab'), help='vocabulary directory')
    parser.add_argument('--gpu', default='-1', help='-1 for CPU')
    parser.add_argument('--unit', choices=('paragraph', 'sentence', 'both'), default='both',
                        help='what one line of input is')
    args = parser.parse_args()
    tf = cli.prepare_tensorflow(gpu=args.gpu)
    import numpy as np

    import model
    import scoring
    from encoder import get_encoder

    hparams = model.RELEASED[args.model_size]
    encoder = get_encoder(args.vocab)
    runner = scoring.ModelRunner(model.init_parameters(hparams), hparams)
    batch_size = args.batch_size or scoring.DEFAULT_BATCH_SIZE
    print(f'model {args.model_size} random weights; devices '
          f'{[d.name for d in tf.config.list_logical_devices()]}')
    for unit in ('paragraph', 'sentence') if args.unit == 'both' else (args.unit,):
        texts = corpus_lines(args.lines, unit)
        tokens = [len(encoder.encode(text)) + 1 for text in texts]
        print(f'\n{unit}s: {len(texts)} lines, {sum(tokens)} tokens scored '
              f'(median {int(np.median(tokens))}, max {max(tokens)})')
        timed_run(runner, encoder, texts[:8], 1)  # warm-up: trace the graph once
        timed_run(runner, encoder, texts[:8], batch_size)
        single_time, single = timed_run(runner, encoder, texts, 1)
        batched_time, batched = timed_run(runner, encoder, texts, batch_size)
        difference = max(float(np.max(np.abs(a.logprobs - b.logprobs))) for a, b in zip(single, batched))
        print(f'one line at a time: {single_time:7.2f} s  {len(texts) / single_time:8.2f} lines/s')
        print(f'batched ({batch_size:3d} lines):  {batched_time:7.2f} s  {len(texts) / batched_time:8.2f} lines/s')
        print(f'speed-up: {single_time / batched_time:.2f}x   (largest logprob difference {difference:.2e})')


if __name__ == '__main__':
    main()
