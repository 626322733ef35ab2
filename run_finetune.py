"""Fine-tune a gpt2ja model on a tokenised dataset (the .npz of `python -m encoder`).

    python run_finetune.py --dataset corpus.npz --base_model gpt2ja-small \
        --run_name mine --max_steps 10000

Checkpoints go to checkpoint/RUN_NAME/, a model directory that gpt2-score, gpt2-transform
and gpt2-generate load. Running again with the same --run_name resumes. Ctrl-C or SIGTERM
saves and exits. See report/finetune.md for memory, speed and several devices.
"""
import math
from pathlib import Path

import cli
import precision


def build_parser():
    parser = cli.ArgumentParser(description='Fine-tune GPT2-JA on your own dataset.')
    data = parser.add_argument_group('data')
    data.add_argument('--dataset', metavar='PATH', required=True,
                      help='training tokens: the .npz written by python -m encoder')
    data.add_argument('--val_dataset', metavar='PATH', help='validation tokens (.npz)')
    data.add_argument('--val_fraction', type=float, default=0.0,
                      help='hold out this fraction of the dataset\'s sequences for validation')
    data.add_argument('--val_every', metavar='N', type=int, default=1000,
                      help='report validation loss and perplexity every N steps')
    model = parser.add_argument_group('model')
    cli.add_model_flags(model, flag='--base_model', default='gpt2ja-small')
    optim = parser.add_argument_group('optimisation')
    optim.add_argument('--batch_size', metavar='SIZE', type=int, default=1,
                       help='sequences per step (the global batch, split across replicas)')
    optim.add_argument('--accumulate_gradients', metavar='K', type=int, default=1,
                       help='sum gradients over K batches per step: effective batch K x batch_size')
    optim.add_argument('--optim', choices=['adam', 'adagrad', 'sgd'], default='adam',
                       help='optimizer (TF1 semantics; Adam with beta2 0.98, epsilon 1e-7)')
    optim.add_argument('--learning_rate', metavar='LR', type=float, default=5e-5, help='learning rate')
    optim.add_argument('--warmup_steps', metavar='N', type=int, default=0,
                       help='raise the learning rate linearly from 0 over the first N steps')
    optim.add_argument('--max_steps', type=int, help='stop after this many steps (counting resumed ones)')
    optim.add_argument('--epochs', type=float, default=1.0,
                       help='stop after this many passes over the data (unless --max_steps)')
    optim.add_argument('--seed', type=int, default=0, help='seed of the data order and samples')
    optim.add_argument('--max_bad_steps', metavar='N', type=int, default=5,
                       help='stop when the loss is NaN or infinite N steps in a row')
    run = parser.add_argument_group('run directory')
    run.add_argument('--run_name', default='gpt2ja_finetune',
                     help='name of the run: its directory in --checkpoint_dir; same name resumes')
    run.add_argument('--checkpoint_dir', default='checkpoint', help='where run directories go')
    run.add_argument('--save_every', metavar='N', type=int, default=1000, help='save every N steps')
    run.add_argument('--keep', metavar='N', type=int, default=5,
                     help='keep the newest N checkpoints (0: all)')
    run.add_argument('--sample_every', metavar='N', type=int, default=0,
                     help='print a short sample every N steps (0: never)')
    run.add_argument('--sample_length', metavar='TOKENS', type=int, default=64,
                     help='length of those samples')
    speed = parser.add_argument_group('memory and speed')
    speed.add_argument('--recompute', action='store_true',
                       help='recompute activations in the backward pass and use plain (non-oneDNN) '
                            'kernels: least memory, slower steps (figures in report/finetune.md); '
                            'TF_ENABLE_ONEDNN_OPTS=1 keeps oneDNN: faster, a little more memory')
    precision.add_precision_flag(speed, default='auto')
    speed.add_argument('--xla', action=cli.argparse.BooleanOptionalAction, default=False,
                       help='compile the forward and backward pass with XLA '
                            '(report/finetune.md compares it)')
    speed.add_argument('--strategy', choices=['auto', 'mirrored', 'multiworker'], default='auto',
                       help='auto: all visible GPUs when more than one, else one device; '
                            'multiworker: several machines, configured by $TF_CONFIG')
    cli.add_common_flags(parser)
    return parser


def check_args(args):
    """Reject bad flag values before TensorFlow starts."""
    positive = {'--batch_size': args.batch_size, '--accumulate_gradients': args.accumulate_gradients,
                '--max_bad_steps': args.max_bad_steps, '--sample_length': args.sample_length}
    for flag, value in positive.items():
        if value < 1:
            raise cli.UsageError(f'{flag} must be at least 1, not {value}')
    non_negative = {'--warmup_steps': args.warmup_steps, '--save_every': args.save_every,
                    '--keep': args.keep, '--val_every': args.val_every,
                    '--sample_every': args.sample_every}
    for flag, value in non_negative.items():
        if value < 0:
            raise cli.UsageError(f'{flag} must not be negative, not {value}')
    if args.max_steps is not None and args.max_steps < 0:
        raise cli.UsageError(f'--max_steps must not be negative, not {args.max_steps}')
    if not (math.isfinite(args.epochs) and args.epochs > 0):
        raise cli.UsageError(f'--epochs must be a positive number, not {args.epochs}')
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise cli.UsageError(f'--learning_rate must be a positive number, not {args.learning_rate}')
    if args.val_dataset and args.val_fraction:
        raise cli.UsageError('give --val_dataset or --val_fraction, not both')
    if not 0 <= args.val_fraction < 1:
        raise cli.UsageError(f'--val_fraction must be at least 0 and below 1, not {args.val_fraction}')
    checkpoint_dir = Path(args.checkpoint_dir)
    if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise cli.UsageError(f'--checkpoint_dir {checkpoint_dir} is not a directory')
    if not args.run_name or '/' in args.run_name or args.run_name in ('.', '..'):
        raise cli.UsageError(f'--run_name must be a plain name, not {args.run_name!r}')


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    from finetune.memory import prepare_process
    prepare_process(recompute=args.recompute)  # before TensorFlow is imported
    cli.prepare_tensorflow(verbose=args.verbose, gpu=args.gpu)
    if args.precision != 'auto':  # a float16 without a GPU is refused before any work;
        args.precision = precision.resolve_precision(args.precision)  # auto: once set up
    from finetune.training_run import run_training
    return run_training(args)


if __name__ == '__main__':
    cli.run_main(main)
