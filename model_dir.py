"""A model directory: checkpoint, hyperparameters and vocabulary, loaded and saved in one place.

Every script loads its model through `load_model_dir(path, vocab_dir=...)`, which checks
the directory fully before any work starts and reports each problem as one line
(`ModelDirError`, a usage error). A model directory holds:
  - TF1 Saver files `NAME.index` + `NAME.data-*-of-*` and usually a `checkpoint` file;
  - usually `hparams.json` ({"n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"});
  - usually the vocabulary (`ja-bpe.txt`, `emoji.json`), else found as encoder/vocab.py says.
A released model's name or a model archive stands for its directory in the cache (fetch.py).

`ModelDir.start_loading` gives the network's variables at once and fills them from the
checkpoint on a background thread (`Filling`), so that a script traces its model meanwhile.

`save_checkpoint` writes the same layout (used by fine-tuning and by the tests' tiny models),
crash-safely: a checkpoint appears complete or not at all.
"""
import atexit
import dataclasses
import json
import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import tensorflow as tf

from cli import UsageError
from encoder.vocab import EMOJI_FILE, VOCAB_FILE, find_vocab_dir, read_vocab
from fetch import RELEASED_MODELS, locate_model
from model import SCOPE, HParams, parameter_shapes
from files import atomic_output, write_text_atomic

HPARAMS_FILE = 'hparams.json'
CHECKPOINT_STATE_FILE = 'checkpoint'
DEFAULT_HEAD_SIZE = 64  # every released GPT-2 uses 64-wide heads
# Names of unfinished saves start with this; checkpoint searches skip names starting with '.'.
TEMP_PREFIX = '.tmp-'


