"""Shardings of the optimizer state from the shardings of the parameters."""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from adafisher_optax import _tree


def state_shardings(
  tx: optax.GradientTransformation, params: Any, params_shardings: Any
) -> Any:
  """Returns shardings for ``tx.init(params)``, for ``jax.jit(out_shardings=)``.

  Every part of the state laid out like the params (AdaFisher's momentum,
  Adam's moments in a chain, ...) takes ``params_shardings``; everything else
  (step counts, AdaFisher's factor vectors, hyperparameters) is replicated on
  the params' mesh. The factor vectors are a few KiB per layer, so replicating
  them costs nothing and keeps their refresh free of communication. Boxed
  params (``nn.Partitioned``, as ``nn.with_logical_partitioning`` makes them)
  are accepted with shardings given for the boxed or the unboxed tree; the
  state keeps the boxes (and so the logical axis names).

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
  plain = _tree.unbox_tree(params)
  plain_structure = jax.tree.structure(plain)
  per_leaf = jax.tree.leaves(_tree.unbox_tree(params_shardings))
  if len(per_leaf) != plain_structure.num_leaves:
    raise ValueError(
      'state_shardings: params_shardings must have one sharding per '
      f'parameter ({plain_structure.num_leaves}), got {len(per_leaf)}.'
    )
  abstract_state = jax.eval_shape(tx.init, params)

  def like_params(node) -> bool:
    return jax.tree.structure(_tree.unbox_tree(node)) == plain_structure

  def assign(node):
    if like_params(node):
      boxed = jax.tree.structure(node, is_leaf=_tree.is_box)
      return boxed.unflatten(per_leaf)
    return jax.tree.map(lambda _: replicated, node)

  return jax.tree.map(assign, abstract_state, is_leaf=like_params)
