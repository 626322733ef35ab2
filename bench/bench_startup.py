"""Benchmark of what each script costs before it answers, as whole processes.

    python bench/bench_startup.py [--size small|medium] [--repeats 3] [--only NAME ...]
                                  [--code DIR] [--vocab DIR]

Makes (once) a model directory of random weights of the released size in bench/out/startup/
(vocabulary from --vocab, default ../shared/vocab), inputs (one line; 200 short sentences
from ../shared/corpus/aozora; a small training set), then measures, in one run:
  import      bare `python -c "import tensorflow"`: the baseline subtracted from the others;
  score1      gpt2-score.py on one line                  (target: <= 1.5 s beyond import);
  generate1   gpt2-generate.py --num_generate 1 --max_length 1: its first token
                                                          (target: <= 2.0 s beyond import);
  transform1  gpt2-transform.py --context TEXT           (target: <= 1.5 s beyond import);
  finetune    run_finetune.py: when its first step's log line appears, and one step's time
              (the gap to the second), in wall and the process's CPU seconds
                                                          (target: <= 4 s + a step beyond import);
  memory      peak RSS of generate1 against the import's plus the checkpoint's size
                                                          (target: <= that sum + 15%);
  e2e         three 100-character samples and 200 lines scored, ours against
              bench/original_scripts.py (the original scripts' per-call work)
                                                          (targets: >= 10x and >= 2.5x);
  steady      in one process: decode ms a step at batch 1 and 8 rows, scoring tokens/s on
              batches of 32 short lines (no regression beyond 5%);
  overhead    in one process: a 400-character sample through gpt2-generate.py's main()
              (streaming to a terminal; or its progress bar) against bare steps, per token
                                                          (target: <= 1.1x).
Process figures are the best of --repeats runs (noise only adds time). Each script process
is also given beyond its *own* TensorFlow import: it runs through bench/import_clock.py,
which notes when `import tensorflow` returns in that process, so a slow or fast import in
one process does not move the figure (the bare import above is a separate process, and on a
shared machine it moves by seconds between runs). --code DIR runs the scripts of another
checkout (same flags) for before/after comparisons. Figures: report/startup.md.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRATCH = REPO / 'bench' / 'out' / 'startup'
MEASUREMENTS = ('import', 'score1', 'generate1', 'transform1', 'finetune', 'memory', 'e2e', 'steady', 'overhead',
                'optimiser')
CONTEXT = '吾輩は猫である。名前はまだ無い。'


def launch_clocked(command, **popen_args):
    """Start `command` (python SCRIPT ARGS...) through bench/import_clock.py. Returns the child
    and a function giving, once it has run, (seconds from launch to the end of its own
    TensorFlow import, its CPU seconds by then), or None where it never imported TensorFlow."""
    clock_file = SCRATCH / f'import-clock-{os.getpid()}'
    clock_file.unlink(missing_ok=True)
    launched = time.time()
    child = subprocess.Popen([command[0], str(REPO / 'bench' / 'import_clock.py'), str(clock_file), *command[1:]],
                             **popen_args)

    def read_clock():
        try:
            wall, cpu = map(float, clock_file.read_text().split())
        except (OSError, ValueError):
            return None
        return wall - launched, cpu

    return child, read_clock


def run_process_peak(command, *, cwd, clock=True):
    """Of one child process: wall seconds, CPU seconds, peak RSS in MB, and the wall and CPU
    seconds beyond its own TensorFlow import (with `clock`, for `python SCRIPT ARGS...`
    commands; else, or for a process that never imports TensorFlow, None, None)."""
    quiet = dict(cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    start = time.perf_counter()
    child, read_clock = launch_clocked(command, **quiet) if clock else (subprocess.Popen(command, **quiet), None)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if status:
        raise RuntimeError(f'{" ".join(map(str, command))} failed (status {status})')
    cpu = usage.ru_utime + usage.ru_stime
    import_end = read_clock and read_clock()
    beyond_own = (None, None) if import_end is None else (wall - import_end[0], cpu - import_end[1])
    return wall, cpu, usage.ru_maxrss / 1024, *beyond_own


def best_process(command, *, cwd, repeats, clock=True):
    """The best wall and CPU times of `repeats` runs, their highest peak RSS (MB), and the
    best wall and CPU times beyond each run's own import. CPU time is the steadier figure on
    a loaded machine (other jobs stretch the wall time)."""
    runs = [run_process_peak(command, cwd=cwd, clock=clock) for _ in range(repeats)]
    best = lambda i: min(r[i] for r in runs) if runs[0][i] is not None else None
    return best(0), best(1), max(r[2] for r in runs), best(3), best(4)


def process_cpu_seconds(pid):
    """User + system CPU seconds of a running process so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def finetune_first_steps(command, *, cwd):
    """Of a run_finetune.py process, stopped after its second step: (seconds from launch to
    the first step's log line, seconds between the first and the second), the same two
    figures in the process's CPU seconds (None where /proc is missing), and the wall and CPU
    seconds its own TensorFlow import had taken by its end."""
    start = time.perf_counter()
    child, read_clock = launch_clocked(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       stdin=subprocess.DEVNULL, text=True)
    seen, cpu, lines = {}, {}, []
    for line in child.stderr:
        lines.append(line)
        for step in (1, 2):
            if line.startswith(f'[{step} |') and step not in seen:
                seen[step] = time.perf_counter() - start
                cpu[step] = process_cpu_seconds(child.pid)
        if 2 in seen:
            break
    child.kill()
    child.wait()
    if 2 not in seen:
        raise RuntimeError('run_finetune.py printed no second step:\n' + ''.join(lines[-20:]))
    cpu_step = None if None in cpu.values() else cpu[2] - cpu[1]
    import_end = read_clock()
    if import_end is None:
        raise RuntimeError('run_finetune.py trained without its import clock written (bench/import_clock.py)')
    return seen[1], seen[2] - seen[1], cpu[1], cpu_step, *import_end