class ModelDirError(UsageError):
    """A model directory that cannot be loaded; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class ModelDir:
    path: Path
    checkpoint: str  # the checkpoint prefix: `checkpoint + '.index'` exists
    hparams: HParams
    vocab_dir: Path = None

    def load_parameters(self):
        """Network parameters as numpy arrays, name -> array; optimizer state is ignored."""
        return read_parameters(self.checkpoint, self.hparams)

    def parameter_loaders(self):
        """Name -> zero-argument function reading that parameter as a float32 tensor: for
        loading the network one tensor at a time, so no second copy of the checkpoint sits
        beside the one being built."""
        return parameter_loaders(self.checkpoint, self.hparams)

    def start_loading(self, *, dtype=tf.float32, transposed=None):
        """The network's parameters as variables of `dtype`, created at once (shapes from the
        checkpoint's index) and filled from the checkpoint by a background thread: the caller
        traces the functions that read them meanwhile, then calls `wait()` before running
        them. transposed: name -> new name of parameters held transposed under the new name.
        Returns a `Filling` whose `variables` are name -> variable."""
        dtype, transposed = tf.as_dtype(dtype), transposed or {}
        loaders = self.parameter_loaders()
        fills = {}
        for name, shape in parameter_shapes(self.hparams).items():
            load = lambda load=loaders[name]: tf.cast(load(), dtype)
            if name in transposed:
                name, shape = transposed[name], shape[::-1]
                load = lambda load=load: tf.transpose(load())
            fills[name] = (empty_variable(shape, dtype), load)
        return Filling(fills)

    def load_encoder(self):
        from encoder import get_encoder
        return get_encoder(self.vocab_dir)


def load_model_dir(path, *, vocab_dir=None, need_vocab=True, n_head=None):
    """Find and check everything needed to run the model in `path`.

    path: a model directory, or what `fetch.locate_model` resolves to one: a released
    model's name (fetched into the cache on first use) or a model archive.
    vocab_dir: an explicit vocabulary directory (`--vocab`); else searched for.
    n_head: used only when there is no hparams.json (it cannot be read off the shapes).
    """
    path = locate_model(path, verify=check_loads)
    if not path.exists():
        raise ModelDirError(f'model directory {path} does not exist; pass --model with a model '
                            f'directory, a released model ({", ".join(RELEASED_MODELS)}: '
                            f'fetched on first use) or a model archive (.tar.bz2)')
    if not path.is_dir():
        raise ModelDirError(f'{path} is not a directory; --model takes a model directory, a '
                            f'released model name or a model archive')
    if not os.access(path, os.R_OK | os.X_OK):
        raise ModelDirError(f'cannot read the model directory {path}: permission denied; '
                            f'ask its owner for read access (chmod a+rx) or copy it')
    prefix = find_checkpoint(path)
    shapes = checkpoint_shapes(prefix)
    hparams = resolve_hparams(path, shapes, n_head=n_head)
    check_variables(prefix, shapes, hparams)
    found_vocab = None
    if need_vocab:
        found_vocab = find_vocab_dir(vocab_dir, model_dir=path)
        vocab_size = len(read_vocab(found_vocab))
        if vocab_size != hparams.n_vocab:
            raise ModelDirError(
                f'the vocabulary in {found_vocab} has {vocab_size} entries but the checkpoint '
                f'{prefix} expects {hparams.n_vocab} (rows of {SCOPE}/wte); use the vocabulary '
                f'the model was trained with')
    return ModelDir(path=path, checkpoint=prefix, hparams=hparams, vocab_dir=found_vocab)


def check_loads(directory):
    """Raise ModelDirError unless `directory` loads, weights included (how fetched models are
    checked before they are moved into place)."""
    load_model_dir(directory).load_parameters()


def find_checkpoint(directory):
    """The checkpoint prefix to load from `directory`.

    The `checkpoint` file names it, but often with an absolute path from the machine that
    trained the model; then (or with no such file) the same file name in this directory is
    tried, and last the newest `*.index` here.
    """
    directory = Path(directory)
    named = _checkpoint_state_path(directory)
    if named is not None:
        for candidate in (Path(named), directory / named, directory / Path(named).name):
            if Path(f'{candidate}.index').is_file():
                return str(candidate)
    indexes = sorted((index for index in directory.glob('*.index') if not index.name.startswith('.')),
                     key=_index_sort_key)
    if not indexes:
        raise ModelDirError(f'no checkpoint in {directory}: expected NAME.index and '
                            f'NAME.data-00000-of-00001 files (TF1 Saver format)')
    return str(indexes[-1])[:-len('.index')]


def _checkpoint_state_path(directory):
    state = directory / CHECKPOINT_STATE_FILE
    if not state.is_file():
        return None
    try:
        text = state.read_text(encoding='utf-8', errors='replace')
    except OSError:
        return None
    match = re.search(r'^model_checkpoint_path:\s*"(.*)"\s*$', text, re.MULTILINE)
    return match.group(1) if match else None


def _index_sort_key(index_path):
    # Newest by step number when names carry one (model-1200 > model-900), then by time.
    step = re.search(r'-(\d+)\.index$', index_path.name)
    return (int(step.group(1)) if step else -1, index_path.stat().st_mtime)


def checkpoint_shapes(prefix):
    """Variable name -> shape of every tensor in the checkpoint."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        return {name: tuple(shape) for name, shape in reader.get_variable_to_shape_map().items()}
    except (tf.errors.OpError, ValueError, IndexError, OSError) as exc:
        raise unreadable(prefix, exc) from None


def unreadable(prefix, exc):
    """The error for a checkpoint whose files cannot be read back."""
    return ModelDirError(f'checkpoint {prefix} is unreadable (truncated or corrupt?): {first_line(exc)}')


