"""Convolutions of any spatial rank (spec section 1: im2col statistics
without materialising patches)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from adafisher_optax.rules.base import (
  Application,
  KroneckerRule,
  statistics_dtype,
)
from adafisher_optax.rules.base import count as _count
from adafisher_optax.rules.base import (
  sum_of_squares_over_leading as _sum_of_squares_over_leading,
)


@dataclasses.dataclass(frozen=True)
class Conv:
  """A channels-last convolution with a kernel ``[*kernel_size, c_in/G, c_out]``.

  ``padding`` is ``'SAME'``, ``'VALID'``, ``'CIRCULAR'``, ``'REFLECT'``,
  ``'CAUSAL'`` or one ``(low, high)`` pair per spatial axis.
  """

  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: str | tuple[tuple[int, int], ...]
  input_dilation: tuple[int, ...]
  kernel_dilation: tuple[int, ...]
  groups: int = 1
  use_bias: bool = True


def conv_input_padding(config: Conv, x: jax.Array):
  """Pads ``x`` (``[batch, *spatial, c_in]``) as the convolution pads it.

  Returns:
    ``(x, pads)``: the input after circular, reflective or causal padding,
    and the remaining explicit ``(low, high)`` zero padding per spatial axis.
  """
  n = len(config.kernel_size)
  dilated_kernel = [
    (k - 1) * d + 1 for k, d in zip(config.kernel_size, config.kernel_dilation)
  ]
  padding = config.padding
  if padding in ('CIRCULAR', 'REFLECT'):
    pads = [((k - 1) // 2, k // 2) for k in dilated_kernel]
    mode = {'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[padding]
    return jnp.pad(x, [(0, 0), *pads, (0, 0)], mode=mode), [(0, 0)] * n
  if padding == 'CAUSAL':
    x = jnp.pad(x, [(0, 0), (dilated_kernel[0] - 1, 0), (0, 0)])
    return x, [(0, 0)] * n
  if isinstance(padding, str):  # as lax.conv_general_dilated: undilated input
    return x, jax.lax.padtype_to_pads(
      x.shape[1 : n + 1], dilated_kernel, config.strides, padding
    )
  return x, [tuple(p) for p in padding]


def _window_matrix(
  size: int,
  low_pad: int,
  input_dilation: int,
  kernel_size: int,
  kernel_dilation: int,
  stride: int,
  out_size: int,
) -> np.ndarray:
  """``M[j, o] = 1`` when input position ``j`` meets kernel offset ``o``.

  Along one spatial axis, input ``j`` sits at ``low_pad + j *
  input_dilation`` of the padded, dilated input, and kernel offset ``o``
  reads positions ``o * kernel_dilation + p * stride`` for every output
  position ``p``; padding zeros contribute nothing.
  """
  matrix = np.zeros((size, kernel_size))
  for j in range(size):
    for o in range(kernel_size):
      q = low_pad + j * input_dilation - o * kernel_dilation
      if q >= 0 and q % stride == 0 and q // stride < out_size:
        matrix[j, o] = 1.0
  return matrix


class ConvRule(KroneckerRule):
  """:class:`Conv` (any spatial rank, strides, padding, dilations, groups).

  ``H`` sums squared im2col patch entries without building patches: along
  each spatial axis the input positions that meet kernel offset ``k`` form a
  fixed 0/1 matrix, so ``H = einsum(x**2, M_1, ..., M_n)`` contracted over
  the batch and every position (a few small matmuls; a sharded batch
  all-reduces only the kernel-sized result). Groups fold into rows; the
  divisor ``D = prod(kernel) * c_in / G`` is the authors' (spec section 1).
  """

  name = 'conv'

  def statistics(self, config: Conv, inputs, outputs, weight, bias):
    x = inputs
    n_spatial = len(config.kernel_size)
    n_batch = x.ndim - n_spatial - 1
    batch = _count(x.shape[:n_batch])
    out_spatial = tuple(outputs.shape[n_batch : n_batch + n_spatial])
    x = x.astype(statistics_dtype()).reshape((-1,) + x.shape[n_batch:])
    squares, pads = conv_input_padding(config, x * x)
    matrices = [
      jnp.asarray(_window_matrix(*args), squares.dtype)
      for args in zip(
        squares.shape[1:-1],
        [low for low, _ in pads],
        config.input_dilation,
        config.kernel_size,
        config.kernel_dilation,
        config.strides,
        out_spatial,
      )
    ]
    # One spatial axis at a time, batch kept: matmuls, and a sharded batch
    # sums only the kernel-sized result across devices.
    windows, current = squares, 'b' + 'hwd'[:n_spatial] + 'c'
    for axis in reversed(range(n_spatial)):
      position, offset = 'hwd'[axis], 'xyz'[axis]
      result = current.replace(position, offset)
      windows = jnp.einsum(
        f'{current},{position}{offset}->{result}', windows, matrices[axis]
      )
      current = result
    windows = jnp.sum(windows, axis=0)
    c_in = x.shape[-1]
    groups = config.groups
    windows = windows.reshape(
      tuple(config.kernel_size) + (groups, c_in // groups)
    ).sum(-2)
    patch_len = windows.size
    h = windows.reshape(-1) / patch_len
    rows = batch * _count(out_spatial)
    if config.use_bias:
      h = jnp.append(h, jnp.asarray(rows * groups / patch_len, h.dtype))
    return Application((h,), rows, _sum_of_squares_over_leading(1))
