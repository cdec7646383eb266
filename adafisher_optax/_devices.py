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


def tracks_varying(axis_name: Any) -> bool:
  """Whether values are typed as varying along ``axis_name`` here.

  True inside ``shard_map`` (which then sums the cotangents of replicated
  inputs itself), false under ``pmap``, where nothing says whether a value
  differs between devices.
  """
  return axis_name in varying_axes(jax.lax.axis_index(axis_name))