def first_line(exc):
    """The first line of an error's message (TensorFlow's run to many), or its type's name."""
    text = getattr(exc, 'message', None) or str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def _reason(exc):
    """An OSError's or a TensorFlow I/O error's reason alone ("No space left on device"),
    without the file names and op names TensorFlow wraps around it."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    text = re.sub(r'\s*\[Op:\w+\]\s*$', '', first_line(exc))
    return text.rsplit('; ', 1)[-1].strip()


def infer_hparams(shapes, *, n_head=None):
    """Read the sizes off the checkpoint's variable shapes (n_head: given, or n_embd / 64)."""
    try:
        n_vocab, n_embd = shapes[f'{SCOPE}/wte']
        n_ctx, _ = shapes[f'{SCOPE}/wpe']
    except (KeyError, ValueError):
        raise ModelDirError(f'the checkpoint has no {SCOPE}/wte and {SCOPE}/wpe of rank 2: '
                            f'is it a GPT-2 checkpoint?') from None
    layers = {int(m.group(1)) for name in shapes if (m := re.match(rf'{SCOPE}/h(\d+)/', name))}
    if n_head is None:
        n_head = max(1, n_embd // DEFAULT_HEAD_SIZE)
    try:
        return HParams(n_vocab=n_vocab, n_ctx=n_ctx, n_embd=n_embd, n_head=n_head,
                       n_layer=len(layers))
    except ValueError as exc:
        raise ModelDirError(f'cannot infer hparams from the checkpoint: {exc}') from None


def read_hparams_file(directory):
    """The dict in `hparams.json`, or None when the file is absent."""
    path = Path(directory) / HPARAMS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f'cannot read {path}: {exc}') from None
    if not isinstance(data, dict):
        raise ModelDirError(f'{path} must hold a JSON object')
    return data


def resolve_hparams(directory, shapes, *, n_head=None):
    """hparams.json where present (checked against the checkpoint), else inferred."""
    inferred = infer_hparams(shapes, n_head=n_head)
    written = read_hparams_file(directory)
    if written is None:
        return inferred
    fields = [f.name for f in dataclasses.fields(HParams)]
    missing = [name for name in fields if name not in written]
    if missing:
        raise ModelDirError(f'{Path(directory) / HPARAMS_FILE} lacks {", ".join(missing)}')
    try:
        hparams = HParams(**{name: written[name] for name in fields})
    except ValueError as exc:
        raise ModelDirError(f'{Path(directory) / HPARAMS_FILE}: {exc}') from None
    contradictions = [f'{name}={getattr(hparams, name)} (checkpoint: {getattr(inferred, name)})'
                      for name in ('n_vocab', 'n_ctx', 'n_embd', 'n_layer')
                      if getattr(hparams, name) != getattr(inferred, name)]
    if contradictions:
        raise ModelDirError(f'{Path(directory) / HPARAMS_FILE} contradicts the checkpoint: '
                            f'{", ".join(contradictions)}; fix or remove hparams.json')
    return hparams


def check_variables(prefix, shapes, hparams):
    """Every network variable is in the checkpoint with the shape hparams imply."""
    for name, shape in parameter_shapes(hparams).items():
        if name not in shapes:
            raise ModelDirError(f'checkpoint {prefix} lacks the variable {name}; it does not '
                                f'match hparams {hparams.to_dict()}')
        if tuple(shapes[name]) != tuple(shape):
            raise ModelDirError(f'checkpoint {prefix}: {name} has shape {list(shapes[name])}, '
                                f'expected {list(shape)} for hparams {hparams.to_dict()}')


def read_parameters(prefix, hparams):
    """Network parameters (numpy float32) from the checkpoint; other tensors are skipped."""
    try:
        reader = tf.train.load_checkpoint(prefix)
        return {name: reader.get_tensor(name).astype(np.float32, copy=False)
                for name in parameter_shapes(hparams)}
    except (tf.errors.OpError, ValueError, IndexError, OSError) as exc:
        raise unreadable(prefix, exc) from None


def parameter_loaders(prefix, hparams):
    """See ModelDir.parameter_loaders."""
    loaders = tensor_loaders(prefix, parameter_shapes(hparams))
    return {name: (lambda load=load: tf.cast(load(), tf.float32)) for name, load in loaders.items()}


