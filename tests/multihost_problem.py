"""The training problem shared by the multi-host test and its workers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import adafisher_optax as afo

STEPS, GLOBAL_BATCH = 5, 8


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3, 3), name='conv')(x).reshape(x.shape[0], -1)
    x = nn.LayerNorm(name='ln')(nn.Dense(6, name='hidden')(jnp.tanh(x)))
    return nn.Dense(3, name='head')(x)


def data():
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(STEPS, GLOBAL_BATCH, 4, 4, 2))
  ys = rng.integers(0, 3, size=(STEPS, GLOBAL_BATCH))
  params = Net().init(jax.random.key(1), jnp.asarray(xs[0]))['params']
  return jax.tree.map(lambda p: np.asarray(p, np.float64), params), xs, ys


def train_step():
  model = Net()
  tx = afo.adafisher(0.05, t_cov=2)

  def loss(params, x, y):
    logits = model.apply({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  grad_fn = afo.value_and_grad_with_curvature(loss)

  @jax.jit
  def step(params, state, x, y):
    _, grads, curvature = grad_fn(params, x, y)
    updates, state = tx.update(grads, state, params, curvature=curvature)
    return optax.apply_updates(params, updates), state

  return tx, step


def train_single():
  params, xs, ys = data()
  tx, step = train_step()
  state = tx.init(params)
  for x, y in zip(xs, ys):
    params, state = step(params, state, x, y)
  return params


def train_sharded():
  """Data-parallel over every device of every process; each feeds its part."""
  params, xs, ys = data()
  tx, step = train_step()
  mesh = jax.make_mesh((jax.device_count(),), ('batch',))
  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P('batch'))
  per_process = GLOBAL_BATCH // jax.process_count()
  mine = slice(
    jax.process_index() * per_process, (jax.process_index() + 1) * per_process
  )

  def global_array(sharding, local):
    return jax.make_array_from_process_local_data(sharding, local)

  params = jax.tree.map(lambda v: global_array(replicated, v), params)
  state = jax.jit(tx.init, out_shardings=replicated)(params)
  for x, y in zip(xs, ys):
    params, state = step(
      params, state, global_array(batch, x[mine]), global_array(batch, y[mine])
    )
  return params
