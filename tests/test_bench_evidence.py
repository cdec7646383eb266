"""The evidence benchmark end to end at a tiny size, the runner checked
against a plain optax loop, and the protocol's rules."""

import dataclasses
import itertools
import json
import math
import re
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from benchmarks import cli, evidence, protocol, report, runner, tasks
from benchmarks import optimizers as opt

TINY = tasks.FashionConfig(
  widths=(8,),
  batch_size=16,
  epochs=1,
  validation_size=200,
  train_limit=256,
  test_limit=200,
  eval_batch=100,
)


def _or_skip(build, config):
  try:
    return build(config)
  except RuntimeError as error:  # no cache and no registry
    pytest.skip(f'data unavailable: {error}')


@pytest.fixture(scope='module')
def tiny():
  return _or_skip(tasks.fashion_mnist, TINY)


def test_schedule_warmup_then_cosine_to_zero():
  peak, horizon = 0.1, 100  # warmup: 5 updates
  lr = [float(runner.schedule(t, peak, horizon)) for t in range(horizon + 1)]
  np.testing.assert_allclose(lr[:5], [0.02, 0.04, 0.06, 0.08, 0.1], rtol=1e-6)
  assert lr[5] == pytest.approx(peak)
  assert all(a >= b for a, b in itertools.pairwise(lr[5:]))  # decreasing
  assert lr[-1] == pytest.approx(0.0, abs=1e-9)
  mid = 5 + (horizon - 5) / 2  # half-way through the cosine: half the peak
  assert float(runner.schedule(mid, peak, horizon)) == pytest.approx(peak / 2)
  assert float(runner.schedule(0, peak, 10)) == pytest.approx(peak)  # w = 1


def test_batch_orders_are_prefixes_and_differ_by_seed(tiny):
  long, short = tiny.indices(3, 40), tiny.indices(3, 7)
  np.testing.assert_array_equal(long[:7], short)
  assert not np.array_equal(tiny.indices(4, 7), short)
  per_epoch = tiny.info['steps_per_epoch']
  epoch = long[:per_epoch].ravel()
  assert len(set(epoch.tolist())) == len(epoch)  # no image twice per epoch


def test_shakespeare_task_is_tied_and_preconditioned():
  config = tasks.ShakespeareConfig(
    layers=1,
    d_model=16,
    heads=2,
    seq_len=16,
    steps=3,
    validation_windows=8,
    test_windows=8,
  )
  task = _or_skip(tasks.shakespeare, config)
  np.testing.assert_array_equal(task.indices(5, 30)[:9], task.indices(5, 9))
  assert task.info['sha256']['text'] == (
    '53425af8ba67c56d492c76125fa5eddb485b0d925f3ce1d2230edbb0add50861'
  )
  x, y = task.splits['test']
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
  params, _ = task.init(jax.random.key(0))
  assert 'head' not in params  # the output projection is the token table
  # The runner turns an unpreconditioned parameter (AdaFisher's warning)
  # into an error: the tied table is preconditioned.
  (result,) = runner.train(task, protocol.LIKE_ADAM, [runner.Run(1e-2, 0, 3)])
  assert result['curve'][-1]['loss'] < result['curve'][0]['loss']


def test_autoencoder_loss_is_summed_over_pixels():
  config = tasks.AutoencoderConfig(
    widths=(8, 4), validation_size=100, train_limit=64, test_limit=50
  )
  task = _or_skip(tasks.autoencoder, config)
  params, state = task.init(jax.random.key(0))
  x, _ = task.splits['test']
  logits = task.model.apply({'params': params}, x)
  expected = optax.sigmoid_binary_cross_entropy(logits, x.reshape(50, -1))
  _, total = task.scores(params, state, x, np.zeros(50, np.int32))
  np.testing.assert_allclose(total, expected.sum(), rtol=1e-5)
  loss, _ = task.loss(params, state, x, np.zeros(50, np.int32))
  np.testing.assert_allclose(loss, expected.sum() / 50, rtol=1e-5)
  assert x.min() >= 0.0 and x.max() <= 1.0


