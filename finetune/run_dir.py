"""The run directory `checkpoint/RUN_NAME/`: a model directory that grows checkpoints.

It holds what every script needs to load it (TF1-layout `model-STEP.*` files, a `checkpoint`
file with relative paths, `hparams.json`, the vocabulary) plus the original's `counter`
(the last saved step), TensorBoard event files, and `finetune.json`, which records the base
model and optimizer so that a later run with the same name resumes the same training.

One run at a time: a run holds an exclusive lock on `.lock` in the directory (which records
its process id) from before it reads anything there until it ends, so a second run with the
same name refuses to start instead of deleting the first one's unfinished saves.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path


import model
from cli import UsageError
from model_dir import (TEMP_PREFIX, CheckpointWriteError, ModelDirError, checkpoint_shapes, copy_vocab, first_line,
                       parameter_loaders, resolve_hparams, save_checkpoint, tensor_loaders,
                       write_checkpoint_state, write_hparams)
from files import write_text_atomic

RUN_FILE = 'finetune.json'
COUNTER_FILE = 'counter'
LOCK_FILE = '.lock'
CHECKPOINT_NAME = 'model'
STEP_VARIABLE = 'global_step'  # TF1's name for the step counter in a checkpoint


def checkpoint_fingerprint(prefix):
    """A digest of a checkpoint's .index file, which lists every tensor with its checksum:
    the same weights give the same fingerprint wherever the files were copied."""
    return hashlib.sha256(Path(f'{prefix}.index').read_bytes()).hexdigest()[:16]


def read_run_record(run_dir):
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError) as exc:
        raise UsageError(f'cannot read {path}: {exc}; remove the run directory or pick another '
                         f'--run_name') from None


def check_run_matches(run_dir, record, base, optimizer_name):
    """A run directory made from another base model or optimizer is not silently mixed in."""
    if record is None:
        return
    fingerprint = checkpoint_fingerprint(base.checkpoint)
    if record.get('base_fingerprint') != fingerprint:
        raise UsageError(f'run directory {run_dir} was made from the base model '
                         f'{record.get("base_model")}, not {base.path}; pick another --run_name '
                         f'or the same --base_model')
    if record.get('optim') != optimizer_name:
        raise UsageError(f'run directory {run_dir} was trained with --optim {record.get("optim")}, '
                         f'not {optimizer_name}; resume with the same optimizer or pick another '
                         f'--run_name')


@contextlib.contextmanager
def lock_run_dir(run_dir):
    """Create `run_dir` if needed and hold its lock for the block; a run directory in use by
    another process, or one that cannot be created, is a one-line UsageError."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f'{run_dir} exists and is not a directory; pick another --run_name')
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / LOCK_FILE, 'a+')
    except OSError as exc:
        raise UsageError(f'cannot create the run directory {run_dir}: {exc.strerror or exc}; '
                         f'pass a writable --checkpoint_dir') from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0)
            holder = lock.read().strip() or 'unknown'
            raise UsageError(f'run directory {run_dir} is in use by another run (process '
                             f'{holder}); wait for it to end or pick another --run_name') from None
        lock.seek(0)
        lock.truncate()
        lock.write(f'{os.getpid()}\n')
        lock.flush()
        yield run_dir


def checkpoint_problem(prefix):
    """None if every tensor of the checkpoint reads back with its checksum, else why not."""
    import tensorflow as tf
    try:
        reader = tf.train.load_checkpoint(str(prefix))
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)  # one tensor at a time: memory of the largest only
    except (tf.errors.OpError, ValueError, IndexError, OSError) as exc:
        return first_line(exc)
    return None


def newest_intact_checkpoint(run_dir):
    """The prefix of the newest checkpoint in `run_dir` that reads back whole, with a note on
    stderr for each newer one that does not; UsageError if none does."""
    damaged = []
    for step in reversed(saved_steps(run_dir)):
        prefix = Path(run_dir) / f'{CHECKPOINT_NAME}-{step}'
        problem = checkpoint_problem(prefix)
        if problem is None:
            for bad, why in damaged:
                print(f'note: checkpoint {bad} is damaged ({why}); resuming from {prefix.name}, '
                      f'the newest intact one', file=sys.stderr)
            return str(prefix)
        damaged.append((prefix, problem))
    found = f' ({damaged[0][0]}: {damaged[0][1]})' if damaged else ''
    raise UsageError(f'run directory {run_dir} holds no intact checkpoint to resume from{found}; '
                     f'remove it or pick another --run_name')


