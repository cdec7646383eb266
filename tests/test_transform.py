"""scale_by_adafisher / adafisher / adafisherw: maths and optax integration."""

import functools
import itertools
import re
import subprocess
import sys
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax import tree as otu

import adafisher_optax as afo
from adafisher_optax.factors import minmax_paper, minmax_reference

from models import MLP, ConvNet, TiedGPT, batch, loss_fn, make_step, run

TOL = dict(rtol=1e-10, atol=1e-13)


def _setup(model=None, shape=(8, 5), seed=0):
  model = model or MLP()
  x, _y = batch(jax.random.key(seed), shape)
  params = model.init(jax.random.key(1), x)['params']
  return (
    model,
    params,
    [batch(jax.random.key(seed + i), shape) for i in range(1, 6)],
  )


def test_state_is_keyed_like_params_and_init_maps_over_params():
  _model, params, _ = _setup()
  tx = afo.scale_by_adafisher()
  state = tx.init(params)
  assert isinstance(state, afo.AdaFisherState)
  assert state.count.dtype == jnp.int32 and int(state.count) == 0
  chex.assert_trees_all_equal_shapes(state.mu, params)
  assert set(state.factors) == set(params)
  for name, layer in params.items():
    factors = state.factors[name]
    assert factors.h_ema is None  # reference numerics
    assert factors.h.shape == (layer['kernel'].shape[0] + 1,)
    assert factors.s.shape == layer['bias'].shape
  abstract = jax.eval_shape(tx.init, params)
  chex.assert_trees_all_equal_shapes(abstract, state)
  chex.assert_trees_all_equal(jax.jit(tx.init)(params), state)


def test_first_step_matches_hand_computation(x64):
  """One reference step by hand: EMA of min-max, F~, bias-corrected momentum."""
  model, params, batches = _setup()
  params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
  x, y = batches[0]
  grad_fn = jax.jit(afo.value_and_grad_with_curvature(loss_fn(model)))
  _, grads, curvature = grad_fn(params, x, y)
  tx = afo.adafisher(0.01, b1=0.8, damping=0.01, gamma=0.5, t_cov=1)
  updates, _ = tx.update(grads, tx.init(params), params, curvature=curvature)
  for name in params:
    h_hat, s_hat = (np.asarray(v) for v in curvature[name].means())
    h = 0.05 * 1 + 0.005 * minmax_reference(h_hat)
    s = 0.05 * 1 + 0.005 * minmax_reference(s_hat)
    f_w = h[:-1, None] * s[None] + 0.01
    f_b = h[-1] * s + 0.01
    m_hat_w = 0.2 * grads[name]['kernel'] / (1 - 0.8)
    m_hat_b = 0.2 * grads[name]['bias'] / (1 - 0.8)
    np.testing.assert_allclose(
      updates[name]['kernel'], -0.01 * m_hat_w / f_w, **TOL
    )
    np.testing.assert_allclose(
      updates[name]['bias'], -0.01 * m_hat_b / f_b, **TOL
    )


def test_paper_numerics_follow_the_equations(x64):
  model, params, batches = _setup(ConvNet(), shape=(4, 6, 6, 2))
  params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
  gamma, damping, lr, b1 = 0.7, 1e-3, 0.05, 0.9
  tx = afo.scale_by_adafisher(
    b1=b1, damping=damping, gamma=gamma, numerics='paper'
  )
  grad_fn = jax.jit(afo.value_and_grad_with_curvature(loss_fn(model)))
  state = tx.init(params)
  ema = {}
  momentum = jax.tree.map(jnp.zeros_like, params)
  for t, (x, y) in enumerate(batches[:3]):
    x = x.astype(jnp.float64)
    _, grads, curvature = grad_fn(params, x, y)
    updates, state = tx.update(grads, state, params, curvature=curvature)
    momentum = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, momentum, grads)
    for name, stats in curvature.items():
      h_hat, s_hat = (np.asarray(v) for v in stats.means('paper'))
      if t == 0:
        ema[name] = (h_hat, s_hat)
      else:
        ema[name] = tuple(
          gamma * old + (1 - gamma) * new
          for old, new in zip(ema[name], (h_hat, s_hat))
        )
      h, s = (np.asarray(minmax_paper(jnp.asarray(v))) for v in ema[name])
      np.testing.assert_allclose(state.factors[name].h_ema, ema[name][0], **TOL)
      m_hat = {
        k: np.asarray(v) / (1 - b1 ** (t + 1))
        for k, v in momentum[name].items()
      }
      if name in ('gn', 'ln'):
        want_scale, want_bias = (
          m_hat['scale'] / (h * s + damping),
          (m_hat['bias'] / (s + damping)),
        )
      else:
        kernel = m_hat['kernel']
        f = (h[:-1, None] * s[None] + damping).reshape(kernel.shape)
        want_scale, want_bias = (
          kernel / f,
          m_hat['bias'] / (h[-1] * s + damping),
        )
      weight = 'scale' if name in ('gn', 'ln') else 'kernel'
      np.testing.assert_allclose(updates[name][weight], want_scale, **TOL)
      np.testing.assert_allclose(updates[name]['bias'], want_bias, **TOL)
    params = optax.apply_updates(
      params, jax.tree.map(lambda u: -lr * u, updates)
    )


