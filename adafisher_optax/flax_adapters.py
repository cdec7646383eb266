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
  of the input dilated by the strides, whose kernel is the parameter
  ``[*k, c_in, c_out]``, or with ``transpose_kernel=True`` the parameter
  ``[*k, c_out, c_in]`` flipped and transposed."""
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
    transpose_kernel=bool(module.transpose_kernel),
  )


def einsum_config(
  module, x, kwargs, kernel_shape, use_bias, bias_shape=None
) -> rules.Einsum:
  """``nn.Einsum`` and ``nnx.Einsum``: the equation of the call (or of the
  layer), resolved for these shapes. A ``bias_shape`` given (NNX's is the
  user's) must start with the kernel's stacked axes."""
  equation = kwargs.get('einsum_str') or module.einsum_str
  try:
    config = rules.einsum_config(
      equation, x.shape, tuple(kernel_shape), use_bias
    )
  except ValueError as error:
    raise UnsupportedCall(f'einsum {equation!r}: {error}') from None
  stack = tuple(kernel_shape[: len(config.stack)])
  if bias_shape is not None and tuple(bias_shape[: len(stack)]) != stack:
    raise UnsupportedCall(
      f'einsum {equation!r}: a bias of shape {tuple(bias_shape)} not led '
      f'by the stacked axes {config.stack!r} {stack}'
    )
  return config


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


def _standardisation(module, axes, **kwargs) -> rules.Standardisation | None:
  """The layer's ``x_hat`` from its input; ``None`` where its statistics are
  averaged over devices (``axis_name``), which the input does not show."""
  if getattr(module, 'axis_name', None) is not None:
    return None
  return rules.Standardisation(tuple(axes), float(module.epsilon), **kwargs)


def token_norm_config(module, x, kwargs) -> rules.Norm:
  """LayerNorm and RMSNorm (linen or NNX): the reference surrogate axis is
  axis 1 of the input as given (the token axis of ``[B, T, D]``), as the
  authors' hooks see a batch-first tensor."""
  _check_norm_call(module, x, kwargs)
  centred = hasattr(module, 'use_bias')  # LayerNorm; RMSNorm has no shift
  return rules.Norm(
    feature_axes=_norm_axes(module.feature_axes, x.ndim),
    surrogate_axis=1,
    use_scale=module.use_scale,
    use_bias=getattr(module, 'use_bias', False),
    standardisation=_standardisation(
      module, _norm_axes(module.reduction_axes, x.ndim), centred=centred
    ),
  )


def _group_standardisation(module, x) -> rules.Standardisation | None:
  """GroupNorm: statistics over its reduction axes and each group of
  channels (the last axis split into groups)."""
  channels = x.shape[-1]
  groups = module.num_groups or channels // module.group_size
  reduction = module.reduction_axes
  if reduction is None:
    reduction = list(range(1, x.ndim - 1)) + [-1]
  axes = _norm_axes(reduction, x.ndim)[:-1] + (x.ndim,)
  return _standardisation(module, axes, groups=groups)


def _batch_standardisation(module, axes, x, kwargs):
  """BatchNorm in training mode: statistics over every axis but its
  feature axes (``None`` in eval mode, which reads its running averages)."""
  running = kwargs.get('use_running_average')
  if running is None:
    running = module.use_running_average
  if running:
    return None
  return _standardisation(
    module, tuple(a for a in range(x.ndim) if a not in axes)
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
  grouped = hasattr(module, 'num_groups')
  return rules.Norm(
    feature_axes=axes,
    surrogate_axis=axes[0],
    use_scale=module.use_scale,
    use_bias=module.use_bias,
    standardisation=(
      _group_standardisation(module, x)
      if grouped
      else _batch_standardisation(module, axes, x, kwargs)
    ),
  )