def _plain_run(task, arm, lr, seed, steps):
  """The same run as the runner's, written as an ordinary optax loop."""
  params, state = task.init(jax.random.key(seed))
  tx = opt.make(arm, lambda c: runner.schedule(c, lr, steps))
  opt_state = tx.init(params)
  grad = jax.jit(jax.value_and_grad(task.loss, has_aux=True))
  table = task.indices(seed, steps)
  for t in range(steps):
    x, y = task.gather(task.data, table[t])
    (_, state), grads = grad(params, state, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return runner.Evaluator(task)(params, state, 'validation')


def test_runner_matches_a_plain_loop_and_runs_are_independent(tiny):
  steps = tiny.steps
  runs = [runner.Run(3e-3, 0, steps), runner.Run(3e-3, 0, steps - 5)]
  results = runner.train(tiny, opt.ADAM, runs, curve_points=3, test=True)
  assert [r['steps'] for r in results] == [steps, steps - 5]
  for run, result in zip(runs, results):
    plain = _plain_run(tiny, opt.ADAM, 3e-3, 0, run.steps)
    assert result['validation']['loss'] == pytest.approx(
      plain['loss'], rel=1e-4
    )
  assert results[1]['curve'][-1]['step'] == steps - 5
  assert all(r['test'] is not None for r in results)
  alone = runner.train(tiny, opt.ADAM, runs[1:], curve_points=3)
  assert alone[0]['fingerprint'] == results[1]['fingerprint']  # same bits


def test_decayed_sgd_and_adafisher_controls_train(tiny):
  sgd = protocol.SGDM
  low, high = runner.train(
    tiny,
    sgd,
    [runner.Run(0.05, 0, tiny.steps, wd) for wd in (0.0, 0.5)],
    curve_points=2,
  )
  assert low['fingerprint'] != high['fingerprint']  # the decay is applied
  arm = opt.permuted(protocol.LIKE_ADAM)
  results = runner.train(
    tiny, arm, [runner.Run(1e-2, s, tiny.steps) for s in (0, 1)], curve_points=2
  )
  assert all(math.isfinite(r['validation']['loss']) for r in results)


def test_step_times_are_interleaved_ratios_with_intervals(tiny):
  timing = runner.step_times(
    tiny, [opt.ADAM, protocol.DEFAULT], rounds=3, steps_per_round=2
  )
  assert timing['ratio']['adam'] == pytest.approx(1.0)
  low, high = timing['ratio_ci']['adafisher']
  assert 0 < low <= timing['ratio']['adafisher'] <= high
  assert len(timing['seconds_per_step']['adafisher']) == 3
  assert timing['refresh_periods']['adafisher'] == 100


def test_time_plans():
  assert evidence._time_ratio_plan(1.01, [0.99, 1.03]) == 'same'
  assert evidence._time_ratio_plan(1.30, [1.20, 1.40]) == 'separate'
  assert evidence._time_ratio_plan(0.80, [0.70, 0.90]) == 'separate'
  assert evidence._time_ratio_plan(1.04, [0.98, 1.10]) == 'inconclusive'


def _task_entry(scores, higher=True, margin=0.01):
  arms = {name: {'grid': {'score': score}} for name, score in scores.items()}
  return {'arms': arms, 'margin': margin, 'higher_is_better': higher}


def test_recommendation_rule_over_tasks():
  a, b, c = (cand.name for cand in protocol.CANDIDATES)
  tasks_ = {
    'cnn': _task_entry({'adam': 0.90, a: 0.89, b: 0.90, c: 0.85}),
    'gpt': _task_entry({'adam': 2.00, a: 2.00, b: 2.05, c: 1.90}, False),
  }
  rec = report.recommend(tasks_)
  # deficits: a: (1 + 0) / 2 = 0.5; b: (0 + 5) / 2 = 2.5; c: (5 - 10) / 2
  assert rec['means'][a] == pytest.approx(0.5)
  assert rec['means'][b] == pytest.approx(2.5)
  assert rec['means'][c] == pytest.approx(-2.5)
  assert rec['name'] == c and rec['tasks'] == ['cnn', 'gpt']
  tasks_['cnn']['arms'][c]['grid']['score'] = math.nan  # did not train
  assert report.recommend(tasks_)['name'] == a


def test_smoke_tier_end_to_end(tmp_path):
  _or_skip(tasks.fashion_mnist, TINY)
  evidence.main(['--tier', 'smoke', '--out-dir', str(tmp_path)])
  task = json.loads((tmp_path / 'mlp.json').read_text())
  assert task['command'].startswith('python -m benchmarks.evidence')
  assert task['eval_seeds'] == [100, 101]
  arms = task['arms']
  best = task['best_candidate']
  assert set(arms) == {'adam', 'sgdm', best, f'{best}+perm'}
  sgd = arms['sgdm']['grid']
  assert sgd['decays_tried'] == pytest.approx([5e-5, 5e-4, 5e-3])
  assert arms['sgdm']['chosen_decay'] in sgd['decays_tried']
  for entry in arms.values():
    assert entry['chosen'] in {
      r['learning_rate'] for r in entry['grid']['runs']
    }
    assert [r['seed'] for r in entry['eval']] == [100, 101]
    assert entry['equal_time']['plan'] in ('same', 'separate', 'inconclusive')
  assert task['replication']['identical'] is True
  assert task['timing']['ratio']['adam'] == pytest.approx(1.0)
  rows = task['analysis']['views']['equal_steps']['comparisons']
  assert {(r['arm'], r['versus']) for r in rows} >= {(best, 'adam')}
  assert all(r['verdict'] for r in rows)
  study = json.loads((tmp_path / 'batch_size.json').read_text())
  assert set(study['batch_sizes']) == {'32'}
  text = (tmp_path / 'report.md').read_text()
  for phrase in ('Protocol', 'recommended drop-in', 'Equal time', 'Batch size'):
    assert phrase in text
  for plot in ('mlp_curves', 'mlp_differences', 'mlp_lr_sensitivity'):
    assert (tmp_path / f'{plot}.png').stat().st_size > 0
  assert (tmp_path / 'batch_size.png').stat().st_size > 0
  # --resume: every arm's tuning and evaluation come back from the JSON
  evidence.main(['--tier', 'smoke', '--out-dir', str(tmp_path), '--resume'])
  again = json.loads((tmp_path / 'mlp.json').read_text())
  assert sorted(again['resumed_tuning']) == sorted(arms)
  assert again['arms']['adam']['eval'] == arms['adam']['eval']


def test_resume_refuses_a_json_of_other_code(monkeypatch):
  sources = {'aaa': 'library 1', 'bbb': 'library 1', 'ccc': 'library 2'}
  monkeypatch.setattr(cli, 'source_id', lambda c: sources[c])
  path = Path('cnn.json')
  for now, before in [('aaa', 'aaa'), ('aaa+dirty', 'aaa+dirty')]:
    monkeypatch.setattr(cli, 'git_commit', lambda now=now: now)
    evidence._check_same_code(path, before)  # the same checkout
  monkeypatch.setattr(cli, 'git_commit', lambda: 'bbb')
  sources['HEAD'] = sources['bbb']
  evidence._check_same_code(path, 'aaa')  # a later commit, same code
  evidence._check_same_code(path, None)  # a JSON from before the field
  for before in ('ccc', 'aaa+dirty'):
    with pytest.raises(
      SystemExit, match=f'commit {re.escape(before)}.*worktree'
    ):
      evidence._check_same_code(path, before)


def test_gpu_tier_logic_at_a_tiny_size(tmp_path):
  from benchmarks import gpu_tier

  _or_skip(
    tasks.cnn,
    dataclasses.replace(protocol.PROTOCOL['gpu-tiny'].tasks['cnn'].config),
  )
  gpu_tier.main(['--tiny', '--out-dir', str(tmp_path)])
  task = json.loads((tmp_path / 'cnn.json').read_text())
  assert set(task['arms']) == {'adam', 'sgdm'}
  assert task['machine']['jax_backend'] == jax.default_backend()
  rows = task['analysis']['views']['equal_steps']['comparisons']
  assert {(r['arm'], r['versus']) for r in rows} >= {('sgdm', 'adam')}
  assert (tmp_path / 'report.md').exists()
