"""Benchmark fine-tuning on a gpt2ja-small-sized model (random weights) at batch 1 x 1024.

    python bench/bench_finetune.py [--steps 3] [--configs original,auto,float32,...] [--profile]
        [--profile_configs float32,bfloat16]

For each configuration, a fresh child process builds the trainer, runs one untimed step
(tracing, XLA compilation), then `--steps` timed steps, and reports seconds a step and its
peak resident memory (ru_maxrss, which covers the whole process). `original` is the original
scripts' training step, emulated: a TF1 graph and session, the loss differentiated by
tf.gradients, tf.compat.v1.train.AdamOptimizer, float32.
Another child measures the matmul ceiling in the same run: `tf.matmul` of the model's own
shape, [1024, 768] x [768, 3072], in float32 and bfloat16. Each configuration's matrix-product
FLOPs a step (6 x parameters x tokens, plus the attention products, 12 x layers x n_ctx^2 x
n_embd) per second is given as a share of the ceiling of its own precision.
--profile adds, for each of --profile_configs, the share of a step's op time (the TF
profiler's per-op timings, in a child that runs one op at a time so that each op's time is
its own) that is not matrix products, and its largest parts.
`original` builds the original's graph, every layer in line (`model.forward(block=model.text_block)`).
A configuration written NAME@DIR runs the modules of the checkout at DIR (e.g.
`--configs float32@/work/main,float32,float32@/work/main,float32` alternates another
version's step with this one's in one run, as timing comparisons need).
Results print as Markdown tables; scratch files go to bench/out/ (git-ignored).
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
CONFIGS = {  # the Trainer's arguments (and K); each differs from float32 in one way
    'original': {'original': True},
    # The original's step with oneDNN's kernels, which TensorFlow leaves off on CPUs without
    # AVX512's neural-network features (fine-tuning turns them on: finetune/memory.py).
    'original-onednn': {'original': True, 'environment': {'TF_ENABLE_ONEDNN_OPTS': '1'}},
    'auto': {'precision': 'auto'},
    'float32': {},
    'bfloat16': {'precision': 'bfloat16'},
    'recompute': {'recompute': True},
    'recompute-plain': {'recompute': True, 'process_settings': False},  # without finetune.memory
    'accumulate-2': {'accumulate': 2},
    'xla': {'xla': True},
}
DEFAULT_CONFIGS = 'original,auto,float32,bfloat16'
MATMUL_SHAPE = (1024, 768, 3072)  # [rows, n_embd] x [n_embd, 4 n_embd] of gpt2ja-small
MATMUL_OPS = {'MatMul', 'BatchMatMulV2', 'BatchMatMulV3', '_MklMatMul', '_MklBatchMatMulV2',
              '_MklNativeMatMul', '_MklNativeBatchMatMulV2', '_MklFusedMatMul', '_MklNativeFusedMatMul'}


def child_matmul(repeats=20):
    """The float32 and bfloat16 rates of the model-shaped matmul (best of three rounds)."""
    import cli
    from finetune.memory import prepare_process
    prepare_process(recompute=False)  # the kernels a default training step runs
    tf = cli.prepare_tensorflow()
    m, k, n = MATMUL_SHAPE
    matmul = tf.function(lambda a, b: tf.matmul(a, b))
    rates = {}
    for dtype in ('float32', 'bfloat16'):
        a = tf.cast(tf.random.normal([m, k]), dtype)
        b = tf.cast(tf.random.normal([k, n]), dtype)
        matmul(a, b).numpy()
        best = 0.0
        for _ in range(3):
            began = time.perf_counter()
            for _ in range(repeats):
                result = matmul(a, b)
            result.numpy()
            best = max(best, 2 * m * k * n * repeats / (time.perf_counter() - began))
        rates[dtype] = best
    return rates


def step_flops(hparams, batch):
    """Matrix-product FLOPs of one training step over `batch` sequences of n_ctx tokens:
    forward and backward (3 x 2 x parameters a token; the unembedding shares wte), plus
    attention's two products a layer, computed over the whole [n_ctx, n_ctx] square."""
    import model
    tokens = batch * hparams.n_ctx
    attention = 3 * 2 * 2 * hparams.n_layer * hparams.n_ctx ** 2 * hparams.n_embd * batch
    return 6 * model.count_parameters(hparams) * tokens + attention