def start_run_dir(run_dir, base, optimizer_name):
    """Check `run_dir` (locked by lock_run_dir) for a run from `base` (a ModelDir) and clear
    what killed saves left. Returns the checkpoint prefix to resume from, or None for a
    fresh run."""
    run_dir = Path(run_dir)
    record = read_run_record(run_dir)
    check_run_matches(run_dir, record, base, optimizer_name)
    resume = None
    if saved_steps(run_dir) or (run_dir / 'checkpoint').exists():
        if record is None:
            raise UsageError(f'run directory {run_dir} holds a checkpoint but no {RUN_FILE}: it was '
                             f'not made by this run_finetune.py; pick another --run_name')
        resume = newest_intact_checkpoint(run_dir)
        hparams = resolve_hparams(run_dir, checkpoint_shapes(resume))
        if hparams != base.hparams:
            raise UsageError(f'run directory {run_dir} holds a model of hparams '
                             f'{hparams.to_dict()}, not the base model\'s '
                             f'{base.hparams.to_dict()}; pick another --run_name')
    remove_unfinished_saves(run_dir)
    try:
        if record is None:
            write_text_atomic(run_dir / RUN_FILE, json.dumps({
                'base_model': str(base.path), 'base_fingerprint': checkpoint_fingerprint(base.checkpoint),
                'optim': optimizer_name}, indent=2) + '\n')
        write_hparams(run_dir, base.hparams)
        if base.vocab_dir is not None:
            copy_vocab(base.vocab_dir, run_dir)
    except OSError as exc:
        raise UsageError(f'cannot write to the run directory {run_dir}: {exc.strerror or exc}; '
                         f'pass a --checkpoint_dir with room to write') from None
    return resume


def initial_values(base, resume, optimizer):
    """Checkpoint name -> function reading the initial value: network weights from the resumed
    checkpoint or the base model; optimizer state and step from the resumed checkpoint or new.
    Read straight into TensorFlow's memory (model_dir.tensor_loaders), one tensor at a time."""
    import tensorflow as tf
    shapes = model.parameter_shapes(base.hparams)
    values = parameter_loaders(resume or base.checkpoint, base.hparams)
    fresh = optimizer.initial_state(shapes)
    if resume is None:
        values.update(fresh)
        values[STEP_VARIABLE] = lambda: tf.constant(0, tf.int64)
        return values
    saved = tf.train.load_checkpoint(resume).get_variable_to_shape_map()
    missing = [name for name in [*fresh, STEP_VARIABLE] if name not in saved]
    if missing:
        raise ModelDirError(f'checkpoint {resume} lacks the optimizer state {missing[0]}; it was not '
                            f'written by this run_finetune.py with --optim {optimizer.name}')
    values.update(tensor_loaders(resume, [*fresh, STEP_VARIABLE]))
    return values


def saved_steps(run_dir):
    """Steps of the complete checkpoints in `run_dir`, oldest first."""
    steps = []
    for index in Path(run_dir).glob(f'{CHECKPOINT_NAME}-*.index'):
        match = re.fullmatch(rf'{CHECKPOINT_NAME}-(\d+)\.index', index.name)
        if match:
            steps.append(int(match.group(1)))
    return sorted(steps)


def save_run_checkpoint(run_dir, tensors, *, step, keep):
    """Write checkpoint `model-STEP` crash-safely, then the counter, then delete all but the
    newest `keep` checkpoints: the new one is complete and named in `checkpoint` before any
    old one goes. Returns the new prefix."""
    prefix = save_checkpoint(run_dir, tensors, step=step, name=CHECKPOINT_NAME)
    steps = saved_steps(run_dir)
    kept = steps[-keep:] if keep > 0 else steps
    try:
        write_text_atomic(Path(run_dir) / COUNTER_FILE, f'{step}\n')
        write_checkpoint_state(run_dir, f'{CHECKPOINT_NAME}-{step}',
                               all_names=[f'{CHECKPOINT_NAME}-{s}' for s in kept])
    except OSError as exc:
        # Nothing old has been deleted yet.
        raise CheckpointWriteError(f'checkpoint {prefix} was saved but the run directory could '
                                   f'not be updated: {exc.strerror or exc}') from None
    for old in steps:
        if old not in kept:
            for path in Path(run_dir).glob(f'{CHECKPOINT_NAME}-{old}.*'):
                path.unlink(missing_ok=True)
    return prefix


def remove_unfinished_saves(run_dir):
    """Delete what a killed save left: temporary files and folders, and data files with no
    index. Only while the run directory is locked: another live run may be saving."""
    run_dir = Path(run_dir)
    for path in run_dir.glob(f'{TEMP_PREFIX}*'):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    for data in run_dir.glob(f'{CHECKPOINT_NAME}-*.data-*'):
        prefix = data.name.split('.data-')[0]
        if not (run_dir / f'{prefix}.index').exists():
            data.unlink(missing_ok=True)
