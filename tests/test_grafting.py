"""``grafting``: AdaFisher's direction with a per-layer step size.

Against a direct computation: the ungrafted AdaFisher update rescaled per
group (the parameters of one captured layer together, an unpreconditioned
parameter alone) to ``RMS_TARGET`` or to the norm of ``optax.adam``'s update
of the group; several devices equal one; the aliases and the wrappers.
"""

import functools
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import adafisher_optax as afo
from adafisher_optax.grafting import RMS_TARGET

pytestmark = [
  pytest.mark.usefixtures('x64'),
  pytest.mark.filterwarnings('ignore::UserWarning:adafisher_optax'),
]


class Net(nn.Module):
  """Captured Dense and LayerNorm layers and a free parameter (F~ = 1)."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(6, name='hidden')(x))
    x = nn.LayerNorm(name='ln')(x)
    scale = self.param('scale', nn.initializers.ones, (3,))
    return nn.Dense(3, name='head')(x) * scale


def _loss(model):
  def loss(params, x, y):
    logits = model.apply({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss


def _problem(steps=4, n=8):
  model = Net()
  keys = jax.random.split(jax.random.key(0), 3)
  xs = jax.random.normal(keys[0], (steps, n, 5), jnp.float64)
  ys = jax.random.randint(keys[1], (steps, n), 0, 3)
  params = model.init(keys[2], xs[0])['params']
  return model, jax.tree.map(lambda p: p.astype(jnp.float64), params), xs, ys


GROUPS = {
  'hidden': ('hidden/kernel', 'hidden/bias'),
  'ln': ('ln/scale', 'ln/bias'),
  'head': ('head/kernel', 'head/bias'),
  'scale': ('scale',),
}


def _flat(tree):
  return {
    '/'.join(str(getattr(k, 'key', k)) for k in kp): np.asarray(v)
    for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _updates_along(model, params, xs, ys, txs):
  """Each tx's update at every step; the params follow the first tx."""
  grad_fn = jax.jit(afo.value_and_grad_with_curvature(_loss(model)))
  states = [tx.init(params) for tx in txs]
  updates_of = [jax.jit(tx.update) for tx in txs]
  history = []
  for x, y in zip(xs, ys):
    _, grads, curvature = grad_fn(params, x, y)
    step = []
    for i, update in enumerate(updates_of):
      extra = {'curvature': curvature} if _is_adafisher(states[i]) else {}
      updates, states[i] = update(grads, states[i], params, **extra)
      step.append(_flat(updates))
      if i == 0:
        first = updates
    params = jax.tree.map(lambda p, u: p - 0.05 * u, params, first)
    history.append(step)
  return history


def _is_adafisher(state):
  return any(
    isinstance(s, afo.AdaFisherState)
    for s in jax.tree.leaves(
      state, is_leaf=lambda s: isinstance(s, afo.AdaFisherState)
    )
  )


def _group_norm(flat, paths):
  return np.sqrt(sum(np.sum(flat[p] ** 2) for p in paths))


@pytest.mark.parametrize(
  'options',
  [
    {},
    {'numerics': 'paper', 'damping': 0.1},
    {'relative_damping': 0.1},
    {'fisher_power': 0.5, 't_cov': 2},
  ],
)
def test_rms_grafting_is_the_direction_rescaled_to_the_target(options):
  model, params, xs, ys = _problem()
  plain = afo.scale_by_adafisher(**options)
  grafted = afo.scale_by_adafisher(grafting='rms', **options)
  for ungrafted, got in _updates_along(model, params, xs, ys, [plain, grafted]):
    for paths in GROUPS.values():
      size = sum(ungrafted[p].size for p in paths)
      scale = RMS_TARGET * np.sqrt(size) / _group_norm(ungrafted, paths)
      for p in paths:
        np.testing.assert_allclose(got[p], scale * ungrafted[p], rtol=1e-10)


def test_adam_grafting_takes_the_norm_of_adams_update_per_group():
  model, params, xs, ys = _problem(steps=5)
  plain = afo.scale_by_adafisher(relative_damping=0.1)
  grafted = afo.scale_by_adafisher(grafting='adam', relative_damping=0.1)
  adam = optax.scale_by_adam()
  for ungrafted, got, want in _updates_along(
    model, params, xs, ys, [plain, grafted, adam]
  ):
    for paths in GROUPS.values():
      scale = _group_norm(want, paths) / _group_norm(ungrafted, paths)
      for p in paths:
        np.testing.assert_allclose(got[p], scale * ungrafted[p], rtol=1e-8)


