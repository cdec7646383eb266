"""Kronecker-factor moving averages and their normalisation (spec section 2).

``reference`` numerics min-max normalise each new statistic with the authors'
absolute epsilon and fold it in as ``0.1*gamma*old + 0.01*gamma*new``;
``paper`` numerics keep a plain EMA of the raw statistics and min-max
normalise (scale-free) when building the preconditioner.

Every layer (and every slice of a stacked layer) is normalised on its own,
but all of them are processed together: their vectors are concatenated and
each min-max is a segment reduction, so a step costs a handful of kernels
whatever the number of layers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

#: Absolute epsilon of the authors' min-max normalisation.
REFERENCE_MINMAX_EPS = 1e-6
#: Relative epsilon of the scale-free min-max of ``paper`` numerics.
PAPER_MINMAX_EPS = 1e-6

Reduce = Callable[[Callable, jax.Array], jax.Array]


class KroneckerFactors(NamedTuple):
  """The factor vectors of one layer (``[*stack, len]`` each).

  Attributes:
    input: ``H``, the input-side factor (with the bias entry last, if any).
    output: ``S``, the output-gradient factor.
    refreshes: how many refreshes folded statistics in (int32, ``[*stack]``).
  """

  input: jax.Array
  output: jax.Array
  refreshes: jax.Array


def _last_axis(op, x):
  return op(x, axis=-1, keepdims=True)


def minmax_reference(x: jax.Array, reduce: Reduce = _last_axis) -> jax.Array:
  """``(x - min) / (max - min + 1e-6)``, ``+-inf`` first mapped to 1 and 0.

  As the authors' code does; over the last axis, or over the segments of
  ``reduce``.
  """
  x = jnp.where(jnp.isposinf(x), 1.0, jnp.where(jnp.isneginf(x), 0.0, x))
  lo, hi = reduce(jnp.min, x), reduce(jnp.max, x)
  return (x - lo) / (hi - lo + REFERENCE_MINMAX_EPS)


def minmax_paper(x: jax.Array, reduce: Reduce = _last_axis) -> jax.Array:
  """Scale-free min-max over the last axis (or the segments of ``reduce``).

  The denominator ``max - min + eps * max|x| + tiny`` makes the result
  invariant to rescaling ``x``, so every float precision agrees.
  """
  lo, hi = reduce(jnp.min, x), reduce(jnp.max, x)
  magnitude = reduce(jnp.max, jnp.abs(x))
  tiny = jnp.finfo(x.dtype).tiny
  return (x - lo) / (hi - lo + PAPER_MINMAX_EPS * magnitude + tiny)


def initial(shapes, dtype) -> KroneckerFactors:
  """Initial factors: ones (the authors' initialisation), no refresh yet."""
  h_shape, s_shape = shapes
  return KroneckerFactors(
    jnp.ones(h_shape, dtype),
    jnp.ones(s_shape, dtype),
    jnp.zeros(h_shape[:-1], jnp.int32),
  )


class Segments:
  """Per-layer ``[*stack, n]`` arrays laid end to end in one flat vector.

  Segment ``k`` is one layer's (or one stacked slice's) vector; the same
  paths and stacks in the same order give matching segments for ``H`` and
  ``S``.
  """

  def __init__(self, shapes: Mapping[Any, tuple[int, ...]]):
    self.shapes = dict(shapes)
    slices = [int(np.prod(s[:-1])) for s in self.shapes.values()]
    sizes = np.repeat([s[-1] for s in self.shapes.values()], slices)
    self.count = len(sizes)
    self.ids = jnp.asarray(np.repeat(np.arange(self.count), sizes))
    self.splits = np.cumsum(
      [n * s[-1] for n, s in zip(slices, self.shapes.values())]
    )[:-1]
    self.segment_splits = np.cumsum(slices)[:-1]

  def flatten(self, arrays: Mapping[Any, jax.Array]) -> jax.Array:
    return jnp.concatenate([arrays[p].reshape(-1) for p in self.shapes])

  def per_segment(self, arrays: Mapping[Any, jax.Array]) -> jax.Array:
    """Concatenates per-slice values (shape ``[*stack]``) in segment order."""
    return jnp.concatenate([jnp.reshape(arrays[p], -1) for p in self.shapes])

  def unflatten(self, flat: jax.Array) -> dict[Any, jax.Array]:
    parts = jnp.split(flat, self.splits)
    return {p: v.reshape(s) for (p, s), v in zip(self.shapes.items(), parts)}

  def unflatten_per_segment(self, values: jax.Array) -> dict[Any, jax.Array]:
    """Inverse of :meth:`per_segment`."""
    parts = jnp.split(values, self.segment_splits)
    return {
      p: v.reshape(s[:-1]) for (p, s), v in zip(self.shapes.items(), parts)
    }

  def reduce(self, op, x: jax.Array) -> jax.Array:
    """``op`` (``jnp.min``/``jnp.max``) within each segment, broadcast back."""
    segment_op = {jnp.min: jax.ops.segment_min, jnp.max: jax.ops.segment_max}
    per_segment = segment_op[op](
      x, self.ids, self.count, indices_are_sorted=True
    )
    return per_segment[self.ids]

  def all(self, x: jax.Array) -> jax.Array:
    """Whether each segment is all true (``[count]``)."""
    return jax.ops.segment_min(
      x.astype(jnp.int32), self.ids, self.count, indices_are_sorted=True
    ).astype(bool)


def refresh(
  factors: Mapping[Any, KroneckerFactors],
  means: Mapping[Any, tuple[jax.Array, jax.Array]],
  rows: Mapping[Any, jax.Array],
  *,
  gamma: Any,
  numerics: str,
) -> dict[Any, KroneckerFactors]:
  """Folds one refresh step's statistics into the factors of every layer.

  The refresh of a layer (or of one slice of a stacked layer) is skipped, and
  its factors kept, when no rows reached it or when its statistics are not
  finite: a bad batch never poisons the factors. In
  ``paper`` numerics a layer's first refresh sets the factors to the
  statistics.

  Args:
    factors: the factors per layer.
    means: ``(H_hat, S_hat)`` per layer.
    rows: the rows behind the statistics per layer (``[*stack]``).
    gamma: the EMA decay.
    numerics: ``"reference"`` or ``"paper"``.

  Returns:
    The new factors per layer.
  """
  h_seg = Segments({p: f.input.shape for p, f in factors.items()})
  s_seg = Segments({p: f.output.shape for p, f in factors.items()})
  h_hat = h_seg.flatten({p: m[0] for p, m in means.items()})
  s_hat = s_seg.flatten({p: m[1] for p, m in means.items()})
  old_h = h_seg.flatten({p: f.input for p, f in factors.items()})
  old_s = s_seg.flatten({p: f.output for p, f in factors.items()})
  refreshes = h_seg.per_segment({p: f.refreshes for p, f in factors.items()})
  if numerics == 'reference':
    new_h = 0.1 * gamma * old_h + 0.01 * gamma * minmax_reference(
      h_hat, h_seg.reduce
    )
    new_s = 0.1 * gamma * old_s + 0.01 * gamma * minmax_reference(
      s_hat, s_seg.reduce
    )
  else:
    first = refreshes == 0
    new_h = jnp.where(
      first[h_seg.ids], h_hat, gamma * old_h + (1 - gamma) * h_hat
    )
    new_s = jnp.where(
      first[s_seg.ids], s_hat, gamma * old_s + (1 - gamma) * s_hat
    )
  finite = h_seg.all(jnp.isfinite(h_hat)) & s_seg.all(jnp.isfinite(s_hat))
  ok = (h_seg.per_segment(rows) > 0) & finite
  new_h = jnp.where(ok[h_seg.ids], new_h, old_h).astype(old_h.dtype)
  new_s = jnp.where(ok[s_seg.ids], new_s, old_s).astype(old_s.dtype)
  h, s = h_seg.unflatten(new_h), s_seg.unflatten(new_s)
  counts = h_seg.unflatten_per_segment(refreshes + ok.astype(refreshes.dtype))
  return {p: KroneckerFactors(h[p], s[p], counts[p]) for p in factors}


def for_preconditioning(
  factors: Mapping[Any, KroneckerFactors], numerics: str
) -> dict[Any, tuple[jax.Array, jax.Array]]:
  """The factor vectors ``(H, S)`` of every layer as ``F~`` uses them."""
  if numerics == 'reference':
    return {p: (f.input, f.output) for p, f in factors.items()}
  h_seg = Segments({p: f.input.shape for p, f in factors.items()})
  s_seg = Segments({p: f.output.shape for p, f in factors.items()})
  h = h_seg.unflatten(
    minmax_paper(
      h_seg.flatten({p: f.input for p, f in factors.items()}), h_seg.reduce
    )
  )
  s = s_seg.unflatten(
    minmax_paper(
      s_seg.flatten({p: f.output for p, f in factors.items()}), s_seg.reduce
    )
  )
  return {p: (h[p], s[p]) for p in factors}
