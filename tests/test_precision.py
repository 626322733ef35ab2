"""--precision: what auto chooses and says, and bfloat16 staying close to float32 where a user
looks: scores of the reference cases, and the loss of a fine-tune."""
import io
import json

import numpy as np
import pytest

import cli
import precision
import scoring
from finetune.optimizers import make_optimizer
from finetune.trainer import STEP_VARIABLE, Trainer
from model import HParams, init_parameters, parameter_shapes
from model_dir import load_model_dir


# -- choosing ----------------------------------------------------------------------------

@pytest.mark.parametrize('gpus, flags, expected', [
    ([], {'avx2', 'avx512f', 'avx512_bf16'}, 'bfloat16'),
    ([], {'avx2', 'amx_bf16', 'amx_tile'}, 'bfloat16'),
    ([], {'avx2', 'avx512f'}, 'float32'),
    ([], set(), 'float32'),
    ([(8, 0)], set(), 'bfloat16'),
    ([(9, 0), (8, 6)], {'avx2'}, 'bfloat16'),
    ([(7, 5)], {'avx512_bf16'}, 'float32'),  # the model runs on the GPU, not the CPU
    ([(8, 0), (7, 0)], set(), 'float32'),    # every GPU must have it
])
def test_auto_decides_by_the_hardware_and_says_why_in_one_line(gpus, flags, expected):
    stderr = io.StringIO()
    assert precision.resolve_precision('auto', gpus=gpus, flags=flags, stream=stderr) == expected
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'precision: {expected} (--precision auto: ')


def test_an_explicit_precision_is_kept_silently():
    stderr = io.StringIO()
    for name in ('float32', 'bfloat16'):
        assert precision.resolve_precision(name, gpus=[], flags=set(), stream=stderr) == name
    assert precision.resolve_precision('float16', gpus=[(7, 0)], flags=set(), stream=stderr) == 'float16'
    assert stderr.getvalue() == ''


def test_float16_without_a_gpu_is_a_usage_error():
    with pytest.raises(cli.UsageError, match='float16 needs a GPU'):
        precision.resolve_precision('float16', gpus=[], flags={'avx512_bf16'})


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text('processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n')
    assert precision.cpu_flags(cpuinfo) == {'fpu', 'avx2', 'avx512_bf16'}
    assert precision.cpu_flags(tmp_path / 'absent') == set()


# -- scores ------------------------------------------------------------------------------

# bfloat16 keeps 8 significant bits (relative rounding 2^-9, about 0.2 %); layer-norm
# statistics, softmax and the log-softmax stay float32, so the error of a total is a few
# roundings of the activations, not their sum over tokens. The bounds leave a few times the
# error measured on the reference cases (report/score.md).
TOTAL_RELATIVE_ERROR = 1e-2
VECTOR_RELATIVE_ERROR = 3e-2


@pytest.fixture(scope='module')
def reference_runs(reference_dir, vocab_dir):
    expected = json.loads((reference_dir / 'tiny-a-expected.json').read_text(encoding='utf-8'))
    loaded = load_model_dir(reference_dir / 'tiny-a', vocab_dir=vocab_dir)
    params = loaded.load_parameters()
    runners = {name: scoring.ModelRunner(params, loaded.hparams, precision=name)
               for name in ('float32', 'bfloat16')}
    return expected, loaded.load_encoder(), runners


def test_bfloat16_scores_stay_close_to_float32(reference_runs):
    expected, encoder, runners = reference_runs
    for case in expected['score']:
        totals = {}
        for name, runner in runners.items():
            scored, = scoring.score_texts(runner, encoder, [case['text']], exclude_end=case['exclude_end'])
            assert scored.tokens == case['tokens']
            totals[name] = scored.total
        assert totals['float32'] == pytest.approx(case['total'], rel=1e-4)
        assert totals['bfloat16'] == pytest.approx(totals['float32'], rel=TOTAL_RELATIVE_ERROR)


def test_bfloat16_vectors_stay_close_to_float32(reference_runs):
    expected, encoder, runners = reference_runs
    for case in expected['transform']:
        vectors = {name: next(scoring.transform_texts(runner, encoder, [case['context']]))
                   for name, runner in runners.items()}
        assert vectors['bfloat16'].dtype == np.float32
        error = np.linalg.norm(vectors['bfloat16'] - vectors['float32']) / np.linalg.norm(vectors['float32'])
        assert error < VECTOR_RELATIVE_ERROR


# -- fine-tuning -------------------------------------------------------------------------

PROSE_SEQUENCES = 1024
STEPS = 200
# Trained on the same batches from the same weights, the two runs drift apart only by
# rounding. Compared: the mean loss over the last 40 steps of 200 (less than one pass over
# the prose, so the model learns rather than memorises, where small differences grow), with
# about twice the gap measured (report/finetune.md) as the bound, against a fall of over
# 1 nat from the start.
LOSS_RELATIVE_GAP = 0.02


def prose_sequences(shared_dir, vocab_dir, *, n_ctx):
    """Token sequences of the shared prose, renumbered to the ids that occur (a small vocabulary
    keeps the model tiny and the test fast), and that vocabulary's size."""
    from encoder import get_encoder
    encoder = get_encoder(vocab_dir)
    ids = np.concatenate([encoder.encode(path.read_text(encoding='utf-8'))
                          for path in sorted((shared_dir / 'corpus' / 'aozora').glob('*.txt'))])
    _, compact = np.unique(ids, return_inverse=True)
    usable = min(len(compact) // n_ctx, PROSE_SEQUENCES) * n_ctx
    return compact[:usable].reshape(-1, n_ctx).astype(np.int32), int(compact.max()) + 1


def fine_tune_losses(hparams, sequences, precision_name):
    optimizer = make_optimizer('adam')
    params = init_parameters(hparams, seed=5)
    initial = {name: (lambda value=value: value) for name, value in params.items()}
    initial.update(optimizer.initial_state(parameter_shapes(hparams)))
    initial[STEP_VARIABLE] = lambda: np.int64(0)
    trainer = Trainer(hparams=hparams, optimizer=optimizer, initial=initial, precision=precision_name)
    order = np.random.default_rng(0)
    weights = np.ones((1, 4, hparams.n_ctx - 1), np.float32)
    losses = []
    for _ in range(STEPS):
        batch = sequences[order.choice(len(sequences), 4, replace=False)]
        loss, applied = trainer.train_step(batch[None], weights, learning_rate=3e-3)
        assert applied
        losses.append(loss)
    return np.array(losses)


@pytest.mark.slow
def test_a_bfloat16_fine_tune_tracks_float32(shared_dir, vocab_dir):
    sequences, n_vocab = prose_sequences(shared_dir, vocab_dir, n_ctx=64)
    hparams = HParams(n_vocab=n_vocab, n_ctx=64, n_embd=64, n_head=4, n_layer=2)
    f32 = fine_tune_losses(hparams, sequences, 'float32')
    bf16 = fine_tune_losses(hparams, sequences, 'bfloat16')
    start, end = f32[:10].mean(), f32[-40:].mean()
    assert end < start - 1.0, 'the float32 run did not learn; the comparison would say nothing'
    assert abs(bf16[-40:].mean() - end) / end < LOSS_RELATIVE_GAP
    assert abs(bf16[:10].mean() - start) / start < LOSS_RELATIVE_GAP
