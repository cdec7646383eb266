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
  by_param = plain_structure.unflatten(per_leaf)

  def like_params(node) -> list | None:
    """The params' shardings at ``node``'s leaves when ``node`` is laid out
    like the params (``optax.masked`` may put a ``MaskedNode`` in place of a
    leaf or a sub-tree), else ``None``."""
    plain_node = _tree.unbox_tree(node)
    structure = jax.tree.structure(plain_node, is_leaf=_masked)
    try:
      parts = structure.flatten_up_to(by_param)
    except (ValueError, TypeError):
      return None
    leaves = structure.flatten_up_to(plain_node)
    if all(_masked(leaf) for leaf in leaves) or not all(
      _masked(leaf) or isinstance(part, NamedSharding)
      for leaf, part in zip(leaves, parts)
    ):
      return None
    return [
      leaf if _masked(leaf) else part for leaf, part in zip(leaves, parts)
    ]

  def assign(node):
    found = like_params(node)
    if found is None:
      return jax.tree.map(lambda _: replicated, node)
    boxed = jax.tree.structure(
      node, is_leaf=lambda n: _tree.is_box(n) or _masked(n)
    )
    return boxed.unflatten(found)

  return jax.tree.map(
    assign, abstract_state, is_leaf=lambda n: like_params(n) is not None
  )


def _masked(node: Any) -> bool:
  return isinstance(node, optax.MaskedNode)
