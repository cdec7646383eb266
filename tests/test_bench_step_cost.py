"""The step-cost benchmark at a tiny size: compile cost next to Adam's, the
GPT-2-sized workloads, and the measurement helpers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import measure, stats, step_cost, workloads
from benchmarks.models import CharGPT


def test_compile_only_rows_have_ratios_to_adam(tmp_path):
  step_cost.main(
    [
      '--compile-only',
      '--models',
      'mlp',
      '--optimizers',
      'adam,adafisher-ref',
      '--compile-rounds',
      '2',
      '--out-dir',
      str(tmp_path),
      '--tag',
      'before',
    ]
  )
  report = json.loads((tmp_path / 'step_cost_compile_before.json').read_text())
  rows = {(r['optimizer'], r['program']): r for r in report['rows']}
  assert set(rows) == {
    ('adam', 'step'),
    ('adafisher-ref', 'refresh'),
    ('adafisher-ref', 'plain'),
  }
  adam = rows['adam', 'step']
  assert adam['compile_vs_adam']['ratio'] == pytest.approx(1.0)
  refresh = rows['adafisher-ref', 'refresh']
  assert refresh['rounds'] == 2 and len(refresh['seconds']) == 2
  low, high = refresh['compile_vs_adam']['ci']
  assert 0 < low <= refresh['compile_vs_adam']['ratio'] <= high
  assert refresh['kernels'] > adam['kernels']  # the statistics
  assert refresh['state_vs_adam'] == pytest.approx(0.5, abs=0.01)
  assert refresh['compiled_memory']['total'] > 0
  assert refresh['curvature_layout_seconds'] > 0
  text = (tmp_path / 'step_cost_compile_before.md').read_text()
  assert 'trace+lower' in text and 'peak / Adam' in text


def test_timed_rows_carry_compile_seconds(tmp_path):
  step_cost.main(
    [
      '--models',
      'mlp',
      '--optimizers',
      'adam,adafisher-rms',
      '--rounds',
      '2',
      '--steps-per-round',
      '1',
      '--out-dir',
      str(tmp_path),
    ]
  )
  report = json.loads((tmp_path / 'step_cost.json').read_text())
  rows = {r['optimizer']: r for r in report['rows']}
  assert rows['adam']['time_vs_adam'] == 1.0
  plain = rows['adafisher-rms']['programs']['plain']
  assert plain['compile_seconds']['compile'] > 0
  assert plain['compile_vs_adam'] > 0


def test_gpt2_workloads_are_tied_and_unrolled():
  work = workloads.build('gpt2-4', batch=1, seq=16)
  assert work.large and work.x.shape == (1, 16)
  params = jax.eval_shape(
    lambda: work.model.init(jax.random.key(0), work.x)['params']
  )
  assert 'head' not in params  # the token table is the output projection
  assert params['tokens']['embedding'].shape == (50257, 768)
  assert sum('TransformerBlock' in k for k in params) == 4  # no nn.scan
  n = sum(x.size for x in jax.tree.leaves(params))
  # 38.6M in the table, 7.1M per block (12 d^2 + 13 d): 67.0M at 4 blocks
  # (GPT-2 small, 12 blocks and 1024 positions: 124M)
  assert n == 50257 * 768 + 16 * 768 + 4 * (12 * 768**2 + 13 * 768) + 2 * 768
  small = workloads.build('gpt2-small', batch=1, seq=16)
  assert small.model.layers == 12 and small.model.d_model == 768


def test_scanned_gpt2_stacks_the_unrolled_blocks():
  """``gpt2-*-scan``: the same model, its blocks' params stacked."""
  unrolled = CharGPT(11, layers=4, d_model=8, heads=2, max_len=8, tied=True)
  scanned = unrolled.clone(scan=True)
  x = jax.random.randint(jax.random.key(0), (2, 8), 0, 11)
  params = unrolled.init(jax.random.key(1), x)['params']
  names = [f'TransformerBlock_{i}' for i in range(4)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *[params[n] for n in names])
  scan_params = {k: v for k, v in params.items() if k not in names}
  scan_params['blocks'] = {'TransformerBlock_0': stacked}
  want = unrolled.apply({'params': params}, x)
  got = scanned.apply({'params': scan_params}, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert {'gpt2-small-scan', 'gpt2-24-scan'} <= set(workloads.WORKLOADS)


def test_ratio_interval_and_kernel_count():
  exact = stats.ratio([2.0, 4.0, 8.0], [1.0, 2.0, 4.0])
  assert exact['ratio'] == pytest.approx(2.0) and exact['ci'] == pytest.approx(
    [2.0, 2.0]
  )
  noisy = stats.ratio([1.1, 0.9, 1.0, 1.2], [1.0, 1.0, 1.0, 1.0])
  assert noisy['ci'][0] < noisy['ratio'] < noisy['ci'][1]
  assert stats.ratio([1.0], [2.0])['ratio'] == 0.5
  compiled = jax.jit(lambda a: (a * 2).sum() + 1).lower(jax.numpy.ones(3))
  compiled = compiled.compile()
  assert measure.kernel_count(compiled.as_text()) >= 1
  assert measure.tree_bytes({'a': jax.ShapeDtypeStruct((3, 4), 'float32')}) == (
    48
  )


@pytest.mark.parametrize(
  'flag',
  ['--rounds', '--compile-rounds', '--steps-per-round', '--gpt2-batch'],
)
def test_counts_below_one_are_argument_errors(flag, capsys):
  with pytest.raises(SystemExit):
    step_cost.parse_args([flag, '0'])
  assert f'{flag} must be >= 1' in capsys.readouterr().err
