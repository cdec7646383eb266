"""Checkpoints written by adafisher_optax 0.2 (one factor dict per layer):
refused by ``restore`` with the fix, converted by ``restore_legacy``.

``tests/data/checkpoint_0.2`` was written by release 0.2.0 (commit c2a69a3)
with ``make.py`` there: three adafisher steps (t_cov=2) of a small MLP with
a LayerNorm, in both numerics, and the factors it held.
"""

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafisher_optax as afo

DATA = Path(__file__).parent / 'data' / 'checkpoint_0.2'


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(8, name='hidden')(x))
    x = nn.LayerNorm(name='ln')(x)
    return nn.Dense(3, name='head')(x)


def _target(numerics):
  x = jax.random.normal(jax.random.key(0), (16, 5))
  params = MLP().init(jax.random.key(1), x)['params']
  tx = afo.adafisher(0.01, numerics=numerics, t_cov=2)
  return tx, {'params': params, 'opt_state': tx.init(params)}


@pytest.mark.parametrize('numerics', ['reference', 'paper'])
def test_restore_refuses_a_0_2_checkpoint_with_the_fix(numerics):
  _, target = _target(numerics)
  with pytest.raises(ValueError, match=r'0\.2.*restore_legacy'):
    afo.checkpoint.restore(DATA / numerics, target)


@pytest.mark.parametrize('numerics', ['reference', 'paper'])
def test_restore_legacy_converts_every_layer(numerics):
  tx, target = _target(numerics)
  restored = afo.checkpoint.restore_legacy(DATA / numerics, target)
  expected = np.load(DATA / f'{numerics}_expected.npz')
  state = afo.adafisher_state(restored['opt_state'])
  assert int(state.count) == int(expected['count']) == 3
  assert int(state.last_refresh) == int(expected['last_refresh'])
  view = state.factors
  for name in ('hidden', 'ln', 'head'):
    for field in ('h', 's', 'curvature_mean', 'refreshes'):
      np.testing.assert_array_equal(
        np.asarray(getattr(view[name], field)), expected[f'{name}/{field}']
      )
  # The converted state trains on, with this version's optimizer.
  x = jax.random.normal(jax.random.key(0), (16, 5))
  y = jnp.arange(16) % 3

  def loss_fn(p, x, y):
    logits = MLP().apply({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  _, grads, curvature = afo.value_and_grad_with_curvature(loss_fn)(
    restored['params'], x, y
  )
  updates, new = tx.update(
    grads, restored['opt_state'], restored['params'], curvature=curvature
  )
  new = afo.adafisher_state(new)
  assert int(new.count) == 4 and int(new.last_refresh) == 2  # not yet due
  schedule = afo.refresh_schedule(restored['opt_state'])
  assert [next(schedule) for _ in range(3)] == [False, True, False]
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
