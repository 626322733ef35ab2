"""Benchmark of the encoder: plain vs fast characters per second on one core, and the
.npz encoding of a corpus folder with 1 vs 2 processes. Prints a Markdown table (the
figures of report/encoder.md).

    python3 bench/bench_encoder.py [--vocab ../shared/vocab] [--corpus ../shared/corpus]
                                   [--copies 300] [--repeat 3]

The plain encoder is tests/plain_encoder.py, the one the tests check the fast one against.
Targets: fast/plain >= 5 on both texts; 2 processes / 1 process >= 1.6.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / 'tests')]

from encoder import get_encoder  # noqa: E402
from plain_encoder import PlainEncoder  # noqa: E402

SHARED = REPO.parent / 'shared'
CHUNK = 50000  # characters, as `python -m encoder` encodes them by default


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--vocab', default=SHARED / 'vocab', type=Path,
                        help='folder holding ja-bpe.txt and emoji.json')
    parser.add_argument('--corpus', default=SHARED / 'corpus', type=Path,
                        help='folder holding aozora/*.txt and mixed-sns.txt')
    parser.add_argument('--copies', default=300, type=int,
                        help='copies of the aozora files in the folder encoded to .npz')
    parser.add_argument('--repeat', default=3, type=int,
                        help='timings per figure; the best is kept')
    return parser.parse_args()


def best_seconds(function, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def chars_per_second(encoder, chunks, clean, repeat):
    seconds = best_seconds(lambda: [encoder.encode(c, clean=clean) for c in chunks], repeat)
    return sum(map(len, chunks)) / seconds


def encoder_rows(args, texts):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    fast, plain = get_encoder(args.vocab), PlainEncoder(args.vocab)
    rows = []
    for name, text in texts.items():
        chunks = [text[i:i + CHUNK] for i in range(0, len(text), CHUNK)]
        for clean in (False, True):
            assert [fast.encode(c, clean) for c in chunks] == [plain.encode(c, clean) for c in chunks]
            plain_cps = chars_per_second(plain, chunks, clean, args.repeat)
            fast_cps = chars_per_second(fast, chunks, clean, args.repeat)
            rows.append((f'{name}, clean={clean}', len(text), plain_cps, fast_cps))
    os.sched_setaffinity(0, range(os.cpu_count()))
    return rows


def npz_seconds(args, src, processes, dst):
    command = [sys.executable, '-m', 'encoder', '--src_dir', str(src), '--dst_file', str(dst),
               '--vocab', str(args.vocab), '--num_process', str(processes), '--quiet']
    return best_seconds(lambda: subprocess.run(command, cwd=REPO, check=True), args.repeat)


def npz_rows(args):
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / 'src'
        for copy in range(args.copies):
            shutil.copytree(args.corpus / 'aozora', src / f'{copy:04d}')
        characters = sum(len(p.read_text(encoding='utf-8')) for p in src.rglob('*.txt'))
        one = npz_seconds(args, src, 1, Path(tmp) / 'one.npz')
        two = npz_seconds(args, src, 2, Path(tmp) / 'two.npz')
        same = (Path(tmp) / 'one.npz').read_bytes() == (Path(tmp) / 'two.npz').read_bytes()
    return characters, one, two, same


def main():
    args = parse_args()
    texts = {'aozora prose': ''.join(p.read_text(encoding='utf-8')
                                     for p in sorted((args.corpus / 'aozora').glob('*.txt'))),
             'mixed-sns': (args.corpus / 'mixed-sns.txt').read_text(encoding='utf-8')}
    print('| text | characters | plain chars/s | fast chars/s | fast / plain |')
    print('|---|---:|---:|---:|---:|')
    for name, length, plain_cps, fast_cps in encoder_rows(args, texts):
        print(f'| {name} | {length:,} | {plain_cps:,.0f} | {fast_cps:,.0f} | '
              f'{fast_cps / plain_cps:.1f}x |')
    characters, one, two, same = npz_rows(args)
    print()
    print('| .npz of a folder | characters | 1 process | 2 processes | 1 / 2 | identical |')
    print('|---|---:|---:|---:|---:|---|')
    print(f'| aozora x {args.copies} | {characters:,} | {one:.1f} s | {two:.1f} s | '
          f'{one / two:.2f}x | {same} |')


if __name__ == '__main__':
    main()
