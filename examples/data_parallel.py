"""Data-parallel AdaFisher three ways, checked against one device.

Runs on 8 virtual CPU devices by default (or the machine's accelerators with
``--real-devices``): a small MLP on scikit-learn's digits trained for a few
steps with sharded ``jit``, ``shard_map`` and ``pmap``; prints how far each
lands from the single-device run on the same global batches.

    python examples/data_parallel.py
"""

import argparse
import os
import sys

if '--real-devices' not in sys.argv:
  os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn.datasets import load_digits

import adafisher_optax as afo


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(nn.LayerNorm()(x))


def loss_fn(params, x, y):
  logits = MLP().apply({'params': params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--real-devices', action='store_true')
  args = parser.parse_args(argv)
  n = jax.device_count()
  digits = load_digits()
  x = (digits.images / 16.0).reshape(-1, 64).astype(np.float32)
  y = digits.target.astype(np.int32)
  batches = [
    (x[i * 8 * n : (i + 1) * 8 * n], y[i * 8 * n : (i + 1) * 8 * n])
    for i in range(args.steps)
  ]
  params = MLP().init(jax.random.key(0), x[:1])['params']
  tx = afo.adafisher(1e-3, t_cov=2)
  grad_fn = afo.value_and_grad_with_curvature(loss_fn)

  def step(params, opt_state, x, y):
    _, grads, curvature = grad_fn(params, x, y)
    updates, opt_state = tx.update(
      grads, opt_state, params, curvature=curvature
    )
    return optax.apply_updates(params, updates), opt_state

  def train(step_fn, put=lambda v: v, p=params, s=None):
    s = tx.init(params) if s is None else s
    for bx, by in batches:
      p, s = step_fn(p, s, put(bx), put(by))
    return p

  single = train(jax.jit(step))
  mesh = jax.make_mesh((n,), ('batch',))
  replicated, sharded = (
    NamedSharding(mesh, P()),
    NamedSharding(mesh, P('batch')),
  )

  # 1. jit with the batch sharded over the mesh: global statistics for free.
  jit_result = train(
    jax.jit(step),
    lambda v: jax.device_put(v, sharded),
    jax.device_put(params, replicated),
  )

  # 2. shard_map: each device's loss is its share of the global mean; JAX
  #    sums gradients and statistics of the replicated params over devices.
  share_grad = afo.value_and_grad_with_curvature(
    lambda p, x, y: loss_fn(p, x, y) / n
  )

  def local_step(params, opt_state, x, y):
    _, grads, curvature = share_grad(params, x, y)
    updates, opt_state = tx.update(
      grads, opt_state, params, curvature=curvature
    )
    return optax.apply_updates(params, updates), opt_state

  shard_map_result = train(
    jax.jit(
      jax.shard_map(
        local_step,
        mesh=mesh,
        in_specs=(P(), P(), P('batch'), P('batch')),
        out_specs=(P(), P()),
      )
    ),
    lambda v: jax.device_put(v, sharded),
    jax.device_put(params, replicated),
    jax.device_put(tx.init(params), replicated),
  )

  # 3. pmap: local-mean loss, pmean'd gradients, and axis_name on AdaFisher.
  pmap_tx = afo.adafisher(1e-3, t_cov=2, axis_name='batch')

  def pmap_step(params, opt_state, x, y):
    _, grads, curvature = grad_fn(params, x, y)
    grads = jax.lax.pmean(grads, 'batch')
    updates, opt_state = pmap_tx.update(
      grads, opt_state, params, curvature=curvature
    )
    return optax.apply_updates(params, updates), opt_state

  stack = lambda t: jax.tree.map(lambda v: jnp.stack([v] * n), t)  # noqa: E731
  pmap_result = train(
    jax.pmap(pmap_step, axis_name='batch'),
    lambda v: v.reshape(n, -1, *v.shape[1:]),
    stack(params),
    stack(pmap_tx.init(params)),
  )
  pmap_result = jax.tree.map(lambda v: v[0], pmap_result)

  def gap(result):
    return max(
      float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
      for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(single))
    )

  print(
    f'{n} devices, {args.steps} steps, global batch {8 * n}; '
    'max relative difference from one device:'
  )
  for name, result in (
    ('jit (sharded batch)', jit_result),
    ('shard_map', shard_map_result),
    ('pmap', pmap_result),
  ):
    print(f'  {name:20s} {gap(result):.2e}')
  return max(gap(r) for r in (jit_result, shard_map_result, pmap_result))


if __name__ == '__main__':
  main()
