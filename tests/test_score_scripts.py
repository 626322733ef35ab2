"""gpt2-score.py and gpt2-transform.py as a user runs them: the reference numbers in the
original output formats, the new flags, and one-line errors for bad input."""
import json

import numpy as np
import pytest

import cli
from helpers import assert_usage_error, load_script, run_script


score_script = load_script('gpt2-score.py')
transform_script = load_script('gpt2-transform.py')


@pytest.fixture(scope='module')
def expected(reference_dir):
    return json.loads((reference_dir / 'tiny-a-expected.json').read_text(encoding='utf-8'))


@pytest.fixture(scope='module')
def tiny_a(reference_dir, vocab_dir):
    return ['--model', str(reference_dir / 'tiny-a'), '--vocab', str(vocab_dir), '--gpu', '-1']


def run_main(capsys, script, *args):
    assert script.main([*map(str, args)]) == 0
    return capsys.readouterr().out


def write_lines(path, lines):
    path.write_text(''.join(line + '\n' for line in lines), encoding='utf-8')
    return path


def parse_scores(out):
    """Text output with --tokens -> [(text, total, [(token, logprob), ...])]."""
    results = []
    for block in out.split('\n\n')[:-1]:
        head, *tokens = block.split('\n')
        text, total = head.rsplit('\t', 1)  # texts may hold tabs; numbers never do
        pairs = [token.rsplit('\t', 1) for token in tokens]
        results.append((text, float(total), [(token, float(logprob)) for token, logprob in pairs]))
    return results


@pytest.mark.parametrize('exclude_end', [False, True])
def test_score_reproduces_the_reference(capsys, tmp_path, tiny_a, expected, exclude_end):
    cases = [c for c in expected['score'] if c['exclude_end'] == exclude_end]
    # Blank lines are skipped and lines stripped, as the original read its input.
    texts = write_lines(tmp_path / 'in.txt', ['', *(f' {c["text"]} ' for c in cases), '   '])
    flags = ['--exclude-end'] if exclude_end else []
    printed = parse_scores(run_main(capsys, score_script, *tiny_a, '--tokens', *flags, texts))
    records = [json.loads(line) for line in
               run_main(capsys, score_script, *tiny_a, '--format', 'jsonl', *flags, texts).splitlines()]
    assert len(printed) == len(records) == len(cases)
    for case, (text, total, tokens), record in zip(cases, printed, records):
        assert text == record['text'] == case['text'].strip()
        assert total == pytest.approx(case['total'], rel=1e-4)
        assert [t for t, _ in tokens] == case['token_text']
        np.testing.assert_allclose([lp for _, lp in tokens], case['logprobs'], rtol=1e-4, atol=1e-3)
        # Full precision in JSON lines: the reference to 1e-4 relative.
        assert [t['id'] for t in record['tokens']] == case['tokens']
        np.testing.assert_allclose([t['logprob'] for t in record['tokens']], case['logprobs'], rtol=1e-4)
        assert record['total'] == pytest.approx(case['total'], rel=1e-4)
        assert record['n_tokens'] == len(case['tokens'])
        assert record['perplexity'] == pytest.approx(np.exp(-case['total'] / len(case['tokens'])), rel=1e-3)


def test_score_prints_the_original_lines_and_an_optional_perplexity_column(capsys, tmp_path, tiny_a, expected):
    case = expected['score'][0]
    texts = write_lines(tmp_path / 'in.txt', [case['text']])
    assert run_main(capsys, score_script, *tiny_a, texts) == '%s\t%.5g\n' % (case['text'], case['total'])
    text, total, ppl = run_main(capsys, score_script, *tiny_a, '--ppl', texts).rstrip('\n').rsplit('\t', 2)
    assert float(ppl) == pytest.approx(np.exp(-case['total'] / len(case['tokens'])), rel=1e-3)