def test_paper_minmax_is_scale_free():
  x = jnp.array([3.0, 1.0, 2.0, 7.0])
  np.testing.assert_allclose(minmax_paper(x), minmax_paper(1e-6 * x), rtol=1e-6)
  np.testing.assert_allclose(
    minmax_paper(x.astype(jnp.bfloat16)).astype(jnp.float32),
    minmax_paper(x),
    atol=1e-2,
  )
  assert np.all(np.isfinite(minmax_paper(jnp.zeros(3))))


def test_factors_refresh_only_every_t_cov_steps():
  model, params, batches = _setup()
  tx = afo.scale_by_adafisher(t_cov=3)
  step = jax.jit(make_step(model, tx))
  state = tx.init(params)
  history = []
  for x, y in batches:
    params, state, _ = step(params, state, x, y)
    history.append(np.asarray(state.factors['head'].h))
  changed = [not np.array_equal(a, b) for a, b in itertools.pairwise(history)]
  assert changed == [False, False, True, False]  # refreshes at counts 0, 3


def test_reference_default_t_cov_is_100_and_paper_is_1():
  model, params, batches = _setup()
  for numerics, refreshes in (('reference', 1), ('paper', 5)):
    tx = afo.scale_by_adafisher(numerics=numerics)
    step = jax.jit(make_step(model, tx))
    state, seen, p = tx.init(params), [], params
    for x, y in batches:
      p, state, _ = step(p, state, x, y)
      seen.append(np.asarray(state.factors['head'].s))
    n = 1 + sum(not np.array_equal(a, b) for a, b in itertools.pairwise(seen))
    assert n == refreshes, numerics


def test_fisher_power_half_divides_by_the_square_root():
  model, params, batches = _setup()
  x, y = batches[0]
  _, grads, curvature = afo.value_and_grad_with_curvature(loss_fn(model))(
    params, x, y
  )
  out = {}
  for p in (1.0, 0.5):
    tx = afo.scale_by_adafisher(fisher_power=p)
    out[p], _ = tx.update(grads, tx.init(params), curvature=curvature)
  # u1 = m/F, u_half = m/sqrt(F) => u_half**2 = u1 * m with m = grads here.
  jax.tree.map(
    lambda a, b, g: np.testing.assert_allclose(a**2, b * g, rtol=1e-4),
    out[0.5],
    out[1.0],
    grads,
  )


def test_fisher_power_half_is_a_square_root_and_a_traced_power_agrees():
  """A Python 0.5 compiles to a sqrt (no per-element ``power``); the same
  power injected as a traced hyperparameter gives the same update."""
  model, params, batches = _setup()
  x, y = batches[0]
  _, grads, curvature = afo.value_and_grad_with_curvature(loss_fn(model))(
    params, x, y
  )
  tx = afo.scale_by_adafisher(fisher_power=0.5)
  state = tx.init(params)

  def update(g, s):
    return tx.update(g, s, curvature=curvature)[0]

  hlo = jax.jit(update).lower(grads, state).compile().as_text()
  elementwise = re.compile(r'= f(32|64)\[\d[^]]*\]\S* (power|r?sqrt)\(')
  ops = {m.group(2) for m in elementwise.finditer(hlo)}
  assert ops and 'power' not in ops, ops  # (b1**count, a scalar, stays)
  injected = optax.inject_hyperparams(
    afo.scale_by_adafisher, static_args=('t_cov',)
  )(fisher_power=0.5)
  traced, _ = injected.update(grads, injected.init(params), curvature=curvature)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
    update(grads, state),
    traced,
  )


def test_coupled_and_decoupled_weight_decay():
  model, params, batches = _setup()
  x, y = batches[0]
  grad_fn = afo.value_and_grad_with_curvature(loss_fn(model))
  _, grads, curvature = grad_fn(params, x, y)

  def first_update(tx, g):
    return tx.update(g, tx.init(params), params, curvature=curvature)[0]

  plain = first_update(afo.adafisher(0.1), grads)
  coupled = first_update(afo.adafisher(0.1, weight_decay=0.3), grads)
  by_hand = first_update(
    afo.adafisher(0.1), jax.tree.map(lambda g, p: g + 0.3 * p, grads, params)
  )
  chex.assert_trees_all_close(coupled, by_hand, rtol=1e-6)
  decoupled = first_update(afo.adafisherw(0.1, weight_decay=0.3), grads)
  chex.assert_trees_all_close(
    decoupled,
    jax.tree.map(lambda u, p: u - 0.1 * 0.3 * p, plain, params),
    rtol=1e-5,
    atol=1e-8,
  )


