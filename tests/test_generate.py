"""Sampling and gpt2-generate.py: the cached step, the sampling distribution, stopping, output."""
import json

import numpy as np
import pytest
import tensorflow as tf

import sample
from conftest import SMALL_VOCAB, TINY
from helpers import assert_usage_error, load_script, run_as_script, run_main, run_script
from model import CompiledBlocks, KVCache, decoding_parameters, forward, forward_cached, init_parameters
from model_dir import save_model_dir

EOT = SMALL_VOCAB.n_vocab - 1  # of the SMALL_VOCAB models here; TINY's is TINY.n_vocab - 1


@pytest.fixture(scope='module')
def generate_script():
    return load_script('gpt2-generate.py')


# --- the cached step -------------------------------------------------------------------

def test_cached_step_gives_the_logits_of_recomputing_at_every_position():
    params = init_parameters(SMALL_VOCAB, seed=3)
    tokens = np.random.default_rng(0).integers(0, SMALL_VOCAB.n_vocab, size=(2, 20))
    full = forward(params, tokens, hparams=SMALL_VOCAB)['logits'].numpy()
    for weights in (params, decoding_parameters(params)):  # wte as stored, and transposed
        cache = KVCache(SMALL_VOCAB, batch_size=2)
        logits = forward_cached(weights, tokens[:, :6], hparams=SMALL_VOCAB, cache=cache, start=0)
        np.testing.assert_allclose(logits.numpy(), full[:, 5], rtol=1e-4, atol=1e-5)
        for position in range(6, 20):
            logits = forward_cached(weights, tokens[:, position:position + 1], hparams=SMALL_VOCAB,
                                    cache=cache, start=position)
            np.testing.assert_allclose(logits.numpy(), full[:, position], rtol=1e-4, atol=1e-5)


def test_a_cache_grown_between_steps_keeps_its_slots_and_gives_the_logits_of_recomputing():
    params = init_parameters(SMALL_VOCAB, seed=3)
    tokens = np.random.default_rng(0).integers(0, SMALL_VOCAB.n_vocab, size=(2, 20))
    full = forward(params, tokens, hparams=SMALL_VOCAB)['logits'].numpy()
    cache = KVCache(SMALL_VOCAB, batch_size=2, slots=6)
    forward_cached(params, tokens[:, :6], hparams=SMALL_VOCAB, cache=cache, start=0)
    capacities = [cache.capacity]
    for position in range(6, 20):
        cache.reserve(position + 1)
        capacities.append(cache.capacity)
        logits = forward_cached(params, tokens[:, position:position + 1], hparams=SMALL_VOCAB,
                                cache=cache, start=position)
        np.testing.assert_allclose(logits.numpy(), full[:, position], rtol=1e-4, atol=1e-5)
    # It doubles when full, and never passes the window.
    assert sorted(set(capacities)) == [6, 12, 24]
    cache.reserve(SMALL_VOCAB.n_ctx)
    assert cache.capacity == SMALL_VOCAB.n_ctx == cache.layers[0].numpy().shape[3]
    with pytest.raises(ValueError):
        cache.reserve(SMALL_VOCAB.n_ctx + 1)


def greedy_by_recomputing(params, context, count):
    """`count` greedy tokens after `context`, each from the whole text run again (no cache),
    end-of-text excluded."""
    text = list(context)
    for _ in range(count):
        logits = forward(params, [text], hparams=SMALL_VOCAB)['logits'].numpy()[0, -1]
        logits[EOT] = -np.inf
        text.append(int(np.argmax(logits)))
    return text[len(context):]


