"""Run a script as `python SCRIPT ARGS...` would, noting when its TensorFlow import ends.

    python bench/import_clock.py CLOCK_FILE SCRIPT [ARGS...]

Writes to CLOCK_FILE, when the `import tensorflow` that loads TensorFlow returns (wherever
the script makes it), one line: the wall clock (`time.time()`) and the process's CPU
seconds at that moment. A benchmark that noted the wall clock at launch can then give a
process's time beyond its *own* import. That is steadier than subtracting a separate
`python -c "import tensorflow"` on a machine whose load moves the import by seconds from
one process to the next.

Nothing else changes: the script runs as `__main__` with its own directory first on
sys.path, and its environment is set up by its own code before TensorFlow loads (the
wrapper imports nothing heavy and does not import TensorFlow itself).
"""
import builtins
import runpy
import sys
import time
from pathlib import Path


def clock_tensorflow_import(clock_file):
    """Wrap `__import__` so that the `import tensorflow` that loads TensorFlow writes the
    clock when it returns. Only that call counts: TensorFlow's own modules import the
    package again while it loads, and those calls return at once, half-way through."""
    plain_import = builtins.__import__

    def clocked_import(name, *args, **kwargs):
        loads_it = name == 'tensorflow' and 'tensorflow' not in sys.modules
        module = plain_import(name, *args, **kwargs)
        if loads_it:
            builtins.__import__ = plain_import  # once is enough; later imports cost nothing extra
            with open(clock_file, 'w') as out:
                out.write(f'{time.time()!r} {time.process_time()!r}\n')
        return module

    builtins.__import__ = clocked_import


def main():
    clock_file, script, *script_args = sys.argv[1:]
    clock_tensorflow_import(clock_file)
    sys.argv = [script, *script_args]
    sys.path[0] = str(Path(script).resolve().parent)
    runpy.run_path(script, run_name='__main__')


if __name__ == '__main__':
    main()
