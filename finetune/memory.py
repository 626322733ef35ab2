"""Process-level memory settings for fine-tuning, applied before TensorFlow is imported.

Measured on gpt2ja-small, batch 1 x 1024, Adam (report/finetune.md, "What was tried for
memory"): what a training step allocates beyond its tensors is mostly the C heap keeping
freed activations and TensorFlow's oneDNN kernels' own caches and scratch buffers.

- glibc malloc (`mallopt`): every allocation of 128 KiB or more is its own mmap, given back
  to the system when freed (glibc otherwise raises that threshold to 32 MiB as large blocks
  are freed, and then keeps freed activations in a fragmented heap), and at most 2 malloc
  arenas (glibc makes up to 8 per core, one per thread that allocates). Same values,
  set from code so that `python run_finetune.py` gets them without environment variables.
- `TF_ENABLE_ONEDNN_OPTS=0` with `--recompute` (it is the mode that trades speed for
  memory): TensorFlow's plain Eigen kernels instead of oneDNN's; `TF_ENABLE_ONEDNN_OPTS=1`
  otherwise. TensorFlow's own default turns oneDNN on only on CPUs with AVX512 features for
  neural networks (VNNI, BF16, AMX); on others (AVX2 only) it falls back to Eigen, whose
  batched matrix products (attention's) run at a third to a half of oneDNN's rate.
Neither changes what is computed beyond floating-point summation order of the kernels.
"""
import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 128 * 1024
ARENA_MAX = 2


def tune_malloc():
    """Set glibc's mmap threshold and arena count; True if they were set (False where the C
    library is not glibc, e.g. macOS or musl, which have no such settings)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_ARENA_MAX, ARENA_MAX))


def prepare_process(*, recompute):
    """Call before TensorFlow is imported (later, the oneDNN setting has no effect). An
    explicit TF_ENABLE_ONEDNN_OPTS in the environment is left as it is."""
    tune_malloc()
    os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0' if recompute else '1')