@pytest.mark.parametrize('xla', [False, pytest.param(True, marks=pytest.mark.slow)])
def test_greedy_sampling_as_the_cache_grows_equals_recomputing_and_traces_the_step_once(xla):
    params = init_parameters(SMALL_VOCAB, seed=10)
    params['model/wte'] = params['model/wte'] * 12  # clear winners: no near-ties to flip
    settings = sample.Settings(top_k=1, min_length=SMALL_VOCAB.n_ctx)  # no end-of-text
    sampler = sample.BatchSampler(params, SMALL_VOCAB, batch_size=2, settings=settings, eot_id=EOT,
                                  rng=sample.make_rng(0), xla=xla)
    # Rows of 3 and 7 tokens (the first left-padded) until the window is full: the cache
    # starts with room for the contexts and grows twice.
    contexts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    results = sample.sample_batch(sampler, contexts, max_tokens=None)
    for context, (tokens, reason) in zip(contexts, results):
        assert reason == sample.WINDOW
        assert tokens == greedy_by_recomputing(params, context, SMALL_VOCAB.n_ctx - 7 + 1)
    assert sampler.cache.capacity == SMALL_VOCAB.n_ctx
    # The same sampler's next round (as for a refeed) reads none of the first round's slots.
    contexts = [[11, 12], [13]]
    results = sample.sample_batch(sampler, contexts, max_tokens=5)
    assert [tokens for tokens, _ in results] == [greedy_by_recomputing(params, c, 5) for c in contexts]
    traced = {sampler._advance, sampler._step}
    assert [function.experimental_get_tracing_count() for function in traced] == [1] * len(traced)


def test_a_short_sample_keeps_a_small_cache():
    params = init_parameters(TINY, seed=11)
    sampler = sample.BatchSampler(params, TINY, batch_size=1, settings=sample.Settings(), eot_id=TINY.n_vocab - 1,
                                  rng=sample.make_rng(0))
    sample.sample_batch(sampler, [[1, 2, 3]], max_tokens=2)
    assert sampler.cache.capacity < TINY.n_ctx / 4
    assert sampler.cache.layers[0].numpy().shape == (2, 1, TINY.n_head, sampler.cache.capacity, TINY.head_size)


def test_left_padded_rows_give_the_logits_of_their_own_context():
    params = init_parameters(SMALL_VOCAB, seed=4)
    short, long = [5, 6, 7], [1, 2, 3, 4, 5, 6]
    cache = KVCache(SMALL_VOCAB, batch_size=2)
    out = forward_cached(params, [[0, 0, 0] + short, long], hparams=SMALL_VOCAB, cache=cache,
                         start=0, first_slot=tf.constant([3, 0]))
    step = forward_cached(params, [[9], [9]], hparams=SMALL_VOCAB, cache=cache, start=6,
                          first_slot=tf.constant([3, 0]))
    for row, context in enumerate([short, long]):
        alone = forward(params, [context + [9]], hparams=SMALL_VOCAB)['logits'].numpy()[0]
        np.testing.assert_allclose(out.numpy()[row], alone[-2], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(step.numpy()[row], alone[-1], rtol=1e-4, atol=1e-5)


def test_the_xla_compiled_blocks_give_the_plain_step_logits():
    params = init_parameters(SMALL_VOCAB, seed=5)
    tokens = np.random.default_rng(1).integers(0, SMALL_VOCAB.n_vocab, size=(2, 20))
    first_slot = tf.constant([2, 0])
    compiled = CompiledBlocks()
    caches = {way: KVCache(SMALL_VOCAB, batch_size=2) for way in ('plain', 'compiled')}
    for cache in caches.values():
        forward_cached(params, tokens[:, :6], hparams=SMALL_VOCAB, cache=cache, start=0, first_slot=first_slot)
    for position in range(6, 20):
        logits = {way: forward_cached(params, tokens[:, position:position + 1], hparams=SMALL_VOCAB,
                                      cache=cache, start=position, first_slot=first_slot,
                                      **({'blocks': compiled} if way == 'compiled' else {})).numpy()
                  for way, cache in caches.items()}
        np.testing.assert_allclose(logits['compiled'], logits['plain'], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(caches['compiled'].layers[1].numpy(), caches['plain'].layers[1].numpy(),
                               rtol=1e-4, atol=1e-5)


# --- the sampling distribution ---------------------------------------------------------

def truncated_softmax(logits, *, top_k, top_p, temperature):
    """The distribution the sampler must draw from, computed independently in numpy."""
    z = np.asarray(logits, np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-z, kind='stable')
    if top_p > 0:
        mass_above = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])
        kept = order[mass_above < top_p]
    elif top_k > 0:
        kept = order[:top_k]
    else:
        kept = order
    out = np.zeros_like(probs)
    out[kept] = probs[kept]
    return out / out.sum()


