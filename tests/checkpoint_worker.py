"""A training process for the kill-and-resume test.

    python checkpoint_worker.py run N OUT       # N steps, save final params
    python checkpoint_worker.py crash K DIR     # K steps, checkpoint, SIGKILL
    python checkpoint_worker.py resume N DIR OUT

Steps use a fixed stream of batches (the batch of step t depends only on t),
so a resumed run sees exactly what the uninterrupted one did.
"""

import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import adafisher_optax as afo

from models import ConvNet, loss_fn

jax.config.update('jax_enable_x64', True)
MODEL = ConvNet()
TX = optax.chain(optax.clip_by_global_norm(1.0), afo.adafisher(0.02, t_cov=3))


def batch(t):
  keys = jax.random.split(jax.random.key(100 + t))
  x = jax.random.normal(keys[0], (6, 5, 5, 2), jnp.float64)
  return x, jax.random.randint(keys[1], (6,), 0, 3)


@jax.jit
def step(params, opt_state, x, y):
  grad_fn = afo.value_and_grad_with_curvature(loss_fn(MODEL))
  _, grads, curvature = grad_fn(params, x, y)
  updates, opt_state = TX.update(grads, opt_state, params, curvature=curvature)
  return optax.apply_updates(params, updates), opt_state


def initial():
  params = MODEL.init(jax.random.key(0), batch(0)[0])['params']
  params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
  return {'params': params, 'opt_state': TX.init(params), 'step': 0}


def train(state, until, manager=None):
  params, opt_state = state['params'], state['opt_state']
  for t in range(int(state['step']), until):
    params, opt_state = step(params, opt_state, *batch(t))
    if manager is not None:
      manager.save(
        t + 1,
        args=ocp.args.StandardSave(
          {'params': params, 'opt_state': opt_state, 'step': t + 1}
        ),
      )
  return params


def save_params(params, out):
  np.savez(
    out,
    **{
      jax.tree_util.keystr(k): np.asarray(v)
      for k, v in jax.tree_util.tree_leaves_with_path(params)
    },
  )


def main():
  mode, steps, where = sys.argv[1], int(sys.argv[2]), sys.argv[3]
  if mode == 'run':
    save_params(train(initial(), steps), where)
  elif mode == 'crash':
    with ocp.CheckpointManager(where) as manager:
      train(initial(), steps, manager)
      manager.wait_until_finished()
    os.kill(os.getpid(), signal.SIGKILL)
  else:
    with ocp.CheckpointManager(where) as manager:
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, initial())
      state = manager.restore(
        manager.latest_step(), args=ocp.args.StandardRestore(abstract)
      )
    save_params(train(state, steps), sys.argv[4])


if __name__ == '__main__':
  main()
