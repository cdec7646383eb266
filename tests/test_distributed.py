"""Several devices give exactly the single-device result (spec section 4).

Runs on the 8 virtual CPU devices set up in conftest.py.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import adafisher_optax as afo

pytestmark = pytest.mark.usefixtures('x64')
DEVICES, PER_DEVICE, STEPS = 4, 3, 5


class Net(nn.Module):
  """BatchNorm-free: Conv, GroupNorm, LayerNorm, Dense, Embed-free."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), strides=2, name='conv')(x)
    x = nn.relu(nn.GroupNorm(num_groups=2, name='gn')(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.LayerNorm(name='ln')(nn.Dense(8, name='hidden')(x))
    return nn.Dense(3, name='head')(jnp.tanh(x))


def _loss(model):
  def loss(params, x, y):
    logits = model.apply({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss


def _problem(seed=0):
  model = Net()
  keys = jax.random.split(jax.random.key(seed), 3)
  n = DEVICES * PER_DEVICE
  xs = jax.random.normal(keys[0], (STEPS, n, 6, 6, 2), jnp.float64)
  ys = jax.random.randint(keys[1], (STEPS, n), 0, 3)
  params = model.init(keys[2], xs[0])['params']
  params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
  return model, params, xs, ys


def _single_device(model, params, xs, ys, tx):
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


def _local_step(model, tx, axis):
  """One data-parallel step seen from one device (pmap / shard_map)."""
  grad_fn = afo.value_and_grad_with_curvature(_loss(model))

  def step(params, state, x, y):
    _, grads, curvature = grad_fn(params, x, y)
    grads = jax.lax.pmean(grads, axis)
    updates, state = tx.update(grads, state, params, curvature=curvature)
    return optax.apply_updates(params, updates), state

  return step


def _assert_close(got, want, rtol=1e-9):
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)
  ):
    a, b = np.asarray(a), np.asarray(b)
    err = np.max(np.abs(a - b)) / np.max(np.abs(b))
    assert err <= rtol, (jax.tree_util.keystr(path), err)


CASES = [(1, 'reference'), (3, 'reference'), (1, 'paper'), (3, 'paper')]


@pytest.mark.parametrize('t_cov,numerics', CASES)
def test_pmap_equals_one_device_with_the_global_batch(t_cov, numerics):
  model, params, xs, ys = _problem()
  want = _single_device(
    model,
    params,
    xs,
    ys,
    afo.adafisher(0.05, t_cov=t_cov, numerics=numerics),
  )
  tx = afo.adafisher(0.05, t_cov=t_cov, numerics=numerics, axis_name='batch')
  step = jax.pmap(
    _local_step(model, tx, 'batch'),
    axis_name='batch',
    devices=jax.devices()[:DEVICES],
  )
  replicate = lambda t: jax.tree.map(lambda v: jnp.stack([v] * DEVICES), t)  # noqa: E731
  p, s = replicate(params), replicate(tx.init(params))
  shard = lambda v: v.reshape(DEVICES, PER_DEVICE, *v.shape[1:])  # noqa: E731
  for x, y in zip(xs, ys):
    p, s = step(p, s, shard(x), shard(y))
  for device in range(DEVICES):
    _assert_close(jax.tree.map(lambda v, d=device: v[d], p), want)


@pytest.mark.parametrize('t_cov,numerics', CASES)
def test_sharded_jit_equals_one_device(t_cov, numerics):
  model, params, xs, ys = _problem()
  tx = afo.adafisher(0.05, t_cov=t_cov, numerics=numerics)
  want = _single_device(model, params, xs, ys, tx)
  mesh = jax.make_mesh((DEVICES,), ('batch',), devices=jax.devices()[:DEVICES])
  batch_sharding = NamedSharding(mesh, P('batch'))
  replicated = NamedSharding(mesh, P())
  p = jax.device_put(params, replicated)
  xs = jax.device_put(xs, NamedSharding(mesh, P(None, 'batch')))
  ys = jax.device_put(ys, NamedSharding(mesh, P(None, 'batch')))
  got = _single_device(model, p, xs, ys, tx)
  assert xs[0].sharding.is_equivalent_to(batch_sharding, 5)
  _assert_close(got, want)


def _shard_map_step(model, tx, mesh):
  """The shard_map recipe: each device's loss is its share of the global mean.

  JAX sums the gradients of replicated parameters over devices, and the
  statistics with them (they flow back through replicated probes).
  """
  base = _loss(model)
  grad_fn = afo.value_and_grad_with_curvature(
    lambda p, x, y: base(p, x, y) / DEVICES
  )

  def step(params, state, x, y):
    _, grads, curvature = grad_fn(params, x, y)
    updates, state = tx.update(grads, state, params, curvature=curvature)
    return optax.apply_updates(params, updates), state

  return jax.jit(
    jax.shard_map(
      step,
      mesh=mesh,
      in_specs=(P(), P(), P('batch'), P('batch')),
      out_specs=(P(), P()),
    )
  )


@pytest.mark.parametrize(
  't_cov,numerics,axis_name',
  [c + (None,) for c in CASES] + [(3, 'paper', 'batch')],
)
def test_shard_map_equals_one_device(t_cov, numerics, axis_name):
  """``axis_name`` is not needed in shard_map, and passing it changes nothing."""
  model, params, xs, ys = _problem()
  want = _single_device(
    model,
    params,
    xs,
    ys,
    afo.adafisher(0.05, t_cov=t_cov, numerics=numerics),
  )
  mesh = jax.make_mesh((DEVICES,), ('batch',), devices=jax.devices()[:DEVICES])
  tx = afo.adafisher(0.05, t_cov=t_cov, numerics=numerics, axis_name=axis_name)
  step = _shard_map_step(model, tx, mesh)
  replicated = NamedSharding(mesh, P())
  p = jax.device_put(params, replicated)
  s = jax.device_put(tx.init(params), replicated)
  batch = NamedSharding(mesh, P('batch'))
  for x, y in zip(xs, ys):
    p, s = step(p, s, jax.device_put(x, batch), jax.device_put(y, batch))
  _assert_close(p, want)


def test_sampled_fisher_in_shard_map_sums_the_devices_shares():
  """Each device's sampled statistics are weighted by its share of the loss
  (``1 / D``), as its gradients are: the shard_map statistics are those of
  the mean of the shards' own losses (not ``D**2`` times them)."""
  model, params, xs, ys = _problem()
  base = lambda p, x, y: afo.softmax_cross_entropy(  # noqa: E731
    model.apply({'params': p}, x), y
  )
  grad_fn = afo.value_and_grad_with_curvature(
    lambda p, x, y: base(p, x, y) / DEVICES, fisher='sampled'
  )
  key = jax.random.key(3)

  def local(params, x, y):
    device_key = jax.random.fold_in(key, jax.lax.axis_index('batch'))
    return grad_fn(params, x, y, fisher_key=device_key)[2]

  mesh = jax.make_mesh((DEVICES,), ('batch',), devices=jax.devices()[:DEVICES])
  got = jax.jit(
    jax.shard_map(
      local, mesh=mesh, in_specs=(P(), P('batch'), P('batch')), out_specs=P()
    )
  )(
    jax.device_put(params, NamedSharding(mesh, P())),
    *jax.device_put((xs[0], ys[0]), NamedSharding(mesh, P('batch'))),
  )
  own_loss = afo.value_and_grad_with_curvature(base, fisher='sampled')
  shards = [
    own_loss(
      params,
      xs[0][d * PER_DEVICE : (d + 1) * PER_DEVICE],
      ys[0][d * PER_DEVICE : (d + 1) * PER_DEVICE],
      fisher_key=jax.random.fold_in(key, d),
    )[2]
    for d in range(DEVICES)
  ]
  summed = jax.tree.map(lambda *parts: sum(parts), *shards)
  want = jax.tree.map(
    lambda stats: stats.average_of(DEVICES),
    summed,
    is_leaf=lambda node: isinstance(node, afo.LayerStatistics),
  )
  _assert_close(got, want)


def test_pmap_without_axis_name_is_refused_with_the_fix():
  """Per-device statistics would let the replicas drift apart (issue 18)."""
  model, params, xs, ys = _problem()
  tx = afo.adafisher(0.05, t_cov=1)
  step = jax.pmap(
    _local_step(model, tx, 'batch'),
    axis_name='batch',
    devices=jax.devices()[:DEVICES],
  )
  replicate = lambda t: jax.tree.map(lambda v: jnp.stack([v] * DEVICES), t)  # noqa: E731
  p, s = replicate(params), replicate(tx.init(params))
  shard = lambda v: v.reshape(DEVICES, PER_DEVICE, *v.shape[1:])  # noqa: E731
  with pytest.raises(
    ValueError, match=r"pmap over axes \['batch'\].*axis_name='batch'"
  ):
    step(p, s, shard(xs[0]), shard(ys[0]))


def test_named_vmap_is_not_taken_for_a_pmap():
  """Runs vmapped with an axis name (an ensemble) keep their statistics."""
  model, params, xs, ys = _problem()
  tx = afo.adafisher(0.05, t_cov=1)
  grad_fn = afo.value_and_grad_with_curvature(_loss(model))

  def run_step(params, state, x, y):
    _, grads, curvature = grad_fn(params, x, y)
    updates, state = tx.update(grads, state, params, curvature=curvature)
    return optax.apply_updates(params, updates), state

  step = jax.jit(jax.vmap(run_step, axis_name='runs'))
  stacked = lambda t: jax.tree.map(lambda v: jnp.stack([v] * 2), t)  # noqa: E731
  p, s = stacked(params), stacked(tx.init(params))
  p, s = step(p, s, jnp.stack([xs[0], xs[1]]), jnp.stack([ys[0], ys[1]]))
  h = [
    np.asarray(afo.adafisher_state(run).factors['hidden'].h)
    for run in (jax.tree.map(lambda v, i=i: v[i], s) for i in range(2))
  ]
  assert not np.allclose(h[0], h[1])  # each run its own statistics


class Wide(nn.Module):
  """An MLP whose kernels are large enough to shard FSDP-style."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64, name='fc1')(x))
    x = nn.relu(nn.Dense(64, name='fc2')(x))
    return nn.Dense(4, name='head')(x)


def _all_gathers(compiled_text):
  """Element counts of the results of all all-gather ops in compiled HLO."""
  sizes = []
  for line in compiled_text.splitlines():
    match = re.search(r'= \w+\[([\d,]*)\][^=]*? all-gather(?:-start)?\(', line)
    if match:
      dims = [int(d) for d in match.group(1).split(',') if d]
      sizes.append(int(np.prod(dims)) if dims else 1)
  return sorted(sizes)


@pytest.mark.parametrize('per_layer', [False, True])
def test_state_shardings_of_a_masked_adafisher_shard_its_momentum(per_layer):
  """optax.masked / multi_transform put MaskedNodes in the state (in place of
  a leaf, or of a layer with a per-layer mask): the momentum of the trained
  params is still sharded like them, not replicated."""
  model = Wide()
  params = model.init(jax.random.key(0), jnp.ones((2, 32)))['params']
  mesh = jax.make_mesh((8,), ('fsdp',))
  params_shardings = jax.tree.map(
    lambda leaf: NamedSharding(
      mesh,
      P(*[None] * (leaf.ndim - 1), 'fsdp') if leaf.shape[-1] % 8 == 0 else P(),
    ),
    params,
  )
  if per_layer:
    mask = {name: name != 'fc1' for name in params}
  else:
    mask = {n: {'kernel': True, 'bias': n != 'fc1'} for n in params}
  labels = jax.tree.map(lambda m: 'fisher' if m else 'frozen', mask)
  for tx in (
    optax.masked(afo.adafisher(1e-3), mask),
    optax.multi_transform(
      {'fisher': afo.adafisher(1e-3), 'frozen': optax.set_to_zero()}, labels
    ),
  ):
    shardings = afo.state_shardings(tx, params, params_shardings)
    mu = afo.adafisher_state(shardings).mu
    assert mu['fc2']['kernel'] == params_shardings['fc2']['kernel']
    p = jax.device_put(params, params_shardings)
    state = jax.jit(tx.init, out_shardings=shardings)(p)
    got = afo.adafisher_state(state).mu['fc2']['kernel'].sharding
    assert got.is_equivalent_to(params_shardings['fc2']['kernel'], 2)
    assert jax.tree.structure(shardings) == jax.tree.structure(state)


def test_fsdp_sharded_params_and_state():
  model = Wide()
  keys = jax.random.split(jax.random.key(3), 3)
  xs = jax.random.normal(keys[0], (STEPS, 16, 32), jnp.float64)
  ys = jax.random.randint(keys[1], (STEPS, 16), 0, 4)
  params = jax.tree.map(
    lambda p: p.astype(jnp.float64), model.init(keys[2], xs[0])['params']
  )
  tx = afo.adafisher(0.05, t_cov=2)
  want = _single_device(model, params, xs, ys, tx)

  mesh = jax.make_mesh((2, 4), ('data', 'fsdp'))

  def spec(path, leaf):
    big = leaf.ndim == 2 and leaf.shape[0] % 4 == 0 and leaf.size >= 1024
    return NamedSharding(mesh, P('fsdp', None) if big else P())

  params_shardings = jax.tree_util.tree_map_with_path(spec, params)
  state_shardings = afo.state_shardings(tx, params, params_shardings)
  assert state_shardings[1].mu == params_shardings
  assert all(
    sharding.spec == P()
    for sharding in jax.tree.leaves(state_shardings[1].factors)
  )
  p = jax.device_put(params, params_shardings)
  s = jax.jit(tx.init, out_shardings=state_shardings)(p)
  assert (
    s[1]
    .mu['fc2']['kernel']
    .sharding.is_equivalent_to(params_shardings['fc2']['kernel'], 2)
  )
  batch = NamedSharding(mesh, P(('data', 'fsdp')))
  grad_fn = afo.value_and_grad_with_curvature(_loss(model))

  def afisher_step(params, state, x, y):
    _, grads, curvature = grad_fn(params, x, y)
    updates, state = tx.update(grads, state, params, curvature=curvature)
    return optax.apply_updates(params, updates), state

  step = jax.jit(
    afisher_step, out_shardings=(params_shardings, state_shardings)
  )
  for x, y in zip(xs, ys):
    p, s = step(p, s, jax.device_put(x, batch), jax.device_put(y, batch))
  _assert_close(p, want)
  assert p['fc2']['kernel'].sharding.is_equivalent_to(
    params_shardings['fc2']['kernel'], 2
  )

  # AdaFisher adds no all-gather of kernels beyond the forward pass's own.
  adam = optax.adam(1e-3)
  adam_shardings = afo.state_shardings(adam, params, params_shardings)

  def adam_step(params, state, x, y):
    grads = jax.grad(_loss(model))(params, x, y)
    updates, state = adam.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  x, y = jax.device_put(xs[0], batch), jax.device_put(ys[0], batch)
  ours = _all_gathers(step.lower(p, s, x, y).compile().as_text())
  theirs = _all_gathers(
    jax.jit(adam_step, out_shardings=(params_shardings, adam_shardings))
    .lower(p, jax.jit(adam.init, out_shardings=adam_shardings)(p), x, y)
    .compile()
    .as_text()
  )
  kernel_size = params['fc2']['kernel'].size
  big = lambda sizes: [n for n in sizes if n >= kernel_size // 4]  # noqa: E731
  assert len(big(ours)) <= len(big(theirs)), (ours, theirs)


class Boxed(nn.Module):
  """Kernels annotated with logical axes (``nn.with_logical_partitioning``)."""

  @nn.compact
  def __call__(self, x):
    def dense(features, axes, name):
      init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes)
      return nn.Dense(features, kernel_init=init, name=name)

    x = nn.relu(dense(64, ('embed', 'mlp'), 'fc1')(x))
    return dense(4, ('mlp', 'vocab'), 'head')(x)


def test_boxed_params_end_to_end():
  """Capture, init, update and state shardings keep nn.Partitioned boxes."""
  model = Boxed()
  keys = jax.random.split(jax.random.key(5), 3)
  xs = jax.random.normal(keys[0], (STEPS, 16, 32), jnp.float64)
  ys = jax.random.randint(keys[1], (STEPS, 16), 0, 4)
  boxed = jax.tree.map(
    lambda p: p.astype(jnp.float64),
    model.init(keys[2], xs[0])['params'],
  )
  assert isinstance(boxed['fc1']['kernel'], nn.Partitioned)
  tx = afo.adafisher(0.05, t_cov=2)
  want = _single_device(model, nn.unbox(boxed), xs, ys, tx)

  mesh = jax.make_mesh(
    (4, 2), ('data', 'model'), axis_types=(jax.sharding.AxisType.Auto,) * 2
  )
  rules = (('embed', None), ('mlp', 'model'), ('vocab', None))
  specs = nn.get_partition_spec(boxed)
  params_shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  state_shardings = afo.state_shardings(tx, boxed, params_shardings)
  p = jax.device_put(boxed, params_shardings)
  s = jax.jit(tx.init, out_shardings=state_shardings)(p)
  mu = afo.adafisher_state(s).mu['fc1']['kernel']
  assert isinstance(mu, nn.Partitioned) and mu.names == ('embed', 'mlp')
  assert mu.value.sharding.spec == P(None, 'model')
  grad_fn = afo.value_and_grad_with_curvature(_loss(model))

  @functools.partial(jax.jit, out_shardings=(params_shardings, state_shardings))
  def step(params, state, x, y):
    _, grads, curvature = grad_fn(params, x, y)
    assert isinstance(grads['fc1']['kernel'], nn.Partitioned)
    updates, state = tx.update(grads, state, params, curvature=curvature)
    assert isinstance(updates['fc1']['kernel'], nn.Partitioned)
    return optax.apply_updates(params, updates), state

  batch = NamedSharding(mesh, P('data'))
  for x, y in zip(xs, ys):
    p, s = step(p, s, jax.device_put(x, batch), jax.device_put(y, batch))
  assert p['fc1']['kernel'].value.sharding.spec == P(None, 'model')
  _assert_close(nn.unbox(p), want)


def test_multi_steps_inside_shard_map_with_a_layout_traced_outside():
  """The layout does not record where it was traced (issue 12)."""
  model, params, xs, ys = _problem()
  base = _loss(model)
  inner = afo.adafisher(0.05, t_cov=1)
  layout = afo.curvature_layout(
    afo.value_and_grad_with_curvature(base), params, xs[0], ys[0]
  )
  tx = afo.multi_steps(inner, 2, layout=layout, accumulator_dtype=jnp.float64)

  def make_step(grad_fn):
    def step(params, state, x, y):
      _, grads, curvature = grad_fn(params, x, y)
      updates, state = tx.update(grads, state, params, curvature=curvature)
      return optax.apply_updates(params, updates), state

    return step

  one = jax.jit(make_step(afo.value_and_grad_with_curvature(base)))
  mesh = jax.make_mesh((DEVICES,), ('batch',), devices=jax.devices()[:DEVICES])
  sharded = jax.jit(
    jax.shard_map(
      make_step(
        afo.value_and_grad_with_curvature(
          lambda p, x, y: base(p, x, y) / DEVICES
        )
      ),
      mesh=mesh,
      in_specs=(P(), P(), P('batch'), P('batch')),
      out_specs=(P(), P()),
    )
  )
  replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P('batch'))
  want, want_state = params, tx.init(params)
  got = jax.device_put(params, replicated)
  got_state = jax.device_put(tx.init(params), replicated)
  for x, y in zip(xs[:4], ys[:4]):
    want, want_state = one(want, want_state, x, y)
    got, got_state = sharded(
      got, got_state, jax.device_put(x, batch), jax.device_put(y, batch)
    )
  _assert_close(got, want)


def test_explicit_sharding_of_a_tensor_parallel_input():
  """Under explicit sharding the input sums of a feature-sharded input are
  typed sharded; the capture hands them to the probe replicated (bonsai's
  Qwen3 with use_fsdp and use_tp), and they equal the unsharded ones."""
  from flax import nnx

  def loss_fn(model, x, **out):
    return jnp.mean(jnp.sin(model(x, **out)) ** 2)

  def capture(model, x, **out):
    return afo.nnx.value_and_grad_with_curvature(loss_fn)(model, x, **out)[2]

  x = jax.random.normal(jax.random.key(0), (4, 3, 8), jnp.float64)
  want = capture(nnx.Linear(8, 4, param_dtype=jnp.float64, rngs=nnx.Rngs(0)), x)
  mesh = jax.make_mesh(
    (2, 2),
    ('fsdp', 'tp'),
    axis_types=(jax.sharding.AxisType.Explicit,) * 2,
    devices=jax.devices()[:4],
  )
  with jax.set_mesh(mesh):
    model = nnx.Linear(
      8, 4, param_dtype=jnp.float64, rngs=nnx.Rngs(0),
      kernel_metadata={'out_sharding': P('tp', None)},
    )  # fmt: skip
    sharded = jax.sharding.reshard(x, P('fsdp', None, 'tp'))
    out = {'out_sharding': P('fsdp', None, None)}
    got = jax.jit(functools.partial(capture, **out))(model, sharded)
  _assert_close(got, want, rtol=1e-12)