def test_chain_with_clipping_equals_clipping_by_hand():
  model, params, batches = _setup()
  x, y = batches[0]
  _, grads, curvature = afo.value_and_grad_with_curvature(loss_fn(model))(
    params, x, y
  )
  grads = jax.tree.map(lambda g: 50 * g, grads)
  chained = optax.chain(optax.clip_by_global_norm(1.0), afo.adafisher(1e-2))
  got, _ = chained.update(
    grads, chained.init(params), params, curvature=curvature
  )
  clipped = jax.tree.map(lambda g: g / optax.tree.norm(grads), grads)
  plain = afo.adafisher(1e-2)
  want, _ = plain.update(
    clipped, plain.init(params), params, curvature=curvature
  )
  chex.assert_trees_all_close(got, want, rtol=1e-5)


def test_inject_hyperparams_and_schedule():
  model, params, batches = _setup()
  schedule = optax.linear_schedule(1e-2, 1e-3, 4)
  plain = afo.adafisher(1e-2, damping=2e-3)
  injected = optax.inject_hyperparams(afo.adafisher)(
    learning_rate=1e-2, damping=2e-3, b1=0.9, gamma=0.8, fisher_power=1.0
  )
  p1, _ = run(model, plain, params, batches)
  p2, state = run(model, injected, params, batches)
  chex.assert_trees_all_close(p1, p2, rtol=1e-5, atol=1e-7)
  assert float(state.hyperparams['damping']) == pytest.approx(2e-3)
  # A schedule scales the step exactly like a constant of its current value.
  x, y = batches[0]
  _, grads, curvature = afo.value_and_grad_with_curvature(loss_fn(model))(
    params, x, y
  )
  scheduled, unit = afo.adafisher(schedule), afo.adafisher(1.0)
  s_state, u_state = scheduled.init(params), unit.init(params)
  for t in range(3):
    us, s_state = scheduled.update(grads, s_state, params, curvature=curvature)
    uu, u_state = unit.update(grads, u_state, params, curvature=curvature)
    lr = schedule(t)
    chex.assert_trees_all_close(us, otu.scale(lr, uu), rtol=1e-5)


def _masked_tx(trainable, **kwargs):
  frozen = jax.tree.map(lambda m: not m, trainable)
  return optax.chain(
    optax.masked(afo.adafisher(1e-2, **kwargs), trainable),
    optax.masked(optax.set_to_zero(), frozen),
  )


#: A frozen layer and a frozen bias.
_TRAINABLE = {
  'dense0': {'kernel': True, 'bias': True},
  'dense1': {'kernel': False, 'bias': False},
  'head': {'kernel': True, 'bias': False},
}


def test_masked_freezes_layers_and_biases():
  model, params, batches = _setup()
  new, state = run(model, _masked_tx(_TRAINABLE), params, batches)
  assert np.array_equal(new['dense1']['kernel'], params['dense1']['kernel'])
  assert np.array_equal(new['head']['bias'], params['head']['bias'])
  assert not np.array_equal(new['head']['kernel'], params['head']['kernel'])
  factors = afo.adafisher_state(state).factors
  assert 'dense1' not in factors and factors['head'].h.shape == (9,)


@pytest.mark.parametrize('grafting', [None, 'rms', 'adam'])
def test_a_mask_or_labels_per_layer_equal_a_mask_per_leaf(grafting):
  """``optax.masked`` and ``optax.multi_transform`` given one flag or label
  per layer (a prefix of the params) put a ``MaskedNode`` in place of a
  frozen layer's dict; its curvature is dropped like a masked leaf's."""
  model, params, batches = _setup()
  per_layer = {'dense0': True, 'dense1': False, 'head': True}
  per_leaf = {k: {'kernel': v, 'bias': v} for k, v in per_layer.items()}
  want, _ = run(model, _masked_tx(per_leaf, grafting=grafting), params, batches)
  got, state = run(
    model, _masked_tx(per_layer, grafting=grafting), params, batches
  )
  chex.assert_trees_all_equal(got, want)
  assert set(afo.adafisher_state(state).factors) == {'dense0', 'head'}
  labels = {k: 'fisher' if v else 'frozen' for k, v in per_layer.items()}
  transforms = {
    'fisher': afo.adafisher(1e-2, grafting=grafting),
    'frozen': optax.set_to_zero(),
  }
  tx = optax.multi_transform(transforms, labels)
  got, _ = run(model, tx, params, batches)
  chex.assert_trees_all_equal(got, want)