def test_transform_reproduces_the_reference(capsys, tmp_path, tiny_a, expected):
    for case in expected['transform']:
        out = run_main(capsys, transform_script, *tiny_a, '--context', case['context'])
        assert out.startswith('[') and out.endswith(']\n') and out.count('\n') == 1
        np.testing.assert_allclose(json.loads(out), case['vector'], rtol=1e-4, atol=1e-4)
    # Many texts in one run: one vector a line, or a float32 matrix, in input order.
    contexts = write_lines(tmp_path / 'contexts.txt', [c['context'] for c in expected['transform']] * 3)
    lines = run_main(capsys, transform_script, *tiny_a, '--input', contexts, '--batch_size', 2).splitlines()
    matrix_path = tmp_path / 'vectors.npy'
    assert run_main(capsys, transform_script, *tiny_a, '--input', contexts, '--output', matrix_path) == ''
    matrix = np.load(matrix_path)
    assert matrix.dtype == np.float32 and matrix.shape == (9, len(expected['transform'][0]['vector']))
    for row, line, case in zip(matrix, lines, expected['transform'] * 3):
        np.testing.assert_allclose(row, case['vector'], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(json.loads(line), case['vector'], rtol=1e-4, atol=1e-4)
    # An existing output is user data: kept unless --overwrite.
    with pytest.raises(cli.UsageError, match='--overwrite'):
        transform_script.main([*tiny_a, '--input', str(contexts), '--output', str(matrix_path)])
    mean = tmp_path / 'mean.npy'
    run_main(capsys, transform_script, *tiny_a, '--input', contexts, '--output', mean, '--pooling', 'mean')
    assert np.load(mean).shape == matrix.shape and not np.allclose(np.load(mean), matrix)


def test_non_utf8_input_names_the_line_or_is_replaced(capsys, tmp_path, tiny_a):
    bad = tmp_path / 'bad.txt'
    bad.write_bytes('猫\n\n犬\n'.encode() + b'\xff\xfe bad\n')
    with pytest.raises(cli.UsageError, match=r'line 4 is not UTF-8.*--errors replace'):
        score_script.main([*tiny_a, str(bad)])
    capsys.readouterr()
    out = run_main(capsys, score_script, *tiny_a, '--errors', 'replace', bad)
    assert [line.split('\t')[0] for line in out.splitlines()] == ['猫', '犬', '\ufffd\ufffd bad']


def test_transform_input_with_a_blank_line_is_an_error(tmp_path, tiny_a):
    with pytest.raises(cli.UsageError, match='line 2 is empty'):
        transform_script.main([*tiny_a, '--input', str(write_lines(tmp_path / 'in.txt', ['猫', '', '犬']))])


def test_empty_input_is_an_error(tmp_path, tiny_a):
    blank = write_lines(tmp_path / 'blank.txt', ['', '  '])
    with pytest.raises(cli.UsageError, match='no text'):
        score_script.main([*tiny_a, str(blank)])
    empty = write_lines(tmp_path / 'empty.txt', [])
    with pytest.raises(cli.UsageError, match='no text'):
        transform_script.main([*tiny_a, '--input', str(empty), '--output', str(tmp_path / 'v.npy')])
    assert not (tmp_path / 'v.npy').exists()


def test_score_script_from_stdin_with_a_clean_stderr(tiny_model_dir):
    result = run_script('gpt2-score.py', '--model', tiny_model_dir, '--gpu', '-1', '-',
                        stdin='猫\n\n犬がいる\n')
    assert result.returncode == 0, result.stderr
    assert result.stderr == ''
    assert [line.split('\t')[0] for line in result.stdout.splitlines()] == ['猫', '犬がいる']


def test_score_script_errors_are_one_line(tmp_path, tiny_model_dir):
    assert_usage_error(run_script('gpt2-score.py', '--model', tmp_path / 'nowhere', '--gpu', '-1', '-', stdin='猫\n'),
                       'nowhere', 'does not exist')
    bad = tmp_path / 'bad.txt'
    bad.write_bytes(b'ok\n\x80\n')
    assert_usage_error(run_script('gpt2-score.py', '--model', tiny_model_dir, '--gpu', '-1', bad), 'line 2')


def test_transform_script_errors_are_one_line(tmp_path, tiny_model_dir):
    assert_usage_error(run_script('gpt2-transform.py', '--model', tiny_model_dir, '--context', ''),
                       '--context is empty')
    assert_usage_error(run_script('gpt2-transform.py', '--model', tiny_model_dir, '--gpu', '-1',
                                  '--input', tmp_path / 'missing.txt'), 'missing.txt')