def tensor_loaders(prefix, names):
    """Name -> zero-argument function reading that tensor of the checkpoint as it is stored.
    RestoreV2 reads a tensor straight into TensorFlow's memory (no numpy copy on the way)."""
    try:
        dtypes = tf.train.load_checkpoint(prefix).get_variable_to_dtype_map()
    except (tf.errors.OpError, ValueError, IndexError, OSError) as exc:
        raise unreadable(prefix, exc) from None

    def load(name):
        try:
            tensor, = tf.raw_ops.RestoreV2(prefix=prefix, tensor_names=[name], shape_and_slices=[''],
                                           dtypes=[dtypes[name]])
        except (tf.errors.OpError, ValueError) as exc:
            raise unreadable(prefix, exc) from None
        return tensor
    return {name: (lambda name=name: load(name)) for name in names}


def empty_variable(shape, dtype, *, name=None):
    """A variable of `shape` and `dtype` without a value yet (reading it fails until it is
    assigned one): a handle only, made in a fraction of the time a variable with a value
    takes, and its first assignment adopts the value's memory instead of copying it. What
    tf.saved_model's loader creates before restoring; not part of the public API."""
    try:
        from tensorflow.python.ops.resource_variable_ops import UninitializedVariable
    except ImportError:  # a TensorFlow that moved it: a variable of unfilled memory instead
        return tf.Variable(tf.raw_ops.Empty(shape=shape, dtype=dtype), trainable=False, name=name)
    return UninitializedVariable(shape=shape, dtype=dtype, trainable=False, name=name)


class Filling:
    """Variables being written by a background thread while the caller goes on (tracing the
    functions that read them): reading a checkpoint and copying tensors run in TensorFlow's
    C++ code, which releases Python's lock, so on two cores the two truly overlap.

    fills: name -> (variable, zero-argument function giving its value), filled in order,
    one value alive at a time. `variables`: name -> variable. `wait()` returns once all are
    filled, or raises what the filling raised (a ModelDirError for an unreadable checkpoint).
    The thread is a daemon that stops between tensors when the process exits early (Ctrl-C,
    an error elsewhere), so it never holds the exit up."""

    def __init__(self, fills):
        self.variables = {name: variable for name, (variable, _) in fills.items()}
        self._values = [(variable, value) for variable, value in fills.values()]
        self._error = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._fill, name='parameter-filling', daemon=True)
        atexit.register(self._stop)
        self._thread.start()

    def _fill(self):
        try:
            for variable, value in self._values:
                if self._stopping.is_set():
                    return
                variable.assign(value(), read_value=False)
        except BaseException as exc:  # noqa: B036 -- raised in the caller's thread by wait()
            self._error = exc
        finally:
            self._values = None

    def _stop(self):
        self._stopping.set()
        self._thread.join()

    def wait(self):
        self._thread.join()
        atexit.unregister(self._stop)
        if self._error is not None:
            raise self._error


def trace_then_wait(function, parameters_ready):
    """Trace `function` (a tf.function with an input signature) while the parameters it reads
    may still be being filled, then wait for them: `parameters_ready` is `Filling.wait`, or
    None once it has been called. Returns None, for the caller to keep as its
    `parameters_ready`: the wait is owed once, before the first run."""
    if parameters_ready is not None:
        function.get_concrete_function()
        parameters_ready()


def read_tensors(prefix, names):
    """Any named tensors of a checkpoint (optimizer slots, step counters) as numpy arrays."""
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in names}


class CheckpointWriteError(UsageError):
    """A checkpoint could not be written (full disk, no permission); nothing was replaced."""


class NonFiniteTensorError(ValueError):
    """A tensor to be saved holds NaN or infinity; such weights are never written."""