def original_step(hparams, steps, tokens):
    """The original run_finetune.py's step: TF1 graph, tf.gradients, v1 Adam (float32)."""
    import tensorflow as tf
    import model
    v1 = tf.compat.v1
    v1.disable_eager_execution()
    with v1.Session(graph=tf.Graph()) as session:
        context = v1.placeholder(tf.int32, [None, None])
        params = model.tf1_parameters(hparams)
        logits = model.forward(params, context, hparams=hparams, block=model.text_block)['logits']
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=context[:, 1:], logits=logits[:, :-1]))
        variables = list(params.values())
        optimizer = v1.train.AdamOptimizer(learning_rate=1e-5, beta1=0.9, beta2=0.98, epsilon=1e-7)
        train = optimizer.apply_gradients(list(zip(tf.gradients(loss, variables), variables)))
        session.run(v1.global_variables_initializer())
        feed = {context: tokens}
        began = time.perf_counter()
        session.run((train, loss), feed)
        first = time.perf_counter() - began
        began = time.perf_counter()
        for _ in range(steps):
            _, value = session.run((train, loss), feed)
        return (time.perf_counter() - began) / steps, first, float(value), True


def make_trainer(config, model_dir):
    import precision as precisions
    from finetune.optimizers import make_optimizer
    from finetune.run_dir import initial_values
    from finetune.trainer import Trainer
    from model_dir import load_model_dir
    base = load_model_dir(model_dir, need_vocab=False)
    optimizer = make_optimizer('adam')
    chosen = config.get('precision', 'float32')
    if chosen == 'auto':
        chosen = precisions.resolve_precision('auto', stream=sys.stdout)
    trainer = Trainer(hparams=base.hparams, optimizer=optimizer,
                      initial=initial_values(base, None, optimizer), precision=chosen,
                      recompute=config.get('recompute', False), xla=config.get('xla', False))
    return trainer, base.hparams, chosen


def child_train(config, steps, model_dir):
    import resource
    import numpy as np
    import cli
    from finetune.memory import prepare_process
    os.environ.update(config.get('environment', {}))
    if config.get('process_settings', not config.get('original')):  # as run_finetune.py does
        prepare_process(recompute=config.get('recompute', False))
    cli.prepare_tensorflow()
    from model_dir import load_model_dir
    hparams = load_model_dir(model_dir, need_vocab=False).hparams
    k = config.get('accumulate', 1)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, hparams.n_vocab, (k, 1, hparams.n_ctx)).astype(np.int32)
    weights = np.ones((k, 1, hparams.n_ctx - 1), np.float32)
    if config.get('original'):
        seconds, first, loss, applied = original_step(hparams, steps, tokens[0])
        chosen = 'float32'
    else:
        trainer, hparams, chosen = make_trainer(config, model_dir)
        began = time.perf_counter()
        trainer.train_step(tokens, weights, learning_rate=1e-5)
        first = time.perf_counter() - began
        began = time.perf_counter()
        for _ in range(steps):
            loss, applied = trainer.train_step(tokens, weights, learning_rate=1e-5)
        seconds = (time.perf_counter() - began) / steps
    return {'seconds_per_step': seconds, 'first_step_s': first, 'tokens_per_step': k * hparams.n_ctx,
            'flops_per_step': step_flops(hparams, k), 'precision': chosen,
            'peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
            'loss': loss, 'applied': applied}


def child_profile(config, steps, model_dir):
    """Op time of `steps` training steps by op type (TF profiler), matrix products apart.
    The executor runs one op at a time here (each still on all cores): with ops side by side,
    as a step normally runs them, an op's time includes the time it waits for cores another
    op holds, and a small op beside a matrix product looks as slow as the product.
    Counts the kernels TensorFlow's executor runs; code that XLA compiled (the training
    path's GELU) runs on XLA's own threads and is not counted."""
    import collections
    import glob
    import tempfile
    import numpy as np
    import cli
    from finetune.memory import prepare_process
    prepare_process(recompute=False)
    tf = cli.prepare_tensorflow()
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    trainer, hparams, _ = make_trainer(config, model_dir)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, hparams.n_vocab, (1, 1, hparams.n_ctx)).astype(np.int32)
    weights = np.ones((1, 1, hparams.n_ctx - 1), np.float32)
    trainer.train_step(tokens, weights, learning_rate=1e-5)
    OUT.mkdir(parents=True, exist_ok=True)
    log_dir = tempfile.mkdtemp(dir=OUT)
    tf.profiler.experimental.start(log_dir)
    began = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(tokens, weights, learning_rate=1e-5)
    wall = (time.perf_counter() - began) / steps
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    with open(glob.glob(f'{log_dir}/**/*.xplane.pb', recursive=True)[0], 'rb') as f:
        space.ParseFromString(f.read())
    by_type, by_name = collections.Counter(), collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith('tf_Compute'):  # the threads that run kernels
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ':' in name and '::' not in name:  # "op_name:OpType"; not executor frames
                    by_type[name.rsplit(':', 1)[1]] += event.duration_ps / 1e12
                    by_name[name] += event.duration_ps / 1e12
    total = sum(by_type.values())
    other = {op: seconds for op, seconds in by_type.items() if op not in MATMUL_OPS}
    with open(f'{log_dir}/ops.json', 'w') as f:  # every op's seconds, for a closer look
        json.dump(by_name.most_common(), f, indent=0)
    return {'op_seconds': total, 'wall_seconds_per_step': wall, 'non_matmul_share': sum(other.values()) / total,
            'largest': [(op, seconds / total) for op, seconds in collections.Counter(other).most_common(8)]}


