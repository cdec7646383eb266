"""Dense layers: ``y = x . W (+ b)`` over any contracted and output axes."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from adafisher_optax.rules.base import (
  Application,
  KroneckerRule,
  count,
  statistics_dtype,
  sum_of_squares_over_leading,
  sum_over_all_but,
)


@dataclasses.dataclass(frozen=True)
class Dense:
  """``y = x . W (+ b)``: the ``in_axes`` of ``x`` contract with the kernel's
  leading axes, whose ``out_ndim`` trailing axes are the output's last axes."""

  in_axes: tuple[int, ...] = (-1,)
  out_ndim: int = 1
  use_bias: bool = True


class DenseRule(KroneckerRule):
  """:class:`Dense`: rows are every axis of ``x`` that is not contracted."""

  name = 'dense'

  def statistics(self, config: Dense, inputs, outputs, weight, bias):
    x = inputs.astype(statistics_dtype())
    contracted = sorted({a % x.ndim for a in config.in_axes})
    h = sum_over_all_but(x * x, contracted).reshape(-1)
    rows = count(tuple(d for i, d in enumerate(x.shape) if i not in contracted))
    if config.use_bias:
      h = jnp.append(h, jnp.asarray(rows, h.dtype))
    return Application((h,), rows, sum_of_squares_over_leading(config.out_ndim))