def test_diagnostics_of_a_masked_adafisher_take_the_whole_params():
  """Under optax.masked the params given to tx.init are the ones a user has
  at hand: diagnostics reports AdaFisher's layers and leaves the others out
  (they are not AdaFisher's, so not "unpreconditioned" either)."""
  model, params, batches = _setup()
  _, state = run(model, _masked_tx(_TRAINABLE), params, batches)
  report = afo.diagnostics(state, params)
  assert sorted(report.layers) == ['dense0', 'head']
  assert report.layers['head'].parameters == ('kernel',)
  assert report.unpreconditioned == []
  subtree = {k: v for k, v in params.items() if k != 'dense1'}
  assert str(afo.diagnostics(state, subtree)) == str(report)
  with pytest.raises(ValueError, match="params 'extra/kernel' is not in"):
    afo.diagnostics(state, {**params, 'extra': {'kernel': jnp.ones(3)}})


def test_an_optimizer_of_a_sub_tree_takes_the_whole_models_curvature():
  """An nnx.Optimizer with a wrt filter (or an optimizer of some layers)
  gets the curvature of the whole model: statistics of layers it does not
  hold are left out, as when the curvature is filtered by hand."""
  model, params, batches = _setup()
  grad_fn = afo.value_and_grad_with_curvature(loss_fn(model))
  _, grads, curvature = grad_fn(params, *batches[0])
  sub = {'head': params['head']}
  tx = afo.adafisher(1e-2, t_cov=1)
  state = tx.init(sub)
  got = tx.update({'head': grads['head']}, state, sub, curvature=curvature)
  want = tx.update(
    {'head': grads['head']}, state, sub,
    curvature={'head': curvature['head']},
  )  # fmt: skip
  chex.assert_trees_all_equal(got, want)
  assert afo.adafisher_state(got[1]).factors['head'].refreshes == 1
  elsewhere = {'encoder': curvature['dense0']}
  with pytest.raises(ValueError, match=r"\['encoder'\], none of which"):
    tx.update({'head': grads['head']}, state, sub, curvature=elsewhere)


class _TwoHeads(nn.Module):
  @nn.compact
  def __call__(self, x, both=True):
    a = nn.Dense(3, name='a')(x)
    return a + nn.Dense(3, name='b')(x) if both else a


def test_a_layer_without_statistics_in_a_refresh_keeps_its_factors():
  """The warning says what the update does: a layer that was refreshed
  before and brings no statistics now divides by its stored factors."""
  model = _TwoHeads()
  x = jax.random.normal(jax.random.key(0), (8, 4))
  params = model.init(jax.random.key(1), x)['params']

  def loss(p, x, both):
    return jnp.mean(model.apply({'params': p}, x, both) ** 2)

  grad_fn = afo.value_and_grad_with_curvature(loss)
  tx = afo.adafisher(1e-3, t_cov=1)
  _, grads, curvature = grad_fn(params, x, True)
  _, state = tx.update(grads, tx.init(params), params, curvature=curvature)
  _, grads, curvature = grad_fn(params, x, False)
  grads['b'] = jax.tree.map(jnp.ones_like, grads['b'])
  with pytest.warns(
    afo.UnpreconditionedParametersWarning,
    match=r'keep the factors of their latest refresh.*: b/bias, b/kernel',
  ):
    updates, _ = tx.update(grads, state, params, curvature=curvature)
  plain, _ = tx.update(grads, state, params)  # divides by stored factors
  chex.assert_trees_all_close(updates['b'], plain['b'], rtol=1e-6)
  # F~ = 1 would give steps of about lr (the gradients are ones); the stored
  # F~ ~ 1e-2 gives steps more than ten times larger.
  assert float(jnp.max(jnp.abs(updates['b']['kernel']))) > 10 * 1e-3


def test_masked_weights_need_a_layout():
  """Bias-only training (BitFit): the kernel shape is hidden by the mask."""
  model, params, batches = _setup()
  trainable = jax.tree_util.tree_map_with_path(
    lambda path, _: path[-1].key == 'bias', params
  )
  with pytest.raises(ValueError, match='masked out'):
    run(model, _masked_tx(trainable), params, batches)
  grad_fn = afo.value_and_grad_with_curvature(loss_fn(model))
  layout = afo.curvature_layout(grad_fn, params, *batches[0])
  new, _ = run(model, _masked_tx(trainable, layout=layout), params, batches)
  for name in params:
    assert np.array_equal(new[name]['kernel'], params[name]['kernel'])
    assert not np.array_equal(new[name]['bias'], params[name]['bias'])


