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
from typing import Any, NamedTuple

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
  return _minmax_reference(x, *_range(x))


def minmax_paper(x: jax.Array) -> jax.Array:
  """Scale-free min-max over the last axis.

  The denominator ``max - min + eps * max|x| + tiny`` makes the result
  invariant to rescaling ``x``, so every float precision agrees.
  """
  return _minmax_paper(x, *_range(x))


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


class _Summary(NamedTuple):
  """One reduction over the last axis of a new vector ``x`` (and the old)."""

  lo: jax.Array
  hi: jax.Array
  weighted: jax.Array  # sum(w * x)
  weighted_old: jax.Array  # sum(w * old)


def _weights(weights: np.ndarray, n: int, dtype) -> Any:
  """``weights`` as a scalar or an iota expression, not a large constant
  (which costs XLA:CPU far more compile time)."""
  if np.all(weights == weights[0]):
    return jnp.asarray(weights[0], dtype)
  if np.all(weights[:-1] == weights[0]):
    last = jnp.arange(n) == n - 1
    return jnp.where(last, weights[-1], weights[0]).astype(dtype)
  return jnp.asarray(weights, dtype)


def _summary(x: jax.Array, old: jax.Array, weights: Any) -> _Summary:
  """Min, max and weighted sums in one variadic reduction: one XLA kernel
  (separate reductions are a kernel each, split in two above 32 entries)."""

  def combine(a, b):
    return (
      jnp.minimum(a[0], b[0]),
      jnp.maximum(a[1], b[1]),
      a[2] + b[2],
      a[3] + b[3],
    )

  zero = jnp.zeros((), x.dtype)
  lo, hi, weighted, weighted_old = jax.lax.reduce(
    (x, x, x * weights, old * weights),
    (zero + jnp.inf, zero - jnp.inf, zero, zero),
    combine,
    (x.ndim - 1,),
  )
  return _Summary(lo[..., None], hi[..., None], weighted, weighted_old)


def _fold(old, x, summary, weight_total, numerics, gamma):
  """``(new vector, sum(w * new))`` of one factor from its new statistic
  ``x`` (the EMA in ``paper`` numerics).

  The vector is divided by a vector: XLA turns a division by a broadcast
  scalar into a reciprocal, a kernel of its own per vector (``0 * x`` is
  not folded away for floats, and a non-finite ``x`` is not kept).
  """
  lo, hi = summary.lo, summary.hi
  shifted_sum = summary.weighted - weight_total * lo[..., 0]
  if numerics == 'paper':
    magnitude = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    tiny = jnp.finfo(x.dtype).tiny
    span = hi - lo + PAPER_MINMAX_EPS * magnitude + tiny
    return (x - lo) / (span + 0 * x), shifted_sum / span[..., 0]
  span = hi - lo + REFERENCE_MINMAX_EPS
  new = 0.1 * gamma * old + 0.01 * gamma * (x - lo) / (span + 0 * x)
  weighted = (
    0.1 * gamma * summary.weighted_old
    + 0.01 * gamma * shifted_sum / span[..., 0]
  )
  return new, weighted


def refresh(
  factors: Factors,
  means: tuple[jax.Array, jax.Array],
  rows: jax.Array,
  *,
  due: Any,
  numerics: rules.Numerics,
  gamma: Any,
  form: rules.CurvatureSum | None,
  entries: int,
  mean_of: Callable[[jax.Array, jax.Array], jax.Array],
) -> Factors:
  """One block's factors with one refresh step's statistics folded in.

  A slice refreshes when the refresh is ``due``, rows reached it, and its
  statistics are finite; a due slice with non-finite statistics is counted
  in ``skipped`` and keeps its factors (a bad batch never poisons them). In
  ``paper`` numerics a slice's first refresh sets the EMAs to the
  statistics. Written for few XLA kernels per block: one reduction per
  vector gives its min and max (which propagate NaN and infinities, so
  they also tell whether it is finite) and, for an outer
  :class:`~adafisher_optax.rules.CurvatureSum`, the sums behind ``mean(K)``.

  Args:
    factors: the block's factors.
    means: its ``(H_hat, S_hat)``.
    rows: the rows behind them (``[*stack]``).
    due: whether a refresh is due (a bool scalar).
    numerics: ``'reference'`` or ``'paper'``.
    gamma: the EMA decay.
    form: the block's ``sum(K)`` form (``None``: use ``mean_of``).
    entries: the entries of the layer's parameters (``mean(K)``'s divisor).
    mean_of: ``mean(K)`` per slice from new ``(h, s)``, for other forms.
  """
  dtype = factors.h.dtype
  h_hat, s_hat = (m.astype(dtype) for m in means)
  if numerics == 'paper':
    first = (factors.refreshes == 0)[..., None]
    h_hat = jnp.where(first, h_hat, gamma * factors.h_ema + (1 - gamma) * h_hat)
    s_hat = jnp.where(first, s_hat, gamma * factors.s_ema + (1 - gamma) * s_hat)
  outer = form is not None and form.outer
  h_weights = form.weights if outer else np.ones(h_hat.shape[-1])
  s_weights = np.ones(s_hat.shape[-1])
  h_summary = _summary(
    h_hat, factors.h, _weights(h_weights, h_hat.shape[-1], dtype)
  )
  s_summary = _summary(s_hat, factors.s, jnp.ones((), dtype))
  finite = jnp.isfinite(
    h_summary.lo + h_summary.hi + s_summary.lo + s_summary.hi
  )
  reached = (rows > 0) & due
  ok = reached & finite[..., 0]
  keep = ok[..., None]
  h, h_sum = _fold(
    factors.h, h_hat, h_summary, h_weights.sum(), numerics, gamma
  )
  s, s_sum = _fold(
    factors.s, s_hat, s_summary, s_weights.sum(), numerics, gamma
  )
  h = jnp.where(keep, h, factors.h)
  s = jnp.where(keep, s, factors.s)
  mean = h_sum * s_sum / entries if outer else mean_of(h, s)
  emas = {}
  if numerics == 'paper':
    emas = dict(
      h_ema=jnp.where(keep, h_hat, factors.h_ema).astype(dtype),
      s_ema=jnp.where(keep, s_hat, factors.s_ema).astype(dtype),
    )
  return dataclasses.replace(
    factors,
    h=h.astype(dtype),
    s=s.astype(dtype),
    curvature_mean=jnp.where(ok, mean, factors.curvature_mean).astype(dtype),
    refreshes=factors.refreshes + ok,
    skipped=factors.skipped + (reached & ~ok),
    **emas,
  )


def _range(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return jnp.min(x, axis=-1, keepdims=True), jnp.max(x, axis=-1, keepdims=True)


def _minmax_reference(x, lo, hi):
  return (x - lo) / (hi - lo + REFERENCE_MINMAX_EPS)


def _minmax_paper(x, lo, hi):
  magnitude = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
  tiny = jnp.finfo(x.dtype).tiny
  return (x - lo) / (hi - lo + PAPER_MINMAX_EPS * magnitude + tiny)
