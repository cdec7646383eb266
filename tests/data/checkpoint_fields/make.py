"""Writes this folder with the state layout of one array per factor field
(``h``, ``s``, ``curvature_mean``, ``refreshes``, ``skipped``, ``h_ema``,
``s_ema``), as adafisher_optax kept it up to commit 31527a8.

git worktree add /tmp/fields 31527a8
PYTHONPATH=/tmp/fields python tests/data/checkpoint_fields/make.py OUT_DIR
"""

import sys

import flax.linen as nn
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

import adafisher_optax as afo

FIELDS = ('h', 's', 'curvature_mean', 'refreshes', 'skipped', 'h_ema', 's_ema')


class TiedLM(nn.Module):
  """A tied embedding (lookup and ``attend``), a Dense and a LayerNorm."""

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(11, 6, name='tokens')
    x = nn.relu(nn.Dense(6, name='hidden')(embed(ids)))
    return embed.attend(nn.LayerNorm(name='ln')(x))


def loss_fn(params, ids):
  logits = TiedLM().apply({'params': params}, ids)
  return optax.softmax_cross_entropy_with_integer_labels(
    logits[:, :-1], ids[:, 1:]
  ).mean()


def main(out):
  ids = jax.random.randint(jax.random.key(0), (4, 7), 0, 11)
  params = TiedLM().init(jax.random.key(1), ids)['params']
  grad_fn = afo.value_and_grad_with_curvature(loss_fn)
  layout = afo.curvature_layout(grad_fn, params, ids)
  for numerics in ('reference', 'paper'):
    tx = afo.adafisher(0.01, numerics=numerics, t_cov=2, layout=layout)
    state, p = tx.init(params), params
    for _ in range(3):
      _, grads, curvature = grad_fn(p, ids)
      updates, state = tx.update(grads, state, p, curvature=curvature)
      p = optax.apply_updates(p, updates)
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(f'{out}/{numerics}', {'params': p, 'opt_state': state})
      checkpointer.wait_until_finished()
    inner = afo.adafisher_state(state)
    expected = {
      f'{"/".join(path)}:{rule}/{field}': np.asarray(getattr(factors, field))
      for (path, rule), factors in afo.factors.by_block(inner.factors).items()
      for field in FIELDS
      if getattr(factors, field) is not None
    }
    np.savez(
      f'{out}/{numerics}_expected.npz',
      count=np.asarray(inner.count),
      last_refresh=np.asarray(inner.last_refresh),
      **expected,
    )


if __name__ == '__main__':
  main(sys.argv[1])