def test_adam_grafting_keeps_adams_second_moment_and_rms_no_state():
  _, params, _, _ = _problem()
  rms = afo.scale_by_adafisher(grafting='rms').init(params)
  adam = afo.scale_by_adafisher(grafting='adam').init(params)
  plain = afo.scale_by_adafisher().init(params)
  # The same leaves (the settings, static, say which grafting it is).
  assert jax.tree.structure(rms._replace(settings=plain.settings)) == (
    jax.tree.structure(plain)
  )
  chex.assert_trees_all_equal_shapes(adam.nu, params)
  size = lambda t: sum(x.size for x in jax.tree.leaves(t))  # noqa: E731
  assert size(adam) - size(plain) == size(params)


def test_decoupled_decay_comes_after_grafting():
  model, params, xs, ys = _problem(steps=1)
  grafted = afo.scale_by_adafisher(grafting='rms')
  w = afo.adafisherw(0.5, weight_decay=0.1, grafting='rms')
  [(direction, got)] = _updates_along(model, params, xs, ys, [grafted, w])
  flat_params = _flat(params)
  for p, u in direction.items():
    np.testing.assert_allclose(
      got[p], -0.5 * (u + 0.1 * flat_params[p]), rtol=1e-10
    )


def test_like_adam_is_the_recommended_adafisherw():
  model, params, xs, ys = _problem(steps=3)
  like = afo.adafisher_like_adam(1e-3, weight_decay=0.01)
  spelled = afo.adafisherw(  # as the README and the docstring spell it
    1e-3,
    weight_decay=0.01,
    grafting='adam',
    relative_damping=0.1,
    fisher_power=0.5,
  )
  for a, b in _updates_along(model, params, xs, ys, [like, spelled]):
    chex.assert_trees_all_close(a, b, rtol=0)


def test_grafted_step_under_inject_hyperparams_multi_steps_and_float16():
  model, params, xs, ys = _problem(steps=4)
  injected = optax.inject_hyperparams(
    afo.adafisher, static_args=('t_cov', 'grafting')
  )(1e-3, grafting='rms')
  direct = afo.adafisher(1e-3, grafting='rms')
  for a, b in _updates_along(model, params, xs, ys, [injected, direct]):
    chex.assert_trees_all_close(a, b, rtol=1e-12)
  grad_fn = afo.value_and_grad_with_curvature(_loss(model))
  layout = afo.curvature_layout(grad_fn, params, xs[0], ys[0])
  accumulated = afo.multi_steps(
    afo.adafisher(1e-3, grafting='adam'), 2, layout=layout
  )

  @jax.jit
  def accumulate(params, state, x, y):
    _, grads, curvature = grad_fn(params, x, y)
    updates, state = accumulated.update(
      grads, state, params, curvature=curvature
    )
    return optax.apply_updates(params, updates), state

  state = accumulated.init(params)
  for x, y in zip(xs, ys):
    params, state = accumulate(params, state, x, y)
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(params))
  half = jax.tree.map(lambda p: p.astype(jnp.float16), params)
  tx = afo.adafisher(1e-3, grafting='rms')

  @jax.jit
  def half_update(params, x, y):
    _, grads, curvature = grad_fn(params, x, y)
    return tx.update(grads, tx.init(params), params, curvature=curvature)[0]

  updates = half_update(half, xs[0].astype(jnp.float16), ys[0])
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(updates))


def test_adam_grafting_squares_float16_gradients_in_float32():
  """A float16 gradient of 1e-4 squares to 0 in float16: Adam's norm must
  not divide by a second moment that underflowed."""
  params = {'dense': {'kernel': jnp.ones((4, 3)), 'bias': jnp.ones(3)}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-4), params)

  def first_update(dtype, tx):
    p, g = (jax.tree.map(lambda a: a.astype(dtype), t) for t in (params, grads))
    return tx.update(g, tx.init(p), p)[0]

  for mu_dtype in (jnp.float32, None):  # nu is float32 for float16 params
    tx = afo.adafisher(1e-2, grafting='adam', mu_dtype=mu_dtype)
    chex.assert_trees_all_close(
      first_update(jnp.float16, tx), first_update(jnp.float32, tx), rtol=1e-2
    )
  half = jax.tree.map(lambda a: a.astype(jnp.float16), params)
  nu = afo.adafisher_state(afo.adafisher_like_adam(1e-3).init(half)).nu
  assert {a.dtype for a in jax.tree.leaves(nu)} == {jnp.dtype(jnp.float32)}
  nu = afo.adafisher_state(afo.adafisher_like_adam(1e-3).init(params)).nu
  assert {a.dtype for a in jax.tree.leaves(nu)} == {
    params['dense']['bias'].dtype
  }


