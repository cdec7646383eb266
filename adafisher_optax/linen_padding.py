"""The input padding of ``flax.linen.Conv``, applied to a per-position map.

The conv statistics need the padded, dilated input geometry that ``nn.Conv``
uses. This module repeats Flax's padding rules on ``x**2`` summed over the
batch (squaring commutes with zero, circular and reflective padding).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding


def _per_dim(value, n: int) -> tuple[int, ...]:
  if value is None:
    return (1,) * n
  if isinstance(value, int):
    return (value,) * n
  return tuple(value)


def conv_input_pads(module: nn.Conv, squares: jax.Array):
  """Pads ``squares`` (``[*spatial, c_in]``) as ``module`` pads its input.

  Returns:
    ``(squares, pads, input_dilation, strides, kernel_dilation)``: the input
    after circular/reflective/causal padding, the remaining explicit
    ``(low, high)`` zero padding per spatial dim, and the per-dim geometry.
  """
  kernel_size = tuple(np.atleast_1d(module.kernel_size))
  n = len(kernel_size)
  strides = _per_dim(module.strides, n)
  input_dilation = _per_dim(module.input_dilation, n)
  kernel_dilation = _per_dim(module.kernel_dilation, n)
  dilated_kernel = [
    (k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)
  ]
  padding = canonicalize_padding(module.padding, n)
  if padding in ('CIRCULAR', 'REFLECT'):
    pads = [((k - 1) // 2, k // 2) for k in dilated_kernel] + [(0, 0)]
    mode = {'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[padding]
    squares = jnp.pad(squares, pads, mode=mode)
    padding = 'VALID'
  elif padding == 'CAUSAL':
    squares = jnp.pad(squares, [(dilated_kernel[0] - 1, 0), (0, 0)])
    padding = 'VALID'
  if isinstance(padding, str):
    pads = jax.lax.padtype_to_pads(
      squares.shape[:n], dilated_kernel, strides, padding
    )
  else:
    pads = [tuple(p) for p in padding]
  return squares, pads, input_dilation, strides, kernel_dilation
