"""Tagged layer ops for models written without Flax (the pure-JAX front end).

Each op computes its layer like Flax does, from a dict of parameters with
Flax's names, and marks it for :func:`adafisher_optax.value_and_grad_with_curvature`:

    def model(params, x):
      h = jax.nn.relu(tags.dense(x, params['hidden']))
      return tags.dense(h, params['head'])

Outside a capture the ops are plain computations. Inside one, an op finds
its layer's path by the identity of the arrays it is given (ops on arrays
that are not in the first argument, such as a teacher network's, are not
captured). Pass ``name='a/b'`` when the arrays are transformed or sliced,
and, for a layer stacked along leading axes and sliced inside
``jax.lax.scan``, ``index=`` its position in the stack (scan over
``jnp.arange(n)`` alongside the params).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from adafisher_optax import capture, layers, rules


def _record(
  rule: rules.Rule,
  config: rules.Config,
  params: Mapping[str, jax.Array],
  weight: str,
  bias: str | None,
  name: str | None,
  index: Any,
  inputs: jax.Array,
  outputs: jax.Array,
) -> jax.Array:
  session = capture.current()
  if session is None:
    return outputs
  session.calls += 1
  kind = f'tags.{rule.name}'
  if name is not None:
    path = tuple(name.split('/'))
  else:
    found = session.leaf_paths.get(id(params[weight]))
    if found is None or found[-1] != weight:
      if session.discovering:
        session.unmatched.append(
          f'{kind} (its params are not arrays of the first argument: if they '
          "are the model's own, transformed or sliced, pass name='path/to/"
          "layer', their path in params)"
        )
      return outputs
    path = found[:-1]
  layer_type = layers.LayerType(
    rule, lambda layer, x, kwargs: config, weight=weight, bias=bias
  )

  def probe():
    value = session.probes.get(path)
    record = session.plan[path]
    if index is not None and not record.stack:
      raise capture.CaptureError(
        f'{kind} {"/".join(path)!r}: index= was given but its params are not '
        'stacked.'
      )
    if value is None or not record.stack:
      return value
    if index is None:
      raise capture.CaptureError(
        f'{kind} {"/".join(path)!r}: its params are stacked '
        f'{record.stack} and sliced inside the model; pass index= (its '
        'position in the stack).'
      )
    return jax.tree.map(lambda v: v[index], value)

  return session.apply(
    path,
    layer_type,
    '__call__',
    None,
    (inputs,),
    {},
    outputs,
    get_param=lambda n: params[n],
    get_probe=probe,
    description=kind,
  )


def dense(
  x: jax.Array,
  params: Mapping[str, jax.Array],
  *,
  name: str | None = None,
  index: Any = None,
) -> jax.Array:
  """``x @ params['kernel'] (+ params['bias'])`` over the last axis of ``x``."""
  y = jnp.dot(x, params['kernel'])
  if 'bias' in params:
    y = y + params['bias']
  config = rules.Dense(use_bias='bias' in params)
  return _record(
    rules.DENSE, config, params, 'kernel', 'bias', name, index, x, y
  )


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
  index: Any = None,
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
  if isinstance(padding, int):
    padding = ((padding, padding),) * n
  elif not isinstance(padding, str):
    padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  config = rules.Conv(
    kernel_size=tuple(kernel.shape[:n]),
    strides=rules.per_dim(strides, n, 'strides'),
    padding=padding,
    input_dilation=rules.per_dim(input_dilation, n, 'input_dilation'),
    kernel_dilation=rules.per_dim(kernel_dilation, n, 'kernel_dilation'),
    groups=feature_group_count,
    use_bias='bias' in params,
  )
  y = jax.lax.conv_general_dilated(
    x,
    kernel,
    config.strides,
    padding,
    lhs_dilation=config.input_dilation,
    rhs_dilation=config.kernel_dilation,
    dimension_numbers=(f'N{spatial}C', f'{spatial}IO', f'N{spatial}C'),
    feature_group_count=feature_group_count,
  )
  if 'bias' in params:
    y = y + params['bias']
  return _record(
    rules.CONV, config, params, 'kernel', 'bias', name, index, x, y
  )


def embed(
  ids: jax.Array,
  params: Mapping[str, jax.Array],
  *,
  name: str | None = None,
  index: Any = None,
) -> jax.Array:
  """Rows ``params['embedding'][ids]``."""
  table = params['embedding']
  y = jnp.take(table, ids, axis=0)
  config = rules.Embed(num_embeddings=table.shape[0])
  return _record(
    rules.EMBED, config, params, 'embedding', None, name, index, ids, y
  )


__all__ = ['conv', 'dense', 'embed']
