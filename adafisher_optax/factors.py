"""Kronecker-factor moving averages and their normalisation (spec section 2).

``reference`` numerics min-max normalise each new statistic with the authors'
absolute epsilon and fold it in as ``0.1*gamma*old + 0.01*gamma*new``: the
factors are used as they are. ``paper`` numerics keep a plain EMA of the raw
statistics and min-max normalise it (scale-free) for ``F~``; the normalised
vectors are computed at refresh time and kept, so a step that does not
refresh reads them as they are.

The factors of the whole model live in :class:`FactorBuffers`: one
``[rows, n]`` array per vector length ``n`` (rows placed by
:class:`~adafisher_optax.layout.FactorLayout`). Each row is normalised on
its own, but a refresh processes every row of a length at once, so it costs
a handful of large ops whatever the number of layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adafisher_optax import _tree, rules
from adafisher_optax.layout import Block, BlockKey, FactorLayout

#: Absolute epsilon of the authors' min-max normalisation.
REFERENCE_MINMAX_EPS = 1e-6
#: Relative epsilon of the scale-free min-max of ``paper`` numerics.
PAPER_MINMAX_EPS = 1e-6


def minmax_reference(x: jax.Array) -> jax.Array:
  """``(x - min) / (max - min + 1e-6)`` over the last axis, as the authors do
  (``+-inf`` first mapped to 1 and 0)."""
  x = jnp.where(jnp.isposinf(x), 1.0, jnp.where(jnp.isneginf(x), 0.0, x))
  lo = jnp.min(x, axis=-1, keepdims=True)
  hi = jnp.max(x, axis=-1, keepdims=True)
  return (x - lo) / (hi - lo + REFERENCE_MINMAX_EPS)


def minmax_paper(x: jax.Array) -> jax.Array:
  """Scale-free min-max over the last axis.

  The denominator ``max - min + eps * max|x| + tiny`` makes the result
  invariant to rescaling ``x``, so every float precision agrees.
  """
  lo = jnp.min(x, axis=-1, keepdims=True)
  hi = jnp.max(x, axis=-1, keepdims=True)
  magnitude = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
  tiny = jnp.finfo(x.dtype).tiny
  return (x - lo) / (hi - lo + PAPER_MINMAX_EPS * magnitude + tiny)


@dataclasses.dataclass(frozen=True)
class LayerFactors:
  """A view of one block's factors (``[*stack, n]`` vectors).

  Attributes:
    h: ``H`` as ``F~`` uses it (the bias entry last, if any).
    s: ``S`` as ``F~`` uses it.
    h_ema: ``paper`` numerics: the EMA of ``H_hat`` (``None`` otherwise).
    s_ema: ``paper`` numerics: the EMA of ``S_hat``.
    curvature_mean: the mean of ``K`` over the layer's parameters at the
      latest refresh (``[*stack]``; relative damping divides by it).
    refreshes: refreshes that folded statistics in (``[*stack]``).
    skipped: refreshes skipped because the statistics were not finite.
    block: where it lives, its rule and the parameters it covers.
  """

  h: jax.Array
  s: jax.Array
  h_ema: jax.Array | None
  s_ema: jax.Array | None
  curvature_mean: jax.Array
  refreshes: jax.Array
  skipped: jax.Array
  block: Block

  @property
  def rule(self) -> str:
    return self.block.rule

  def roles(self) -> dict[str, str]:
    return dict(self.block.roles)


def _rows(buffer: Mapping[str, jax.Array], length: int, first: int, block):
  # dynamic_slice at a constant offset: XLA:CPU compiles a program with many
  # of them about 25% faster than one with as many static slices.
  rows = jax.lax.dynamic_slice_in_dim(buffer[str(length)], first, block.slices)
  return rows.reshape(block.stack + (length,))


def _per_slice(values: jax.Array, block: Block) -> jax.Array:
  rows = jax.lax.dynamic_slice_in_dim(values, block.first_slice, block.slices)
  return rows.reshape(block.stack)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FactorBuffers:
  """The factor vectors of every block, a few arrays for the whole model.

  :meth:`view` gives :class:`LayerFactors` views keyed like the params; a
  layer read by several rules gives a tuple of views sorted by rule name.

  Attributes:
    h: ``{'n': [rows, n]}``, every ``H`` vector of length ``n``.
    s: the same for ``S``.
    h_ema: ``paper`` numerics: the EMAs behind ``h`` (empty otherwise).
    s_ema: ``paper`` numerics: the EMAs behind ``s``.
    curvature_mean: ``mean(K)`` per slice (``[slices]``).
    refreshes: refreshes per slice (int32).
    skipped: refreshes skipped per slice (non-finite statistics).
    layout: the :class:`~adafisher_optax.layout.FactorLayout` (static).
  """

  h: dict[str, jax.Array]
  s: dict[str, jax.Array]
  h_ema: dict[str, jax.Array]
  s_ema: dict[str, jax.Array]
  curvature_mean: jax.Array
  refreshes: jax.Array
  skipped: jax.Array
  layout: FactorLayout = dataclasses.field(metadata=dict(static=True))

  def block(self, block: Block) -> LayerFactors:
    """The view of one block."""
    paper = bool(self.h_ema)
    return LayerFactors(
      h=_rows(self.h, block.h_length, block.h_row, block),
      s=_rows(self.s, block.s_length, block.s_row, block),
      h_ema=_rows(self.h_ema, block.h_length, block.h_row, block)
      if paper
      else None,
      s_ema=_rows(self.s_ema, block.s_length, block.s_row, block)
      if paper
      else None,
      curvature_mean=_per_slice(self.curvature_mean, block),
      refreshes=_per_slice(self.refreshes, block),
      skipped=_per_slice(self.skipped, block),
      block=block,
    )

  def view(self) -> Any:
    """Nested dicts keyed like the params, of :class:`LayerFactors`."""
    return _tree.nest(
      {
        path: views[0] if len(views) == 1 else views
        for path, blocks in self.layout.layers.items()
        for views in [tuple(self.block(b) for b in blocks)]
      }
    )


def initial(layout: FactorLayout, paper: bool, dtype: Any) -> FactorBuffers:
  """Factors before any refresh: ones (the authors' initialisation)."""

  def ones(rows: Mapping[int, int]) -> dict[str, jax.Array]:
    return {str(n): jnp.ones((count, n), dtype) for n, count in rows.items()}

  return FactorBuffers(
    h=ones(layout.h_rows),
    s=ones(layout.s_rows),
    h_ema=ones(layout.h_rows) if paper else {},
    s_ema=ones(layout.s_rows) if paper else {},
    curvature_mean=jnp.ones(layout.slices, dtype),
    refreshes=jnp.zeros(layout.slices, jnp.int32),
    skipped=jnp.zeros(layout.slices, jnp.int32),
    layout=layout,
  )


def _assemble(layout, side: str, means: Mapping[BlockKey, jax.Array], dtype):
  """``{'n': [rows, n]}`` of one side's new statistics, zeros where absent."""
  out = {}
  for n in getattr(layout, f'{side}_rows'):
    parts = []
    for block in layout.blocks:
      if getattr(block, f'{side}_length') != n:
        continue
      value = means.get(block.key)
      parts.append(
        jnp.zeros((block.slices, n), dtype)
        if value is None
        else value.reshape(block.slices, n).astype(dtype)
      )
    out[str(n)] = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
  return out


def _row_slices(layout: FactorLayout, side: str) -> dict[str, np.ndarray]:
  """``{'n': the slice of each row}`` of one side's arrays."""
  found: dict[str, list[int]] = {}
  for block in layout.blocks:
    n = str(getattr(block, f'{side}_length'))
    found.setdefault(n, []).extend(
      range(block.first_slice, block.first_slice + block.slices)
    )
  return {n: np.asarray(slices) for n, slices in found.items()}


def _in_slice_order(
  flags: Mapping[str, jax.Array], slices_of_rows
) -> jax.Array:
  """``[slices]`` from one side's per-row ``{'n': [rows]}`` (a row a slice)."""
  order = np.concatenate([slices_of_rows[n] for n in flags])
  values = jnp.concatenate([flags[n] for n in flags])
  return values[np.argsort(order, kind='stable')]


def refresh(
  buffers: FactorBuffers,
  means: Mapping[BlockKey, tuple[jax.Array, jax.Array]],
  rows: Mapping[BlockKey, jax.Array],
  *,
  numerics: rules.Numerics,
  gamma: Any,
) -> FactorBuffers:
  """Folds one refresh step's statistics into the factors of every block.

  The refresh of a slice is skipped, and its factors kept, when no rows
  reached it (or its block has no statistics this step) or when its
  statistics are not finite (counted in ``skipped``): a bad batch never
  poisons the factors. In ``paper`` numerics a slice's first refresh sets
  the EMAs to the statistics. ``curvature_mean`` is left to the caller.

  Args:
    buffers: the factors.
    means: ``{block key: (H_hat, S_hat)}`` of the blocks with statistics.
    rows: ``{block key: rows}`` (``[*stack]``) behind them.
    numerics: ``'reference'`` or ``'paper'``.
    gamma: the EMA decay.

  Returns:
    The new factors.
  """
  layout = buffers.layout
  dtype = buffers.curvature_mean.dtype
  hats = {
    'h': _assemble(layout, 'h', {k: m[0] for k, m in means.items()}, dtype),
    's': _assemble(layout, 's', {k: m[1] for k, m in means.items()}, dtype),
  }
  slices_of = {side: _row_slices(layout, side) for side in ('h', 's')}
  finite = _in_slice_order(
    {n: jnp.all(jnp.isfinite(v), -1) for n, v in hats['h'].items()},
    slices_of['h'],
  ) & _in_slice_order(
    {n: jnp.all(jnp.isfinite(v), -1) for n, v in hats['s'].items()},
    slices_of['s'],
  )
  reached = jnp.concatenate(
    [
      jnp.zeros(b.slices, bool)
      if b.key not in rows
      else jnp.reshape(rows[b.key], -1) > 0
      for b in layout.blocks
    ]
  )
  ok = reached & finite
  first = buffers.refreshes == 0
  new = {}
  for side in ('h', 's'):
    used, emas = {}, {}
    for n, hat in hats[side].items():
      keep = ok[slices_of[side][n]][:, None]
      if numerics == 'paper':
        old = getattr(buffers, f'{side}_ema')[n]
        start = first[slices_of[side][n]][:, None]
        ema = jnp.where(start, hat, gamma * old + (1 - gamma) * hat)
        emas[n] = jnp.where(keep, ema, old).astype(dtype)
        used[n] = jnp.where(
          keep, minmax_paper(emas[n]), getattr(buffers, side)[n]
        ).astype(dtype)
      else:
        old = getattr(buffers, side)[n]
        fresh = 0.1 * gamma * old + 0.01 * gamma * minmax_reference(hat)
        used[n] = jnp.where(keep, fresh, old).astype(dtype)
    new[side] = used
    new[f'{side}_ema'] = emas
  return dataclasses.replace(
    buffers,
    **new,
    refreshes=buffers.refreshes + ok,
    skipped=buffers.skipped + (reached & ~finite),
  )
