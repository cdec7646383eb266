"""Dense layers: ``y = x . W (+ b)`` over any contracted and output axes."""

from __future__ import annotations

import dataclasses

import numpy as np

from adafisher_optax.rules.base import (
  Application,
  KroneckerRule,
  append_entry,
  count,
  reduced,
  statistics_dtype,
  sum_of_squares_over_leading,
  sum_over_all_but,
)


@dataclasses.dataclass(frozen=True)
class Dense:
  """``y = x . W (+ b)``: the ``in_axes`` of ``x`` contract with the kernel's
  leading axes, whose ``out_ndim`` trailing axes are the output's last axes.

  With ``batch_ndim > 0`` (``DenseGeneral``'s ``batch_dims``) the leading
  axes of ``x``, of the kernel, of the bias and of the output are a stack
  of independent layers: statistics per slice.
  """

  in_axes: tuple[int, ...] = (-1,)
  out_ndim: int = 1
  use_bias: bool = True
  batch_ndim: int = 0

  def __post_init__(self):
    in_axes = self.in_axes
    if isinstance(in_axes, int) and not isinstance(in_axes, bool):
      in_axes = (in_axes,)
    if not isinstance(in_axes, (tuple, list)) or not all(
      isinstance(a, int) and not isinstance(a, bool) for a in in_axes
    ):
      raise TypeError(
        f'rules.Dense: in_axes must be a tuple of ints, got {self.in_axes!r}.'
      )
    object.__setattr__(self, 'in_axes', tuple(in_axes))
    if not isinstance(self.use_bias, (bool, np.bool_)):
      raise TypeError(
        f'rules.Dense: use_bias must be a bool, got {self.use_bias!r}.'
      )
    object.__setattr__(self, 'use_bias', bool(self.use_bias))


class DenseRule(KroneckerRule):
  """:class:`Dense`: rows are every axis of ``x`` that is neither contracted
  nor a batch axis."""

  name = 'dense'

  def statistics(self, config: Dense, inputs, outputs, weight, bias):
    x = inputs.astype(statistics_dtype())
    stack = tuple(x.shape[: config.batch_ndim])
    contracted = sorted({a % x.ndim for a in config.in_axes})
    kept = list(range(len(stack))) + contracted
    h = sum_over_all_but(x * x, kept).reshape(stack + (-1,))
    rows = count(tuple(d for i, d in enumerate(x.shape) if i not in kept))
    if config.use_bias:
      h = append_entry(h, rows)
    if not stack:
      output_sums = sum_of_squares_over_leading(config.out_ndim)
    else:

      def output_sums(g):
        g = g.astype(statistics_dtype())
        middle = range(len(stack), g.ndim - config.out_ndim)
        return (reduced(g * g, middle).reshape(stack + (-1,)),)

    return Application((h,), rows, output_sums, stack)