def test_a_zero_gradient_layer_gets_a_zero_update():
  _, params, _, _ = _problem()
  tx = afo.scale_by_adafisher(grafting='rms')
  grads = jax.tree.map(jnp.zeros_like, params)
  grads['head']['kernel'] = jnp.ones_like(grads['head']['kernel'])
  updates, _ = tx.update(grads, tx.init(params), params)
  flat = _flat(updates)
  assert np.all(flat['hidden/kernel'] == 0) and np.all(flat['scale'] == 0)
  np.testing.assert_allclose(
    _group_norm(flat, GROUPS['head']),
    RMS_TARGET * np.sqrt(flat['head/kernel'].size + flat['head/bias'].size),
  )


def test_bad_grafting_is_named():
  with pytest.raises(ValueError, match='grafting'):
    afo.adafisher(1e-3, grafting='sgd')
  with pytest.raises(ValueError, match='b2'):
    afo.adafisher(1e-3, grafting='adam', b2=1.0)


def _one_device(model, params, xs, ys, tx):
  grad_fn = afo.value_and_grad_with_curvature(_loss(model))

  @jax.jit
  def step(params, state, x, y):
    _, grads, curvature = grad_fn(params, x, y)
    updates, state = tx.update(grads, state, params, curvature=curvature)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for x, y in zip(xs, ys):
    params, state = step(params, state, x, y)
  return params


@pytest.mark.parametrize('grafting', ['rms', 'adam'])
def test_several_devices_equal_one(grafting):
  """pmap (replicated), a jit with params sharded FSDP-style, shard_map."""
  devices = jax.devices()[:4]
  model, params, xs, ys = _problem(steps=3, n=8)
  tx = afo.adafisher(0.05, grafting=grafting, t_cov=1)
  want = _one_device(model, params, xs, ys, tx)

  mesh = jax.make_mesh((4,), ('d',), devices=devices)
  fsdp = jax.tree.map(
    lambda p: NamedSharding(mesh, P('d') if p.shape[0] % 4 == 0 else P()),
    params,
  )
  sharded = _one_device(
    model,
    jax.device_put(params, fsdp),
    jax.device_put(xs, NamedSharding(mesh, P(None, 'd'))),
    jax.device_put(ys, NamedSharding(mesh, P(None, 'd'))),
    tx,
  )
  chex.assert_trees_all_close(sharded, want, rtol=1e-9)

  tx_pmap = afo.adafisher(0.05, grafting=grafting, t_cov=1, axis_name='d')
  grad_fn = afo.value_and_grad_with_curvature(_loss(model))

  def local(params, state, x, y):
    _, grads, curvature = grad_fn(params, x, y)
    grads = jax.lax.pmean(grads, 'd')
    updates, state = tx_pmap.update(grads, state, params, curvature=curvature)
    return optax.apply_updates(params, updates), state

  step = jax.pmap(local, axis_name='d', devices=devices)
  stack = lambda t: jax.tree.map(lambda v: jnp.stack([v] * 4), t)  # noqa: E731
  p, s = stack(params), stack(tx_pmap.init(params))
  for x, y in zip(xs, ys):
    p, s = step(p, s, x.reshape(4, 2, -1), y.reshape(4, 2))
  chex.assert_trees_all_close(jax.tree.map(lambda v: v[0], p), want, rtol=1e-9)

  shard_loss = functools.partial(
    lambda base, p, x, y: base(p, x, y) / 4, _loss(model)
  )
  shard_grad = afo.value_and_grad_with_curvature(shard_loss)

  def replica(params, state, x, y):
    _, grads, curvature = shard_grad(params, x, y)
    updates, state = tx.update(grads, state, params, curvature=curvature)
    return optax.apply_updates(params, updates), state

  mapped = jax.jit(
    jax.shard_map(
      replica,
      mesh=mesh,
      in_specs=(P(), P(), P('d'), P('d')),
      out_specs=(P(), P()),
    )
  )
  replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P('d'))
  p = jax.device_put(params, replicated)
  s = jax.device_put(tx.init(params), replicated)
  for x, y in zip(xs, ys):
    p, s = mapped(p, s, jax.device_put(x, batch), jax.device_put(y, batch))
  chex.assert_trees_all_close(p, want, rtol=1e-9)


def test_import_under_python_oo():
  """Docstrings are literal (no ``__doc__ +=``): ``python -OO`` imports."""
  code = 'import adafisher_optax as a; a.adafisher_like_adam(1e-3)'
  subprocess.run([sys.executable, '-OO', '-c', code], check=True)
