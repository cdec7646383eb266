"""TrainState, pure-JAX tags, orbax, accumulation, precision, NaN, diagnostics."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafisher_optax as afo
from adafisher_optax import tags

import brute_force as bf
from models import MLP, ConvNet, batch, loss_fn, make_step

HERE = Path(__file__).parent


def _params(model, shape, seed=1, dtype=jnp.float32):
  x, _ = batch(jax.random.key(0), shape)
  params = model.init(jax.random.key(seed), x)['params']
  return jax.tree.map(lambda p: p.astype(dtype), params)


# --- Flax TrainState ---------------------------------------------------------


def test_train_state_matches_the_plain_optax_path():
  model = ConvNet()
  params = _params(model, (6, 5, 5, 2))
  tx = afo.adafisher(0.02, t_cov=2)
  grad_fn = afo.value_and_grad_with_curvature(loss_fn(model))
  state = afo.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  @jax.jit
  def train_step(state, x, y):
    _, grads, curvature = grad_fn(state.params, x, y)
    return state.apply_gradients(grads=grads, curvature=curvature)

  step = jax.jit(make_step(model, tx))
  p, s = params, tx.init(params)
  for i in range(4):
    x, y = batch(jax.random.key(10 + i), (6, 5, 5, 2))
    state = train_step(state, x, y)
    p, s, _ = step(p, s, x, y)
  chex.assert_trees_all_equal(state.params, p)
  assert int(state.step) == 4


def test_train_state_with_an_optimizer_that_takes_no_curvature():
  """A plain step passes no ``curvature=``: optax's own transformations (no
  extra arguments) run as in Flax's TrainState."""
  from flax.training import train_state

  model = MLP()
  params = _params(model, (6, 5))
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optax.scale_by_adam()
  ours = afo.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  flax_state = train_state.TrainState.create(
    apply_fn=model.apply, params=params, tx=tx
  )
  chex.assert_trees_all_equal(
    ours.apply_gradients(grads=grads).params,
    flax_state.apply_gradients(grads=grads).params,
  )


# --- Flax serialization (msgpack, flax.training.checkpoints) ----------------

_OPTIMIZERS = {
  'reference': lambda: afo.adafisher(0.02, t_cov=2),
  'paper': lambda: afo.adafisher(0.02, t_cov=2, numerics='paper'),
  'like_adam': lambda: afo.adafisher_like_adam(1e-3, t_cov=2),
}


@pytest.mark.parametrize('name', sorted(_OPTIMIZERS))
def test_flax_msgpack_round_trip_resumes_training(name):
  from flax import serialization

  model, tx = ConvNet(), _OPTIMIZERS[name]()
  params = _params(model, (6, 5, 5, 2))
  step = jax.jit(make_step(model, tx))
  batches = [batch(jax.random.key(10 + i), (6, 5, 5, 2)) for i in range(4)]
  p, s = params, tx.init(params)
  for x, y in batches[:2]:
    p, s, _ = step(p, s, x, y)
  state = afo.TrainState.create(apply_fn=model.apply, params=p, tx=tx)
  state = state.replace(opt_state=s)
  target = afo.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  restored = serialization.from_bytes(target, serialization.to_bytes(state))
  chex.assert_trees_all_equal(restored.opt_state, s)
  q, r = restored.params, restored.opt_state
  for x, y in batches[2:]:
    p, s, _ = step(p, s, x, y)
    q, r, _ = step(q, r, x, y)
  chex.assert_trees_all_equal((q, r), (p, s))


def test_flax_msgpack_round_trip_of_multi_steps_mid_window():
  """The running sums of the statistics travel with the state."""
  from flax import serialization

  model = MLP()
  params = _params(model, (4, 5))
  grad_fn = afo.value_and_grad_with_curvature(loss_fn(model))
  batches = [batch(jax.random.key(10 + i), (4, 5)) for i in range(4)]
  layout = afo.curvature_layout(grad_fn, params, *batches[0])
  tx = afo.multi_steps(afo.adafisher(0.02, t_cov=1), 2, layout=layout)

  @jax.jit
  def step(p, s, x, y):
    _, grads, curvature = grad_fn(p, x, y)
    updates, s = tx.update(grads, s, p, curvature=curvature)
    return optax.apply_updates(p, updates), s

  p, s = step(params, tx.init(params), *batches[0])  # one micro-batch in
  r = serialization.from_bytes(tx.init(params), serialization.to_bytes(s))
  chex.assert_trees_all_equal(r, s)
  q = p
  for x, y in batches[1:]:
    p, s = step(p, s, x, y)
    q, r = step(q, r, x, y)
  chex.assert_trees_all_equal((q, r), (p, s))


