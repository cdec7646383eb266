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


# --- one array per factor field (up to commit 31527a8) -----------------------

FIELDS = Path(__file__).parent / 'data' / 'checkpoint_fields'


class TiedLM(nn.Module):
  """The model of ``checkpoint_fields/make.py``."""

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(11, 6, name='tokens')
    x = nn.relu(nn.Dense(6, name='hidden')(embed(ids)))
    return embed.attend(nn.LayerNorm(name='ln')(x))


def _lm_loss(params, ids):
  logits = TiedLM().apply({'params': params}, ids)
  return optax.softmax_cross_entropy_with_integer_labels(
    logits[:, :-1], ids[:, 1:]
  ).mean()


def _lm_target(numerics):
  ids = jax.random.randint(jax.random.key(0), (4, 7), 0, 11)
  params = TiedLM().init(jax.random.key(1), ids)['params']
  grad_fn = afo.value_and_grad_with_curvature(_lm_loss)
  layout = afo.curvature_layout(grad_fn, params, ids)
  tx = afo.adafisher(0.01, numerics=numerics, t_cov=2, layout=layout)
  return tx, grad_fn, ids, {'params': params, 'opt_state': tx.init(params)}


@pytest.mark.parametrize('numerics', ['reference', 'paper'])
def test_restore_refuses_a_checkpoint_with_one_array_per_field(numerics):
  *_, target = _lm_target(numerics)
  with pytest.raises(ValueError, match=r'one array per factor.*restore_legacy'):
    afo.checkpoint.restore(FIELDS / numerics, target)


@pytest.mark.parametrize('numerics', ['reference', 'paper'])
def test_restore_legacy_converts_one_array_per_field(numerics):
  tx, grad_fn, ids, target = _lm_target(numerics)
  restored = afo.checkpoint.restore_legacy(FIELDS / numerics, target)
  expected = dict(np.load(FIELDS / f'{numerics}_expected.npz'))
  state = afo.adafisher_state(restored['opt_state'])
  assert int(state.count) == int(expected.pop('count')) == 3
  assert int(state.last_refresh) == int(expected.pop('last_refresh'))
  blocks = afo.factors.by_block(state.factors)
  assert {path for path, _ in blocks} == {('tokens',), ('hidden',), ('ln',)}
  assert (('tokens',), 'attend') in blocks  # the tied table: both rules
  checked = set()
  for (path, rule), factors in blocks.items():
    for field in ('h', 's', 'curvature_mean', 'refreshes', 'skipped'):
      name = f'{"/".join(path)}:{rule}/{field}'
      np.testing.assert_array_equal(
        np.asarray(getattr(factors, field)), expected[name]
      )
      checked.add(name)
    if numerics == 'paper':
      for field in ('h_ema', 's_ema'):
        name = f'{"/".join(path)}:{rule}/{field}'
        np.testing.assert_array_equal(
          np.asarray(getattr(factors, field)), expected[name]
        )
        checked.add(name)
  assert checked == set(expected)  # every stored field was compared
  assert int(blocks[('tokens',), 'attend'].refreshes) == 2  # steps 0 and 2
  # The converted state trains on, with this version's optimizer.
  _, grads, curvature = grad_fn(restored['params'], ids)
  updates, new = tx.update(
    grads, restored['opt_state'], restored['params'], curvature=curvature
  )
  assert int(afo.adafisher_state(new).count) == 4
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize('numerics', ['reference', 'paper'])
def test_restore_legacy_into_grafting_adam_starts_its_second_moment(numerics):
  """The saved state had no ``nu`` (stored as ``()``): it starts at zero."""
  _, grad_fn, ids, plain = _lm_target(numerics)
  layout = afo.curvature_layout(grad_fn, plain['params'], ids)
  tx = afo.adafisher(
    0.01, numerics=numerics, t_cov=2, layout=layout, grafting='adam'
  )
  target = {'params': plain['params'], 'opt_state': tx.init(plain['params'])}
  restored = afo.checkpoint.restore_legacy(FIELDS / numerics, target)
  state = afo.adafisher_state(restored['opt_state'])
  assert int(state.count) == 3
  assert all(not np.any(v) for v in jax.tree.leaves(state.nu))
  want = afo.checkpoint.restore_legacy(FIELDS / numerics, plain)
  np.testing.assert_array_equal(
    afo.adafisher_state(want['opt_state']).factors['hidden'].vectors,
    state.factors['hidden'].vectors,
  )


def test_restore_legacy_names_what_does_not_fit(tmp_path):
  import orbax.checkpoint as ocp

  _, target = _target('reference')
  wider = jax.tree.map(  # every output axis twice as wide
    lambda p: jnp.zeros(p.shape[:-1] + (2 * p.shape[-1],)), target['params']
  )
  with pytest.raises(
    ValueError, match=r"'params/head/bias' has shape \(3,\), the target \(6,\)"
  ):
    afo.checkpoint.restore_legacy(
      DATA / 'reference', {**target, 'params': wider}
    )
  _, paper = _target('paper')
  with pytest.raises(ValueError, match=r"numerics='reference'.*'paper'"):
    afo.checkpoint.restore_legacy(DATA / 'reference', paper)
  with ocp.StandardCheckpointer() as checkpointer:  # this version's layout
    checkpointer.save(tmp_path / 'now', target)
    checkpointer.wait_until_finished()
  with pytest.raises(ValueError, match=r"this version's layout.*restore"):
    afo.checkpoint.restore_legacy(tmp_path / 'now', target)