@pytest.mark.parametrize('top_k, top_p, temperature', [
    (3, 0.9, 1.5),  # top_p, top_k and temperature together; the other cases are slow
    *(pytest.param(*case, marks=pytest.mark.slow)
      for case in [(0, 0.0, 1.0), (5, 0.0, 1.0), (10, 0.0, 0.7), (40, 0.6, 1.0)])])
def test_first_tokens_follow_the_truncated_renormalised_softmax(top_k, top_p, temperature):
    params = init_parameters(SMALL_VOCAB, seed=6)
    # Sharpen the output so that truncation matters (random init is nearly uniform).
    params['model/wte'] = params['model/wte'] * 12
    context = [3, 1, 4, 1, 5]
    draws = 6000
    logits = forward(params, [context], hparams=SMALL_VOCAB)['logits'].numpy()[0, -1]
    expected = truncated_softmax(logits, top_k=top_k, top_p=top_p, temperature=temperature)
    settings = sample.Settings(top_k=top_k, top_p=top_p, temperature=temperature)
    sampler = sample.BatchSampler(params, SMALL_VOCAB, batch_size=draws, settings=settings,
                                  eot_id=EOT, rng=sample.make_rng(1234))
    first, _ = sampler.start([context] * draws, np.zeros(draws, bool))
    counts = np.bincount(first, minlength=SMALL_VOCAB.n_vocab)
    assert counts[expected == 0].sum() == 0, 'a token outside the truncation was drawn'
    kept = expected > 0
    chi2 = (((counts[kept] - draws * expected[kept]) ** 2) / (draws * expected[kept])).sum()
    dof = max(kept.sum() - 1, 1)
    assert chi2 < dof + 6 * np.sqrt(2 * dof), (chi2, dof)


def test_filters_keep_ties_and_top_p_keeps_at_least_one_token():
    logits = tf.constant([[1.0, 3.0, 3.0, 0.5, 2.0]])
    assert np.isfinite(sample.top_k_filter(logits, 2).numpy()).tolist() == [[False, True, True, False, False]]
    assert np.isfinite(sample.top_p_filter(logits, 1e-6).numpy()).sum() >= 1


# --- stopping --------------------------------------------------------------------------

def eot_loving_parameters():
    """A model whose every prediction is end-of-text, by far."""
    params = init_parameters(SMALL_VOCAB, seed=7)
    direction = np.random.default_rng(0).normal(size=SMALL_VOCAB.n_embd).astype(np.float32)
    params['model/ln_f/g'] = np.zeros_like(params['model/ln_f/g'])
    params['model/ln_f/b'] = direction
    params['model/wte'][EOT] = direction * 10
    return params


@pytest.mark.slow
def test_min_length_forbids_end_of_text_in_the_first_tokens():
    params = eot_loving_parameters()
    assert sample.generate(params, SMALL_VOCAB, [1, 2], max_tokens=20, eot_id=EOT, top_k=1) == [[]]
    out = sample.generate(params, SMALL_VOCAB, [1, 2], max_tokens=20, eot_id=EOT, top_k=1,
                          min_length=5, batch_size=2, seed=0)
    assert [len(tokens) for tokens in out] == [5, 5]
    assert all(EOT not in tokens for tokens in out)