def test_flax_msgpack_refuses_factors_of_another_model_or_numerics():
  from flax import serialization

  params = _params(MLP(), (4, 5))
  blob = serialization.to_bytes(afo.adafisher(0.1).init(params))
  paper = afo.adafisher(0.1, numerics='paper').init(params)
  with pytest.raises(ValueError, match=r"'reference' numerics.*'paper'"):
    serialization.from_bytes(paper, blob)
  wider = _params(MLP(widths=(8, 8)), (4, 5))
  with pytest.raises(ValueError, match=r'factors/dense0/vectors.*shape'):
    serialization.from_bytes(afo.adafisher(0.1).init(wider), blob)


def test_flax_msgpack_works_when_flax_is_imported_after_the_library():
  code = (
    'import adafisher_optax as afo\n'
    'import jax.numpy as jnp\n'
    'from flax import serialization\n'
    "params = {'dense': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)}}\n"
    'state = afo.adafisher(1e-3).init(params)\n'
    'back = serialization.from_bytes(state, serialization.to_bytes(state))\n'
    'factors = afo.adafisher_state(back).factors\n'
    "assert isinstance(factors['dense'], afo.Factors)\n"
  )
  done = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, timeout=120
  )
  assert done.returncode == 0, done.stderr


# --- tags for pure JAX -----------------------------------------------------------


def _tagged_convnet(params, x):
  """The ConvNet of models.py minus its norms, in pure JAX with tags."""
  h = jax.nn.relu(tags.conv(x, params['conv']))
  h = h.mean(axis=(1, 2))
  return tags.dense(h, params['head'])


class _FlaxTwin(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(4, (3, 3), name='conv')(x)).mean(axis=(1, 2))
    return nn.Dense(3, name='head')(h)


def _tagged_mlp(params, x):
  h = jnp.tanh(tags.dense(x, params['dense0']))
  h = jnp.tanh(tags.dense(h, params['dense1']))
  return tags.dense(h, params['head'])