def make_model_dir():
    path = OUT / 'gpt2ja-small-random'
    if not (path / 'hparams.json').exists():
        subprocess.run([sys.executable, '-c', (
            'import cli; cli.prepare_tensorflow(); import model, model_dir; '
            'h = model.RELEASED["gpt2ja-small"]; '
            f'model_dir.save_model_dir({str(path)!r}, model.init_parameters(h), h)')],
            cwd=REPO, check=True)
    return path


def in_child(*args, code=REPO):
    """Run a child (`child_*`) with the modules of the checkout at `code`."""
    result = subprocess.run([sys.executable, __file__, '--child', json.dumps(args), '--code', str(code)],
                            cwd=code, capture_output=True, text=True)
    if result.returncode:
        return {'error': result.stderr.strip().splitlines()[-1:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def config_and_code(name):
    """'float32' or 'float32@DIR' -> (the configuration, the checkout whose code runs it)."""
    name, _, code = name.partition('@')
    return CONFIGS[name], Path(code).resolve() if code else REPO


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
    parser.add_argument('--configs', default=DEFAULT_CONFIGS,
                        help=f'comma-separated, of: {", ".join(CONFIGS)}')
    parser.add_argument('--profile', action='store_true',
                        help='also measure the share of a step that is not matrix products')
    parser.add_argument('--profile_configs', default='float32,bfloat16',
                        help='the configurations --profile measures')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    parser.add_argument('--code', default=str(REPO), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, args.code)
    if args.child:
        kind, *rest = json.loads(args.child)
        children = {'matmul': child_matmul, 'train': child_train, 'profile': child_profile}
        print(json.dumps(children[kind](*rest)))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    model_dir = make_model_dir()
    print(f'machine: {cpu_model()}, {os.cpu_count()} CPUs; gpt2ja-small random weights, '
          f'batch 1 x 1024 tokens, Adam, {args.steps} timed steps\n')
    ceiling = in_child('matmul')
    m, k, n = MATMUL_SHAPE
    print(f'matmul [{m}, {k}] x [{k}, {n}]: float32 {ceiling["float32"] / 1e9:.0f} GFLOP/s, '
          f'bfloat16 {ceiling["bfloat16"] / 1e9:.0f} GFLOP/s\n')
    print('| configuration | precision | s/step | x original | tokens/s | GFLOP/s | % of its matmul rate '
          '| peak RSS GB | first step s | loss |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    original = None
    for name in args.configs.split(','):
        config, code = config_and_code(name)
        r = in_child('train', config, args.steps, str(model_dir), code=code)
        if 'error' in r:
            print(f'| {name} | error: {r["error"]} |||||||||', flush=True)
            continue
        seconds = r['seconds_per_step']
        original = seconds if name.partition('@')[0] == 'original' else original
        rate = r['flops_per_step'] / seconds
        print(f'| {name} | {r["precision"]} | {seconds:.2f} | '
              f'{f"{seconds / original:.2f}" if original else "-"} | {r["tokens_per_step"] / seconds:.0f} | '
              f'{rate / 1e9:.0f} | {100 * rate / ceiling[r["precision"]]:.0f}% | {r["peak_rss_gb"]:.2f} | '
              f'{r["first_step_s"]:.0f} | {r["loss"]:.2f}{"" if r["applied"] else " (skipped)"} |', flush=True)
    if args.profile:
        print('\nOne op at a time (inter-op threads 1), profiled:\n')
        print('| configuration | s/step | op time, s/step | not matrix products | largest parts |')
        print('|---|---|---|---|---|')
        for name in args.profile_configs.split(','):
            config, code = config_and_code(name)
            r = in_child('profile', config, args.steps, str(model_dir), code=code)
            if 'error' in r:
                print(f'| {name} | error: {r["error"]} ||||', flush=True)
                continue
            largest = ', '.join(f'{op} {100 * share:.1f}%' for op, share in r['largest'])
            print(f'| {name} | {r["wall_seconds_per_step"]:.2f} | {r["op_seconds"] / args.steps:.2f} | '
                  f'{100 * r["non_matmul_share"]:.0f}% | {largest} |', flush=True)


if __name__ == '__main__':
    main()
