"""The evidence benchmark end to end at a tiny size, and the runner checked
against a plain optax loop."""

import itertools
import json
import math

import jax
import numpy as np
import optax
import pytest

from benchmarks import evidence, runner, tasks
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


@pytest.fixture(scope='module')
def tiny():
  try:
    return tasks.fashion_mnist(TINY)
  except RuntimeError as error:  # no cache and no registry
    pytest.skip(f'Fashion-MNIST unavailable: {error}')


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


def test_shakespeare_batch_orders_are_prefixes():
  try:
    task = tasks.shakespeare(tasks.ShakespeareConfig(steps=4))
  except RuntimeError as error:
    pytest.skip(f'Shakespeare unavailable: {error}')
  np.testing.assert_array_equal(task.indices(5, 30)[:9], task.indices(5, 9))
  assert task.info['sha256']['text'] == (
    '53425af8ba67c56d492c76125fa5eddb485b0d925f3ce1d2230edbb0add50861'
  )
  x, y = task.splits['test']
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


def _plain_adam_run(task, lr, seed, steps):
  """The same run as the runner's, written as an ordinary optax loop."""
  params, state = task.init(jax.random.key(seed))
  tx = optax.adam(lambda c: runner.schedule(c, lr, steps))
  opt_state = tx.init(params)
  grad = jax.jit(jax.value_and_grad(task.loss, has_aux=True))
  table = task.indices(seed, steps)
  for t in range(steps):
    x, y = task.gather(task.data, table[t])
    (_, state), grads = grad(params, state, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return runner.Evaluator(task)(
    jax.tree.map(lambda a: a[None], params),
    jax.tree.map(lambda a: a[None], state),
    'validation',
  )[0]


def test_runner_matches_a_plain_loop_and_freezes_finished_runs(tiny):
  steps = tiny.steps
  results = runner.train(
    tiny,
    opt.ADAM,
    [
      runner.Run(3e-3, 0, steps),
      runner.Run(3e-3, 0, steps - 5),
      runner.Run(1e-2, 1, steps),
    ],
    curve_points=3,
    test=True,
  )
  assert [r['steps'] for r in results] == [steps, steps - 5, steps]
  for run, lr, seed in ((results[0], 3e-3, 0), (results[1], 3e-3, 0)):
    plain = _plain_adam_run(tiny, lr, seed, run['steps'])
    assert run['validation']['loss'] == pytest.approx(plain['loss'], rel=1e-4)
    assert run['validation']['accuracy'] == pytest.approx(
      plain['accuracy'], abs=1e-9
    )
  curve = results[1]['curve']
  assert curve[0]['step'] == 0 and curve[-1]['step'] == steps - 5
  assert results[0]['validation'] != results[1]['validation']
  assert all(r['test'] is not None for r in results)


def test_adafisher_arms_train_under_vmap(tiny):
  arm = opt.permuted(opt.RELATIVE[0.1])
  results = runner.train(
    tiny, arm, [runner.Run(0.1, s, tiny.steps) for s in (0, 1)], curve_points=2
  )
  assert all(math.isfinite(r['validation']['loss']) for r in results)
  assert results[0]['validation'] != results[1]['validation']


def test_step_times_are_interleaved_ratios(tiny):
  timing = runner.step_times(
    tiny, [opt.ADAM, opt.REF], rounds=2, steps_per_round=2
  )
  assert timing['ratio']['adam'] == 1.0
  assert timing['ratio']['adafisher-ref'] > 0
  assert len(timing['seconds_per_step']['adafisher-ref']) == 2


def test_smoke_tier_end_to_end(tmp_path):
  try:
    tasks.fashion_mnist(TINY)
  except RuntimeError as error:
    pytest.skip(f'Fashion-MNIST unavailable: {error}')
  evidence.main(['--tier', 'smoke', '--out-dir', str(tmp_path)])
  report = json.loads((tmp_path / 'evidence_smoke.json').read_text())
  assert report['command'].startswith('python -m benchmarks.evidence')
  assert report['protocol']['eval_seeds'] == [1, 2]
  task = report['tasks']['fashion_mnist']
  arms = task['arms']
  expected = {
    'adam',
    'sgdm',
    'adafisher-rel-inf',
    'adafisher-rel-0.1',
    'adafisher-rel-0.1+perm',
  }
  assert expected <= set(arms)
  assert task['timing']['ratio']['adam'] == 1.0
  for name, entry in arms.items():
    if entry['arm']['family'] != 'kfac':
      grid = entry['grid']
      assert len(grid['initial']) == 2
      assert entry['chosen'] in {r['learning_rate'] for r in grid['runs']}
    for run in entry['eval']:
      assert {'learning_rate', 'seed', 'steps', 'curve', 'validation', 'test'}
      assert run['seed'] in (1, 2) and run['test'] is not None
    assert entry['equal_time']['time_ratio'] == task['timing']['ratio'][name]
  comparisons = task['analysis']['views']['equal_steps']['comparisons']
  assert {(c['arm'], c['versus']) for c in comparisons} >= {
    ('adafisher-rel-inf', 'adam'),
    ('adafisher-rel-inf', 'sgdm'),
  }
  decision = task['analysis']['decision']
  assert decision['best'] == 'adafisher-rel-0.1'
  assert [c['versus'] for c in decision['comparisons']] == [
    'adafisher-rel-inf',
    'adafisher-rel-0.1+perm',
  ]
  text = (tmp_path / 'evidence_smoke.md').read_text()
  for phrase in ('Protocol', 'Decision rule', 'Equal time', 'vs SGD-m'):
    assert phrase in text
  for plot in task['plots']:
    assert (tmp_path / plot).stat().st_size > 0


def test_gpu_tier_logic_at_a_tiny_size(tmp_path):
  from benchmarks import gpu_tier

  try:
    tasks.fashion_mnist(TINY)
  except RuntimeError as error:
    pytest.skip(f'Fashion-MNIST unavailable: {error}')
  gpu_tier.main(['--tiny', '--arms', 'adam,sgdm', '--out-dir', str(tmp_path)])
  report = json.loads((tmp_path / 'evidence_gpu_tiny.json').read_text())
  task = report['tasks']['fashion_mnist_resnet']
  assert set(task['arms']) == {'adam', 'sgdm'}
  for entry in task['arms'].values():
    # one program per arm: every learning rate on every seed
    assert len(entry['grid']['runs']) == 2 * 3
    assert len(entry['eval']) + len(entry['other_eval_runs']) == 2 * 2
    assert {r['learning_rate'] for r in entry['eval']} == {entry['chosen']}
  rows = task['analysis']['views']['equal_steps']['comparisons']
  assert {(r['arm'], r['versus']) for r in rows} == {
    ('sgdm', 'adam'),
    ('adam', 'sgdm'),
  }
  assert all(r['n'] == 2 for r in rows)  # seeds 3 and 4
  assert (tmp_path / 'evidence_gpu_tiny.md').exists()
