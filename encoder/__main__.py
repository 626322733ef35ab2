"""Encode a folder of .txt files into an .npz of token ids (or decode one back).

    python -m encoder --src_dir corpus/ --dst_file corpus.npz [--num_process 2] [--model gpt2ja-small]
    python -m encoder --decode corpus.npz | less

See encoder/corpus.py for the chunking and the file format.
"""
import os
import sys

from cli import ArgumentParser, UsageError, run_main
from encoder.bpe import get_encoder
from encoder.corpus import decode_npz, encode_folder, npz_path, summary_line, timed
from encoder.vocab import find_model_vocab_dir, find_vocab_dir


def parse_args(argv):
    parser = ArgumentParser(
        prog='python -m encoder',
        description='Encode every .txt file under a folder (recursively, UTF-8, sorted by '
                    'path) into an .npz of token ids for fine-tuning, as the original '
                    'encode_bpe.py did: each file followed by <|endoftext|>, files gathered '
                    'into chunks until a chunk holds at least --combine characters, each '
                    'chunk one uint16 array arr_0, arr_1, ... in file order. The result does '
                    'not depend on --num_process.')
    io = parser.add_argument_group('encode a folder')
    io.add_argument('--src_dir', help='folder whose .txt files (recursively) are encoded')
    io.add_argument('--dst_file', help='the .npz to write (".npz" is appended if absent); '
                                       'replaced only once complete')
    io.add_argument('--combine', type=int, default=50000,
                    help='close a chunk once it holds at least this many characters')
    io.add_argument('--clean_text', action='store_true',
                    help='replace URLs, e-mail addresses, phone numbers, dates and prices '
                         'by tags, and full-width ASCII by half-width')
    io.add_argument('--num_process', type=int, default=os.cpu_count() or 1,
                    help='processes encoding chunks in parallel')
    io.add_argument('--on_bad_file', choices=['stop', 'skip'], default='stop',
                    help='what to do with a file that is not UTF-8: stop before writing '
                         'anything, or skip it with a warning')
    parser.add_argument('--decode', metavar='FILE.npz',
                        help='instead, print the text of the arrays of FILE.npz, in order')
    vocab = parser.add_argument_group(
        'vocabulary', 'Neither given: $GPT2JA_VOCAB_DIR, the encoder/ folder, then the fetched '
                      'copy in $GPT2JA_HOME/vocab (fetched on first use unless $GPT2JA_OFFLINE)')
    source = vocab.add_mutually_exclusive_group()
    source.add_argument('--vocab', metavar='DIR', help='folder holding ja-bpe.txt and emoji.json')
    source.add_argument('--model', metavar='MODEL',
                        help='use the vocabulary of this model: a model directory, or a released '
                             'name (gpt2ja-small, gpt2ja-medium), whose vocabulary is fetched '
                             'without the model')
    parser.add_argument('--quiet', action='store_true', help='no progress bar or summary')
    args = parser.parse_args(argv)
    if args.decode is None and not (args.src_dir and args.dst_file):
        raise UsageError('--src_dir and --dst_file are required (or --decode FILE.npz)')
    if args.combine < 1:
        raise UsageError('--combine must be at least 1')
    if args.num_process < 1:
        raise UsageError('--num_process must be at least 1')
    return args


def main(argv=None):
    args = parse_args(argv)
    vocab_dir = find_model_vocab_dir(args.model) if args.model else find_vocab_dir(args.vocab)
    if args.decode is not None:
        decode_npz(args.decode, get_encoder(vocab_dir), sys.stdout)
        return 0
    totals, seconds = timed(encode_folder, args.src_dir, args.dst_file, vocab_dir=vocab_dir,
                            combine=args.combine, clean=args.clean_text,
                            num_process=args.num_process, on_bad_file=args.on_bad_file,
                            progress=not args.quiet)
    if not args.quiet:
        print(summary_line(totals, seconds, npz_path(args.dst_file)), file=sys.stderr)
    return 0


if __name__ == '__main__':
    run_main(main, prog='python -m encoder')