# --- inputs -----------------------------------------------------------------------------

def make_model(path, size, vocab, code):
    if (path / 'hparams.json').exists():
        return
    subprocess.run([sys.executable, '-c', (
        'import sys; sys.path.insert(0, "."); import cli; cli.prepare_tensorflow(); '
        'import model; from model_dir import save_model_dir; '
        f'h = model.RELEASED["gpt2ja-{size}"]; '
        f'save_model_dir({str(path)!r}, model.init_parameters(h), h, vocab_dir={str(vocab)!r})')],
        cwd=code, check=True)


def short_lines(corpus, count=200):
    """`count` short sentences (8 to 40 characters) from the corpus's files, in file order."""
    lines = []
    for path in sorted(Path(corpus).glob('*.txt')):
        for sentence in path.read_text(encoding='utf-8').replace('\n', '。').split('。'):
            sentence = sentence.strip()
            if 8 <= len(sentence) <= 40:
                lines.append(sentence + '。')
                if len(lines) == count:
                    return lines
    return lines


def make_inputs(scratch, corpus, vocab, code):
    (scratch / 'one.txt').write_text(CONTEXT + '\n', encoding='utf-8')
    (scratch / 'lines200.txt').write_text('\n'.join(short_lines(corpus)) + '\n', encoding='utf-8')
    dataset = scratch / 'train.npz'
    if not dataset.exists():
        source = scratch / 'train-text'
        source.mkdir(exist_ok=True)
        for path in sorted(Path(corpus).glob('*.txt'))[:2]:
            (source / path.name).write_text(path.read_text(encoding='utf-8'), encoding='utf-8')
        subprocess.run([sys.executable, '-m', 'encoder', '--src_dir', str(source), '--dst_file', str(dataset),
                        '--vocab', str(vocab), '--quiet'], cwd=code, check=True)
    return dataset


# --- in-process probes (run as child processes of this script) -------------------------------

