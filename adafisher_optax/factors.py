"""Kronecker-factor moving averages and their normalisation (spec section 2).

``reference`` numerics min-max normalise each new statistic with the authors'
absolute epsilon and fold it in as ``0.1*gamma*old + 0.01*gamma*new``: the
factors are used as they are. ``paper`` numerics keep a plain EMA of the raw
statistics and min-max normalise it (scale-free) for ``F~``; the normalised
vectors are computed at refresh time and kept, so a step that does not
refresh reads them as they are.

The state keeps each block's :class:`Factors` at its layer's path, keyed
like the params (a tuple sorted by rule where several rules read a layer).
Every block refreshes on its own, with a few small fused ops: XLA compiles
independent small computations in time linear in their number, whereas
gathering all layers into shared arrays and splitting them back costs it
time that grows faster than the number of layers (``docs/performance.md``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Factors:
  """One block's factor vectors (``[*stack, n]``) and refresh counters.

  Attributes:
    h: ``H`` as ``F~`` uses it (the bias entry last, if any).
    s: ``S`` as ``F~`` uses it.
    curvature_mean: the mean of ``K`` over the layer's parameters at the
      latest refresh (``[*stack]``; relative damping divides by it).
    refreshes: refreshes that folded statistics in (int32, ``[*stack]``).
    skipped: refreshes skipped because the statistics were not finite.
    h_ema: ``paper`` numerics: the EMA of ``H_hat`` (``None`` otherwise).
    s_ema: ``paper`` numerics: the EMA of ``S_hat``.
    block: the rule and the parameters it covers (static).
  """

  h: jax.Array
  s: jax.Array
  curvature_mean: jax.Array
  refreshes: jax.Array
  skipped: jax.Array
  h_ema: jax.Array | None
  s_ema: jax.Array | None
  block: Block = dataclasses.field(metadata=dict(static=True))

  @property
  def rule(self) -> str:
    return self.block.rule

  def roles(self) -> dict[str, str]:
    return dict(self.block.roles)


def is_factors(node: Any) -> bool:
  return isinstance(node, Factors)


def _is_layer_node(node: Any) -> bool:
  return is_factors(node) or (
    isinstance(node, tuple) and bool(node) and all(map(is_factors, node))
  )


def by_block(tree: Any) -> dict[BlockKey, Factors]:
  """``{(layer path, rule): Factors}`` of a state's ``factors`` tree."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_layer_node)[0]
  return {
    factors.block.key: factors
    for _, node in flat
    for factors in (node if isinstance(node, tuple) else (node,))
  }


def layout_of(tree: Any) -> FactorLayout:
  """The layout of a state's ``factors`` tree."""
  return FactorLayout({k: f.block for k, f in by_block(tree).items()})


def _initial(block: Block, paper: bool, dtype: Any) -> Factors:
  """Factors before any refresh: ones (the authors' initialisation)."""
  return Factors(
    h=jnp.ones(block.h_shape, dtype),
    s=jnp.ones(block.s_shape, dtype),
    curvature_mean=jnp.ones(block.stack, dtype),
    refreshes=jnp.zeros(block.stack, jnp.int32),
    skipped=jnp.zeros(block.stack, jnp.int32),
    h_ema=jnp.ones(block.h_shape, dtype) if paper else None,
    s_ema=jnp.ones(block.s_shape, dtype) if paper else None,
    block=block,
  )


def nest(factors: dict[BlockKey, Factors]) -> Any:
  """The ``factors`` tree of a state: keyed like the params, a tuple sorted
  by rule where several rules read one layer."""
  layers: dict[_tree.Path, list[Factors]] = {}
  for key in sorted(factors):
    layers.setdefault(key[0], []).append(factors[key])
  return _tree.nest(
    {
      path: nodes[0] if len(nodes) == 1 else tuple(nodes)
      for path, nodes in layers.items()
    }
  )


def initial(layout: FactorLayout, paper: bool, dtype: Any) -> Any:
  """The ``factors`` tree of a new state."""
  return nest({b.key: _initial(b, paper, dtype) for b in layout.blocks})


def refresh(
  factors: Factors,
  means: tuple[jax.Array, jax.Array],
  rows: jax.Array,
  *,
  due: Any,
  numerics: rules.Numerics,
  gamma: Any,
  mean_of: Callable[[jax.Array, jax.Array], jax.Array],
) -> Factors:
  """One block's factors with one refresh step's statistics folded in.

  A slice refreshes when the refresh is ``due``, rows reached it, and its
  statistics are finite; a due slice with non-finite statistics is counted
  in ``skipped`` and keeps its factors (a bad batch never poisons them). In
  ``paper`` numerics a slice's first refresh sets the EMAs to the
  statistics.

  Args:
    factors: the block's factors.
    means: its ``(H_hat, S_hat)``.
    rows: the rows behind them (``[*stack]``).
    due: whether a refresh is due (a bool scalar).
    numerics: ``'reference'`` or ``'paper'``.
    gamma: the EMA decay.
    mean_of: ``mean(K)`` per slice of new ``(h, s)``.
  """
  h_hat, s_hat = (m.astype(factors.h.dtype) for m in means)
  finite = jnp.all(jnp.isfinite(h_hat), -1) & jnp.all(jnp.isfinite(s_hat), -1)
  reached = (rows > 0) & due
  ok = reached & finite
  first = factors.refreshes == 0
  h, h_ema = _fold_side(
    factors.h, factors.h_ema, h_hat, ok, first, numerics, gamma
  )
  s, s_ema = _fold_side(
    factors.s, factors.s_ema, s_hat, ok, first, numerics, gamma
  )
  mean = jnp.where(ok, mean_of(h, s), factors.curvature_mean)
  return dataclasses.replace(
    factors,
    h=h,
    s=s,
    h_ema=h_ema,
    s_ema=s_ema,
    curvature_mean=mean.astype(factors.curvature_mean.dtype),
    refreshes=factors.refreshes + ok,
    skipped=factors.skipped + (reached & ~finite),
  )


def _fold_side(old, ema, hat, ok, first, numerics, gamma):
  """``(used, ema)`` of one factor after a refresh where ``ok``."""
  keep = ok[..., None]
  if numerics == 'paper':
    folded = jnp.where(first[..., None], hat, gamma * ema + (1 - gamma) * hat)
    new_ema = jnp.where(keep, folded, ema).astype(ema.dtype)
    used = jnp.where(keep, minmax_paper(new_ema), old).astype(old.dtype)
    return used, new_ema
  fresh = 0.1 * gamma * old + 0.01 * gamma * minmax_reference(hat)
  return jnp.where(keep, fresh, old).astype(old.dtype), None
