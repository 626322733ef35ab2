"""Turn texts into vectors with a gpt2ja model: the final layer-normalised hidden state.

    python gpt2-transform.py --model model/gpt2ja-small --context "猫"       # one vector
    python gpt2-transform.py --model model/gpt2ja-small --input texts.txt --output v.npy

A vector prints as the original gpt2-transform.py printed it, a Python list of floats; with
--input, one text a line, one vector a line (or one row of the --output .npy matrix) in
input order, run in batches. Texts longer than the model's context use their last n_ctx tokens.
"""
import contextlib

import cli
# None imports TensorFlow: safe before prepare_tensorflow.
import files
import precision
import streams


def parse_args(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split('\n\n')[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--context', help='the text to vectorise')
    source.add_argument('--input', help='text file, one text a line (no blank lines); - for stdin')
    cli.add_model_flags(parser)
    parser.add_argument('--pooling', choices=('last', 'mean'), default='last',
                        help="last: the hidden state at the last token (the original's vector); "
                             'mean: the mean over all tokens')
    parser.add_argument('--output', default=None,
                        help='write the vectors as a float32 .npy matrix (rows in input order) '
                             'instead of printing them')
    parser.add_argument('--overwrite', action='store_true', help='let --output replace an existing file')
    precision.add_precision_flag(parser, default='float32')
    streams.add_batch_flags(parser, unit='texts')
    cli.add_common_flags(parser)
    args = parser.parse_args(argv)
    if args.context is not None and not args.context:
        raise cli.UsageError('--context is empty; give the text to vectorise')
    if args.context is not None:
        cli.check_text_argument('--context', args.context)
    streams.check_batch_flags(args)
    return args


def numbered_texts(lines, name):
    """The texts of `lines`, each non-empty (a blank line would shift every row after it)."""
    for number, line in enumerate(lines, 1):
        if not line:
            raise cli.UsageError(f'{name}: line {number} is empty; every line must hold a text '
                                 f'(vectors are one per line)')
        yield line


def main(argv=None):
    args = parse_args(argv)
    cli.prepare_tensorflow(verbose=args.verbose, gpu=args.gpu, optimise_graphs=False)
    compute_precision = precision.resolve_precision(args.precision)
    import scoring
    from model_dir import load_model_dir

    if args.output is not None:
        cli.check_output_file('--output', args.output, keep_existing=not args.overwrite)
    name = '--context' if args.input is None else streams.input_name(args.input)
    with contextlib.nullcontext() if args.input is None else streams.open_binary(args.input) as stream:
        loaded = load_model_dir(args.model, vocab_dir=args.vocab)
        loading = loaded.start_loading(dtype=compute_precision)
        runner = scoring.ModelRunner(loading.variables, loaded.hparams, precision=compute_precision,
                                     parameters_ready=loading.wait)
        if args.input is None:
            texts = [args.context]
        else:
            texts = numbered_texts(streams.read_lines(stream, name=name, errors=args.errors), name)
        vectors = scoring.transform_texts(runner, loaded.load_encoder(), texts, pooling=args.pooling,
                                          batch_size=args.batch_size)
        with streams.progress_bar(args.input) as progress:
            count = write_vectors(_counted(vectors, progress), args.output, progress=progress)
    if count == 0:
        raise cli.UsageError(f'{name} holds no text to vectorise')
    return 0


def _counted(items, progress):
    for item in items:
        yield item
        progress.update(1)


def write_vectors(vectors, output, *, progress=None):
    """Print each vector as a line (through the `progress` bar, on a terminal), or save them
    all as one .npy matrix; returns how many."""
    import scoring
    if output is not None:
        try:
            return files.save_npy_rows(output, vectors)
        except OSError as exc:
            raise cli.UsageError(f'cannot write --output {output}: {exc.strerror or exc}; '
                                 f'nothing was written there') from None
    count = 0
    for vector in vectors:
        cli.write_output(scoring.format_vector(vector) + '\n', progress=progress)
        count += 1
    return count


if __name__ == '__main__':
    cli.run_main(main, exit_at_once=True)