def test_train_step_compiles_once():
  model, params, batches = _setup()
  tx = optax.chain(optax.clip_by_global_norm(1.0), afo.adafisher(1e-3, t_cov=2))
  step = jax.jit(chex.assert_max_traces(make_step(model, tx), n=1))
  state = tx.init(params)
  for x, y in batches:
    params, state, loss = step(params, state, x, y)
  assert np.isfinite(loss)


def test_training_reduces_the_loss():
  model, params, _ = _setup()
  x, y = batch(jax.random.key(42), (64, 5))
  for numerics in ('reference', 'paper'):
    tx = afo.adafisher(1e-2, numerics=numerics)
    step = jax.jit(make_step(model, tx))
    state, p = tx.init(params), params
    losses = []
    for _ in range(60):
      p, state, loss = step(p, state, x, y)
      losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], numerics


class _WithCustomParam(nn.Module):
  @nn.compact
  def __call__(self, x):
    gain = self.param('gain', nn.initializers.ones, (x.shape[-1],))
    return nn.Dense(3, name='head')(x * gain)


def test_parameters_without_statistics_get_plain_momentum_and_a_warning():
  model, params, batches = _setup(_WithCustomParam())
  x, y = batches[0]
  _, grads, curvature = afo.value_and_grad_with_curvature(loss_fn(model))(
    params, x, y
  )
  assert afo.unpreconditioned_parameters(params, curvature) == ['gain']
  tx = afo.adafisher(0.5)
  with pytest.warns(afo.UnpreconditionedParametersWarning, match='gain'):
    updates, _ = tx.update(grads, tx.init(params), params, curvature=curvature)
  np.testing.assert_allclose(updates['gain'], -0.5 * grads['gain'], rtol=1e-6)


class _Stacked(nn.Module):
  @nn.compact
  def __call__(self, x):
    class Block(nn.Module):
      @nn.compact
      def __call__(self, h, _):
        return jnp.tanh(nn.Dense(h.shape[-1], name='dense')(h)), None

    scan = nn.scan(
      Block, variable_axes={'params': 0}, split_rngs={'params': True}, length=3
    )
    x, _ = scan(name='blocks')(x, None)
    x = nn.DenseGeneral((2, 3), use_bias=False, name='multi_out')(x)
    return nn.DenseGeneral(3, axis=(-2, -1), name='head')(x)


def test_layout_sizes_factors_of_scanned_and_multi_output_layers():
  model, params, batches = _setup(_Stacked())
  grad_fn = afo.value_and_grad_with_curvature(loss_fn(model))
  x, y = batches[0]
  _, grads, curvature = grad_fn(params, x, y)
  tx = afo.adafisher(1e-2)
  with pytest.raises(
    ValueError, match=r'layout=adafisher_optax.curvature_layout'
  ):
    tx.update(grads, tx.init(params), params, curvature=curvature)
  layout = afo.curvature_layout(grad_fn, params, x, y)
  assert layout['blocks']['dense'].input_sums[0].shape == (3, 6)
  assert layout['multi_out'].output_sums[0].shape == (6,)
  tx = afo.adafisher(1e-2, layout=layout)
  new, state = run(model, tx, params, batches)
  assert afo.adafisher_state(state).factors['blocks']['dense'].s.shape == (
    3,
    5,
  )
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(new))


def test_no_warning_when_everything_is_covered():
  model, params, batches = _setup()
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    run(model, afo.adafisher(1e-3), params, batches[:2])


@pytest.mark.parametrize('a', [1e-6, 0.1, 1.0, float('inf')])
def test_relative_damping_matches_a_direct_computation(x64, a):
  """``F~ = (K + a mean(K)) / ((1 + a) mean(K))`` per layer (spec 3a)."""
  model, params, batches = _setup(ConvNet(), shape=(4, 6, 6, 2))
  params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
  x, y = batches[0]
  _, grads, curvature = jax.jit(
    afo.value_and_grad_with_curvature(loss_fn(model))
  )(params, x.astype(jnp.float64), y)
  tx = afo.scale_by_adafisher(relative_damping=a, t_cov=1)
  updates, state = jax.jit(tx.update)(
    grads, tx.init(params), curvature=curvature
  )
  for name in ('conv', 'head'):
    h = np.asarray(state.factors[name].h)
    s = np.asarray(state.factors[name].s)
    k = h[:, None] * s[None]
    mean = k.mean()
    f = np.ones_like(k) if a == np.inf else (k + a * mean) / ((1 + a) * mean)
    kernel = np.asarray(grads[name]['kernel'])
    np.testing.assert_allclose(
      updates[name]['kernel'], kernel / f[:-1].reshape(kernel.shape), **TOL
    )
    np.testing.assert_allclose(
      updates[name]['bias'], grads[name]['bias'] / f[-1], **TOL
    )
  for name in ('gn', 'ln'):  # reference norms: K = [H0 * S, H1 * S]
    h = np.asarray(state.factors[name].h)
    s = np.asarray(state.factors[name].s)
    k = np.concatenate([h[0] * s, h[1] * s])
    mean = k.mean()
    f = np.ones_like(k) if a == np.inf else (k + a * mean) / ((1 + a) * mean)
    np.testing.assert_allclose(
      updates[name]['scale'], grads[name]['scale'] / f[: len(s)], **TOL
    )
    np.testing.assert_allclose(
      updates[name]['bias'], grads[name]['bias'] / f[len(s) :], **TOL
    )