def check_finite(tensors):
    """Raise NonFiniteTensorError naming the first floating-point tensor (in name order) that
    holds a NaN or an infinity; the test runs where the tensor lives (no copy to the host)."""
    for name in sorted(tensors):
        value = tf.convert_to_tensor(tensors[name])
        if value.dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(value))):
            raise NonFiniteTensorError(f'{name} holds NaN or infinite values')


def save_checkpoint(directory, tensors, *, step, name='model'):
    """Write `tensors` (name -> array or variable) as `directory/NAME-STEP` in TF1 Saver format
    and point the `checkpoint` file at it (relative path). Returns the prefix.

    Tensors with NaN or infinite values are refused (NonFiniteTensorError) before anything is
    written. Crash-safe: the files are written in a temporary folder `.tmp-NAME-STEP-PID/`
    (so no temporary file looks like a checkpoint to `find_checkpoint`), renamed into place
    data first, index last, and the `checkpoint` file is replaced last, so a kill at any moment
    leaves either the old or the new checkpoint loadable, never a half-written one. A failed
    write (full disk) removes the temporary folder and raises CheckpointWriteError.
    """
    check_finite(tensors)
    directory = Path(directory)
    final_prefix = directory / f'{name}-{step}'
    temp_dir = directory / f'{TEMP_PREFIX}{name}-{step}-{os.getpid()}'
    try:
        directory.mkdir(parents=True, exist_ok=True)
        temp_dir.mkdir()
        temp_prefix = temp_dir / final_prefix.name
        names = sorted(tensors)
        values = [tf.convert_to_tensor(tensors[n]) for n in names]
        tf.raw_ops.SaveV2(prefix=str(temp_prefix), tensor_names=names,
                          shape_and_slices=[''] * len(names), tensors=values)
        # Data first, index last: the index is what readers look for.
        for temp_file in sorted(temp_dir.glob(f'{final_prefix.name}.data-*')):
            os.replace(temp_file, directory / temp_file.name)
        os.replace(f'{temp_prefix}.index', f'{final_prefix}.index')
        write_checkpoint_state(directory, final_prefix.name)
    except (OSError, tf.errors.OpError) as exc:
        raise CheckpointWriteError(f'cannot save checkpoint {final_prefix}: {_reason(exc)}; the '
                                   f'checkpoints saved before are intact') from None
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    return str(final_prefix)


def write_checkpoint_state(directory, prefix_name, *, all_names=None):
    """Write the `checkpoint` file naming `prefix_name` (relative), atomically."""
    all_names = list(all_names or [prefix_name])
    text = f'model_checkpoint_path: "{prefix_name}"\n' + ''.join(
        f'all_model_checkpoint_paths: "{n}"\n' for n in all_names)
    write_text_atomic(Path(directory) / CHECKPOINT_STATE_FILE, text)


def write_hparams(directory, hparams):
    write_text_atomic(Path(directory) / HPARAMS_FILE, json.dumps(hparams.to_dict(), indent=2) + '\n')


def copy_vocab(vocab_dir, directory):
    """Put the vocabulary beside a checkpoint so the directory is self-contained."""
    for file_name in (VOCAB_FILE, EMOJI_FILE):
        target = Path(directory) / file_name
        if not target.exists():
            # Through a temporary: a copy cut short (full disk) must not pass for the vocabulary.
            with open(Path(vocab_dir) / file_name, 'rb') as source, atomic_output(target) as copy:
                shutil.copyfileobj(source, copy)


def save_model_dir(directory, params, hparams, *, step=0, vocab_dir=None, extra_tensors=None):
    """A complete model directory: checkpoint (network + extra tensors), hparams.json and,
    when `vocab_dir` is given, the vocabulary. Returns the checkpoint prefix."""
    tensors = dict(params)
    tensors.update(extra_tensors or {})
    Path(directory).mkdir(parents=True, exist_ok=True)
    write_hparams(directory, hparams)
    if vocab_dir is not None:
        copy_vocab(vocab_dir, directory)
    return save_checkpoint(directory, tensors, step=step)
