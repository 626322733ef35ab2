"""What every command-line script shares: quiet TensorFlow, device choice, one-line errors.

Scripts are thin `main()` functions wrapped by `run_main`. They parse their arguments,
call `prepare_tensorflow(verbose=..., gpu=...)` *before* importing anything that imports
TensorFlow (the environment variables below only work if set first), and report bad
input by raising `UsageError`, which `run_main` prints as one line and exit code 2.
SIGTERM unwinds like Ctrl-C (temporary files are removed on the way out), exit code 143.
"""
import argparse
import logging
import os
import signal
import sys
import tempfile
import warnings

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that the same clean-up runs."""


def add_common_flags(parser, *, gpu=True):
    """Flags that every script has: --verbose and (for scripts that run the model) --gpu."""
    parser.add_argument('--verbose', action='store_true',
                        help="show TensorFlow's start-up log and warnings (hidden by default)")
    if gpu:
        parser.add_argument('--gpu', default=None,
                            help='GPU number(s) to use, comma-separated (e.g. "0" or "0,1"); -1 runs '
                                 'on the CPU. Default: the GPUs TensorFlow finds (as '
                                 '$CUDA_VISIBLE_DEVICES allows), else the CPU')


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


# Grappler's passes that leave this project's graphs as they are, switched off where the
# optimiser runs (fine-tuning). Measured on the gpt2ja-small training step (3,300 nodes once
# optimised): together 0.5 s of Grappler's 2.4 s before the first step, and 21 nodes of
# difference in the graph that runs (constant folding's and arithmetic's bookkeeping).
#   layout_optimizer: converts convolutions' data layouts for GPUs; there are none;
#   constant_folding: tracing already made every shape static; it folded 7 of 5,400 nodes;
#   loop_optimization: the step has no loops;
#   function_optimization: nested calls (the traced block) are inlined before Grappler runs;
#   implementation_selector: no op here has alternative implementations to choose from.
# Kept: pruning, common subexpressions, arithmetic, dependencies and the remapper, whose
# oneDNN fusions make a step faster (switching everything off: 7-12% slower steps).
IDLE_GRAPH_PASSES = ('layout_optimizer', 'constant_folding', 'loop_optimization', 'function_optimization',
                     'implementation_selector')


def prepare_tensorflow(*, verbose=False, gpu=None, optimise_graphs=True):
    """Set up TensorFlow's environment and import it; call before TensorFlow is imported.

    gpu: None leaves the devices as TensorFlow finds them; "0", "0,1", ... select GPUs (a
    note on stderr says so when TensorFlow cannot see them); "-1" hides every GPU.
    optimise_graphs: False switches off TensorFlow's graph optimiser (Grappler) for the
    process. It runs before the first call of every traced function, over the whole graph
    twice, and is most of that call's time (0.5-1 s at gpt2ja-small on a 2-core CPU); on the
    inference graphs (scores, vectors, the sampling step) it gains nothing measurable per
    token (report/startup.md), so those scripts skip it. Training keeps it, less the passes
    that do nothing to these graphs (IDLE_GRAPH_PASSES): its rewrites make a step faster.
    Returns the `tensorflow` module, imported silently unless `verbose`.
    """
    requested = None
    if gpu is not None:
        gpu = str(gpu).strip()
        os.environ['CUDA_VISIBLE_DEVICES'] = '' if gpu.startswith('-') else gpu
        requested = None if gpu.startswith('-') else [g for g in gpu.split(',') if g.strip()]
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
    if optimise_graphs:
        tf.config.optimizer.set_experimental_options({name: False for name in IDLE_GRAPH_PASSES})
    else:
        tf.config.optimizer.set_experimental_options({'disable_meta_optimizer': True})
    if requested:
        note_missing_gpus(tf, requested)
    return tf


def note_missing_gpus(tf, requested):
    """One line on stderr when fewer GPUs are visible to TensorFlow than --gpu asked for."""
    found = len(tf.config.list_physical_devices('GPU'))
    if found >= len(requested):
        return
    seen = 'no GPU' if found == 0 else f'only {found} of them'
    where = 'on the CPU' if found == 0 else f'on {found}'
    print(f'note: --gpu {",".join(requested)} asked for {len(requested)} GPU(s) but TensorFlow '
          f'sees {seen}; running {where} (GPU set-up: README.md, "Using a GPU")', file=sys.stderr)


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


def run_main(main, argv=None, *, prog=None, exit_at_once=False):
    """Run `main(argv)` and turn the ways it can end into exit codes.

    UsageError -> one line on stderr, exit 2; Ctrl-C -> exit 130 and SIGTERM -> exit 143,
    without a traceback; a closed stdout pipe (`... | head`) -> quiet exit 0. `prog` names
    the program in error lines (default: the script's file name).
    exit_at_once: end the process as soon as `main` is done and the output is flushed,
    skipping the interpreter's teardown (see exit_without_teardown); for a script's entry
    point only, as tests run `main` in their own process.
    """
    if prog is None:
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else 'gpt2'
    previous_sigterm = _raise_on_sigterm()
    try:
        if sys.stdout is None:
            raise UsageError('standard output is closed; redirect it instead (> FILE or > /dev/null)')
        code = main(argv)
    except UsageError as exc:
        print(error_line(prog, exc), file=sys.stderr)
        code = EXIT_USAGE
    except Terminated:
        print(f'{prog}: terminated', file=sys.stderr)
        code = EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f'{prog}: interrupted', file=sys.stderr)
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        code = 0
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    _discard_unwritten_output()
    if exit_at_once:
        exit_without_teardown(code or 0)
    sys.exit(code or 0)


def exit_without_teardown(code):
    """End the process with `code` now, once stdout, stderr and logging are flushed.

    After TensorFlow is imported, Python's own exit spends about a second (1.1-1.3 s on a
    2-core CPU) finalising TensorFlow's thousands of modules and its C++ state: after the
    answer is printed, but before the prompt returns or a pipe's reader sees the end of the
    output. Nothing the scripts that use this leave behind needs it: their output files are
    written and closed before `main` returns, and their only exit handler stops a reading
    thread (model_dir.Filling), which ending the process stops as well. Training does not
    use it: its event files flush at exit."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _raise_on_sigterm():
    """Make SIGTERM raise Terminated (in the main thread); returns the previous handler."""
    def handle(signum, frame):
        raise Terminated
    try:
        return signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread
        return None