# --- two programs: capture on refresh steps only -----------------------------


def _single_and_two_program_runs(model, tx, params, batches):
  grad_fn = afo.value_and_grad_with_curvature(loss_fn(model))

  @functools.partial(jax.jit, static_argnames='refresh')
  def step(params, state, x, y, refresh):
    _, grads, curvature = grad_fn(params, x, y, capture=refresh)
    updates, state = tx.update(grads, state, params, curvature=curvature)
    return optax.apply_updates(params, updates), state

  single = two = (params, tx.init(params))
  schedule = afo.refresh_schedule(two[1])
  flags = []
  for x, y in batches:
    single = step(*single, x, y, refresh=True)
    flags.append(next(schedule))
    two = step(*two, x, y, refresh=flags[-1])
  return single, two, flags


@pytest.mark.parametrize('numerics', ['reference', 'paper'])
def test_two_programs_equal_one_program_bit_for_bit(numerics):
  model, params, _ = _setup(ConvNet(), shape=(4, 6, 6, 2))
  batches = [batch(jax.random.key(60 + i), (4, 6, 6, 2)) for i in range(7)]
  tx = afo.adafisher(0.05, t_cov=3, numerics=numerics)
  single, two, flags = _single_and_two_program_runs(model, tx, params, batches)
  assert flags == [True, False, False, True, False, False, True]
  chex.assert_trees_all_equal(two, single)


def test_plain_step_uses_the_stored_factors():
  """No curvature: momentum divided by F~ of the factors as they are."""
  model, params, batches = _setup()
  grad_fn = afo.value_and_grad_with_curvature(loss_fn(model))
  tx = afo.scale_by_adafisher(b1=0.5, damping=1e-2)
  _, grads, curvature = grad_fn(params, *batches[0])
  _, state = tx.update(grads, tx.init(params), curvature=curvature)
  updates, new_state = tx.update(grads, state)
  assert int(new_state.last_refresh) == 0 and int(new_state.count) == 2
  chex.assert_trees_all_equal(new_state.factors, state.factors)
  for name in params:
    f = state.factors[name]
    m_hat = np.asarray(new_state.mu[name]['kernel']) / (1 - 0.5**2)
    want = m_hat / (np.asarray(f.h)[:-1, None] * np.asarray(f.s)[None] + 1e-2)
    np.testing.assert_allclose(updates[name]['kernel'], want, rtol=1e-6)


def test_curvature_on_a_step_that_is_not_due_does_not_refresh():
  """Refresh when t_cov updates passed since the last one, late if need be."""
  model, params, batches = _setup()
  grad_fn = afo.value_and_grad_with_curvature(loss_fn(model))
  tx = afo.scale_by_adafisher(t_cov=3)
  state = tx.init(params)
  last = []
  for t, (x, y) in enumerate(batches):
    _, grads, curvature = grad_fn(params, x, y)
    bring = t in (0, 1, 4)  # 1: not due; 4: one step late (due at 3)
    state = tx.update(grads, state, curvature=curvature if bring else None)[1]
    last.append(int(state.last_refresh))
  assert last == [0, 0, 0, 0, 4]


def test_refresh_schedule_resumes_from_a_restored_state():
  model, params, batches = _setup()
  tx = afo.adafisher(1e-2, t_cov=4)
  step = jax.jit(make_step(model, tx))
  state = tx.init(params)
  for x, y in batches[:2]:
    params, state, _ = step(params, state, x, y)
  schedule = afo.refresh_schedule(state)  # count 2, last refresh at 0
  assert [next(schedule) for _ in range(7)] == [
    False,
    False,
    True,
    False,
    False,
    False,
    True,
  ]


def test_refresh_schedule_reports_overdue_factors():
  model, params, batches = _setup()
  tx = afo.adafisher(1e-2, t_cov=2)
  grad_fn = afo.value_and_grad_with_curvature(loss_fn(model))
  state = tx.init(params)
  for x, y in batches[:4]:  # plain steps only: never refreshed
    _, grads, _ = grad_fn(params, x, y, capture=False)
    state = tx.update(grads, state, params)[1]
  with pytest.warns(afo.StaleFactorsWarning, match='4 updates overdue'):
    schedule = afo.refresh_schedule(state)
  assert next(schedule) is True
  assert afo.diagnostics(state, params).overdue == 4