def prepare_as_the_inference_scripts_do():
    """TensorFlow set up as gpt2-score/-transform/-generate set it up: the graph optimiser off,
    where the code measured has that switch."""
    import inspect

    import cli
    if 'optimise_graphs' in inspect.signature(cli.prepare_tensorflow).parameters:
        return cli.prepare_tensorflow(optimise_graphs=False)
    return cli.prepare_tensorflow()


def probe_steady(model_dir, lines_file):
    """Decode ms a step (batch 1 and 8, slots ~10-60) and scoring tokens/s, batches of 32."""
    prepare_as_the_inference_scripts_do()
    import numpy as np

    import sample
    import scoring
    from model_dir import load_model_dir
    loaded = load_model_dir(model_dir)
    hparams, encoder = loaded.hparams, loaded.load_encoder()
    eot = encoder.eot_id
    result = {}
    for batch in (1, 8):
        sampler = sample.BatchSampler(loaded.load_parameters(), hparams, batch_size=batch,
                                      settings=sample.Settings(top_k=40), eot_id=eot, rng=sample.make_rng(0))
        tokens, slot = sampler.start([[eot] * 8] * batch, np.zeros(batch, bool))
        no_eot = np.zeros(batch, bool)
        times = []
        for _ in range(5):
            started = time.perf_counter()
            for i in range(10):
                tokens = sampler.step(tokens, slot + i, no_eot)
            times.append((time.perf_counter() - started) / 10)
            slot += 10
        result[f'decode_ms_batch{batch}'] = min(times) * 1e3
        del sampler
    runner = scoring.ModelRunner(loaded.load_parameters(), hparams)
    texts = [line for line in Path(lines_file).read_text(encoding='utf-8').splitlines() if line]
    n_tokens = sum(len(encoder.encode(text)) + 1 for text in texts)
    list(scoring.score_texts(runner, encoder, texts[:64], batch_size=32))  # trace
    times = []
    for _ in range(3):
        started = time.perf_counter()
        list(scoring.score_texts(runner, encoder, texts, batch_size=32))
        times.append(time.perf_counter() - started)
    result['score_tokens_per_s'] = n_tokens / min(times)
    print(json.dumps(result))


def probe_optimiser(model_dir, lines_file, rounds=8):
    """The steady state with TensorFlow's graph optimiser on and off, alternated in one
    process: a traced function is optimised, or not, at its first call, under the setting of
    that moment, so both versions of each function can run side by side. Medians of `rounds`
    alternations: scoring tokens/s (32 short lines), decode ms a step (batch 1 and 8)."""
    import cli
    tf = cli.prepare_tensorflow()
    import numpy as np

    import sample
    import scoring
    from model_dir import load_model_dir
    loaded = load_model_dir(model_dir)
    hparams, encoder = loaded.hparams, loaded.load_encoder()
    params = loaded.load_parameters()
    texts = [line for line in Path(lines_file).read_text(encoding='utf-8').splitlines() if line][:32]
    n_tokens = sum(len(encoder.encode(text)) + 1 for text in texts)
    ways = ('on', 'off')
    runners, samplers = {}, {}
    for way in ways:
        tf.config.optimizer.set_experimental_options({'disable_meta_optimizer': way == 'off'})
        runners[way] = scoring.ModelRunner(params, hparams)
        list(scoring.score_texts(runners[way], encoder, texts, batch_size=32))  # traced and optimised now
        for batch in (1, 8):
            sampler = sample.BatchSampler(params, hparams, batch_size=batch, settings=sample.Settings(top_k=40),
                                          eot_id=encoder.eot_id, rng=sample.make_rng(0))
            tokens, slot = sampler.start([[encoder.eot_id] * 8] * batch, np.zeros(batch, bool), new_tokens=5 * rounds)
            samplers[way, batch] = [sampler, tokens, slot]
    times = {}
    for _ in range(rounds):
        for way in ways:
            started = time.perf_counter()
            list(scoring.score_texts(runners[way], encoder, texts, batch_size=32))
            times.setdefault(f'score_tokens_per_s_{way}', []).append(n_tokens / (time.perf_counter() - started))
            for batch in (1, 8):
                sampler, tokens, slot = samplers[way, batch]
                started = time.perf_counter()
                for i in range(5):
                    tokens = sampler.step(tokens, slot + i, np.zeros(batch, bool))
                times.setdefault(f'decode_ms_batch{batch}_{way}', []).append((time.perf_counter() - started) / 5 * 1e3)
                samplers[way, batch][1:] = [tokens, slot + 5]
    print(json.dumps({name: float(np.median(values)) for name, values in times.items()}))