def _discard_unwritten_output():
    """After a failed write to stdout (closed pipe, full disk), Python would fail again, with
    a traceback, flushing what is left at exit: point stdout at /dev/null instead."""
    if sys.stdout is None:
        return
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def write_output(text, *, progress=None):
    """Write `text` to stdout at once; a failed write (full disk, closed descriptor) is a
    one-line UsageError. A closed pipe stays BrokenPipeError: run_main ends quietly on it.

    progress: a tqdm bar on stderr. Where it shares a terminal with stdout, the text goes
    through it (the bar clears itself, then redraws below), so no stale bar lines remain."""
    try:
        if progress is not None and not progress.disable and sys.stdout.isatty():
            with progress.external_write_mode():
                sys.stdout.write(text)
                sys.stdout.flush()
            return
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise UsageError(f'cannot write the results to standard output: '
                         f'{exc.strerror or exc}') from None


def check_text_argument(flag, value):
    """A command-line text must be valid UTF-8: bytes that are not arrive from the shell as
    lone surrogates (Python's surrogateescape), which no encoder can take."""
    try:
        value.encode('utf-8')
    except UnicodeEncodeError as exc:
        bad = value[exc.start].encode('utf-8', 'surrogateescape')
        raise UsageError(f'{flag} is not valid UTF-8 (byte 0x{bad[0]:02x} at character '
                         f'{exc.start + 1}); give the text in UTF-8') from None


def check_output_file(flag, path, *, keep_existing=False):
    """Refuse before any work an output file that could not be written at the end: a folder,
    a missing directory, a directory where no file can be created (read-only, no permission);
    with `keep_existing`, also a file that is already there (--overwrite replaces it)."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f'{flag} {path} is a directory; give a file name')
    if not os.path.isdir(parent):
        raise UsageError(f'{flag} {path}: the directory {parent} does not exist')
    if keep_existing and os.path.exists(path):
        raise UsageError(f'{flag} {path} exists; pass --overwrite to replace it')
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise UsageError(f'{flag} {path}: cannot create files in {parent} '
                         f'({exc.strerror or exc})') from None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None: the help text says what happens then."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's defaults: flag defaults shown in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('formatter_class', HelpFormatter)
        super().__init__(*args, **kwargs)
