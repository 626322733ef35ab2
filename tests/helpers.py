"""Running the project's scripts from tests, in a child process as a user would."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
