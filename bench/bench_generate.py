"""Benchmark of generation speed on a gpt2ja-small-sized model with random weights.

    python bench/bench_generate.py [--quick] [--modes plain xla]

Measures, in one run (figures for report/generate.md):
  (a) flat cost: time a token at cache slot ~10 vs ~900 (batch 1); target ratio <= 1.5;
  (b) batching: 8 samples vs 1 of the same length (whole sample_batch calls); target <= 2x;
  (c) bandwidth floor: the bytes of weights read a token / the bandwidth of a float32
      matrix-vector product in TensorFlow over a matrix of the model's size (all cores);
      target: time a token at batch 1 <= 1.3x that floor.
"""
import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402


def best_of(fn, *, repeats, inner=1):
    """The fastest of `repeats` timings of `inner` calls, per call (noise only adds time)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return min(times)


def cpu_name():
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
        return next(line.split(':', 1)[1].strip() for line in out.splitlines() if line.startswith('Model name'))
    except (OSError, StopIteration):
        return platform.processor()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='fewer repeats')
    parser.add_argument('--length', type=int, default=64, help='tokens a sample for (b)')
    parser.add_argument('--modes', nargs='+', choices=['plain', 'xla'], default=['plain', 'xla'],
                        help='which steps to measure: plain TensorFlow, or with the fixed-shape parts '
                             'compiled by XLA (--xla; each mode\'s figures can depend on what ran before it)')
    args = parser.parse_args()
    tf = cli.prepare_tensorflow()
    import numpy as np

    import model
    import sample

    repeats = 3 if args.quick else 7
    hparams = model.RELEASED['gpt2ja-small']
    params = sample.decoding_parameters(model.init_parameters(hparams))
    weight_bytes = sum(int(np.prod(v.shape)) for v in params.values()) * 4
    print(f'machine: {cpu_name()}, {os.cpu_count()} cores; TensorFlow {tf.__version__}; '
          f'intra-op threads {tf.config.threading.get_intra_op_parallelism_threads() or "default"}')

    # (c) bandwidth, as a good kernel sees it: y = M x over a matrix of the model's size, the
    # fastest of three TensorFlow formulations (plain M x, plain x^T M^T, XLA M x).
    matrix = tf.Variable(tf.random.normal([weight_bytes // 4 // hparams.n_embd, hparams.n_embd]))
    vector = tf.random.normal([hparams.n_embd, 1])
    kernels = {
        'M x': tf.function(lambda matrix=matrix: tf.reduce_sum(tf.matmul(matrix, vector))),
        'x^T M^T': tf.function(lambda matrix=matrix: tf.reduce_sum(tf.matmul(vector, matrix, transpose_a=True, transpose_b=True))),
        'M x (XLA)': tf.function(lambda matrix=matrix: tf.reduce_sum(tf.matmul(matrix, vector)), jit_compile=True),
    }
    matvec = {name: best_of(lambda: f().numpy(), repeats=repeats, inner=5) for name, f in kernels.items()}
    print('matvec over the weights\' size: ' + ', '.join(f'{name} {s * 1e3:.1f} ms' for name, s in matvec.items()))
    matvec_s = min(matvec.values())
    bandwidth = weight_bytes / matvec_s
    del kernels, matrix  # the kernels hold the matrix: free its 407 MB before the model runs

    floor = weight_bytes / bandwidth
    print(f'weights read a token: {weight_bytes / 1e6:.0f} MB; float32 matvec over a matrix of '
          f'that size (best): {matvec_s * 1e3:.1f} ms = {bandwidth / 1e9:.1f} GB/s -> floor {floor * 1e3:.1f} ms/token')
    for mode in args.modes:
        report_mode(params, hparams, floor=floor, xla=mode == 'xla', repeats=repeats, length=args.length)


def report_mode(params, hparams, *, floor, xla, repeats, length):
    """(a), (b) and (c) for one way of compiling the step (sample.BatchSampler's xla)."""
    import numpy as np

    import sample
    mode = 'XLA for the fixed-shape parts' if xla else 'plain tf.function'
    eot = hparams.n_vocab - 1
    rng = sample.make_rng(0)
    one = sample.BatchSampler(params, hparams, batch_size=1, settings=sample.Settings(top_k=40),
                              eot_id=eot, rng=rng, xla=xla)
    one.start([[1] * 8], np.zeros(1, bool))
    no_eot, token = np.zeros(1, bool), np.zeros(1, np.int32)
    compile_start = time.perf_counter()
    for slot in (10, 900):
        one.step(token, slot, no_eot)
    compile_s = time.perf_counter() - compile_start
    at = {slot: best_of(lambda: one.step(token, slot, no_eot), repeats=repeats, inner=5) for slot in (10, 900)}
    # (b) whole samples: same context, same length (min_length forbids an early end).
    times = {}
    for batch in (1, 8):
        sampler = sample.BatchSampler(params, hparams, batch_size=batch, eot_id=eot, rng=rng, xla=xla,
                                      settings=sample.Settings(top_k=40, min_length=length))
        run = lambda: sample.sample_batch(sampler, [[eot]] * batch, max_tokens=length)  # noqa: E731
        times[batch] = best_of(run, repeats=max(2, repeats // 2))
    print(f'--- {mode} (first calls at slots 10 and 900, tracing/compiling: {compile_s:.1f} s)')
    print(f'(c) batch-1 token at slot 10: {at[10] * 1e3:.1f} ms = {at[10] / floor:.2f}x the floor (target <= 1.3)')
    print(f'(a) token at slot 900: {at[900] * 1e3:.1f} ms = {at[900] / at[10]:.2f}x slot 10 (target <= 1.5)')
    print(f'(b) {length}-token samples: 1 in {times[1]:.2f} s, 8 in {times[8]:.2f} s = '
          f'{times[8] / times[1]:.2f}x (target <= 2)', flush=True)


if __name__ == '__main__':
    main()
