"""Writes this folder with adafisher_optax 0.2.0 (commit c2a69a3).

git worktree add /tmp/v0.2 c2a69a3
PYTHONPATH=/tmp/v0.2 python tests/data/checkpoint_0.2/make.py OUT_DIR
"""

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import adafisher_optax as afo


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(8, name='hidden')(x))
    x = nn.LayerNorm(name='ln')(x)
    return nn.Dense(3, name='head')(x)


def main(out):
  model = MLP()
  x = jax.random.normal(jax.random.key(0), (16, 5))
  y = jnp.arange(16) % 3
  params = model.init(jax.random.key(1), x)['params']

  def loss_fn(p, x, y):
    logits = model.apply({'params': p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  grad_fn = afo.value_and_grad_with_curvature(loss_fn)
  for numerics in ('reference', 'paper'):
    tx = afo.adafisher(0.01, numerics=numerics, t_cov=2)
    state, p = tx.init(params), params
    for _ in range(3):
      _, grads, curvature = grad_fn(p, x, y)
      updates, state = tx.update(grads, state, p, curvature=curvature)
      p = optax.apply_updates(p, updates)
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(f'{out}/{numerics}', {'params': p, 'opt_state': state})
      checkpointer.wait_until_finished()
    inner = afo.adafisher_state(state)
    expected = {
      f'{name}/{field}': np.asarray(getattr(inner.factors[name], field))
      for name in ('hidden', 'ln', 'head')
      for field in ('h', 's', 'curvature_mean', 'refreshes')
    }
    np.savez(
      f'{out}/{numerics}_expected.npz',
      count=np.asarray(inner.count),
      last_refresh=np.asarray(inner.last_refresh),
      **expected,
    )


if __name__ == '__main__':
  main(sys.argv[1])