@pytest.mark.parametrize(
  'flax_model,tagged,shape',
  [(MLP(), _tagged_mlp, (8, 5)), (_FlaxTwin(), _tagged_convnet, (6, 5, 5, 2))],
)
def test_tags_match_the_flax_capture(x64, flax_model, tagged, shape):
  params = _params(flax_model, shape, dtype=jnp.float64)
  x, y = batch(jax.random.key(3), shape)
  x = x.astype(jnp.float64)

  def pure_loss(p, x, y):
    logits = tagged(p, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  want = jax.jit(afo.value_and_grad_with_curvature(loss_fn(flax_model)))(
    params, x, y
  )
  got = jax.jit(afo.value_and_grad_with_curvature(pure_loss))(params, x, y)
  chex.assert_trees_all_close(got, want, rtol=1e-12)
  tx = afo.adafisher(0.05, t_cov=1)
  updates, _ = jax.jit(functools.partial(tx.update, curvature=got[2]))(
    got[1], tx.init(params), params
  )
  np.testing.assert_allclose(
    float(pure_loss(optax.apply_updates(params, updates), x, y)),
    float(loss_fn(flax_model)(optax.apply_updates(params, updates), x, y)),
    rtol=1e-12,
  )


def test_tags_inside_lax_scan_over_stacked_layers(x64):
  keys = jax.random.split(jax.random.key(0), 4)
  params = {
    'blocks': {
      'kernel': 0.5 * jax.random.normal(keys[0], (3, 4, 4), jnp.float64),
      'bias': jax.random.normal(keys[1], (3, 4), jnp.float64),
    }
  }
  x = jax.random.normal(keys[2], (5, 4), jnp.float64)
  r = jax.random.normal(keys[3], (5, 4), jnp.float64)

  def loss(p, x):
    def body(h, layer_and_index):
      layer, i = layer_and_index
      return jnp.tanh(tags.dense(h, layer, name='blocks', index=i)), None

    layers = (p['blocks'], jnp.arange(3))
    return jnp.sum(jnp.sin(jax.lax.scan(body, x, layers)[0]) * r)

  _, _, curvature = jax.jit(afo.value_and_grad_with_curvature(loss))(params, x)
  h, s = curvature['blocks'].means()
  assert h.shape == (3, 5) and s.shape == (3, 4)

  def manual(perturbations):
    inputs, h = [], x
    for layer in range(3):
      inputs.append(h)
      w, b = params['blocks']['kernel'][layer], params['blocks']['bias'][layer]
      h = jnp.tanh(h @ w + b + perturbations[layer])
    return jnp.sum(jnp.sin(h) * r), inputs

  g, inputs = jax.grad(manual, has_aux=True)([jnp.zeros((5, 4))] * 3)
  for layer in range(3):
    want_h, want_s = bf.dense(inputs[layer], g[layer], [1], 1, True)
    np.testing.assert_allclose(h[layer], want_h, rtol=1e-12)
    np.testing.assert_allclose(s[layer], want_s, rtol=1e-12)


# --- orbax: kill and resume --------------------------------------------------


def test_killed_run_resumes_bit_identically(tmp_path):
  def worker(*args):
    return subprocess.run(
      [sys.executable, str(HERE / 'checkpoint_worker.py'), *map(str, args)],
      cwd=HERE,
      capture_output=True,
      text=True,
      timeout=300,
      env={
        'PYTHONPATH': f'{HERE}:{HERE.parent}',
        'PATH': '/usr/bin:/bin',
        'JAX_PLATFORMS': 'cpu',
        'XLA_FLAGS': os.environ.get('XLA_FLAGS', ''),  # as conftest.py sets
      },
    )

  full = worker('run', 7, tmp_path / 'full.npz')
  assert full.returncode == 0, full.stderr
  crashed = worker('crash', 4, tmp_path / 'ckpt')
  assert crashed.returncode == -9, crashed.stderr  # SIGKILL after step 4
  resumed = worker('resume', 7, tmp_path / 'ckpt', tmp_path / 'resumed.npz')
  assert resumed.returncode == 0, resumed.stderr
  want, got = np.load(tmp_path / 'full.npz'), np.load(tmp_path / 'resumed.npz')
  assert sorted(want) == sorted(got)
  for key in want:
    assert np.array_equal(want[key], got[key]), key


# --- gradient accumulation ---------------------------------------------------


@pytest.mark.parametrize('numerics', ['reference', 'paper'])
def test_multi_steps_counts_every_micro_batch(x64, numerics):
  model = ConvNet()
  params = _params(model, (12, 5, 5, 2), dtype=jnp.float64)
  grad_fn = jax.jit(afo.value_and_grad_with_curvature(loss_fn(model)))
  batches = [batch(jax.random.key(20 + i), (12, 5, 5, 2)) for i in range(2)]
  batches = [(x.astype(jnp.float64), y) for x, y in batches]
  inner = afo.adafisher(1e-3, t_cov=1, numerics=numerics)
  layout = afo.curvature_layout(grad_fn, params, *batches[0])
  accumulated = afo.multi_steps(
    inner, 3, layout=layout, accumulator_dtype=jnp.float64
  )
  big_p, big_s = params, inner.init(params)
  acc_p, acc_s = params, accumulated.init(params)
  big_update, acc_update = jax.jit(inner.update), jax.jit(accumulated.update)
  # After the first update both agree to rounding; the second update shows
  # it amplified by the ill-conditioned steps (F~ ~ lambda) of early training.
  for (x, y), rtol in zip(batches, (1e-10, 1e-6)):
    _, grads, curvature = grad_fn(big_p, x, y)
    updates, big_s = big_update(grads, big_s, big_p, curvature=curvature)
    big_p = optax.apply_updates(big_p, updates)
    for micro in range(3):
      part = slice(4 * micro, 4 * micro + 4)
      _, grads, curvature = grad_fn(acc_p, x[part], y[part])
      updates, acc_s = acc_update(grads, acc_s, acc_p, curvature=curvature)
      acc_p = optax.apply_updates(acc_p, updates)
    chex.assert_trees_all_close(acc_p, big_p, rtol=rtol)
    chex.assert_trees_all_close(
      afo.adafisher_state(acc_s).factors,
      afo.adafisher_state(big_s).factors,
      rtol=rtol,
    )


def _is_factors(node):
  return isinstance(node, afo.Factors)


def test_multi_steps_drops_the_statistics_of_a_skipped_micro_batch(x64):
  """should_skip_update_fn rejects a micro-batch (a NaN input): the run
  equals the run without that micro-batch, factors included."""
  model = ConvNet()
  params = _params(model, (4, 5, 5, 2), dtype=jnp.float64)
  grad_fn = jax.jit(afo.value_and_grad_with_curvature(loss_fn(model)))
  batches = [batch(jax.random.key(30 + i), (4, 5, 5, 2)) for i in range(3)]
  batches = [(x.astype(jnp.float64), y) for x, y in batches]
  poisoned = (batches[1][0].at[0, 0, 0, 0].set(jnp.nan), batches[1][1])
  layout = afo.curvature_layout(grad_fn, params, *batches[0])

  def run(micro_batches):
    tx = afo.multi_steps(
      afo.adafisher(1e-2, t_cov=1), 2, layout=layout,
      should_skip_update_fn=optax.skip_not_finite,
    )  # fmt: skip
    p, state = params, tx.init(params)
    for x, y in micro_batches:
      _, grads, curvature = grad_fn(p, x, y)
      updates, state = tx.update(grads, state, p, curvature=curvature)
      p = optax.apply_updates(p, updates)
    return p, afo.adafisher_state(state).factors

  got = run([batches[0], poisoned, batches[2]])
  want = run([batches[0], batches[2]])
  chex.assert_trees_all_close(got, want, rtol=1e-12)
  counts = [f.counts for f in jax.tree.leaves(got[1], is_leaf=_is_factors)]
  assert all(
    int(c[..., 0].min()) == 1 and int(c[..., 1].max()) == 0 for c in counts
  )


def test_optax_tree_map_params_over_the_state():
  """tree_map_params inits with a placeholder: with layout= it maps the
  momentum like Adam's moments; without, the error says to give layout=."""
  model = ConvNet()
  params = _params(model, (4, 5, 5, 2))
  grad_fn = afo.value_and_grad_with_curvature(loss_fn(model))
  layout = afo.curvature_layout(
    grad_fn, params, *batch(jax.random.key(0), (4, 5, 5, 2))
  )
  tx = afo.adafisher_like_adam(1e-3, layout=layout)
  state = tx.init(params)
  half = optax.tree_utils.tree_map_params(
    tx, lambda p: p.astype(jnp.bfloat16), state
  )
  inner = afo.adafisher_state(half)
  assert {a.dtype for a in jax.tree.leaves((inner.mu, inner.nu))} == {
    jnp.dtype(jnp.bfloat16)
  }
  chex.assert_trees_all_equal(inner.factors, afo.adafisher_state(state).factors)
  guessed = afo.adafisher_like_adam(1e-3)
  with pytest.raises(TypeError, match=r'placeholder\).*layout='):
    optax.tree_utils.tree_map_params(guessed, lambda p: p, guessed.init(params))


# --- mixed precision ---------------------------------------------------------


class _DigitsNet(nn.Module):
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.relu(nn.Conv(8, (3, 3), **kw)(x))
    x = nn.LayerNorm(**kw)(x.reshape(x.shape[0], -1))
    return nn.Dense(10, **kw)(x).astype(jnp.float32)


def _train_digits(model, steps=150):
  from benchmarks.datasets import digits

  data = digits()
  x, y = data['x_train'][..., None], data['y_train']
  params = model.init(jax.random.key(0), x[:2])['params']
  tx = afo.adafisher(1e-3)
  step = jax.jit(make_step(model, tx))
  state = tx.init(params)
  rng = np.random.default_rng(0)
  for _ in range(steps):
    idx = rng.choice(len(x), 64, replace=False)
    params, state, loss = step(params, state, x[idx], y[idx])
  logits = model.apply({'params': params}, data['x_test'][..., None])
  accuracy = float((logits.argmax(-1) == data['y_test']).mean())
  return params, state, float(loss), accuracy


def test_bfloat16_run_stays_finite_and_close_to_float32():
  _, _, loss32, acc32 = _train_digits(_DigitsNet())
  for model in (
    _DigitsNet(dtype=jnp.bfloat16),  # bf16 activations
    _DigitsNet(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16),  # and params
  ):
    params, state, loss, accuracy = _train_digits(model)
    assert np.isfinite(loss)
    assert all(
      np.all(np.isfinite(p.astype(np.float32))) for p in jax.tree.leaves(params)
    )
    for factors in jax.tree.leaves(
      afo.adafisher_state(state).factors,
      is_leaf=lambda n: isinstance(n, afo.Factors),
    ):
      assert factors.h.dtype == factors.s.dtype == jnp.float32
    # Stated tolerance: within 3 points of accuracy and 15% of loss.
    assert abs(accuracy - acc32) <= 0.03, (accuracy, acc32)
    assert abs(loss - loss32) <= 0.15 * loss32 + 0.02, (loss, loss32)
  assert acc32 > 0.85


# --- non-finite steps --------------------------------------------------------


def _run_stream(model, tx, params, stream):
  step = jax.jit(make_step(model, tx))
  p, s, history = params, tx.init(params), []
  for x, y in stream:
    p, s, _ = step(p, s, x, y)
    history.append((p, s))
  return history


def test_nan_batch_leaves_every_entry_with_a_non_finite_gradient_alone():
  """The built-in rule: such an entry keeps its momentum, gets no update."""
  model = MLP()
  params = _params(model, (8, 5))
  batches = [batch(jax.random.key(30 + i), (8, 5)) for i in range(6)]
  bad = (batches[2][0].at[0, 0].set(jnp.nan), batches[2][1])
  history = _run_stream(
    model,
    afo.adafisher(0.02, t_cov=2),
    params,
    batches[:2] + [bad] + batches[3:],
  )
  (before, state_before), (after, state_after) = history[1], history[2]
  chex.assert_trees_all_equal(after, before)  # every gradient was NaN
  chex.assert_trees_all_equal(
    afo.adafisher_state(state_after).mu, afo.adafisher_state(state_before).mu
  )
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(history[-1][0]))