# --- non-finite values and low precision (issue 12) --------------------------


class _BiasNorm(nn.Module):
  """A loss that also reads a bias directly (a norm penalty on it)."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, bias_init=nn.initializers.zeros, name='head')(x)


def test_non_finite_gradient_of_a_captured_layer_is_guarded():
  """sqrt(sum(b**2)) at b = 0 has a NaN gradient: those entries stay put."""
  model = _BiasNorm()
  x, y = batch(jax.random.key(0), (8, 5))
  params = model.init(jax.random.key(1), x)['params']

  def loss(p, x, y):
    logits = model.apply({'params': p}, x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + jnp.sqrt(jnp.sum(p['head']['bias'] ** 2))

  _, grads, curvature = afo.value_and_grad_with_curvature(loss)(params, x, y)
  assert not np.all(np.isfinite(grads['head']['bias']))
  assert np.all(np.isfinite(grads['head']['kernel']))
  tx = afo.adafisher(0.1)
  state = tx.init(params)
  updates, new_state = tx.update(grads, state, params, curvature=curvature)
  np.testing.assert_array_equal(updates['head']['bias'], 0.0)
  inner = afo.adafisher_state(new_state)
  np.testing.assert_array_equal(inner.mu['head']['bias'], 0.0)
  assert np.all(np.isfinite(updates['head']['kernel']))
  assert np.any(updates['head']['kernel'] != 0)
  assert int(inner.count) == 1


def test_overflowing_statistics_skip_the_refresh_visibly():
  """Inputs ~1e20: x**2 overflows float32 while the gradients do not."""
  model = MLP()
  x, y = batch(jax.random.key(0), (8, 5))
  params = model.init(jax.random.key(1), x)['params']
  tx = afo.adafisher(1e-3, t_cov=1)
  step = jax.jit(make_step(model, tx))
  state, p = tx.init(params), params
  for _ in range(3):
    p, state, loss = step(p, state, 1e20 * x, y)
  inner = afo.adafisher_state(state)
  assert int(inner.count) == 3 and np.isfinite(loss)
  assert not np.array_equal(p['head']['kernel'], params['head']['kernel'])
  report = afo.diagnostics(state, p)
  assert report.layers['dense0'].skipped == 3  # its inputs overflow
  assert report.layers['dense0'].refreshes == 0
  assert report.layers['head'].refreshes == 3  # tanh saturates: finite
  assert '| dense0 | dense |' in str(report) and '| 3 |' in str(report)


@pytest.mark.parametrize('dtype', [jnp.float16, jnp.bfloat16])
def test_low_precision_params_get_full_precision_updates(dtype):
  """m_hat / F~ with F~ ~ damping exceeds float16's range; lr brings it back."""
  model, params, _ = _setup()
  params = jax.tree.map(lambda p: p.astype(dtype), params)
  x, y = batch(jax.random.key(3), (8, 5))
  grad_fn = afo.value_and_grad_with_curvature(loss_fn(model))
  _, grads, curvature = grad_fn(params, x.astype(dtype), y)
  grads = jax.tree.map(lambda g: (100 * g).astype(dtype), grads)
  tx = afo.adafisher(1e-4)
  updates, _ = tx.update(grads, tx.init(params), params, curvature=curvature)
  for u in jax.tree.leaves(updates):
    assert u.dtype == jnp.float32 and np.all(np.isfinite(u))
  assert max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(updates)) > 0
  new = optax.apply_updates(params, updates)
  assert all(
    v.dtype == dtype and np.all(np.isfinite(v.astype(jnp.float32)))
    for v in jax.tree.leaves(new)
  )


def test_state_structure_does_not_depend_on_the_weight_decay_value():
  _, params, _ = _setup()
  for alias in (afo.adafisher, afo.adafisherw):
    zero = jax.tree.structure(alias(1e-3, weight_decay=0.0).init(params))
    some = jax.tree.structure(alias(1e-3, weight_decay=1e-4).init(params))
    assert zero == some


