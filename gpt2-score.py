"""Score texts with a gpt2ja model: the log-probability of each line, token by token.

    python gpt2-score.py --model model/gpt2ja-small texts.txt        # text<TAB>total
    python gpt2-score.py --model model/gpt2ja-small --tokens -       # from stdin, per token

Each non-blank line (stripped) is scored as the original gpt2-score.py scored it: the first
token conditioned on <|endoftext|>, the end token scored too unless --exclude-end. Lines
run in padded batches grouped by length; results print in input order as they are ready.
Lines longer than the model's context are scored with a sliding window that moves n_ctx/2
tokens at a time, so every token is conditioned on n_ctx/2 to n_ctx-1 tokens before it.
"""
import json

import cli
import precision
import streams  # no TensorFlow: safe before prepare_tensorflow


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('input_file', help='text file, one text a line (blank lines skipped); - for stdin')
    cli.add_model_flags(parser)
    parser.add_argument('--tokens', action='store_true',
                        help='after each line, print token<TAB>logprob for every token, then an empty line')
    parser.add_argument('--exclude-end', action='store_true', help='do not score the <|endoftext|> after each line')
    parser.add_argument('--ppl', action='store_true', help='add a perplexity column: exp(-total / tokens)')
    parser.add_argument('--format', choices=('text', 'jsonl'), default='text',
                        help='text: the original tab-separated lines; jsonl: one JSON object a line '
                             '(text, total, n_tokens, perplexity, tokens)')
    precision.add_precision_flag(parser, default='float32')
    streams.add_batch_flags(parser, unit='lines')
    cli.add_common_flags(parser)
    args = parser.parse_args(argv)
    streams.check_batch_flags(args)
    return args


def main(argv=None):
    args = parse_args(argv)
    cli.prepare_tensorflow(verbose=args.verbose, gpu=args.gpu, optimise_graphs=False)
    compute_precision = precision.resolve_precision(args.precision)
    import scoring
    from model_dir import load_model_dir

    name = streams.input_name(args.input_file)
    with streams.open_binary(args.input_file) as stream:
        loaded = load_model_dir(args.model, vocab_dir=args.vocab)
        loading = loaded.start_loading(dtype=compute_precision)
        encoder = loaded.load_encoder()
        runner = scoring.ModelRunner(loading.variables, loaded.hparams, precision=compute_precision,
                                     parameters_ready=loading.wait)
        texts = (line.strip() for line in streams.read_lines(stream, name=name, errors=args.errors))
        scored = scoring.score_texts(runner, encoder, (text for text in texts if text),
                                     exclude_end=args.exclude_end,
                                     batch_size=args.batch_size)
        token_text = lambda token: encoder.decode([token])  # as the original printed tokens
        count = 0
        with streams.progress_bar(args.input_file) as progress:
            for result in scored:
                if args.format == 'jsonl':
                    out = json.dumps(scoring.score_record(result, token_text), ensure_ascii=False) + '\n'
                else:
                    out = scoring.format_score(result, token_text, with_tokens=args.tokens,
                                               with_perplexity=args.ppl)
                cli.write_output(out, progress=progress)
                count += 1
                progress.update(1)
    if count == 0:
        raise cli.UsageError(f'{name} has no text to score (every line is blank)')
    return 0


if __name__ == '__main__':
    cli.run_main(main, exit_at_once=True)
