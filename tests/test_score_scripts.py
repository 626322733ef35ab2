"""gpt2-score.py and gpt2-transform.py as a user runs them: the reference numbers in the
original output formats, the new flags, and one-line errors for bad input."""
import json

import numpy as np
import pytest

import cli
from helpers import assert_usage_error, load_script, run_as_script, run_main, run_script


score_script = load_script('gpt2-score.py')
transform_script = load_script('gpt2-transform.py')


@pytest.fixture(scope='module')
def tiny_a_flags(reference_dir, vocab_dir):
    """The flags that run the reference checkpoint."""
    return ['--model', str(reference_dir / 'tiny-a'), '--vocab', str(vocab_dir), '--gpu', '-1']


@pytest.fixture(scope='module')
def tiny_flags(tiny_model_dir):
    """The flags that run the tiny model of the synthetic vocabulary."""
    return ['--model', str(tiny_model_dir), '--gpu', '-1']


def stdout_of(capsys, script, *args):
    """What `script.main(args)` prints on stdout."""
    return run_main(script, capsys, *args).out


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


@pytest.mark.slow
@pytest.mark.parametrize('exclude_end', [False, True])
def test_score_reproduces_the_reference(capsys, tmp_path, tiny_a_flags, reference_expected, exclude_end):
    cases = [c for c in reference_expected['score'] if c['exclude_end'] == exclude_end]
    # Blank lines are skipped and lines stripped, as the original read its input.
    texts = write_lines(tmp_path / 'in.txt', ['', *(f' {c["text"]} ' for c in cases), '   '])
    flags = ['--exclude-end'] if exclude_end else []
    printed = parse_scores(stdout_of(capsys, score_script, *tiny_a_flags, '--tokens', *flags, texts))
    records = [json.loads(line) for line in
               stdout_of(capsys, score_script, *tiny_a_flags, '--format', 'jsonl', *flags, texts).splitlines()]
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


@pytest.mark.slow
def test_score_prints_the_original_lines_and_an_optional_perplexity_column(capsys, tmp_path, tiny_a_flags,
                                                                           reference_expected):
    case = reference_expected['score'][0]
    texts = write_lines(tmp_path / 'in.txt', [case['text']])
    assert stdout_of(capsys, score_script, *tiny_a_flags, texts) == '%s\t%.5g\n' % (case['text'], case['total'])
    text, total, ppl = stdout_of(capsys, score_script, *tiny_a_flags, '--ppl', texts).rstrip('\n').rsplit('\t', 2)
    assert float(ppl) == pytest.approx(np.exp(-case['total'] / len(case['tokens'])), rel=1e-3)


@pytest.mark.slow
def test_transform_reproduces_the_reference(capsys, tiny_a_flags, reference_expected):
    for case in reference_expected['transform']:
        out = stdout_of(capsys, transform_script, *tiny_a_flags, '--context', case['context'])
        assert out.startswith('[') and out.endswith(']\n') and out.count('\n') == 1
        np.testing.assert_allclose(json.loads(out), case['vector'], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_transform_of_many_texts_gives_lines_or_a_matrix(capsys, tmp_path, tiny_flags):
    # One vector a line, or a float32 matrix, in input order: each the vector of --context.
    contexts = ['吾輩は猫である。', '今日は晴れ。', '犬がいる']
    alone = [json.loads(stdout_of(capsys, transform_script, *tiny_flags, '--context', c)) for c in contexts]
    texts = write_lines(tmp_path / 'contexts.txt', contexts * 3)
    lines = stdout_of(capsys, transform_script, *tiny_flags, '--input', texts, '--batch_size', 2).splitlines()
    matrix_path = tmp_path / 'vectors.npy'
    assert stdout_of(capsys, transform_script, *tiny_flags, '--input', texts, '--output', matrix_path) == ''
    matrix = np.load(matrix_path)
    assert matrix.dtype == np.float32 and matrix.shape == (9, len(alone[0]))
    for row, line, vector in zip(matrix, lines, alone * 3):
        np.testing.assert_allclose(row, vector, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(json.loads(line), vector, rtol=1e-4, atol=1e-4)
    # An existing output is user data: kept unless --overwrite.
    with pytest.raises(cli.UsageError, match='--overwrite'):
        transform_script.main([*tiny_flags, '--input', str(texts), '--output', str(matrix_path)])
    mean = tmp_path / 'mean.npy'
    stdout_of(capsys, transform_script, *tiny_flags, '--input', texts, '--output', mean, '--pooling', 'mean')
    assert np.load(mean).shape == matrix.shape and not np.allclose(np.load(mean), matrix)


def test_non_utf8_input_names_the_line_or_is_replaced(capsys, tmp_path, tiny_flags):
    bad = tmp_path / 'bad.txt'
    bad.write_bytes('猫\n\n犬\n'.encode() + b'\xff\xfe bad\n')
    with pytest.raises(cli.UsageError, match=r'line 4 is not UTF-8.*--errors replace'):
        score_script.main([*tiny_flags, str(bad)])
    capsys.readouterr()
    out = stdout_of(capsys, score_script, *tiny_flags, '--errors', 'replace', bad)
    assert [line.split('\t')[0] for line in out.splitlines()] == ['猫', '犬', '\ufffd\ufffd bad']


def test_transform_input_with_a_blank_line_is_an_error(tmp_path, tiny_flags):
    with pytest.raises(cli.UsageError, match='line 2 is empty'):
        transform_script.main([*tiny_flags, '--input', str(write_lines(tmp_path / 'in.txt', ['猫', '', '犬']))])


def test_empty_input_is_an_error(tmp_path, tiny_flags):
    blank = write_lines(tmp_path / 'blank.txt', ['', '  '])
    with pytest.raises(cli.UsageError, match='no text'):
        score_script.main([*tiny_flags, str(blank)])
    empty = write_lines(tmp_path / 'empty.txt', [])
    with pytest.raises(cli.UsageError, match='no text'):
        transform_script.main([*tiny_flags, '--input', str(empty), '--output', str(tmp_path / 'v.npy')])
    assert not (tmp_path / 'v.npy').exists()


@pytest.mark.slow
def test_score_script_from_stdin_with_a_clean_stderr(tiny_model_dir):
    result = run_script('gpt2-score.py', '--model', tiny_model_dir, '--gpu', '-1', '-',
                        stdin='猫\n\n犬がいる\n')
    assert result.returncode == 0, result.stderr
    assert result.stderr == ''
    assert [line.split('\t')[0] for line in result.stdout.splitlines()] == ['猫', '犬がいる']


def test_score_script_errors_are_one_line(tmp_path, tiny_model_dir, capfd):
    lines = write_lines(tmp_path / 'in.txt', ['猫'])
    result = run_as_script(score_script.main, ['--model', tmp_path / 'nowhere', '--gpu', '-1', lines], capfd)
    assert_usage_error(result, 'nowhere', 'does not exist')
    bad = tmp_path / 'bad.txt'
    bad.write_bytes(b'ok\n\x80\n')
    result = run_as_script(score_script.main, ['--model', tiny_model_dir, '--gpu', '-1', bad], capfd)
    assert_usage_error(result, 'line 2')


def test_transform_script_errors_are_one_line(tmp_path, tiny_model_dir, capfd):
    result = run_as_script(transform_script.main, ['--model', tiny_model_dir, '--context', ''], capfd)
    assert_usage_error(result, '--context is empty')
    result = run_as_script(transform_script.main, ['--model', tiny_model_dir, '--gpu', '-1',
                                                   '--input', tmp_path / 'missing.txt'], capfd)
    assert_usage_error(result, 'missing.txt')
