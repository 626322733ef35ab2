"""The training loop: which batch each step trains on, and when to save, validate, sample and
stop. It ends on the first of: `max_steps` reached; Ctrl-C or SIGTERM (after the current
step); `max_bad_steps` non-finite losses in a row; weights that became non-finite. The first
two save once before returning; the last two save nothing more, since the weights are suspect
or broken.

A checkpoint is "good" once the weights it holds gave a finite loss: the step after a save
that is applied proves it (a skipped step changes nothing, so the weights saved are still
the ones being trained).
"""
import dataclasses
import math
import signal
import sys
import time

import numpy as np

from finetune.data import batch_indices
from finetune.optimizers import warmup_learning_rate
from model_dir import NonFiniteTensorError

# float16's dynamic loss scale: start high, halve on overflow, double after this many good steps.
INITIAL_LOSS_SCALE = 2.0 ** 15
LOSS_SCALE_GROWTH_INTERVAL = 2000


@dataclasses.dataclass
class LoopConfig:
    batch_size: int
    max_steps: int
    learning_rate: float = 5e-5
    warmup_steps: int = 0
    accumulate: int = 1
    seed: int = 0
    save_every: int = 1000
    val_every: int = 0
    sample_every: int = 0
    max_bad_steps: int = 5
    dynamic_loss_scale: bool = False


@dataclasses.dataclass
class LoopResult:
    step: int
    reason: str  # 'finished', 'interrupted', 'non-finite' (losses) or 'non-finite-weights'
    good_step: int = None  # the newest step saved whose weights then gave a finite loss
    bad_steps: int = 0  # non-finite losses in a row at the end


