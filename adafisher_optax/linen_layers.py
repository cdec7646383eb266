"""The built-in Flax linen layers: adapters and the table the linen front
end registers (:data:`BUILT_IN`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import numpy as np

from adafisher_optax import rules
from adafisher_optax.flax_adapters import (
  attend_config,
  channel_norm_config,
  conv_config,
  conv_transpose_config,
  embed_config,
  token_norm_config,
)
from adafisher_optax.registry import BuiltIn, UnsupportedCall


def _dense(module: nn.Dense, x, kwargs) -> rules.Dense:
  return rules.Dense(use_bias=module.use_bias)


def _dense_general(module: nn.DenseGeneral, x, kwargs) -> rules.Dense:
  if tuple(np.atleast_1d(module.batch_dims)):
    raise UnsupportedCall('DenseGeneral with batch_dims')
  return rules.Dense(
    in_axes=tuple(int(a) for a in np.atleast_1d(module.axis)),
    out_ndim=len(np.atleast_1d(module.features)),
    use_bias=module.use_bias,
  )


BUILT_IN: tuple[BuiltIn, ...] = (
  BuiltIn(nn.Dense, rules.DENSE, _dense),
  BuiltIn(nn.DenseGeneral, rules.DENSE, _dense_general),
  BuiltIn(nn.Conv, rules.CONV, conv_config),
  BuiltIn(nn.ConvTranspose, rules.CONV, conv_transpose_config),
  BuiltIn(nn.Embed, rules.EMBED, embed_config, 'embedding', None),
  BuiltIn(nn.Embed, rules.ATTEND, attend_config, 'embedding', None, 'attend'),
  BuiltIn(nn.LayerNorm, rules.NORM, token_norm_config, 'scale', 'bias'),
  BuiltIn(nn.RMSNorm, rules.NORM, token_norm_config, 'scale', None),
  BuiltIn(nn.BatchNorm, rules.NORM, channel_norm_config, 'scale', 'bias'),
  BuiltIn(nn.GroupNorm, rules.NORM, channel_norm_config, 'scale', 'bias'),
)

#: The linen layer types the authors' PyTorch code preconditions (Linear,
#: Conv2d, BatchNorm2d, LayerNorm). ``layers=REFERENCE_LAYERS`` reproduces
#: their coverage: everything else gets ``F~ = 1``.
REFERENCE_LAYERS: tuple[type, ...] = (
  nn.Dense,
  nn.DenseGeneral,
  nn.Conv,
  nn.BatchNorm,
  nn.LayerNorm,
)

#: Layers whose fused computation hides registered layers, with a
#: parameter-compatible class that applies them one by one: inside a
#: capture, the second runs in place of the first (same params, the same
#: values up to rounding). ``nn.OptimizedLSTMCell`` concatenates its eight
#: kernels into two matmuls; ``nn.LSTMCell`` applies them as ``nn.Dense``.
EQUIVALENTS: dict[type, type] = {nn.OptimizedLSTMCell: nn.LSTMCell}


def _own_call(cls: type) -> Any:
  call = cls.__call__
  return getattr(call, '__wrapped__', call)


def equivalent_call(module: Any, function: Any) -> Callable[..., Any] | None:
  """The method to run in place of ``function`` (a module's original
  ``__call__``), or ``None``."""
  for fused, equivalent in EQUIVALENTS.items():
    if isinstance(module, fused) and function is _own_call(fused):
      return equivalent.__call__
  return None