def test_one_curvature_serves_both_numerics():
  """Statistics carry what both numerics need; the optimizer picks."""
  model, params, _ = _setup(ConvNet(), shape=(4, 6, 6, 2))
  x, y = batch(jax.random.key(4), (4, 6, 6, 2))
  _, grads, curvature = afo.value_and_grad_with_curvature(loss_fn(model))(
    params, x, y
  )
  for numerics in ('reference', 'paper'):
    tx = afo.adafisher(1e-3, numerics=numerics)
    updates, state = tx.update(
      grads, tx.init(params), params, curvature=curvature
    )
    factors = afo.adafisher_state(state).factors['ln']
    assert factors.h.shape == ((2,) if numerics == 'reference' else (4,))
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_optimizer_core_imports_and_runs_without_flax_or_orbax():
  """transform, factors, rules (and pure-JAX tags) need neither package."""
  code = """
import sys


class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('flax', 'orbax'):
      raise ImportError(f'{name} is blocked')


sys.meta_path.insert(0, Block())
import jax, jax.numpy as jnp, optax
import adafisher_optax as afo
from adafisher_optax import factors, rules, transform

params = {'fc': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}}


def loss(p, x):
  return jnp.sum(afo.tags.dense(x, p['fc']) ** 2)


_, grads, curvature = afo.value_and_grad_with_curvature(loss)(params, jnp.ones((4, 3)))
tx = afo.adafisher(1e-3)
updates, state = tx.update(grads, tx.init(params), params, curvature=curvature)
assert not any(m.split('.')[0] in ('flax', 'orbax') for m in sys.modules)
print('ok')
"""
  result = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, check=False
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == 'ok'


def test_relative_damping_under_inject_hyperparams():
  """A traced ``a`` (including inf) gives what the constant gives."""
  model, params, batches = _setup()
  _, grads, curvature = afo.value_and_grad_with_curvature(loss_fn(model))(
    params, *batches[0]
  )
  for a in (0.1, float('inf')):
    plain = afo.adafisher(0.1, relative_damping=a)
    injected = optax.inject_hyperparams(afo.adafisher)(
      learning_rate=0.1, relative_damping=a
    )
    want, _ = plain.update(
      grads, plain.init(params), params, curvature=curvature
    )
    got, _ = injected.update(
      grads, injected.init(params), params, curvature=curvature
    )
    chex.assert_trees_all_close(got, want, rtol=1e-6)


def test_state_can_be_donated():
  """No two leaves of a new state share a buffer (jit would refuse it)."""
  _, params, _ = _setup()
  state = afo.adafisher(1e-3, numerics='paper').init(params)
  leaves = jax.tree.leaves(state)
  assert len({id(leaf) for leaf in leaves}) == len(leaves)
  jax.jit(lambda s: s, donate_argnums=0)(state)


def _tied_problem():
  model = TiedGPT()
  ids = jnp.array([[1, 2, 3, 0], [4, 5, 1, 10]])
  params = jax.tree.map(
    lambda p: p.astype(jnp.float64) + 0.1,
    model.init(jax.random.key(0), ids)['params'],
  )
  labels = jnp.roll(ids, 1, axis=1)

  def loss(p, ids):
    logits = model.apply({'params': p}, ids)
    return optax.softmax_cross_entropy_with_integer_labels(
      logits, labels
    ).mean()

  return params, ids, afo.value_and_grad_with_curvature(loss)


@pytest.mark.parametrize('numerics', ['reference', 'paper'])
def test_tied_embedding_sums_lookup_and_attend_curvatures(x64, numerics):
  """``F~ = H_l (x) S_l + (H_a (x) S_a)^T + lambda`` (issue 19, item 2)."""
  params, ids, grad_fn = _tied_problem()
  layout = afo.curvature_layout(grad_fn, params, ids)
  tx = afo.scale_by_adafisher(numerics=numerics, t_cov=1, layout=layout)
  _, grads, curvature = grad_fn(params, ids)
  assert afo.unpreconditioned_parameters(params, curvature) == []
  with warnings.catch_warnings():
    warnings.simplefilter('error', afo.UnpreconditionedParametersWarning)
    updates, state = tx.update(grads, tx.init(params), curvature=curvature)
  minmax = minmax_reference if numerics == 'reference' else minmax_paper
  k = 0
  for stats in curvature['embed']:  # (attend, lookup)
    h_hat, s_hat = stats.means(numerics)
    if numerics == 'reference':  # 0.1 * gamma * ones + 0.01 * gamma * new
      h, s = 0.08 + 0.008 * minmax(h_hat), 0.08 + 0.008 * minmax(s_hat)
    else:  # the first refresh sets the EMA to the statistics
      h, s = minmax(h_hat), minmax(s_hat)
    k = k + (
      s[:, None] * h[None, :] if stats.rule == 'attend' else h[:, None] * s
    )
  want = grads['embed']['embedding'] / (k + 1e-3)
  np.testing.assert_allclose(updates['embed']['embedding'], want, **TOL)
  report = afo.diagnostics(state, params)
  assert report.layers['embed'].rule == 'attend+embed'
  assert report.unpreconditioned == []


def test_tied_embedding_without_a_layout_says_to_pass_one(x64):
  params, ids, grad_fn = _tied_problem()
  _, grads, curvature = grad_fn(params, ids)
  tx = afo.adafisher(1e-3)  # sized from names: a lookup table only
  with pytest.raises(ValueError, match=r"'embed'.*'attend'.*layout="):
    tx.update(grads, tx.init(params), params, curvature=curvature)
