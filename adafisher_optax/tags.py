"""Tagged layer ops for models written without Flax.

Each op computes its layer like Flax does, from a dict of parameters with
Flax's names, and marks it for :func:`adafisher_optax.value_and_grad_with_curvature`:

    def model(params, x):
      h = jax.nn.relu(tags.dense(x, params['hidden']))
      return tags.dense(h, params['head'])

Outside a capture the ops are plain computations. Inside one, each op finds
its parameter path by the identity of the arrays it is given (pass
``name='a/b'`` when the arrays are slices, e.g. inside ``jax.lax.scan`` over
stacked layers) and taps its output like a Flax layer.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from adafisher_optax import layers as layers_lib
from adafisher_optax import taps
from adafisher_optax.taps import PROBE, CaptureError


def _record(
  kind: str,
  config: Any,
  params: Mapping,
  name: str | None,
  args: tuple,
  outputs: jax.Array,
) -> jax.Array:
  session = taps.current()
  if session is None:
    return outputs
  session.calls += 1
  weight = params[layers_lib.REGISTRY[kind].param_names(config)[0]]
  if name is not None:
    path = tuple(name.split('/'))
  elif id(weight) in session.param_paths:
    path = session.param_paths[id(weight)][:-1]
  else:
    raise CaptureError(
      f'adafisher_optax.tags.{kind}: its parameters are not leaves of the '
      "params argument of `fun` (sliced or transformed?); pass name='path/to/"
      "layer', its path in params."
    )
  return session.apply(
    path,
    layers_lib.REGISTRY[kind],
    '__call__',
    config,
    args,
    {},
    outputs,
    get_param=lambda n: params[n],
    get_probe=lambda: params.get(PROBE),
    description=f'tags.{kind}',
  )


def dense(
  x: jax.Array, params: Mapping[str, jax.Array], *, name: str | None = None
) -> jax.Array:
  """``x @ params['kernel'] (+ params['bias'])`` over the last axis of ``x``."""
  y = jnp.dot(x, params['kernel'])
  if 'bias' in params:
    y = y + params['bias']
  config = types.SimpleNamespace(use_bias='bias' in params)
  return _record('dense', config, params, name, (x,), y)


def conv(
  x: jax.Array,
  params: Mapping[str, jax.Array],
  *,
  strides: int | Sequence[int] = 1,
  padding: str | int | Sequence[Any] = 'SAME',
  input_dilation: int | Sequence[int] = 1,
  kernel_dilation: int | Sequence[int] = 1,
  feature_group_count: int = 1,
  name: str | None = None,
) -> jax.Array:
  """A channels-last convolution with a Flax-layout kernel ``[*k, c/G, out]``.

  ``x`` is ``[batch, *spatial, channels]``; ``padding`` is ``'SAME'``,
  ``'VALID'``, an int or ``(low, high)`` pairs, as for ``nn.Conv``.
  """
  kernel = params['kernel']
  n = kernel.ndim - 2
  if not 1 <= n <= 3:
    raise ValueError(f'tags.conv supports 1 to 3 spatial dims, got {n}.')
  spatial = 'DHW'[3 - n :]

  def per_dim(v):
    return (v,) * n if isinstance(v, int) else tuple(v)

  if isinstance(padding, int):
    lax_padding = [(padding, padding)] * n
  elif isinstance(padding, str):
    lax_padding = padding
  else:
    lax_padding = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
  y = jax.lax.conv_general_dilated(
    x,
    kernel,
    per_dim(strides),
    lax_padding,
    lhs_dilation=per_dim(input_dilation),
    rhs_dilation=per_dim(kernel_dilation),
    dimension_numbers=(f'N{spatial}C', f'{spatial}IO', f'N{spatial}C'),
    feature_group_count=feature_group_count,
  )
  if 'bias' in params:
    y = y + params['bias']
  config = types.SimpleNamespace(
    use_bias='bias' in params,
    kernel_size=kernel.shape[:n],
    strides=per_dim(strides),
    padding=lax_padding,
    input_dilation=per_dim(input_dilation),
    kernel_dilation=per_dim(kernel_dilation),
    feature_group_count=feature_group_count,
  )
  return _record('conv', config, params, name, (x,), y)


def embed(
  ids: jax.Array, params: Mapping[str, jax.Array], *, name: str | None = None
) -> jax.Array:
  """Rows ``params['embedding'][ids]``."""
  table = params['embedding']
  y = jnp.take(table, ids, axis=0)
  config = types.SimpleNamespace(num_embeddings=table.shape[0])
  return _record('embed', config, params, name, (ids,), y)


__all__ = ['conv', 'dense', 'embed']
