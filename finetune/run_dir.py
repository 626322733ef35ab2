"""The run directory `checkpoint/RUN_NAME/`: a model directory that grows checkpoints.

It holds what every script needs to load it (TF1-layout `model-STEP.*` files, a `checkpoint`
file with relative paths, `hparams.json`, the vocabulary) plus the original's `counter`
(the last saved step), TensorBoard event files, and `finetune.json`, which records the base
model and optimizer so that a later run with the same name resumes the same training.
"""
import hashlib
import json
import re
from pathlib import Path

import numpy as np

import model
from cli import UsageError
from model_dir import (ModelDirError, copy_vocab, load_model_dir, save_checkpoint, write_checkpoint_state, write_hparams)
from files import write_text_atomic
from finetune.trainer import STEP_VARIABLE

RUN_FILE = 'finetune.json'
COUNTER_FILE = 'counter'
CHECKPOINT_NAME = 'model'


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


def start_run_dir(run_dir, base, optimizer_name):
    """Create or check `run_dir` for a run from `base` (a ModelDir). Returns the checkpoint
    prefix to resume from, or None for a fresh run."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f'{run_dir} exists and is not a directory; pick another --run_name')
    record = read_run_record(run_dir)
    check_run_matches(run_dir, record, base, optimizer_name)
    resume = None
    if run_dir.is_dir() and (any(run_dir.glob('*.index')) or (run_dir / 'checkpoint').exists()):
        if record is None:
            raise UsageError(f'run directory {run_dir} holds a checkpoint but no {RUN_FILE}: it was '
                             f'not made by this run_finetune.py; pick another --run_name')
        resumed = load_model_dir(run_dir, need_vocab=False)
        if resumed.hparams != base.hparams:
            raise UsageError(f'run directory {run_dir} holds a model of hparams '
                             f'{resumed.hparams.to_dict()}, not the base model\'s '
                             f'{base.hparams.to_dict()}; pick another --run_name')
        resume = resumed.checkpoint
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_unfinished_saves(run_dir)
    if record is None:
        write_text_atomic(run_dir / RUN_FILE, json.dumps({
            'base_model': str(base.path), 'base_fingerprint': checkpoint_fingerprint(base.checkpoint),
            'optim': optimizer_name}, indent=2) + '\n')
    write_hparams(run_dir, base.hparams)
    if base.vocab_dir is not None:
        copy_vocab(base.vocab_dir, run_dir)
    return resume


def initial_values(base, resume, optimizer):
    """Checkpoint name -> function reading the initial value: network weights from the resumed
    checkpoint or the base model; optimizer state and step from the resumed checkpoint or new."""
    import tensorflow as tf
    shapes = model.parameter_shapes(base.hparams)
    reader = tf.train.load_checkpoint(resume or base.checkpoint)
    values = {name: (lambda name=name: reader.get_tensor(name).astype(np.float32, copy=False)) for name in shapes}
    fresh = optimizer.initial_state(shapes)
    if resume is None:
        values.update(fresh)
        values[STEP_VARIABLE] = lambda: np.int64(0)
        return values
    saved = reader.get_variable_to_shape_map()
    missing = [name for name in [*fresh, STEP_VARIABLE] if name not in saved]
    if missing:
        raise ModelDirError(f'checkpoint {resume} lacks the optimizer state {missing[0]}; it was not '
                            f'written by this run_finetune.py with --optim {optimizer.name}')
    for name in [*fresh, STEP_VARIABLE]:
        values[name] = lambda name=name: reader.get_tensor(name)
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
    write_text_atomic(Path(run_dir) / COUNTER_FILE, f'{step}\n')
    steps = saved_steps(run_dir)
    kept = steps[-keep:] if keep > 0 else steps
    write_checkpoint_state(run_dir, f'{CHECKPOINT_NAME}-{step}',
                           all_names=[f'{CHECKPOINT_NAME}-{s}' for s in kept])
    for old in steps:
        if old not in kept:
            for path in Path(run_dir).glob(f'{CHECKPOINT_NAME}-{old}.*'):
                path.unlink(missing_ok=True)
    return prefix


def remove_unfinished_saves(run_dir):
    """Delete what a killed save left: temporary files, and data files with no index."""
    run_dir = Path(run_dir)
    for path in run_dir.glob('.tmp-*'):
        path.unlink(missing_ok=True)
    for data in run_dir.glob(f'{CHECKPOINT_NAME}-*.data-*'):
        prefix = data.name.split('.data-')[0]
        if not (run_dir / f'{prefix}.index').exists():
            data.unlink(missing_ok=True)
