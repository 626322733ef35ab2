"""Benchmark fine-tuning on a gpt2ja-small-sized model (random weights) at batch 1 x 1024.

    python bench/bench_finetune.py [--steps 3] [--configs default,no-xla,recompute,...]

For each configuration, a fresh child process builds the trainer, runs one untimed step
(tracing, XLA compilation), then `--steps` timed steps, and reports seconds a step and its
peak resident memory (ru_maxrss, which covers the whole process). Another child measures
the float32 matrix-multiply rate of a large TensorFlow matmul, so model FLOPs/s (6 x
parameters x tokens a step) can be given as a fraction of it, measured in the same run.
Results print as a Markdown table; scratch files go to bench/out/ (git-ignored).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / 'bench' / 'out'
CONFIGS = {  # the Trainer's arguments (and K); each differs from the default in one way
    'default': {},
    'recompute': {'recompute': True},
    'recompute-plain': {'recompute': True, 'process_settings': False},  # without finetune.memory
    'accumulate-2': {'accumulate': 2},
    'xla': {'xla': True},
    'bfloat16': {'precision': 'bfloat16'},
}


def child_matmul(sizes=(2048, 4096), repeats=8):
    """The best float32 rate of square matmuls of a few sizes (the machine's practical peak)."""
    import cli
    tf = cli.prepare_tensorflow()
    matmul = tf.function(lambda a, b: tf.matmul(a, b))
    best = 0.0
    for size in sizes:
        a, b = tf.random.normal([size, size]), tf.random.normal([size, size])
        matmul(a, b).numpy()
        began = time.perf_counter()
        for _ in range(repeats):
            result = matmul(a, b)
        result.numpy()
        best = max(best, 2 * size ** 3 * repeats / (time.perf_counter() - began))
    return {'flops_per_s': best}


def child_train(config, steps, model_dir):
    import resource
    import numpy as np
    import cli
    from finetune.memory import prepare_process
    if config.get('process_settings', True):  # what run_finetune.py does before importing TF
        prepare_process(recompute=config.get('recompute', False))
    cli.prepare_tensorflow()
    import model
    from finetune.optimizers import make_optimizer
    from finetune.run_dir import initial_values
    from finetune.trainer import Trainer
    from model_dir import load_model_dir
    base = load_model_dir(model_dir, need_vocab=False)
    optimizer = make_optimizer('adam')
    trainer = Trainer(hparams=base.hparams, optimizer=optimizer,
                      initial=initial_values(base, None, optimizer),
                      precision=config.get('precision', 'float32'),
                      recompute=config.get('recompute', False), xla=config.get('xla', False))
    k = config.get('accumulate', 1)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, base.hparams.n_vocab, (k, 1, base.hparams.n_ctx)).astype(np.int32)
    weights = np.ones((k, 1, base.hparams.n_ctx - 1), np.float32)
    began = time.perf_counter()
    trainer.train_step(tokens, weights, learning_rate=1e-5)
    first = time.perf_counter() - began
    began = time.perf_counter()
    for _ in range(steps):
        loss, applied = trainer.train_step(tokens, weights, learning_rate=1e-5)
    seconds = (time.perf_counter() - began) / steps
    tokens_per_step = k * base.hparams.n_ctx
    return {'seconds_per_step': seconds, 'first_step_s': first, 'tokens_per_step': tokens_per_step,
            'model_flops_per_step': 6 * model.count_parameters(base.hparams) * tokens_per_step,
            'peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            'loss': loss, 'applied': applied}


def make_model_dir():
    path = OUT / 'gpt2ja-small-random'
    if not (path / 'hparams.json').exists():
        subprocess.run([sys.executable, '-c', (
            'import cli; cli.prepare_tensorflow(); import model, model_dir; '
            'h = model.RELEASED["gpt2ja-small"]; '
            f'model_dir.save_model_dir({str(path)!r}, model.init_parameters(h), h)')],
            cwd=REPO, check=True)
    return path


def in_child(*args):
    result = subprocess.run([sys.executable, __file__, '--child', json.dumps(args)], cwd=REPO,
                            capture_output=True, text=True)
    if result.returncode:
        return {'error': result.stderr.strip().splitlines()[-1:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def cpu_model():
    try:
        for line in subprocess.run(['lscpu'], capture_output=True, text=True).stdout.splitlines():
            if line.startswith('Model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--steps', type=int, default=3, help='timed steps per configuration')
    parser.add_argument('--configs', default=','.join(CONFIGS), help='comma-separated configurations')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.child:
        kind, *rest = json.loads(args.child)
        print(json.dumps(child_matmul() if kind == 'matmul' else child_train(*rest)))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    model_dir = make_model_dir()
    print(f'machine: {cpu_model()}, {os.cpu_count()} CPUs; gpt2ja-small random weights, '
          f'batch 1 x 1024 tokens, Adam, {args.steps} timed steps\n')
    matmul = in_child('matmul')
    print(f'float32 matmul (best of 2048^3, 4096^3): {matmul["flops_per_s"] / 1e9:.1f} GFLOP/s\n')
    print('| configuration | s/step | tokens/s | model GFLOP/s | % of matmul | peak RSS GB | first step s | loss |')
    print('|---|---|---|---|---|---|---|---|')
    for name in args.configs.split(','):
        r = in_child('train', CONFIGS[name], args.steps, str(model_dir))
        if 'error' in r:
            print(f'| {name} | error: {r["error"]} |||||')
            continue
        rate = r['model_flops_per_step'] / r['seconds_per_step']
        print(f'| {name} | {r["seconds_per_step"]:.2f} | {r["tokens_per_step"] / r["seconds_per_step"]:.0f} | '
              f'{rate / 1e9:.1f} | {100 * rate / matmul["flops_per_s"]:.0f}% | {r["peak_rss_gb"]:.2f} | '
              f'{r["first_step_s"]:.0f} | {r["loss"]:.2f}{"" if r["applied"] else " (skipped)"} |', flush=True)


if __name__ == '__main__':
    main()
