"""Normalisation layers: per-feature scale and shift (spec section 1)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from adafisher_optax.rules.base import (
  Application,
  CurvatureSum,
  Rule,
  append_entry,
  count,
  statistics_dtype,
  sum_over_all_but,
)


@dataclasses.dataclass(frozen=True)
class Standardisation:
  """How a norm layer standardises its input: ``x_hat`` from ``x``.

  Attributes:
    axes: the axes its mean and variance run over (of the input split into
      groups, where ``groups``).
    epsilon: added to the variance.
    centred: whether the mean is subtracted (``RMSNorm``: not).
    groups: ``GroupNorm``: the last axis split into this many groups.
  """

  axes: tuple[int, ...]
  epsilon: float
  centred: bool = True
  groups: int = 0

  def __call__(self, x: jax.Array) -> jax.Array:
    shape = x.shape
    if self.groups:
      x = x.reshape(shape[:-1] + (self.groups, shape[-1] // self.groups))
    if self.centred:
      x = x - jnp.mean(x, self.axes, keepdims=True)
    variance = jnp.mean(jnp.square(x), self.axes, keepdims=True)
    return (x * jax.lax.rsqrt(variance + self.epsilon)).reshape(shape)


@dataclasses.dataclass(frozen=True)
class Norm:
  """A normalisation with a per-feature scale and shift.

  Attributes:
    feature_axes: the input axes the scale and shift run over.
    surrogate_axis: the axis ``k`` of the authors' surrogate statistics in
      ``reference`` numerics (axis 1 of their batch-first layout: the channel
      axis for BatchNorm and GroupNorm, the token axis of a ``[B, T, D]``
      LayerNorm input).
    use_scale: whether the layer has a scale.
    use_bias: whether the layer has a shift.
    standardisation: how it computes ``x_hat`` from its input, where known
      (``None``: ``x_hat = (y - shift) / scale`` from its output, which a
      zero scale or a bfloat16 output makes inexact).
  """

  feature_axes: tuple[int, ...]
  surrogate_axis: int
  use_scale: bool = True
  use_bias: bool = True
  standardisation: Standardisation | None = None


class NormRule(Rule):
  """Normalisation layers (spec section 1, last bullet).

  The capture records what both numerics need: ``z_k = sum(x over every
  axis but k) / M**2`` and the batch size ``B`` for ``reference``, and
  ``sum(x_hat_c**2)`` for ``paper`` on the input side; ``sum(g_c)`` and
  ``sum(g_c**2)`` on the output side. Sums combine over applications and
  devices before :meth:`means` squares them, so combined statistics are the
  surrogate of the concatenated batch.

  ``paper``: ``H_c = mean(x_hat_c**2)``, ``S_c = mean(g_c**2)``,
  ``K_scale = H' * S'``, ``K_shift = S'``.
  ``reference`` (the authors' surrogate): ``H = [sum z**2, K] / B**2``,
  ``S_c = (sum g_c)**2 / B``, ``K_scale = H[0] * S``, ``K_shift = H[1] * S``.
  """

  name = 'norm'
  output_degrees = (1, 2)

  def has_parameters(self, config: Norm):
    return config.use_scale, config.use_bias

  def statistics(self, config: Norm, inputs, outputs, weight, bias):
    dtype = statistics_dtype()
    x = inputs.astype(dtype)
    features = tuple(sorted({a % x.ndim for a in config.feature_axes}))
    k = config.surrogate_axis % x.ndim
    n_features = count(tuple(x.shape[a] for a in features))

    def per_feature(v: jax.Array) -> jax.Array:
      return sum_over_all_but(v, features).reshape(-1)

    if x.size == 0:  # an empty batch: nothing to count
      zeros = (jnp.zeros(x.shape[k], dtype), jnp.zeros(n_features, dtype))
      return Application(
        zeros + (jnp.zeros(1, dtype),),
        0,
        lambda g: (jnp.zeros(n_features, dtype),) * 2,
      )
    batch = x.shape[0]
    m = x.size // (batch * x.shape[k])
    z = sum_over_all_but(x, (k,)) / m**2
    if config.standardisation is not None:
      x_hat = config.standardisation(x)
    else:
      x_hat = _normalised_input(outputs.astype(dtype), features, weight, bias)
    return Application(
      (z, per_feature(x_hat * x_hat), jnp.full((1,), batch, dtype)),
      x.size // n_features,
      lambda g: (
        per_feature(g.astype(dtype)),
        per_feature(jnp.square(g.astype(dtype))),
      ),
    )

  def means(self, input_sums, output_sums, rows, numerics):
    z, x_hat_squares, batch = input_sums
    g_sums, g_squares = output_sums
    if numerics == 'paper':
      rows = jnp.maximum(rows, 1)[..., None].astype(x_hat_squares.dtype)
      return x_hat_squares / rows, g_squares / rows
    batch = jnp.maximum(batch, 1)
    h = append_entry(jnp.sum(z * z, axis=-1, keepdims=True), z.shape[-1])
    return h / batch**2, g_sums**2 / batch

  def factor_shapes(self, input_shapes, output_shapes, numerics):
    features = tuple(output_shapes[0])
    if numerics == 'paper':
      return features, features
    return features[:-1] + (2,), features

  def curvature(self, h, s, numerics, role, shape):
    if numerics == 'paper':
      k = h * s if role == 'weight' else s
    else:
      k = (h[..., :1] if role == 'weight' else h[..., 1:2]) * s
    return k.reshape(shape)

  def curvature_sum_form(self, numerics, shapes, stack, lengths):
    scale, shift = float('weight' in shapes), float('bias' in shapes)
    if numerics == 'paper':
      return CurvatureSum(
        outer=False,
        weights=np.full(lengths[0], scale),
        offsets=np.full(lengths[1], shift),
      )
    return CurvatureSum(outer=True, weights=np.array([scale, shift]))


def _normalised_input(
  outputs: jax.Array,
  features: tuple[int, ...],
  scale: jax.Array | None,
  shift: jax.Array | None,
) -> jax.Array:
  """``x_hat = (y - shift) / scale`` per feature (0 where the scale is 0)."""
  shape = [
    outputs.shape[a] if a in features else 1 for a in range(outputs.ndim)
  ]

  def param(value: jax.Array) -> jax.Array:
    return jax.lax.stop_gradient(value).astype(outputs.dtype).reshape(shape)

  y = outputs
  if shift is not None:
    y = y - param(shift)
  if scale is not None:
    scale = param(scale)
    y = jnp.where(scale == 0, 0.0, y / jnp.where(scale == 0, 1.0, scale))
  return y
