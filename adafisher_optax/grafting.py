"""Grafting: AdaFisher's direction with a step size that transfers from Adam.

In ``reference`` numerics AdaFisher's step is about ``learning_rate /
damping`` per coordinate, so Adam's learning rate does not carry over.
Grafting keeps the direction ``m_hat / F~**p`` of each layer and rescales it
per *group*, the parameters of one preconditioned layer together (weight
and bias) or an unpreconditioned parameter alone:

* ``'rms'``: to the root-mean-square :data:`RMS_TARGET`, the typical RMS of
  Adam's update (no extra state);
* ``'adam'``: to the norm of Adam's update of the same group, with Adam's
  second moment ``nu`` kept in the state (one more parameter-sized buffer,
  so the state is about Adam's size instead of half of it).

Norms are global: under a sharded ``jit`` a sum is over the whole array;
inside ``shard_map`` the partial sums are added over the mesh axes along
which the updates are sharded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from optax import tree as otu

from adafisher_optax import _devices, _tree
from adafisher_optax.layout import FactorLayout

Grafting = Literal['rms', 'adam'] | None
GRAFTINGS = (None, 'rms', 'adam')

#: Target root-mean-square of a group's update under ``grafting='rms'``:
#: the median per-layer RMS of ``optax.adam``'s update measured over
#: training on the benchmark tasks (docs/numerics.md, "Grafting").
RMS_TARGET = 0.2


def group_of(path: _tree.Path, layout: FactorLayout) -> _tree.Path:
  """The group of parameter ``path``: its layer, or itself when alone."""
  return path[:-1] if layout.blocks_of(path) else path


def _wide(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _global_sum(x: jax.Array) -> jax.Array:
  """``sum(x)`` over the whole array, also when ``shard_map`` splits it."""
  total = jnp.sum(x)
  axes = _devices.varying_axes(total)
  return jax.lax.psum(total, tuple(sorted(axes))) if axes else total


def _global_size(x: jax.Array) -> jax.Array:
  axes = tuple(sorted(_devices.varying_axes(x)))
  size = jnp.asarray(x.size, _wide(x).dtype)
  return jax.lax.psum(size, axes) if axes else size


def rescale(
  updates: Mapping[_tree.Path, jax.Array],
  groups: Mapping[_tree.Path, Any],
  target_square: Callable[[list[_tree.Path]], jax.Array],
) -> dict[_tree.Path, jax.Array]:
  """``updates`` scaled per group to the squared norm ``target_square``.

  Args:
    updates: ``{parameter path: update}``.
    groups: ``{parameter path: group}``.
    target_square: the wanted squared norm of a group, from its paths.

  Returns:
    ``{parameter path: update}``; a group whose update is zero stays zero.
  """
  members: dict[Any, list[_tree.Path]] = {}
  for path in updates:
    members.setdefault(groups[path], []).append(path)
  scaled = {}
  for paths in members.values():
    square = sum(_global_sum(jnp.square(_wide(updates[p]))) for p in paths)
    wanted = target_square(paths)
    scale = jnp.where(
      square > 0, jnp.sqrt(wanted / jnp.where(square > 0, square, 1.0)), 0.0
    )
    for p in paths:
      scaled[p] = updates[p] * scale.astype(updates[p].dtype)
  return scaled


def rms_target_square(updates: Mapping[_tree.Path, jax.Array]):
  """``target_square`` of ``'rms'``: ``RMS_TARGET**2`` times the group size."""

  def target(paths):
    return RMS_TARGET**2 * sum(_global_size(updates[p]) for p in paths)

  return target


def norm_target_square(reference: Mapping[_tree.Path, jax.Array]):
  """``target_square`` matching the group norms of ``reference``."""

  def target(paths):
    return sum(_global_sum(jnp.square(_wide(reference[p]))) for p in paths)

  return target


def initial_nu(params: Any, dtype: Any) -> Any:
  """Adam's second moment of ``'adam'``, zero: in ``dtype``, or in the
  params' dtype but float32 for float16 params (whose squared gradients
  below 2.4e-4 would underflow to 0 and blow Adam's update up)."""

  def zeros(p):
    wanted = dtype or (jnp.float32 if p.dtype == jnp.float16 else p.dtype)
    return jnp.zeros(p.shape, wanted)

  return jax.tree.map(zeros, params)


def _adam_direction(grads, mu, nu, count, b1, b2, eps):
  """``(Adam's update, new nu)``; non-finite gradient entries change nothing."""

  def second_moment(g, v):  # squared in float32 (float16's underflow)
    new = (1 - b2) * jnp.square(_wide(g)) + b2 * v
    return jnp.where(jnp.isfinite(g), new, v).astype(v.dtype)

  nu = jax.tree.map(second_moment, grads, nu)
  mu_hat = otu.bias_correction(mu, b1, count)
  nu_hat = otu.bias_correction(nu, b2, count)

  def direction(m, v, g):
    u = _wide(m) / (jnp.sqrt(_wide(v)) + eps)
    return jnp.where(jnp.isfinite(g), u, 0)

  return jax.tree.map(direction, mu_hat, nu_hat, grads), nu


def graft(
  mode: Grafting,
  updates: optax.Updates,
  grads: optax.Updates,
  mu: optax.Updates,
  nu: optax.Updates,
  layout: FactorLayout,
  *,
  count: jax.Array,
  b1: Any,
  b2: Any,
  eps: Any,
) -> tuple[optax.Updates, optax.Updates]:
  """``(updates, nu)`` with each group's update rescaled as ``mode`` says.

  Args:
    mode: ``'rms'`` or ``'adam'``.
    updates: AdaFisher's updates (the direction).
    grads: the gradients (for Adam's second moment).
    mu: the momentum after this step.
    nu: Adam's second moment before this step (``'adam'`` only).
    layout: the state's factor layout (which parameters form a layer).
    count: the step count after this step.
    b1: momentum decay (Adam's bias correction).
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
  """
  paths = dict(_tree.leaves_with_paths(updates))
  groups = {path: group_of(path, layout) for path in paths}
  if mode == 'rms':
    target = rms_target_square(paths)
  else:
    adam, nu = _adam_direction(grads, mu, nu, count, b1, b2, eps)
    target = norm_target_square(dict(_tree.leaves_with_paths(adam)))
  scaled = rescale(paths, groups, target)
  return _tree.map_with_path(lambda path, u: scaled[path], updates), nu
