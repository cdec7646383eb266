"""A Flax ``TrainState`` that passes curvature statistics to the optimizer."""

from __future__ import annotations

from typing import Any

import optax
from flax.training import train_state

from adafisher_optax import flax_serialization

flax_serialization.register()


class TrainState(train_state.TrainState):
  """``flax.training.train_state.TrainState`` for AdaFisher.

  Drop-in: create it with ``TrainState.create(apply_fn=..., params=...,
  tx=adafisher_optax.adafisher(...))``, then::

    loss, grads, curvature = grad_fn(state.params, batch, capture=refresh)
    state = state.apply_gradients(grads=grads, curvature=curvature)
  """

  def apply_gradients(
    self, *, grads: Any, curvature: Any = None, **kwargs: Any
  ):
    """One optimizer step.

    Args:
      grads: gradients with respect to ``params``.
      curvature: the statistics from
        :func:`adafisher_optax.value_and_grad_with_curvature` (or
        ``adafisher_optax.nnx``) for this step; ``None`` (a plain step)
        preconditions with the stored factors.
      **kwargs: other fields of the state to replace, e.g. ``batch_stats``.

    Returns:
      The state after the step, with ``step`` incremented.
    """
    extra = {} if curvature is None else {'curvature': curvature}
    updates, opt_state = self.tx.update(
      grads, self.opt_state, self.params, **extra
    )
    return self.replace(
      step=self.step + 1,
      params=optax.apply_updates(self.params, updates),
      opt_state=opt_state,
      **kwargs,
    )
