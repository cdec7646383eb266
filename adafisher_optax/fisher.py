"""Which Fisher the output-gradient statistics estimate.

``'empirical'``: the gradients of the user's loss (the authors' choice).
``'sampled'``: a Monte-Carlo estimate of the true Fisher, from labels drawn
from the model's own softmax; the user's loss registers its logits through
:func:`softmax_cross_entropy`, and the capture runs one more backward pass
with :func:`sampled_cotangent` in place of the loss's gradient, weighted
as the loss weighs the cross-entropy (:func:`loss_weight_tap`: a loss
written as a device's share, ``mean / D`` under ``shard_map``, weighs it
``1 / D``, as its gradients).
"""

from __future__ import annotations

import jax
import optax

from adafisher_optax import session as session_lib

FISHER = ('empirical', 'sampled')


def check_fisher(fisher: str) -> str:
  if fisher not in FISHER:
    raise ValueError(f'fisher must be one of {FISHER}, got {fisher!r}.')
  return fisher


def sampled_cotangent(logits: jax.Array, key: jax.Array) -> jax.Array:
  """Gradient of the mean cross-entropy of labels drawn from the model."""
  logits = jax.lax.stop_gradient(logits)
  labels = jax.random.categorical(key, logits)
  probs = jax.nn.softmax(logits)
  one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=probs.dtype)
  return (probs - one_hot) / (logits.size // logits.shape[-1])


@jax.custom_vjp
def loss_weight_tap(value: jax.Array, probe: jax.Array) -> jax.Array:
  """Identity on ``value``; the backward pass gives ``probe`` the cotangent
  of ``value``: how much the loss weighs the cross-entropy."""
  del probe
  return value


def _loss_weight_fwd(value, probe):
  del probe
  return value, None


def _loss_weight_bwd(_, g):
  return g, g


loss_weight_tap.defvjp(_loss_weight_fwd, _loss_weight_bwd)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels, registered for capture.

  The same value as ``optax.softmax_cross_entropy_with_integer_labels(logits,
  labels).mean()``. Inside a capture with ``fisher="sampled"`` the logits are
  recorded, so that the statistics use labels sampled from the model.
  """
  value = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  session = session_lib.current()
  return value if session is None else session.register_loss(logits, value)