class FakeTerminal:
    """A stream that says it is a terminal and throws its text away."""

    def __init__(self):
        self.written = 0

    def write(self, text):
        self.written += len(text)
        return len(text)

    def flush(self):
        pass

    def isatty(self):
        return True


def probe_overhead(model_dir, code):
    """Per-token seconds of a 400-character sample through gpt2-generate.py's main(), streaming
    to a terminal and with its progress bar, against the same number of bare steps."""
    import importlib.util

    prepare_as_the_inference_scripts_do()
    import numpy as np

    import sample
    spec = importlib.util.spec_from_file_location('gpt2_generate', Path(code) / 'gpt2-generate.py')
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    real_step = sample.BatchSampler.step
    record = {}

    def counted_step(self, tokens, slot, no_eot):
        started = time.perf_counter()
        record.setdefault('first', started)
        record['count'] = record.get('count', 0) + 1
        out = real_step(self, tokens, slot, no_eot)
        record['inside'] = record.get('inside', 0.0) + time.perf_counter() - started
        return out

    sample.BatchSampler.step = counted_step
    from model_dir import load_model_dir
    loaded = load_model_dir(model_dir)
    eot = loaded.hparams.n_vocab - 1
    bare_sampler = sample.BatchSampler(loaded.load_parameters(), loaded.hparams, batch_size=1,
                                       settings=sample.Settings(top_k=40), eot_id=eot, rng=sample.make_rng(1))
    no_eot = np.zeros(1, bool)
    result = {}
    # Alternated, best of two each: other jobs on the machine only add time.
    for _ in range(2):
        for way in ('stream', 'progress'):
            record.clear()
            saved = sys.stdout, sys.stderr
            sys.stdout = FakeTerminal() if way == 'stream' else open(os.devnull, 'w')
            sys.stderr = FakeTerminal() if way == 'progress' else open(os.devnull, 'w')
            try:
                script.main(['--model', str(model_dir), '--num_generate', '1', '--max_length', '400',
                             '--seed', '1', '--context', CONTEXT])
            finally:
                sys.stdout, sys.stderr = saved
            per_token = (time.perf_counter() - record['first']) / record['count']
            result[f'{way}_s_per_token'] = min(result.get(f'{way}_s_per_token', 1e9), per_token)
            # The same run's own steps: the ratio is immune to load that comes and goes.
            ratio = (time.perf_counter() - record['first']) / record['inside']
            result[f'{way}_vs_own_steps'] = min(result.get(f'{way}_vs_own_steps', 1e9), ratio)
            result[f'{way}_tokens'] = record['count']
        count = result['stream_tokens']
        tokens, slot = bare_sampler.start([[eot] * 12], no_eot)
        started = time.perf_counter()
        for i in range(count):
            tokens = real_step(bare_sampler, tokens, slot + i, no_eot)
        result['bare_s_per_token'] = min(result.get('bare_s_per_token', 1e9),
                                         (time.perf_counter() - started) / count)
    sample.BatchSampler.step = real_step
    print(json.dumps(result))


