"""Kronecker-factor moving averages and their normalisation (spec section 2).

``reference`` numerics min-max normalise each new statistic with the authors'
absolute epsilon and fold it in as ``0.1*gamma*old + 0.01*gamma*new``;
``paper`` numerics keep a plain EMA of the raw statistics and min-max
normalise (scale-free) when building the preconditioner.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from adafisher_optax.statistics import LayerStatistics

#: Absolute epsilon of the authors' min-max normalisation.
REFERENCE_MINMAX_EPS = 1e-6
#: Relative epsilon of the scale-free min-max of ``paper`` numerics.
PAPER_MINMAX_EPS = 1e-6


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


def minmax_reference(x: jax.Array) -> jax.Array:
  """``(x - min) / (max - min + 1e-6)`` over the last axis, ``+-inf`` first
  mapped to 1 and 0, as the authors' code does."""
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


def initial(shapes, dtype) -> KroneckerFactors:
  """Initial factors: ones (the authors' initialisation), no refresh yet."""
  h_shape, s_shape = shapes
  return KroneckerFactors(
    jnp.ones(h_shape, dtype),
    jnp.ones(s_shape, dtype),
    jnp.zeros(h_shape[:-1], jnp.int32),
  )


def refresh(
  factors: KroneckerFactors,
  stats: LayerStatistics,
  *,
  due: jax.Array,
  gamma: Any,
  numerics: str,
) -> KroneckerFactors:
  """Folds one step's statistics into the factors on refresh steps.

  The refresh of a layer (or of one slice of a stacked layer) is skipped, and
  its factors kept, when it is not ``due``, when no rows reached it, or when
  its statistics are not finite: a bad batch never poisons the factors. In
  ``paper`` numerics a layer's first refresh sets the factors to the
  statistics.
  """
  h_hat, s_hat = stats.means()
  old_h, old_s, refreshes = factors
  if numerics == 'reference':
    new_h = 0.1 * gamma * old_h + 0.01 * gamma * minmax_reference(h_hat)
    new_s = 0.1 * gamma * old_s + 0.01 * gamma * minmax_reference(s_hat)
  else:
    first = (refreshes == 0)[..., None]
    new_h = jnp.where(first, h_hat, gamma * old_h + (1 - gamma) * h_hat)
    new_s = jnp.where(first, s_hat, gamma * old_s + (1 - gamma) * s_hat)
  ok = due & (stats.rows > 0)
  ok &= jnp.all(jnp.isfinite(h_hat), axis=-1)
  ok &= jnp.all(jnp.isfinite(s_hat), axis=-1)
  return KroneckerFactors(
    jnp.where(ok[..., None], new_h, old_h).astype(old_h.dtype),
    jnp.where(ok[..., None], new_s, old_s).astype(old_s.dtype),
    refreshes + ok.astype(refreshes.dtype),
  )


def for_preconditioning(
  factors: KroneckerFactors, numerics: str
) -> tuple[jax.Array, jax.Array]:
  """The factor vectors ``(H, S)`` as the preconditioner uses them."""
  if numerics == 'reference':
    return factors.input, factors.output
  return minmax_paper(factors.input), minmax_paper(factors.output)
