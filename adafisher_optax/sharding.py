"""Shardings of the optimizer state from the shardings of the parameters."""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec


def state_shardings(
  tx: optax.GradientTransformation, params: Any, params_shardings: Any
) -> Any:
  """Returns shardings for ``tx.init(params)``, for ``jax.jit(out_shardings=)``.

  Every part of the state laid out like the params (AdaFisher's momentum,
  Adam's moments in a chain, ...) takes ``params_shardings``; everything else
  (step counts, AdaFisher's factor vectors, hyperparameters) is replicated on
  the params' mesh. The factor vectors are a few KiB per layer, so replicating
  them costs nothing and keeps their refresh free of communication.

  Args:
    tx: the optimizer.
    params: the params, or their ``jax.ShapeDtypeStruct``s.
    params_shardings: a tree like ``params`` of ``NamedSharding``s.

  Returns:
    A tree like the optimizer state, of ``NamedSharding``s.
  """
  shardings = jax.tree.leaves(params_shardings)
  if not shardings or not isinstance(shardings[0], NamedSharding):
    raise TypeError(
      'state_shardings: params_shardings must be a tree of NamedSharding, '
      f'got {type(shardings[0]).__name__ if shardings else "an empty tree"}.'
    )
  replicated = NamedSharding(shardings[0].mesh, PartitionSpec())
  params_structure = jax.tree.structure(params)
  abstract_state = jax.eval_shape(tx.init, params)

  def like_params(node) -> bool:
    return jax.tree.structure(node) == params_structure

  def assign(node):
    if like_params(node):
      return params_shardings
    return jax.tree.map(lambda _: replicated, node)

  return jax.tree.map(assign, abstract_state, is_leaf=like_params)
