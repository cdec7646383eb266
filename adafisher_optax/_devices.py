"""Typing of values across devices: varying along ``shard_map``'s manual mesh
axes, and sharded under explicit sharding."""

from __future__ import annotations

from typing import Any

import jax


def varying_axes(x: Any) -> frozenset:
  """Mesh axes along which ``x`` differs between devices (``shard_map``)."""
  aval = jax.typeof(x)
  axes = getattr(aval, 'vma', None)
  if axes is None:
    axes = getattr(getattr(aval, 'manual_axis_type', None), 'varying', ())
  return frozenset(axes)


def to_varying(x: Any, axes: frozenset) -> Any:
  """Marks ``x`` as varying along ``axes``; its cotangent is summed over them."""
  if not axes:
    return x
  axes = tuple(sorted(axes))
  if hasattr(jax.lax, 'pcast'):
    return jax.tree.map(lambda v: jax.lax.pcast(v, axes, to='varying'), x)
  return jax.tree.map(lambda v: jax.lax.pvary(v, axes), x)


def _sharded_axes(x: Any) -> tuple:
  """The mesh axes of ``x``'s type under explicit sharding (trailing
  unsharded dimensions left out; empty elsewhere)."""
  spec = getattr(getattr(jax.typeof(x), 'sharding', None), 'spec', None)
  axes = tuple(spec or ())
  while axes and axes[-1] is None:
    axes = axes[:-1]
  return axes


def like_sharding(value: Any, like: Any) -> Any:
  """``value`` resharded to ``like``'s explicit sharding type, where the two
  differ (statistics of a tensor-parallel input are sharded by feature;
  the probe that receives them is not)."""
  if _sharded_axes(value) == _sharded_axes(like):
    return value
  return jax.sharding.reshard(value, jax.typeof(like).sharding.spec)


def unsharded(x: jax.Array) -> jax.Array:
  """``x`` replicated where explicit sharding types it sharded: a layer's
  statistics are small vectors, padded and reshaped after the reduction."""
  if not _sharded_axes(x):
    return x
  return jax.sharding.reshard(x, jax.sharding.PartitionSpec())


def tracks_varying(axis_name: Any) -> bool:
  """Whether values are typed as varying along ``axis_name`` here.

  True inside ``shard_map`` (which then sums the cotangents of replicated
  inputs itself), false under ``pmap``, where nothing says whether a value
  differs between devices.
  """
  return axis_name in varying_axes(jax.lax.axis_index(axis_name))


def _bound_axes() -> set | None:
  """The axis names bound around this trace (``pmap``, ``shard_map``, a
  named ``vmap``), read from JAX's axis environment, which has no public
  API: ``None`` where it cannot be read."""
  try:
    from jax._src import core

    return set(core.get_axis_env().axis_names())
  except (ImportError, AttributeError):  # another JAX: no detection
    return None


def untracked_axes(x: Any) -> frozenset:
  """Named axes around this trace along which ``x`` may differ untracked.

  The axes of an enclosing ``pmap``: neither typed varying (as inside
  ``shard_map``) nor the axis of a named ``jax.vmap`` that batches ``x``;
  empty where JAX's axis environment cannot be read.
  """
  names = _bound_axes()
  if names is None:
    return frozenset()
  try:
    from jax._src.interpreters import batching

    while isinstance(x, batching.BatchTracer):
      names.discard(x._trace.axis_data.name)
      x = x.val
  except (ImportError, AttributeError):  # another JAX: no detection
    return frozenset()
  return frozenset(n for n in names if not tracks_varying(n))


def unbound_axes(axis_names: tuple) -> list:
  """Those of ``axis_names`` that no enclosing ``pmap``/``shard_map`` binds
  here (empty where JAX's axis environment cannot be read)."""
  bound = _bound_axes()
  if bound is None:
    return []
  return [name for name in axis_names if name not in bound]
