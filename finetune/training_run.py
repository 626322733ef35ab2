"""One fine-tuning run from checked arguments: strategy, run directory, data, trainer, loop.

`run_finetune.py` parses and checks the flags, prepares TensorFlow, then calls
`run_training(args)`. Everything the user can get wrong is checked here before the first step.
"""
import contextlib
import json
import math
import os
import sys
from pathlib import Path

import tensorflow as tf

import sample as sampling
from cli import UsageError
from finetune import data as data_module
from finetune.loop import LoopConfig, Progress, train_loop
from finetune.optimizers import make_optimizer
from finetune.run_dir import (CHECKPOINT_NAME, STEP_VARIABLE, initial_values, lock_run_dir,
                              save_run_checkpoint, start_run_dir)
from finetune.trainer import Trainer
from model_dir import check_finite, load_model_dir, read_tensors
from precision import resolve_precision


def make_strategy(name):
    """The tf.distribute strategy for --strategy; create it before any other TensorFlow op."""
    if name == 'multiworker':
        if not os.environ.get('TF_CONFIG'):
            raise UsageError('--strategy multiworker needs TF_CONFIG describing the cluster '
                             '(see report/finetune.md)')
        try:
            config = json.loads(os.environ['TF_CONFIG'])
            config['cluster'], config['task']
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f'TF_CONFIG is not a cluster description: {exc}') from None
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices('GPU')
    if name == 'mirrored' or (name == 'auto' and len(gpus) > 1):
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def is_chief(strategy):
    """Only the chief writes checkpoints, summaries and prints samples."""
    return strategy.extended.should_checkpoint


def load_datasets(args, hparams, *, eot_id):
    """(training, validation or None) sequences, checked before training starts; the last
    sequence of each is padded with `eot_id`."""
    load = lambda path: data_module.load_sequences(path, n_ctx=hparams.n_ctx, n_vocab=hparams.n_vocab,
                                                   pad_id=eot_id)
    train = load(args.dataset)
    if args.val_dataset:
        return train, load(args.val_dataset)
    if args.val_fraction:
        return data_module.split_validation(train, args.val_fraction)
    return train, None


def total_steps(args, sequences):
    if args.max_steps is not None:
        return args.max_steps
    per_step = args.batch_size * args.accumulate_gradients
    return math.ceil(args.epochs * len(sequences) / per_step)


def summary_writer(run_dir, chief):
    """`write(step, name, value)` appending a TensorBoard scalar to the run directory's event
    file. Written with tf.summary.write and the scalars plugin's metadata, which is what
    tf.summary.scalar does, because that needs the tensorboard package installed."""
    if not chief:
        return None
    from tensorflow.core.framework import summary_pb2
    writer = tf.summary.create_file_writer(str(run_dir))
    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = 'scalars'

    def write(step, name, value):
        with writer.as_default():
            tf.summary.write(name, tf.constant(value, tf.float32), step=step,
                             metadata=metadata.SerializeToString())
    return write


def run_training(args):
    """Train as `args` say; returns the exit code (0 finished, interrupted or nothing to do;
    1 stopped because the loss or the weights stopped being finite)."""
    strategy = make_strategy(args.strategy)
    if args.batch_size % strategy.num_replicas_in_sync:
        raise UsageError(f'--batch_size {args.batch_size} must be a multiple of the '
                         f'{strategy.num_replicas_in_sync} replicas (it is the global batch)')
    run_dir = Path(args.checkpoint_dir) / args.run_name
    chief = is_chief(strategy)
    # Only the chief writes the run directory, so only the chief locks it.
    with lock_run_dir(run_dir) if chief else contextlib.nullcontext():
        return train_in(run_dir, args, strategy, chief=chief)


def train_in(run_dir, args, strategy, *, chief):
    base = load_model_dir(args.base_model, vocab_dir=args.vocab)
    encoder = base.load_encoder()
    train, val = load_datasets(args, base.hparams, eot_id=encoder.eot_id)
    optimizer = make_optimizer(args.optim)
    # Other workers start from the base model: MultiWorkerMirroredStrategy gives every
    # variable the chief's initial value, resumed or not.
    resume = start_run_dir(run_dir, base, args.optim) if chief else None
    max_steps = total_steps(args, train)
    if resume:
        resumed_step = int(read_tensors(resume, [STEP_VARIABLE])[STEP_VARIABLE])
        if resumed_step >= max_steps:
            print(f'Nothing to do: {resume} is at step {resumed_step}, and the run stops at step '
                  f'{max_steps}; raise --max_steps (or --epochs) to train further', file=sys.stderr)
            return 0
    # Announced here, after every check of the flags, data and run directory: an error
    # before training stays the only line on stderr.
    compute_precision = resolve_precision(args.precision)
    trainer = Trainer(hparams=base.hparams, optimizer=optimizer, strategy=strategy,
                      initial=initial_values(base, resume, optimizer),
                      precision=compute_precision, recompute=args.recompute, xla=args.xla)
    trainer.trace_step(accumulate=args.accumulate_gradients, batch_size=args.batch_size)
    config = LoopConfig(batch_size=args.batch_size, max_steps=max_steps,
                        learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
                        accumulate=args.accumulate_gradients, seed=args.seed,
                        save_every=args.save_every, val_every=args.val_every,
                        sample_every=args.sample_every if chief else 0,
                        max_bad_steps=args.max_bad_steps,
                        dynamic_loss_scale=compute_precision == 'float16')
    progress = Progress(start=trainer.step_number(), total=config.max_steps, enabled=chief,
                        tokens_per_step=args.batch_size * args.accumulate_gradients * base.hparams.n_ctx)
    if resume:
        progress.message(f'Resuming {resume} at step {trainer.step_number()}')

    def save(step):
        if chief:
            prefix = save_run_checkpoint(run_dir, trainer.tensors(), step=step, keep=args.keep)
            progress.message(f'Saving {prefix}')
        else:
            check_finite(trainer.tensors())  # the chief refuses such weights: stop with it

    def sample(step):
        # An unconditional sample from the weights as trained so far.
        ids = sampling.generate(trainer.parameter_values(), base.hparams, [encoder.eot_id],
                                max_tokens=args.sample_length, eot_id=encoder.eot_id,
                                seed=args.seed + step)[0]
        return encoder.decode(ids)

    result = train_loop(trainer, train, config, save=save, val_data=val, sample=sample,
                        summaries=summary_writer(run_dir, chief), progress=progress)
    if result.reason in ('non-finite', 'non-finite-weights'):
        if chief:
            print(f'{Path(sys.argv[0]).name}: {stop_message(result, run_dir, args)}', file=sys.stderr)
        return 1
    return 0


def stop_message(result, run_dir, args):
    """Why the run stopped on non-finite numbers, and which checkpoint, if any, is known good."""
    if result.reason == 'non-finite':
        why = (f'stopped at step {result.step}: the loss was not finite {result.bad_steps} steps '
               f'in a row; these weights were not saved')
    else:
        why = (f'stopped at step {result.step}: the update made the weights NaN or infinite '
               f'(is --learning_rate {args.learning_rate:g} too high?); they were not saved')
    good = run_dir / f'{CHECKPOINT_NAME}-{result.good_step}'
    if result.good_step is not None and Path(f'{good}.index').exists():
        return f'{why}; {good} holds the last weights known to give a finite loss'
    return f'{why}; no checkpoint of this run is known to give a finite loss'
