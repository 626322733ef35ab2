"""What every command-line script shares: quiet TensorFlow, device choice, one-line errors.

Scripts are thin `main()` functions wrapped by `run_main`. They parse their arguments,
call `prepare_tensorflow(verbose=..., gpu=...)` *before* importing anything that imports
TensorFlow (the environment variables below only work if set first), and report bad
input by raising `UsageError`, which `run_main` prints as one line and exit code 2.
"""
import argparse
import logging
import os
import sys
import tempfile
import warnings

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


def add_common_flags(parser, *, gpu=True):
    """Flags that every script has: --verbose and (for scripts that run the model) --gpu."""
    parser.add_argument('--verbose', action='store_true',
                        help="show TensorFlow's start-up log and warnings (hidden by default)")
    if gpu:
        parser.add_argument('--gpu', default='0',
                            help='GPU number(s) to use, comma-separated (e.g. "0" or "0,1"); '
                                 '-1 runs on the CPU')


def add_model_flags(parser, *, flag='--model', default='gpt2ja-medium'):
    """The model flag (`--model`, or `--base_model` for fine-tuning) and --vocab, for every
    script that runs a model; model_dir.load_model_dir resolves what they name."""
    parser.add_argument(flag, metavar='MODEL', default=default,
                        help='a model directory (checkpoint, hparams.json, usually the '
                             'vocabulary); or a released model, gpt2ja-small or gpt2ja-medium, '
                             'fetched into $GPT2JA_HOME (~/.cache/gpt2ja) on first use when no '
                             'directory of that name is here; or a model archive (.tar.bz2), '
                             'unpacked there once')
    parser.add_argument('--vocab', metavar='DIR', default=None,
                        help='directory with ja-bpe.txt and emoji.json; when not given: the model '
                             'directory, $GPT2JA_VOCAB_DIR, encoder/, then $GPT2JA_HOME/vocab '
                             '(fetched when absent)')


def prepare_tensorflow(*, verbose=False, gpu=None):
    """Set up TensorFlow's environment; call before TensorFlow is imported.

    Returns nothing; after it, `import tensorflow` is silent unless `verbose`.
    """
    if gpu is not None:
        gpu = str(gpu).strip()
        os.environ['CUDA_VISIBLE_DEVICES'] = '' if gpu.startswith('-') else gpu
    if not verbose:
        # 3 hides TensorFlow's C++ INFO, WARNING and ERROR start-up lines (oneDNN notices,
        # missing CUDA drivers on CPU machines, ...); fatal errors still show.
        os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
        warnings.filterwarnings('ignore', category=DeprecationWarning)
        warnings.filterwarnings('ignore', category=FutureWarning)
        warnings.filterwarnings('ignore', category=UserWarning, module='tensorflow')
        logging.getLogger('tensorflow').setLevel(logging.ERROR)
        try:
            import absl.logging
            absl.logging.set_verbosity(absl.logging.ERROR)
        except ImportError:
            pass
    tf = _import_tensorflow(quiet=not verbose)
    if not verbose:
        tf.get_logger().setLevel(logging.ERROR)
        tf.autograph.set_verbosity(0)
    _allow_gpu_memory_growth(tf)
    return tf


def _import_tensorflow(*, quiet):
    """Import TensorFlow, holding back what its C++ core prints while it loads.

    TensorFlow 2.16+ prints oneDNN and CUDA notices before absl logging is set up, so
    TF_CPP_MIN_LOG_LEVEL cannot hide them; the only way is to point file descriptor 2
    elsewhere during the import. If the import fails, what it printed is shown after all.
    """
    if not quiet or 'tensorflow' in sys.modules:
        import tensorflow as tf
        return tf
    sys.stderr.flush()
    saved_fd = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            import tensorflow as tf
        except BaseException:
            os.dup2(saved_fd, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode('utf-8', 'replace'))
            raise
        finally:
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
    return tf


def _allow_gpu_memory_growth(tf):
    # Without this TensorFlow reserves all GPU memory at start-up, which breaks running a
    # scorer beside a training job on the same card.
    for device in tf.config.list_physical_devices('GPU'):
        try:
            tf.config.experimental.set_memory_growth(device, True)
        except (ValueError, RuntimeError):
            pass


def error_line(prog, message):
    """The one line printed for a usage error, in argparse's shape."""
    return f'{prog}: error: {message}'


def run_main(main, argv=None, *, prog=None):
    """Run `main(argv)` and turn the ways it can end into exit codes.

    UsageError -> one line on stderr, exit 2; Ctrl-C -> exit 130 without a traceback;
    a closed stdout pipe (`... | head`) -> quiet exit 0. `prog` names the program in error
    lines (default: the script's file name).
    """
    if prog is None:
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else 'gpt2'
    try:
        code = main(argv)
    except UsageError as exc:
        print(error_line(prog, exc), file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        print(f'{prog}: interrupted', file=sys.stderr)
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        # Python would otherwise complain again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 0
    sys.exit(code or 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's defaults: flag defaults shown in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('formatter_class', argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
