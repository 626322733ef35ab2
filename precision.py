"""The number format the network computes in: the `--precision` flag of every script.

    float32   everything in float32: the original scripts' numbers.
    bfloat16  matrix products and activations in bfloat16; float32 where it matters: the
              weights as stored (and, in training, the optimizer's master weights), layer-norm
              statistics, softmax, log-probabilities and the loss.
    float16   as bfloat16 in float16 (training adds loss scaling); GPUs only.
    auto      bfloat16 where the hardware runs it natively: CPUs with AVX512_BF16 or AMX,
              GPUs of compute capability 8.0 and up; float32 elsewhere. The choice and its
              reason go to stderr in one line.

Flags are declared without TensorFlow (`add_precision_flag`, `check_precision_flag`);
`resolve_precision` runs after `cli.prepare_tensorflow`, because it asks TensorFlow which
GPUs are visible.
"""
import sys

import cli

PRECISIONS = ('auto', 'float32', 'bfloat16', 'float16')
# /proc/cpuinfo flags of x86 instructions that compute bfloat16 products natively.
CPU_BFLOAT16_FLAGS = {'avx512_bf16': 'AVX512_BF16', 'amx_bf16': 'AMX'}
# GPUs from this compute capability on (Ampere) have bfloat16 tensor cores.
GPU_BFLOAT16_CAPABILITY = (8, 0)


def add_precision_flag(parser, *, default):
    """--precision, with the same meaning in every script; `default` differs by script."""
    parser.add_argument(
        '--precision', choices=PRECISIONS, default=default,
        help='number format of the computation. float32: as the original; bfloat16: products '
             'in bfloat16, float32 for weights, normalisation, softmax and log-probabilities '
             '(faster where the hardware has bfloat16 instructions, scores differ slightly); '
             'float16: the same in float16, GPUs only; auto: bfloat16 on CPUs with '
             'AVX512_BF16 or AMX and GPUs of compute capability 8.0 or more, else float32')


def cpu_flags(cpuinfo='/proc/cpuinfo'):
    """The CPU's feature flags (lower case), or an empty set where /proc/cpuinfo is absent."""
    try:
        with open(cpuinfo, encoding='ascii', errors='replace') as f:
            for line in f:
                key, _, value = line.partition(':')
                if key.strip() in ('flags', 'Features'):
                    return set(value.split())
    except OSError:
        pass
    return set()


def gpu_capabilities():
    """Compute capability (major, minor) of each visible GPU; (0, 0) where unknown."""
    import tensorflow as tf
    capabilities = []
    for device in tf.config.list_physical_devices('GPU'):
        details = tf.config.experimental.get_device_details(device)
        capabilities.append(tuple(details.get('compute_capability') or (0, 0)))
    return capabilities


def automatic_precision(*, gpus, flags):
    """(precision, reason) that `auto` picks for these GPUs' capabilities (the model runs on
    them when there are any) or, without GPUs, this CPU's flags."""
    if gpus:
        oldest = min(gpus)
        if oldest >= GPU_BFLOAT16_CAPABILITY:
            return 'bfloat16', f'GPU compute capability {oldest[0]}.{oldest[1]} has bfloat16 tensor cores'
        return 'float32', (f'GPU compute capability {oldest[0]}.{oldest[1]} has no bfloat16 '
                           'tensor cores (8.0 and up have)')
    found = [name for flag, name in CPU_BFLOAT16_FLAGS.items() if flag in flags]
    if found:
        return 'bfloat16', f'this CPU has {" and ".join(found)} instructions'
    return 'float32', 'this CPU has no bfloat16 instructions (AVX512_BF16 or AMX)'


def resolve_precision(requested, *, gpus=None, flags=None, stream=None):
    """The precision to compute in for `--precision requested`: auto is decided by the
    hardware and announced on `stream` (stderr) in one line; float16 without a GPU is a
    UsageError. `gpus`, `flags`: the hardware, detected when None."""
    if gpus is None and requested in ('auto', 'float16'):
        gpus = gpu_capabilities()
    if requested == 'float16' and not gpus:
        raise cli.UsageError('--precision float16 needs a GPU (CPUs compute float16 slowly); '
                             'use bfloat16 or float32')
    if requested != 'auto':
        return requested
    chosen, reason = automatic_precision(gpus=gpus, flags=cpu_flags() if flags is None else flags)
    print(f'precision: {chosen} (--precision auto: {reason})', file=stream or sys.stderr)
    return chosen
