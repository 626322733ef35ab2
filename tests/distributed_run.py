"""Helper for test_finetune_distributed.py, run in a child process because the CPU can be
split into logical devices only before TensorFlow starts:

    python tests/distributed_run.py MODEL_DIR DATASET STEPS

It splits the CPU into 2 logical devices, trains the same batches (global batch 4) with
MirroredStrategy over both (also as 2 accumulated micro-batches of 2) and on one device,
and prints the losses and the largest weight differences as JSON.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli  # noqa: E402


def train(strategy, base, sequences, steps, *, xla, accumulate=1):
    from finetune.loop import LoopConfig, step_batch
    from finetune.optimizers import make_optimizer
    from finetune.run_dir import initial_values
    from finetune.trainer import Trainer
    optimizer = make_optimizer('adam')
    trainer = Trainer(hparams=base.hparams, optimizer=optimizer, strategy=strategy, xla=xla,
                      initial=initial_values(base, None, optimizer))
    config = LoopConfig(batch_size=4 // accumulate, accumulate=accumulate, max_steps=steps, seed=7)
    losses = [trainer.train_step(*step_batch(sequences, step, config), learning_rate=1e-3)[0]
              for step in range(steps)]
    return losses, {name: value.numpy() for name, value in trainer.tensors().items()}


def main():
    model_dir, dataset, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tf = cli.prepare_tensorflow()
    cpu = tf.config.list_physical_devices('CPU')[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np
    from finetune.data import load_sequences
    from model_dir import load_model_dir
    base = load_model_dir(model_dir)
    sequences = load_sequences(dataset, n_ctx=base.hparams.n_ctx, n_vocab=base.hparams.n_vocab,
                               pad_id=base.hparams.n_vocab - 1)
    mirrored = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
    mirrored_losses, mirrored_state = train(mirrored, base, sequences, steps, xla=False)
    single_losses, single_state = train(tf.distribute.get_strategy(), base, sequences, steps, xla=False)
    # The same global batch as 2 micro-batches of 2, each split over the 2 devices.
    accumulated_losses, accumulated_state = train(mirrored, base, sequences, steps, xla=False,
                                                  accumulate=2)
    print(json.dumps({
        'replicas': mirrored.num_replicas_in_sync,
        'mirrored_losses': mirrored_losses, 'single_losses': single_losses,
        'max_weight_difference': max(float(np.abs(mirrored_state[n] - single_state[n]).max())
                                     for n in single_state),
        'accumulated_losses': accumulated_losses,
        'max_accumulated_difference': max(float(np.abs(accumulated_state[n] - single_state[n]).max())
                                          for n in single_state),
        'max_weight_change': max(float(np.abs(single_state[n] - v).max())
                                 for n, v in base.load_parameters().items()),
    }))


if __name__ == '__main__':
    main()