def run_probe(kind, *args, code):
    command = [sys.executable, str(Path(__file__).resolve()), '--probe', kind, *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(code))
    out = subprocess.run(command, cwd=code, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f'probe {kind} failed:\n{out.stderr[-3000:]}')
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the run ------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--size', choices=('small', 'medium'), default='small')
    parser.add_argument('--repeats', type=int, default=3, help='runs of each process; the best counts')
    parser.add_argument('--only', nargs='+', choices=MEASUREMENTS, help='measure only these')
    parser.add_argument('--code', default=str(REPO), help='checkout whose scripts run (default: this one)')
    parser.add_argument('--vocab', default=str(REPO.parent / 'shared' / 'vocab'))
    parser.add_argument('--corpus', default=str(REPO.parent / 'shared' / 'corpus' / 'aozora'))
    parser.add_argument('--probe', nargs='+', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        kind, *rest = args.probe
        return {'steady': probe_steady, 'overhead': probe_overhead, 'optimiser': probe_optimiser}[kind](*rest)

    code = Path(args.code).resolve()
    SCRATCH.mkdir(parents=True, exist_ok=True)
    model_dir = SCRATCH / f'gpt2ja-{args.size}'
    make_model(model_dir, args.size, args.vocab, code)
    dataset = make_inputs(SCRATCH, args.corpus, args.vocab, code)
    checkpoint_mb = sum(p.stat().st_size for p in model_dir.glob('model-*.data-*')) / 2**20
    wanted = set(args.only or MEASUREMENTS)
    py = sys.executable
    print(f'{args.size}-sized model, random weights ({checkpoint_mb:.0f} MiB checkpoint); '
          f'code: {code}; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}; '
          f'best of {args.repeats}', flush=True)

    base, base_cpu, base_peak, _, _ = best_process([py, '-c', 'import tensorflow'], cwd=code,
                                                   repeats=args.repeats, clock=False)
    print(f'import tensorflow: {base:.2f} s (CPU {base_cpu:.2f} s), peak {base_peak:.0f} MiB', flush=True)
    beyond = {}

    def process(name, command, target):
        wall, cpu, peak, own, own_cpu = best_process(command, cwd=code, repeats=args.repeats)
        beyond[name] = (wall - base, peak)
        print(f'{name:11s} {wall:6.2f} s = import + {wall - base:5.2f} s (target <= {target} s); '
              f'CPU import + {cpu - base_cpu:5.2f} s; beyond its own import {own:5.2f} s '
              f'(CPU {own_cpu:5.2f} s); peak {peak:.0f} MiB', flush=True)

    m = ['--model', str(model_dir)]
    if 'score1' in wanted:
        process('score1', [py, 'gpt2-score.py', *m, str(SCRATCH / 'one.txt')], 1.5)
    if 'generate1' in wanted or 'memory' in wanted:
        process('generate1', [py, 'gpt2-generate.py', *m, '--num_generate', '1', '--max_length', '1',
                              '--seed', '1', '--context', CONTEXT], 2.0)
    if 'transform1' in wanted:
        process('transform1', [py, 'gpt2-transform.py', *m, '--context', CONTEXT], 1.5)
    if 'memory' in wanted:
        peak = beyond['generate1'][1]
        limit = (base_peak + checkpoint_mb) * 1.15
        print(f'memory      generation peak {peak:.0f} MiB = import {base_peak:.0f} + '
              f'{(peak - base_peak) / checkpoint_mb:.2f} x checkpoint; '
              f'{peak / (base_peak + checkpoint_mb):.2f}x (import + checkpoint) (target <= 1.15, {limit:.0f} MiB)',
              flush=True)
    if 'finetune' in wanted:
        runs, run_dir = [], SCRATCH / 'runs'
        for attempt in range(args.repeats):
            shutil.rmtree(run_dir, ignore_errors=True)
            runs.append(finetune_first_steps(
                [py, 'run_finetune.py', '--dataset', str(dataset), '--base_model', str(model_dir),
                 '--checkpoint_dir', str(run_dir), '--run_name', f'startup-{os.getpid()}-{attempt}',
                 '--save_every', '0', '--max_steps', '3'], cwd=code))
        # The run whose first step came soonest after its own import and step time is the least disturbed.
        first, step, first_cpu, step_cpu, own, own_cpu = min(runs, key=lambda r: r[0] - r[4] - r[1])
        cpu_text = ('' if first_cpu is None else
                    f'; CPU import + {first_cpu - base_cpu:.2f} s, a step {step_cpu:.2f} s, '
                    f'beyond the import and a step {first_cpu - base_cpu - step_cpu:.2f} s')
        own_cpu_text = '' if first_cpu is None else f' (CPU {first_cpu - own_cpu - step_cpu:.2f} s)'
        print(f'finetune    first step logged {first:.2f} s = import + {first - base:.2f} s; a step '
              f'{step:.2f} s; beyond the import and a step {first - base - step:.2f} s (target <= 4)'
              f'{cpu_text}; beyond its own import ({own:.2f} s) and a step {first - own - step:.2f} s'
              f'{own_cpu_text}', flush=True)
    if 'e2e' in wanted:
        gen_args = ['--num_generate', '3', '--max_length', '100']
        ours, *_ = run_process_peak([py, 'gpt2-generate.py', *m, *gen_args, '--seed', '1'], cwd=code, clock=False)
        original, *_ = run_process_peak([py, str(REPO / 'bench' / 'original_scripts.py'), 'generate', *m,
                                        *gen_args], cwd=code, clock=False)
        print(f'e2e         three 100-character samples: ours {ours:.1f} s, original {original:.1f} s = '
              f'{original / ours:.1f}x (target >= 10)', flush=True)
        lines = str(SCRATCH / 'lines200.txt')
        ours, *_ = run_process_peak([py, 'gpt2-score.py', *m, lines], cwd=code, clock=False)
        original, *_ = run_process_peak([py, str(REPO / 'bench' / 'original_scripts.py'), 'score', *m, lines],
                                       cwd=code, clock=False)
        print(f'e2e         200 short lines scored: ours {ours:.1f} s, original {original:.1f} s = '
              f'{original / ours:.1f}x (target >= 2.5)', flush=True)
    if 'steady' in wanted:
        figures = run_probe('steady', model_dir, SCRATCH / 'lines200.txt', code=code)
        print(f'steady      decode {figures["decode_ms_batch1"]:.1f} ms a token (batch 1), '
              f'{figures["decode_ms_batch8"]:.1f} ms a step (8 rows); scoring '
              f'{figures["score_tokens_per_s"]:.0f} tokens/s (batches of 32 short lines)', flush=True)
    if 'optimiser' in wanted:
        f = run_probe('optimiser', model_dir, SCRATCH / 'lines200.txt', code=code)
        ratio = lambda name: f[f'{name}_off'] / f[f'{name}_on']
        print(f'optimiser   graph optimiser off/on, alternated in one process (medians): scoring '
              f'{f["score_tokens_per_s_off"]:.0f} / {f["score_tokens_per_s_on"]:.0f} tokens/s = '
              f'{ratio("score_tokens_per_s"):.3f}x; decode batch 1 {ratio("decode_ms_batch1"):.3f}x, '
              f'8 rows {ratio("decode_ms_batch8"):.3f}x the time a step', flush=True)
    if 'overhead' in wanted:
        f = run_probe('overhead', model_dir, code, code=code)
        bare = f['bare_s_per_token']
        print(f'overhead    400-character sample, {f["stream_tokens"]} tokens: streamed '
              f'{f["stream_s_per_token"] * 1e3:.1f} ms a token, with the progress bar '
              f'{f["progress_s_per_token"] * 1e3:.1f} ms, bare step {bare * 1e3:.1f} ms = '
              f'{f["stream_s_per_token"] / bare:.2f}x / {f["progress_s_per_token"] / bare:.2f}x (target <= 1.1); '
              f'against the time in its own steps {f["stream_vs_own_steps"]:.3f}x / '
              f'{f["progress_vs_own_steps"]:.3f}x', flush=True)


if __name__ == '__main__':
    main()
