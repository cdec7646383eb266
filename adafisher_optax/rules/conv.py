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
  append_entry,
  statistics_dtype,
)
from adafisher_optax.rules.base import count as _count
from adafisher_optax.rules.base import (
  sum_of_squares_over_leading as _sum_of_squares_over_leading,
)

#: Statistics matmuls at full precision (TPUs and GPUs round float32
#: matmul inputs by default).
_EXACT = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Conv:
  """A channels-last convolution with a kernel ``[*kernel_size, c_in/G, c_out]``.

  ``padding`` is ``'SAME'``, ``'VALID'``, ``'CIRCULAR'``, ``'REFLECT'``,
  ``'CAUSAL'`` or one ``(low, high)`` pair per spatial axis. With
  ``transpose_kernel`` the parameter is stored as ``[*kernel_size, c_out,
  c_in]`` with its spatial axes flipped (``ConvTranspose(transpose_kernel=
  True)``): the convolution's kernel is that array flipped and transposed.
  """

  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: str | tuple[tuple[int, int], ...]
  input_dilation: tuple[int, ...]
  kernel_dilation: tuple[int, ...]
  groups: int = 1
  use_bias: bool = True
  transpose_kernel: bool = False


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
  fixed 0/1 matrix, so ``H = einsum(sum_batch(x**2), M_1, ..., M_n)``: one
  pass over the input, then a few matmuls on one image-sized array (a
  sharded batch all-reduces that ``[*spatial, c_in]`` sum, on refresh steps
  only). Groups fold into rows; the
  divisor ``D = prod(kernel) * c_in / G`` is the authors' (spec section 1).
  """

  name = 'conv'

  def resolve(self, config: Conv) -> ConvRule:
    return CONV_TRANSPOSE_KERNEL if config.transpose_kernel else self

  def statistics(self, config: Conv, inputs, outputs, weight, bias):
    x = inputs
    n_spatial = len(config.kernel_size)
    n_batch = x.ndim - n_spatial - 1
    batch = _count(x.shape[:n_batch])
    out_spatial = tuple(outputs.shape[n_batch : n_batch + n_spatial])
    x = x.astype(statistics_dtype()).reshape((-1,) + x.shape[n_batch:])
    # The batch summed first, as a matrix-vector product: one pass over the
    # input, no transposed copy of it (XLA:CPU reduces a major axis alone
    # many times slower); the sum pads like one image.
    squares = jnp.tensordot(
      jnp.ones(x.shape[0], x.dtype), x * x, axes=1, precision=_EXACT
    )[None]
    squares, pads = conv_input_padding(config, squares)
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
    windows, current = squares[0], 'hwd'[:n_spatial] + 'c'
    for axis in reversed(range(n_spatial)):  # small matmuls, axis by axis
      position, offset = 'hwd'[axis], 'xyz'[axis]
      result = current.replace(position, offset)
      windows = jnp.einsum(
        f'{current},{position}{offset}->{result}',
        windows,
        matrices[axis],
        precision=_EXACT,
      )
      current = result
    c_in = x.shape[-1]
    groups = config.groups
    windows = windows.reshape(
      tuple(config.kernel_size) + (groups, c_in // groups)
    ).sum(-2)
    patch_len = windows.size
    h = windows.reshape(-1) / patch_len
    rows = batch * _count(out_spatial)
    if config.use_bias:
      h = append_entry(h, rows * groups / patch_len)
    return Application((h,), rows, _sum_of_squares_over_leading(1))


class TransposedKernelConvRule(ConvRule):
  """:class:`Conv` with ``transpose_kernel``: the statistics of the
  convolution, its curvature flipped and transposed like the stored kernel
  (``K[k, o, i] = H[flip(k), i] * S[o]``)."""

  name = 'conv_transpose_kernel'

  def parameter_mismatch(self, role, shape, input_shapes, output_shapes):
    if role == 'bias':
      return super().parameter_mismatch(
        role, shape, input_shapes, output_shapes
      )
    return None  # [*kernel, c_out, c_in]: curvature transposes it

  def curvature(self, h, s, numerics, role, shape):
    if role == 'bias':
      return super().curvature(h, s, numerics, role, shape)
    n_stack = h.ndim - 1
    *kernel_size, c_out, c_in = shape[n_stack:]
    d_in = _count(tuple(kernel_size)) * c_in
    k = h[..., :d_in, None] * s[..., None, :]
    k = k.reshape(shape[:n_stack] + (*kernel_size, c_in, c_out))
    spatial = tuple(range(n_stack, n_stack + len(kernel_size)))
    return jnp.swapaxes(jnp.flip(k, spatial), -1, -2)


CONV_TRANSPOSE_KERNEL = TransposedKernelConvRule()
