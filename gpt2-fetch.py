"""Fetch released gpt2ja models (and the vocabulary) into the cache, without running them.

    python gpt2-fetch.py gpt2ja-small [gpt2ja-medium] [vocab] [--dest DIR]

For offline machines and images: fetch here, then copy the directory (or set $GPT2JA_HOME
to it) there. Prints each model directory on stdout; the fetching itself is fetch.py's.
"""
import dataclasses
import sys
from pathlib import Path

import cli
import fetch

VOCAB_NAME = 'vocab'


def build_parser():
    parser = cli.ArgumentParser(
        description='Fetch released gpt2ja models and their vocabulary into the cache '
                    '($GPT2JA_HOME, default ~/.cache/gpt2ja) without running anything, and '
                    'print where each one is. What is there already is not fetched again. '
                    'Sources: the original gpt2-japanese project (www.nama.ne.jp, then '
                    'ailab.nama.ne.jp; the vocabulary from github.com/tanreinama/gpt2-japanese), '
                    'or $GPT2JA_MIRROR.')
    parser.add_argument('names', metavar='NAME', nargs='+',
                        help=f'{", ".join(fetch.RELEASED_MODELS)}, "{VOCAB_NAME}" (the vocabulary '
                             f'alone) or a model archive (.tar.bz2) to unpack')
    parser.add_argument('--dest', metavar='DIR', type=Path, default=None,
                        help='the cache to fill instead of $GPT2JA_HOME: models go to DIR/NAME, '
                             'the vocabulary to DIR/vocab; later runs find them with '
                             'GPT2JA_HOME=DIR (or --model DIR/NAME)')
    cli.add_common_flags(parser, gpu=False)
    return parser


def check_names(names):
    for name in names:
        if name != VOCAB_NAME and not fetch.is_released(name) and not Path(name).is_file():
            raise cli.UsageError(f'{name} is neither a released model '
                                 f'({", ".join(fetch.RELEASED_MODELS)}), "{VOCAB_NAME}", nor an '
                                 f'archive file')


def verify_with_loader(verbose):
    """The model loader's checks, with TensorFlow started only when something needs them."""
    def verify(directory):
        cli.prepare_tensorflow(verbose=verbose, gpu='-1')
        from model_dir import check_loads
        check_loads(directory)
    return verify


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_names(args.names)
    settings = fetch.Settings.from_env()
    if args.dest is not None:
        settings = dataclasses.replace(settings, home=args.dest.expanduser())
    verify = verify_with_loader(args.verbose)
    for name in args.names:
        if name == VOCAB_NAME:
            found = fetch.fetch_vocab(settings)
        elif fetch.is_released(name):  # into the cache, even where a directory NAME is here
            found = fetch.fetch_model(name, verify=verify, settings=settings)
        else:
            found = fetch.unpack_local_archive(name, verify=verify, settings=settings)
        print(found)
        sys.stdout.flush()
    return 0


if __name__ == '__main__':
    cli.run_main(main)