class StopRequest:
    """Turns the first Ctrl-C or SIGTERM into a request to stop after the current step (the
    second Ctrl-C interrupts at once); restores the previous handlers on exit."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def step_batch(data, step, config):
    """The global batch of `step`: tokens int32 [K, batch, n_ctx], weights [K, batch, n_ctx-1]."""
    size = config.batch_size * config.accumulate
    tokens, weights = data.batch(batch_indices(step, size, count=len(data), seed=config.seed))
    return (tokens.reshape(config.accumulate, config.batch_size, -1),
            weights.reshape(config.accumulate, config.batch_size, -1))


def evaluate(trainer, data, batch_size):
    """(mean token loss, perplexity) over every sequence of `data`; the last batch is filled
    with zero-weight rows so that every batch has the same shape (one compiled function)."""
    total_loss, total_weight = 0.0, 0.0
    for start in range(0, len(data), batch_size):
        indices = np.arange(start, min(start + batch_size, len(data)))
        tokens, weights = data.batch(np.resize(indices, batch_size))
        weights[len(indices):] = 0.0
        total_loss += trainer.loss_sum(tokens, weights)
        total_weight += float(weights.sum())
    mean = total_loss / max(total_weight, 1.0)
    return mean, math.exp(min(mean, 700.0))


class Progress:
    """Progress on stderr: a tqdm bar on a terminal; elsewhere the original's log lines
    `[step | seconds] loss=... avg=...`. `message` prints above the bar (stderr)."""

    def __init__(self, *, start, total, tokens_per_step, enabled=True, stream=None):
        self.stream = stream or sys.stderr
        self.tokens_per_step = tokens_per_step
        self.started = time.time()
        self.average = (0.0, 0.0)  # the original's decaying sum and weight
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, file=self.stream, unit='step',
                            dynamic_ncols=True)
        self.enabled = enabled

    def update(self, step, loss, seconds):
        self.average = (self.average[0] * 0.99 + loss, self.average[1] * 0.99 + 1.0)
        avg = self.average[0] / self.average[1]
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f'{loss:.2f}', avg=f'{avg:.2f}',
                                 tok_s=f'{self.tokens_per_step / max(seconds, 1e-9):.0f}')
            self.bar.update(1)
        else:
            print(f'[{step} | {time.time() - self.started:2.2f}] loss={loss:2.2f} avg={avg:2.2f}',
                  file=self.stream, flush=True)

    def message(self, text, *, stream=None):
        if not self.enabled:
            return
        stream = stream or self.stream
        if self.bar is not None:
            self.bar.write(text, file=stream)
        else:
            print(text, file=stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def train_loop(trainer, data, config, *, save, val_data=None, sample=None, summaries=None,
               progress=None):
    """Train until `config.max_steps` (counting the resumed step), a stop request or too many
    bad steps; `save(step)` writes a checkpoint (raising model_dir.NonFiniteTensorError for
    weights it refuses); `sample(step)` returns text to print; `summaries(step, name, value)`
    logs a scalar. Returns a LoopResult."""
    step = trainer.step_number()
    progress = progress or Progress(start=step, total=config.max_steps, tokens_per_step=0, enabled=False)
    summaries = summaries or (lambda *args: None)
    loss_scale = INITIAL_LOSS_SCALE if config.dynamic_loss_scale else 1.0
    good_in_a_row, bad_in_a_row, reason = 0, 0, 'finished'
    # A resumed checkpoint holds the weights trained on first: unproven until a step applies.
    # (A fresh run starts at step 0 from the base model, which is no checkpoint of the run.)
    saved_step, unproven_step, good_step = step, step or None, None
    with StopRequest() as stop:
        while step < config.max_steps:
            if stop.requested:
                reason = 'interrupted'
                break
            tokens, weights = step_batch(data, step, config)
            learning_rate = warmup_learning_rate(step, learning_rate=config.learning_rate,
                                                 warmup_steps=config.warmup_steps)
            began = time.time()
            loss, applied = trainer.train_step(tokens, weights, learning_rate=learning_rate,
                                               loss_scale=loss_scale)
            step += 1
            if applied:
                if unproven_step is not None:
                    good_step, unproven_step = unproven_step, None
                good_in_a_row, bad_in_a_row = good_in_a_row + 1, 0
                progress.update(step, loss, time.time() - began)
                summaries(step, 'loss', loss)
                summaries(step, 'learning_rate', learning_rate)
                if config.dynamic_loss_scale and good_in_a_row % LOSS_SCALE_GROWTH_INTERVAL == 0:
                    loss_scale *= 2.0
            elif config.dynamic_loss_scale and math.isfinite(loss) and loss_scale > 1.0:
                # float16 gradients overflowed at this scale: not the data's fault.
                good_in_a_row, loss_scale = 0, loss_scale / 2.0
            else:
                good_in_a_row, bad_in_a_row = 0, bad_in_a_row + 1
                progress.message(f'step {step}: loss is {loss}; the update was skipped '
                                 f'({bad_in_a_row} in a row)')
                if bad_in_a_row >= config.max_bad_steps:
                    reason = 'non-finite'
                    break
            if config.save_every and step % config.save_every == 0:
                try:
                    save(step)
                except NonFiniteTensorError:
                    reason = 'non-finite-weights'
                    break
                saved_step, unproven_step = step, step
            if val_data is not None and config.val_every and step % config.val_every == 0:
                report_validation(trainer, val_data, config, step, progress, summaries)
            if sample is not None and config.sample_every and step % config.sample_every == 0:
                progress.message(f'======== SAMPLE at step {step} ========\n{sample(step)}',
                                 stream=sys.stdout)
    if reason in ('finished', 'interrupted') and saved_step != step:
        try:
            save(step)
        except NonFiniteTensorError:
            reason = 'non-finite-weights'
    progress.close()
    return LoopResult(step=step, reason=reason, good_step=good_step, bad_steps=bad_in_a_row)


def report_validation(trainer, val_data, config, step, progress, summaries):
    mean, perplexity = evaluate(trainer, val_data, config.batch_size)
    summaries(step, 'val_loss', mean)
    progress.message(f'[{step}] val_loss={mean:.4f} val_ppl={perplexity:.2f}', stream=sys.stdout)
