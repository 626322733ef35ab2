"""Generate Japanese text with a gpt2ja model: the original gpt2-generate.py's flags and output.

    python gpt2-generate.py --model model/gpt2ja-small --context "吾輩は猫である。" --num_generate 3

Samples go to stdout (or --output_file), separated by a line `========`; each is the
continuation only, cut at the first <|endoftext|> and at --max_length characters.
The sampling itself lives in sample.py.
"""
import json
import sys

import cli
import files  # no TensorFlow: safe before prepare_tensorflow
import precision

SEPARATOR = '========'
DEFAULT_CONTEXT = '<|endoftext|>'


def build_parser():
    parser = cli.ArgumentParser(description=__doc__.split('\n\n')[0])
    source = parser.add_argument_group('model and context')
    cli.add_model_flags(source)
    source.add_argument('--context', default=DEFAULT_CONTEXT,
                        help='text to continue; <|endoftext|> (or empty) generates from nothing. '
                             'A context longer than half the window keeps its end (noted on stderr)')
    sampling = parser.add_argument_group('sampling')
    sampling.add_argument('--top_k', type=int, default=40,
                          help='sample from the k most likely tokens only; 0 = no limit')
    sampling.add_argument('--top_p', type=float, default=0,
                          help='sample from the smallest set of tokens holding this much probability '
                               '(0 < p <= 1; takes precedence over --top_k); 0 = off')
    sampling.add_argument('--temperature', type=float, default=1,
                          help='divide the logits by this (> 0); lower is more predictable')
    sampling.add_argument('--min_length', type=int, default=0,
                          help='no <|endoftext|> in the first N generated tokens (at most the window)')
    sampling.add_argument('--seed', type=int, default=None,
                          help='random seed: the same seed and flags give the same samples')
    output = parser.add_argument_group('output')
    output.add_argument('--num_generate', type=int, default=5, help='how many samples')
    output.add_argument('--max_length', type=int, default=500,
                        help='the most characters a sample has; past one window, generation goes '
                             'on with the last 256 characters of the sample as context, as the '
                             'original does')
    output.add_argument('--output_file', default='',
                        help='write the samples here (replaced when complete) instead of stdout')
    output.add_argument('--format', choices=('text', 'jsonl'), default='text',
                        help='text: samples separated by "========" lines, as the original; '
                             'jsonl: one JSON object a sample (context, text, tokens, stop_reason)')
    output.add_argument('--batch_size', type=int, default=8,
                        help='how many samples are generated together (memory grows with it)')
    output.add_argument('--xla', action=cli.argparse.BooleanOptionalAction, default=False,
                        help='compile the model with XLA: a token of a single sample comes faster, '
                             'after a compile pause at start-up. Figures: report/generate.md')
    precision.add_precision_flag(output, default='float32')
    cli.add_common_flags(parser)
    return parser


def check_args(args):
    """Reject what can be rejected before TensorFlow loads (one line each). The sampling
    settings are checked where they are made (sample.Settings)."""
    for name in ('num_generate', 'max_length', 'batch_size'):
        if getattr(args, name) < 1:
            raise cli.UsageError(f'--{name} must be at least 1, not {getattr(args, name)}')
    cli.check_text_argument('--context', args.context)
    if args.output_file:
        cli.check_output_file('--output_file', args.output_file)


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    cli.prepare_tensorflow(verbose=args.verbose, gpu=args.gpu, optimise_graphs=False)
    compute_precision = precision.resolve_precision(args.precision)
    import sample
    from model_dir import load_model_dir

    try:
        settings = sample.Settings(top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                                   min_length=args.min_length)
    except ValueError as exc:
        raise cli.UsageError(f'--{exc}') from None
    loaded = load_model_dir(args.model, vocab_dir=args.vocab)
    try:
        settings.check_window(loaded.hparams)
    except ValueError as exc:
        raise cli.UsageError(f'--{exc}') from None
    loading = sample.start_loading_decoding_parameters(loaded, precision=compute_precision)
    encoder = loaded.load_encoder()
    context_tokens = encoder.encode(args.context or DEFAULT_CONTEXT)
    kept, dropped = sample.fit_context(context_tokens, loaded.hparams)
    if dropped:
        print(f'note: the context is {len(context_tokens)} tokens; keeping its last {len(kept)} '
              f'(half the {loaded.hparams.n_ctx}-token window)', file=sys.stderr)

    streaming = (args.num_generate == 1 and args.format == 'text' and not args.output_file
                 and sys.stdout.isatty())
    shown = StreamedText() if streaming else None
    # Progress in characters on a terminal's stderr, unless the text itself streams there.
    with CharacterProgress(args.num_generate, args.max_length,
                           show=sys.stderr.isatty() and not streaming) as progress:
        on_text = progress.update if progress.shown else None
        if streaming:
            on_text = shown.update
        samples = sample.generate_texts(
            loading.variables, loaded.hparams, encoder, kept,
            num_samples=args.num_generate, max_length=args.max_length, settings=settings,
            batch_size=args.batch_size, seed=args.seed, xla=args.xla, precision=compute_precision,
            on_text=on_text, on_done=progress.finish_sample, parameters_ready=loading.wait)
    if streaming:
        shown.finish()
        return 0
    text = format_samples(samples, args.format, context=args.context)
    if args.output_file:
        try:
            files.write_text_atomic(args.output_file, text)
        except OSError as exc:
            raise cli.UsageError(f'cannot write --output_file {args.output_file}: {exc}') from None
    else:
        sys.stdout.write(text)
    return 0


def format_samples(samples, form, *, context):
    """The whole output: the original's text layout, or one JSON object a line."""
    if form == 'jsonl':
        return ''.join(json.dumps({'context': context, 'text': s.text, 'tokens': s.tokens,
                                   'stop_reason': s.stop_reason}, ensure_ascii=False) + '\n'
                       for s in samples)
    return f'{SEPARATOR}\n'.join(s.text + '\n' for s in samples)


class CharacterProgress:
    """A tqdm bar on stderr counting the characters generated against num_samples x
    max_length; a sample that ends early counts as complete. Costs one call a token."""

    def __init__(self, num_samples, max_length, *, show):
        from tqdm import tqdm
        self.shown = show
        self.bar = tqdm(total=num_samples * max_length, unit='char', file=sys.stderr, disable=not show,
                        leave=False, dynamic_ncols=True, mininterval=0.25)
        self.max_length = max_length
        self.counted = {}  # sample index -> characters counted so far

    def update(self, index, text):
        self._count_to(index, len(text))

    def finish_sample(self, sample):
        self._count_to(sample.index, self.max_length)

    def _count_to(self, index, characters):
        grown = characters - self.counted.get(index, 0)
        if grown > 0:
            self.counted[index] = characters
            self.bar.update(grown)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


class StreamedText:
    """Prints a growing text to stdout as it arrives (only what is new each time)."""

    def __init__(self):
        self.printed = ''

    def update(self, _index, text):
        if text.startswith(self.printed):  # a partly decoded character may still change
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text

    def finish(self):
        sys.stdout.write('\n')
        sys.stdout.flush()


if __name__ == '__main__':
    cli.run_main(main, exit_at_once=True)