def test_apply_if_finite_skips_the_whole_step():
  """The documented way to skip steps: as if the bad batch never came."""
  model = MLP()
  params = _params(model, (8, 5))
  batches = [batch(jax.random.key(30 + i), (8, 5)) for i in range(6)]
  bad = (batches[2][0].at[0, 0].set(jnp.nan), batches[2][1])
  tx = optax.apply_if_finite(afo.adafisher(0.02, t_cov=2), 3)
  with_nan = _run_stream(model, tx, params, batches[:2] + [bad] + batches[3:])
  without = _run_stream(model, tx, params, batches[:2] + batches[3:])
  chex.assert_trees_all_equal(with_nan[-1][0], without[-1][0])


# --- diagnostics -------------------------------------------------------------


def test_diagnostics_report_the_preconditioner():
  model = MLP()
  params = _params(model, (16, 5))
  x, y = batch(jax.random.key(5), (16, 5))
  for numerics in ('reference', 'paper'):
    tx = afo.adafisher(0.02, t_cov=2, numerics=numerics, damping=2e-3)
    step = jax.jit(make_step(model, tx))
    p, s = params, tx.init(params)
    for _ in range(5):
      p, s, _ = step(p, s, x, y)
    report = afo.diagnostics(s, p)
    assert report.numerics == numerics
    assert sorted(report.layers) == ['dense0', 'dense1', 'head']
    for layer in report.layers.values():
      assert layer.refreshes == 3  # counts 0, 2, 4
      assert 2e-3 <= layer.f_min <= layer.f_max
      assert 0.0 <= layer.damping_dominated <= 1.0
    assert report.unpreconditioned == []
    assert '| dense0 | dense |' in str(report)
  # The authors' constants leave F~ damping-dominated everywhere.
  assert report.layers['head'].damping_dominated < 1.0
  reference = afo.diagnostics(afo.adafisher(0.02).init(params), params)
  assert reference.layers['head'].refreshes == 0