@pytest.mark.slow
def test_generation_stops_at_max_tokens_and_is_reproducible_with_a_seed():
    params = init_parameters(SMALL_VOCAB, seed=8)
    kwargs = dict(max_tokens=7, eot_id=EOT, batch_size=3, top_k=0, min_length=7)
    a = sample.generate(params, SMALL_VOCAB, [1, 2, 3], seed=5, **kwargs)
    b = sample.generate(params, SMALL_VOCAB, [1, 2, 3], seed=5, **kwargs)
    c = sample.generate(params, SMALL_VOCAB, [1, 2, 3], seed=6, **kwargs)
    assert a == b != c
    assert [len(tokens) for tokens in a] == [7, 7, 7]


def test_settings_outside_their_ranges_are_rejected():
    for bad in (dict(top_k=-1), dict(top_p=1.5), dict(top_p=-0.1), dict(temperature=0), dict(min_length=-1)):
        with pytest.raises(ValueError):
            sample.Settings(**bad)
    with pytest.raises(ValueError):
        sample.Settings(min_length=SMALL_VOCAB.n_ctx + 1).check_window(SMALL_VOCAB)


# --- gpt2-generate.py ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('xla', ['--no-xla', '--xla'])
def test_greedy_generation_of_tiny_a_reproduces_the_reference(generate_script, capsys,
                                                              reference_dir, vocab_dir, xla):
    expected = json.loads((reference_dir / 'tiny-a-expected.json').read_text(encoding='utf-8'))
    for case in expected['greedy']:
        out = run_main(generate_script, capsys, '--model', reference_dir / 'tiny-a', '--vocab', vocab_dir,
                       '--context', case['context'], '--top_k', 1, '--num_generate', 1,
                       '--max_length', 100, '--format', 'jsonl', xla)
        record = json.loads(out.out)
        assert record['tokens'][:len(case['continuation'])] == case['continuation'], case['context']
        assert record['context'] == case['context']


@pytest.mark.slow
def test_text_output_is_samples_separated_by_lines_of_equals(generate_script, capsys, tiny_model_dir):
    out = run_main(generate_script, capsys, '--model', tiny_model_dir, '--num_generate', 3,
                   '--max_length', 12, '--seed', 1, '--context', '吾輩は猫である。')
    samples = out.out.split('========\n')
    assert len(samples) == 3 and all(s.endswith('\n') for s in samples)
    assert all(0 < len(s) - 1 <= 12 and '<|endoftext|>' not in s for s in samples)
    again = run_main(generate_script, capsys, '--model', tiny_model_dir, '--num_generate', 3,
                     '--max_length', 12, '--seed', 1, '--context', '吾輩は猫である。', '--batch_size', 2)
    assert again.out != '' and len(again.out.split('========\n')) == 3


def test_samples_stop_at_max_length_with_at_most_one_token_to_spare(generate_script, capsys,
                                                                    tiny_model_dir, synthetic_encoder):
    encoder = synthetic_encoder
    out = run_main(generate_script, capsys, '--model', tiny_model_dir, '--num_generate', 4,
                   '--max_length', 15, '--seed', 2, '--format', 'jsonl')
    for record in map(json.loads, out.out.splitlines()):
        assert record['stop_reason'] in ('max_length', 'end_of_text')
        if record['stop_reason'] == 'max_length':
            assert len(record['text']) == 15
            assert len(encoder.decode(record['tokens'][:-1])) < 15
        assert record['text'] == encoder.decode(record['tokens'])[:15]


