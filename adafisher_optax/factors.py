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
  lo, hi = _range(x)
  return (x - lo) / _span(lo, hi, 'reference')


def minmax_paper(x: jax.Array) -> jax.Array:
  """Scale-free min-max over the last axis.

  The denominator ``max - min + eps * max|x| + tiny`` makes the result
  invariant to rescaling ``x``, so every float precision agrees.
  """
  lo, hi = _range(x)
  return (x - lo) / _span(lo, hi, 'paper')


def _span(lo: jax.Array, hi: jax.Array, numerics: rules.Numerics) -> jax.Array:
  """The min-max denominator of a vector with minimum ``lo`` and maximum
  ``hi``: ``max - min`` plus the authors' absolute epsilon (``reference``)
  or the scale-free ``eps * max|x| + tiny`` (``paper``)."""
  if numerics == 'paper':
    magnitude = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    tiny = jnp.finfo(jnp.result_type(lo)).tiny
    return hi - lo + PAPER_MINMAX_EPS * magnitude + tiny
  return hi - lo + REFERENCE_MINMAX_EPS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Factors:
  """One block's factor vectors and refresh counters, packed in few arrays.

  A refresh writes each array of the state with a kernel of its own: the
  vectors and ``mean(K)`` of a block share one array, its two counters
  another, so that a block's refresh is four kernels (with its reduction
  and its packed statistics), not seven. The attributes after ``block``
  are views of them (slices XLA fuses into their readers).

  Attributes:
    vectors: ``[*stack, n_h + n_s + 1]``: ``h``, ``s`` and ``curvature_mean``.
    counts: ``[*stack, 2]`` (int32): ``refreshes`` and ``skipped``.
    emas: ``paper`` numerics: ``[*stack, n_h + n_s + 1]``, ``h_ema`` and
      ``s_ema`` packed like ``vectors`` (the last entry unused; ``None``
      in ``reference`` numerics).
    block: the rule and the parameters it covers (static).
    h: ``H`` as ``F~`` uses it (the bias entry last, if any).
    s: ``S`` as ``F~`` uses it.
    curvature_mean: the mean of ``K`` over the layer's parameters at the
      latest refresh (``[*stack]``; relative damping divides by it).
    refreshes: refreshes that folded statistics in (int32, ``[*stack]``).
    skipped: refreshes skipped because the statistics were not finite.
    h_ema: ``paper`` numerics: the EMA of ``H_hat`` (``None`` otherwise).
    s_ema: ``paper`` numerics: the EMA of ``S_hat``.
  """

  vectors: jax.Array
  counts: jax.Array
  emas: jax.Array | None
  block: Block = dataclasses.field(metadata=dict(static=True))

  @classmethod
  def pack(
    cls,
    block: Block,
    *,
    h: Any,
    s: Any,
    curvature_mean: Any,
    refreshes: Any,
    skipped: Any,
    h_ema: Any = None,
    s_ema: Any = None,
  ) -> Factors:
    """The factors of ``block`` from their parts (``[*stack, ...]``)."""
    mean = jnp.asarray(curvature_mean, h.dtype)
    counts = jnp.stack([refreshes, skipped], -1).astype(jnp.int32)
    emas = None
    if h_ema is not None:
      emas = _pack(jnp.asarray(h_ema), jnp.asarray(s_ema), 0 * mean)
    return cls(_pack(jnp.asarray(h), jnp.asarray(s), mean), counts, emas, block)

  @property
  def _n_h(self) -> int:
    return self.block.h_shape[-1]

  @property
  def h(self) -> jax.Array:
    return self.vectors[..., : self._n_h]

  @property
  def s(self) -> jax.Array:
    return self.vectors[..., self._n_h : -1]

  @property
  def curvature_mean(self) -> jax.Array:
    return self.vectors[..., -1]

  @property
  def refreshes(self) -> jax.Array:
    return self.counts[..., 0]

  @property
  def skipped(self) -> jax.Array:
    return self.counts[..., 1]

  @property
  def h_ema(self) -> jax.Array | None:
    return None if self.emas is None else self.emas[..., : self._n_h]

  @property
  def s_ema(self) -> jax.Array | None:
    return None if self.emas is None else self.emas[..., self._n_h : -1]

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
  n = block.h_shape[-1] + block.s_shape[-1]
  return Factors(
    vectors=jnp.ones(block.stack + (n + 1,), dtype),
    counts=jnp.zeros(block.stack + (2,), jnp.int32),
    emas=jnp.ones(block.stack + (n + 1,), dtype) if paper else None,
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


def _as_last(value: jax.Array, length: int, dtype) -> jax.Array:
  """``value`` (``[*stack]``) as the last entry of ``[*stack, length]``
  vectors, zeros before it, written as a pad: XLA fuses it into the reader,
  whereas a broadcast of a scalar that took a division (``mean(K)``) is a
  kernel of its own per block."""
  lead = [(0, 0)] * jnp.ndim(value)
  return jnp.pad(value.astype(dtype)[..., None], lead + [(length - 1, 0)])


def _pack(h: jax.Array, s: jax.Array, last: jax.Array) -> jax.Array:
  """``[h, s, last]`` on the last axis, written as pads and selects: XLA
  fuses those into every reader, whereas a concatenation is a kernel of
  its own per block."""
  n_h, n_s = h.shape[-1], s.shape[-1]
  lead = [(0, 0)] * (h.ndim - 1)
  position = jnp.arange(n_h + n_s + 1)
  last = _as_last(last, n_h + n_s + 1, h.dtype)
  on_s = jnp.where(position < n_h + n_s, jnp.pad(s, lead + [(n_h, 1)]), last)
  return jnp.where(position < n_h, jnp.pad(h, lead + [(0, n_s + 1)]), on_s)


def _packed_weights(weights: np.ndarray, n_s: int, dtype) -> Any:
  """The weights of ``sum(K)`` over a packed vector (``weights`` on ``h``,
  ones on ``s``, zero on the mean), as an iota expression where the
  weights allow, not a large constant (which costs XLA:CPU far more
  compile time)."""
  n_h = weights.shape[0]
  position = jnp.arange(n_h + n_s + 1)
  if np.all(weights[:-1] == weights[0]):
    on_h = jnp.where(position == n_h - 1, weights[-1], weights[0])
  else:
    on_h = jnp.pad(jnp.asarray(weights, dtype), (0, n_s + 1))
  return jnp.where(position < n_h, on_h, 0.0).astype(dtype)


def _segment_summaries(x, old, n_h, n_s, h_weights):
  """Min, max and weighted sums of the ``h`` and ``s`` segments of packed
  ``x`` (and weighted sums of ``old``), in one variadic reduction: one XLA
  kernel per block."""
  position = jnp.arange(x.shape[-1])
  in_h, in_s = position < n_h, (position >= n_h) & (position < n_h + n_s)
  zero = jnp.zeros((), x.dtype)
  on_s = jnp.where(in_s, 1.0, 0.0).astype(x.dtype)
  operands = (
    jnp.where(in_h, x, jnp.inf), jnp.where(in_h, x, -jnp.inf),
    jnp.where(in_s, x, jnp.inf), jnp.where(in_s, x, -jnp.inf),
    x * h_weights, old * h_weights, x * on_s, old * on_s,
  )  # fmt: skip

  def combine(a, b):
    return (
      jnp.minimum(a[0], b[0]), jnp.maximum(a[1], b[1]),
      jnp.minimum(a[2], b[2]), jnp.maximum(a[3], b[3]),
      *(u + v for u, v in zip(a[4:], b[4:], strict=True)),
    )  # fmt: skip

  init = (zero + jnp.inf, zero - jnp.inf) * 2 + (zero,) * 4
  return jax.lax.reduce(operands, init, combine, (x.ndim - 1,))


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
) -> tuple[Factors, jax.Array]:
  """One block's factors with one refresh step's statistics folded in, and
  whether any of its slices took them.

  A slice refreshes when the refresh is ``due``, rows reached it, and its
  statistics are finite; a due slice with non-finite statistics is counted
  in ``skipped`` and keeps its factors (a bad batch never poisons them). In
  ``paper`` numerics a slice's first refresh sets the EMAs to the
  statistics. Written for few XLA kernels per block: the new statistics
  are packed like :attr:`Factors.vectors` and folded in elementwise (so
  XLA updates the arrays in place); one reduction gives each factor's min
  and max (which propagate NaN and infinities, so they also tell whether
  it is finite) and, for an outer :class:`~adafisher_optax.rules.CurvatureSum`,
  the sums behind ``mean(K)``.

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
  old = factors.vectors
  dtype = old.dtype
  n_h, n_s = factors.block.h_shape[-1], factors.block.s_shape[-1]
  position = jnp.arange(n_h + n_s + 1)
  in_h = position < n_h
  x = _pack(*(m.astype(dtype) for m in means), jnp.zeros(old.shape[:-1], dtype))
  if numerics == 'paper':
    first = (factors.refreshes == 0)[..., None]
    x = jnp.where(first, x, gamma * factors.emas + (1 - gamma) * x)
  outer = form is not None and form.outer
  h_weights = np.asarray(form.weights if outer else np.ones(n_h), float)
  lo_h, hi_h, lo_s, hi_s, h_sum, h_sum_old, s_sum, s_sum_old = (
    _segment_summaries(x, old, n_h, n_s, _packed_weights(h_weights, n_s, dtype))
  )
  span_h, span_s = _span(lo_h, hi_h, numerics), _span(lo_s, hi_s, numerics)
  # sum(w * new) of each factor, from the sums of x and old.
  h_sum = (h_sum - h_weights.sum() * lo_h) / span_h
  s_sum = (s_sum - n_s * lo_s) / span_s
  lo = jnp.where(in_h, lo_h[..., None], lo_s[..., None])
  new = (x - lo) / jnp.where(in_h, span_h[..., None], span_s[..., None])
  if numerics == 'reference':
    new = 0.1 * gamma * old + 0.01 * gamma * new
    h_sum = 0.1 * gamma * h_sum_old + 0.01 * gamma * h_sum
    s_sum = 0.1 * gamma * s_sum_old + 0.01 * gamma * s_sum
  if outer:
    mean = h_sum * s_sum / entries
  else:
    mean = mean_of(new[..., :n_h], new[..., n_h : n_h + n_s])
  reached = (rows > 0) & due
  ok = reached & jnp.isfinite(lo_h + hi_h + lo_s + hi_s)
  keep = ok[..., None]
  # mean(K) in the last entry of ``new`` itself: repacking slices of
  # ``new`` would make XLA copy the array instead of updating it in place.
  mean = _as_last(mean, n_h + n_s + 1, dtype)
  new = jnp.where(position == n_h + n_s, mean, new)
  emas = factors.emas
  if numerics == 'paper':
    emas = jnp.where(keep, x, emas).astype(dtype)
  refreshed = Factors(
    vectors=jnp.where(keep, new, old).astype(dtype),
    counts=factors.counts + jnp.stack([ok, reached & ~ok], -1),
    emas=emas,
    block=factors.block,
  )
  return refreshed, jnp.any(ok)


def _range(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return jnp.min(x, axis=-1, keepdims=True), jnp.max(x, axis=-1, keepdims=True)