def test_diagnostics_reference_numerics_are_damping_dominated():
  model = MLP()
  params = _params(model, (16, 5))
  x, y = batch(jax.random.key(5), (16, 5))
  tx = afo.adafisher(0.02, t_cov=1)
  step = jax.jit(make_step(model, tx))
  p, s = params, tx.init(params)
  for _ in range(30):
    p, s, _ = step(p, s, x, y)
  report = afo.diagnostics(s, p)
  for layer in report.layers.values():
    assert layer.damping_dominated == 1.0
    assert layer.f_max < 1.1e-3


# --- Monte-Carlo (sampled) Fisher -------------------------------------------


def test_sampled_fisher_uses_labels_drawn_from_the_model(x64):
  model = MLP()
  params = _params(model, (9, 5), dtype=jnp.float64)
  x, y = batch(jax.random.key(6), (9, 5))
  x = x.astype(jnp.float64)
  key = jax.random.key(11)

  def loss(p, x, y):
    return afo.softmax_cross_entropy(model.apply({'params': p}, x), y)

  empirical = afo.value_and_grad_with_curvature(loss)(params, x, y)
  sampled = jax.jit(afo.value_and_grad_with_curvature(loss, fisher='sampled'))(
    params, x, y, fisher_key=key
  )
  np.testing.assert_allclose(sampled[0], loss_fn(model)(params, x, y))
  chex.assert_trees_all_close(sampled[1], empirical[1], rtol=1e-12)
  logits = model.apply({'params': params}, x)
  drawn = jax.random.categorical(key, logits)

  def head_output_gradient(z):
    return optax.softmax_cross_entropy_with_integer_labels(z, drawn).mean()

  g = jax.grad(head_output_gradient)(logits)
  _, s = sampled[2]['head'].means()
  np.testing.assert_allclose(s, (np.asarray(g) ** 2).mean(0), rtol=1e-12)
  np.testing.assert_allclose(
    sampled[2]['head'].input_sums, empirical[2]['head'].input_sums, rtol=1e-12
  )