@pytest.mark.slow
def test_text_longer_than_the_window_goes_on_from_the_recent_text(generate_script, capsys, tmp_path,
                                                                  synthetic_vocab_dir):
    # A tiny model that never predicts end-of-text, so that only --max_length ends the sample.
    params = init_parameters(TINY, seed=1)
    direction = np.random.default_rng(0).normal(size=TINY.n_embd).astype(np.float32)
    params['model/ln_f/b'] = direction
    params['model/wte'][TINY.n_vocab - 1] = -10 * direction  # <|endoftext|>
    save_model_dir(tmp_path, params, TINY, vocab_dir=synthetic_vocab_dir)
    out = run_main(generate_script, capsys, '--model', tmp_path, '--num_generate', 1,
                   '--max_length', 1000, '--min_length', TINY.n_ctx, '--seed', 3, '--format', 'jsonl')
    record = json.loads(out.out)
    assert len(record['tokens']) > TINY.n_ctx
    assert len(record['text']) == 1000 and record['stop_reason'] == 'max_length'


@pytest.mark.slow
def test_output_file_has_the_stdout_format_and_replaces_the_file_whole(generate_script, capsys,
                                                                        tiny_model_dir, tmp_path):
    target = tmp_path / 'out.txt'
    target.write_text('old contents\n', encoding='utf-8')
    args = ['--model', tiny_model_dir, '--num_generate', 2, '--max_length', 10, '--seed', 4]
    printed = run_main(generate_script, capsys, *args).out
    assert run_main(generate_script, capsys, *args, '--output_file', target).out == ''
    assert target.read_text(encoding='utf-8') == printed
    assert [p.name for p in tmp_path.iterdir()] == ['out.txt']


@pytest.mark.slow
def test_one_sample_streams_to_a_terminal(generate_script, capsys, tiny_model_dir, monkeypatch):
    import sys
    pieces = []
    monkeypatch.setattr(sys.stdout, 'isatty', lambda: True)
    monkeypatch.setattr(sys.stdout, 'write', lambda text: pieces.append(text) or len(text))
    assert generate_script.main(['--model', str(tiny_model_dir), '--num_generate', '1',
                                 '--max_length', '20', '--seed', '5']) == 0
    assert len(pieces) > 3 and pieces[-1] == '\n'
    assert 0 < len(''.join(pieces)) - 1 <= 20


@pytest.mark.parametrize('args, fragment', [
    (['--top_k', '-1'], '--top_k'), (['--top_p', '1.5'], '--top_p'),
    (['--temperature', '0'], '--temperature'), (['--output_file', '/no/such/dir/out.txt'], '--output_file')])
def test_bad_sampling_flags_are_one_line_errors(args, fragment):
    # Checked before TensorFlow loads, so these subprocesses are quick.
    assert_usage_error(run_script('gpt2-generate.py', '--model', 'nowhere', *args), fragment)


def test_min_length_beyond_the_window_is_a_one_line_error(generate_script, tiny_model_dir, capfd):
    result = run_as_script(generate_script.main, ['--model', tiny_model_dir, '--min_length', TINY.n_ctx + 1],
                           capfd)
    assert_usage_error(result, 'min_length', str(TINY.n_ctx))


@pytest.mark.slow
def test_an_over_long_context_keeps_its_end_says_so_and_stderr_is_otherwise_clean(generate_script,
                                                                                  tiny_model_dir, capfd):
    result = run_as_script(generate_script.main, ['--model', tiny_model_dir, '--num_generate', 1,
                                                  '--max_length', 5, '--seed', 1,
                                                  '--context', '吾輩は猫である。' * 20], capfd)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'keeping its last 32' in lines[0], result.stderr
    assert 0 < len(result.stdout.strip()) <= 5


@pytest.mark.slow
def test_the_xla_step_samples_what_the_plain_step_does():
    params = init_parameters(SMALL_VOCAB, seed=9)
    kwargs = dict(max_tokens=SMALL_VOCAB.n_ctx, eot_id=EOT, batch_size=2, top_k=1, min_length=30)
    plain = sample.generate(params, SMALL_VOCAB, [1, 2, 3], xla=False, **kwargs)
    assert sample.generate(params, SMALL_VOCAB, [1, 2, 3], xla=True, **kwargs) == plain
    assert [len(tokens) for tokens in plain] == [SMALL_VOCAB.n_ctx - 2] * 2  # the window fills
