"""Typing of values across devices inside ``shard_map`` (manual mesh axes)."""

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
