"""Running the project's scripts from tests: in a child process as a user would, or their
main() in this process (faster: no TensorFlow start-up per call); fine-tuning runs either way."""
import importlib.util
import os
import subprocess
import sys
import time

import pytest

import cli
from conftest import REPO


def load_script(file_name):
    """A top-level script (`gpt2-score.py`) as a module, to call its main() in-process."""
    spec = importlib.util.spec_from_file_location(file_name.replace('-', '_')[:-3], REPO / file_name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(script, capsys, *args):
    """Call `script.main(args)` in-process, expecting exit code 0; returns what it printed
    (`.out`, `.err`)."""
    assert script.main([str(a) for a in args]) == 0
    return capsys.readouterr()


def run_as_script(main, args, capfd, *, prog='script'):
    """Call `main(args)` under cli.run_main, as a script's entry point does, but in this
    process; returns a CompletedProcess: the exit code, and what reached file descriptors 1
    and 2 (TensorFlow's own log lines included), as run_script would."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as end:
        cli.run_main(main, [str(a) for a in args], prog=prog)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(args, end.value.code, out, err)


def run_script(script, *args, stdin=None, env=None, timeout=300):
    """Run `python SCRIPT ARGS...` in the repository root; returns CompletedProcess (text)."""
    command = [sys.executable, *([script] if script.endswith('.py') else ['-m', script]), *map(str, args)]
    full_env = dict(os.environ, PYTHONUNBUFFERED='1')
    full_env.update(env or {})
    return subprocess.run(command, cwd=REPO, input=stdin, capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def assert_usage_error(result, *fragments):
    """Exit code 2, exactly one line on stderr naming every fragment, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1, result.stderr
    assert 'Traceback' not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def finetune(checkpoint_dir, base, dataset, *args):
    """run_finetune.main() in this process, without XLA; returns the exit code."""
    import run_finetune
    return run_finetune.main(['--dataset', str(dataset), '--base_model', str(base),
                              '--checkpoint_dir', str(checkpoint_dir), '--no-xla', *map(str, args)])


def start_run(checkpoint_dir, base, dataset, *args, prelude=''):
    """run_finetune.py in a child process (Popen, text pipes), as a user starts it; `prelude`
    is Python run first, to patch the process."""
    code = prelude + 'import cli, run_finetune; cli.run_main(run_finetune.main)'
    return subprocess.Popen(
        [sys.executable, '-c', code, '--dataset', str(dataset), '--base_model', str(base),
         '--checkpoint_dir', str(checkpoint_dir), '--no-xla', *map(str, args)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED='1'))


def wait_for_line(stream, fragment, timeout=120):
    """Read `stream` until a line holds `fragment`; returns that line."""
    deadline, seen = time.time() + timeout, []
    while time.time() < deadline:
        line = stream.readline()
        seen.append(line)
        if fragment in line:
            return line
        if not line:
            break
    raise AssertionError(f'{fragment!r} not seen in {seen}')


def kill_while_saving(checkpoint_dir, base, dataset, index_name, *args):
    """Start run_finetune.py (`start_run`), let it pause where a save renames a file to one
    ending in `index_name` (the data file is in place, the index is not), and kill -9 it."""
    process = start_run(checkpoint_dir, base, dataset, *args, prelude=pause_before_rename_to(index_name))
    try:
        wait_for_line(process.stdout, 'PAUSED IN SAVE')
    finally:
        process.kill()
        process.communicate(timeout=60)


def pause_before_rename_to(name):
    """A `start_run` prelude: the process prints 'PAUSED IN SAVE' and sleeps instead of renaming
    a file to one ending in `name`, so that a test can kill it at that moment of a save."""
    return f'''
import os, time
_replace = os.replace
def _pausing_replace(src, dst):
    if str(dst).endswith({name!r}):
        print('PAUSED IN SAVE', flush=True)
        time.sleep(600)
    return _replace(src, dst)
os.replace = _pausing_replace
'''
