"""Adapters shared by the linen and NNX front ends: Flax layers that have
the same attribute names in both APIs, read into rule configurations.

Importing this module registers nothing; each front end lists its layers in
its own table (``BUILT_IN``).
"""

from __future__ import annotations

import numpy as np
from flax.linen.linear import canonicalize_padding

from adafisher_optax import rules
from adafisher_optax.registry import UnsupportedCall


def conv_config(module, x, kwargs) -> rules.Conv:
  """``nn.Conv`` and ``nnx.Conv``."""
  kernel_size = tuple(np.atleast_1d(module.kernel_size))
  n = len(kernel_size)
  padding = canonicalize_padding(module.padding, n)
  return rules.Conv(
    kernel_size=kernel_size,
    strides=rules.per_dim(module.strides, n, 'strides'),
    padding=padding if isinstance(padding, str) else tuple(map(tuple, padding)),
    input_dilation=rules.per_dim(module.input_dilation, n, 'input_dilation'),
    kernel_dilation=rules.per_dim(module.kernel_dilation, n, 'kernel_dilation'),
    groups=module.feature_group_count,
    use_bias=module.use_bias,
  )


def _transposed_pads(kernel: int, stride: int, padding: str) -> tuple[int, int]:
  """``(low, high)`` zero padding of the stride-1 convolution of an input
  dilated by ``stride`` that ``lax.conv_transpose`` computes for ``padding``.

  ``'SAME'`` gives ``stride * n`` outputs from ``n`` inputs, ``'VALID'``
  ``stride * n + max(kernel - stride, 0)``; JAX pads ``kernel - 1`` below
  except for ``'SAME'`` with ``stride < kernel``, which centres the total.
  """
  if padding == 'SAME':
    total = kernel + stride - 2
    low = kernel - 1 if stride >= kernel else -(-total // 2)
  else:
    total = kernel + stride - 2 + max(kernel - stride, 0)
    low = kernel - 1
  return low, total - low


def conv_transpose_config(module, x, kwargs) -> rules.Conv:
  """``nn.ConvTranspose`` and ``nnx.ConvTranspose``: a stride-1 convolution
  of the input dilated by the strides, with the same kernel layout
  ``[*k, c_in, c_out]`` (``transpose_kernel=False``)."""
  if module.transpose_kernel:
    raise UnsupportedCall('transpose_kernel=True (kernel [*k, c_out, c_in])')
  kernel_size = tuple(np.atleast_1d(module.kernel_size))
  n = len(kernel_size)
  strides = rules.per_dim(module.strides, n, 'strides')
  dilation = rules.per_dim(module.kernel_dilation, n, 'kernel_dilation')
  padding = canonicalize_padding(module.padding, n)
  if padding == 'CIRCULAR':
    raise UnsupportedCall("padding='CIRCULAR' (outputs wrapped and summed)")
  if isinstance(padding, str):
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
    pads = tuple(
      _transposed_pads(k, s, padding) for k, s in zip(dilated, strides)
    )
  else:
    pads = tuple(map(tuple, padding))
  return rules.Conv(
    kernel_size=kernel_size,
    strides=(1,) * n,
    padding=pads,
    input_dilation=strides,
    kernel_dilation=dilation,
    use_bias=module.use_bias,
  )


def embed_config(module, x, kwargs) -> rules.Embed:
  """``Embed.__call__`` (linen or NNX): a lookup."""
  return rules.Embed(module.num_embeddings)


def attend_config(module, x, kwargs) -> rules.Attend:
  """``Embed.attend`` (linen or NNX): ``x @ embedding.T``."""
  return rules.Attend()


def _norm_axes(feature_axes, ndim: int) -> tuple[int, ...]:
  return tuple(sorted({int(a) % ndim for a in np.atleast_1d(feature_axes)}))


def _check_norm_call(module, x, kwargs) -> None:
  if kwargs.get('mask') is not None:
    raise UnsupportedCall(f'{type(module).__name__} called with a mask')
  if x.ndim < 2:
    raise UnsupportedCall('input without a batch axis')


def token_norm_config(module, x, kwargs) -> rules.Norm:
  """LayerNorm and RMSNorm (linen or NNX): the reference surrogate axis is
  axis 1 of the input as given (the token axis of ``[B, T, D]``), as the
  authors' hooks see a batch-first tensor."""
  _check_norm_call(module, x, kwargs)
  return rules.Norm(
    feature_axes=_norm_axes(module.feature_axes, x.ndim),
    surrogate_axis=1,
    use_scale=module.use_scale,
    use_bias=getattr(module, 'use_bias', False),
  )


def channel_norm_config(module, x, kwargs) -> rules.Norm:
  """BatchNorm (its ``axis``) and GroupNorm (the last axis), linen or NNX:
  the reference surrogate axis is the channel axis, which PyTorch's NCHW
  layout puts at axis 1."""
  _check_norm_call(module, x, kwargs)
  axes = (
    (x.ndim - 1,)
    if hasattr(module, 'num_groups')
    else _norm_axes(module.axis, x.ndim)
  )
  if len(axes) != 1:
    raise UnsupportedCall('more than one feature axis')
  if axes[0] == 0:
    raise UnsupportedCall('input without a batch axis')
  return rules.Norm(
    feature_axes=axes,
    surrogate_axis=axes[0],
    use_scale=module.use_scale,
    use_bias=module.use_bias,
  )