def test_sampled_fisher_is_weighted_as_the_loss_weighs_the_cross_entropy(x64):
  """A loss that weighs the cross-entropy by ``w`` (a device's share under
  shard_map, an auxiliary-loss mix) scales the sampled output gradients by
  ``w``, as it scales the empirical ones."""
  model = MLP()
  params = _params(model, (9, 5), dtype=jnp.float64)
  x, y = batch(jax.random.key(6), (9, 5))
  x, key = x.astype(jnp.float64), jax.random.key(11)

  def curvature(weight):
    def loss(p, x, y):
      return weight * afo.softmax_cross_entropy(
        model.apply({'params': p}, x), y
      )

    grad_fn = afo.value_and_grad_with_curvature(loss, fisher='sampled')
    return grad_fn(params, x, y, fisher_key=key)[2]

  one, quarter, unused = curvature(1.0), curvature(0.25), curvature(0.0)
  # A cross-entropy the loss does not use (only registered) counts as the mean.
  chex.assert_trees_all_equal(unused, one)
  for layer in ('dense0', 'head'):
    np.testing.assert_allclose(
      quarter[layer].output_sums[0],
      one[layer].output_sums[0] / 16,
      rtol=1e-12,
    )
    np.testing.assert_allclose(
      quarter[layer].input_sums[0], one[layer].input_sums[0], rtol=1e-12
    )


def test_layers_and_exclude_select_tags_ops():
  params = {
    'embed': {'embedding': jnp.ones((5, 3))},
    'fc': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)},
  }

  def loss(p, ids):
    h = afo.tags.embed(ids, p['embed'])
    return jnp.sum(afo.tags.dense(h, p['fc']) ** 2)

  ids = jnp.array([0, 3, 4])
  _, _, everything = afo.value_and_grad_with_curvature(loss)(params, ids)
  _, _, only_dense = afo.value_and_grad_with_curvature(
    loss, layers=(afo.tags.dense,)
  )(params, ids)
  _, _, no_dense = afo.value_and_grad_with_curvature(
    loss, exclude=(afo.tags.dense,)
  )(params, ids)
  assert sorted(everything) == ['embed', 'fc']
  assert sorted(only_dense) == ['fc'] and sorted(no_dense) == ['embed']
  np.testing.assert_array_equal(
    only_dense['fc'].input_sums[0], everything['fc'].input_sums[0]
  )
