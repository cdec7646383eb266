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

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adafisher_optax import _tree, rules
from adafisher_optax.registry import LayerType
from adafisher_optax.session import CaptureError, LayerCall, Session, current


def _path(
  session: Session, kind: str, params: Mapping[str, Any], weight: str, name
) -> _tree.Path | None:
  """The op's layer path: ``name``, or found by the identity of its weight."""
  if name is not None:
    return tuple(name.split('/'))
  found = session.owner(params[weight])
  if found is None or found[-1] != weight:
    session.params_elsewhere(
      f'{kind} (its params are not arrays of the first argument: if they '
      "are the model's own, transformed or sliced, pass name='path/to/"
      "layer', their path in params)"
    )
    return None
  return found[:-1]


def _sliced_probe(session: Session, kind: str, path, index: Any) -> Any:
  """The layer's probe, sliced at ``index`` when its params are stacked."""
  value, stack = session.probe(path), session.stack(path)
  where = '/'.join(path)
  if index is not None and not stack:
    raise CaptureError(
      f'{kind} {where!r}: index= was given but its params are not stacked.'
    )
  if value is None or not stack:
    return value
  if index is None:
    raise CaptureError(
      f'{kind} {where!r}: its params are stacked {stack} and sliced inside '
      'the model; pass index= (its position in the stack).'
    )
  _check_index(kind, where, index, stack)
  return jax.tree.map(lambda v: v[index], value)


def _check_index(kind: str, where: str, index: Any, stack: tuple) -> None:
  """A Python ``index=`` outside the stack is an error (a traced one, as
  ``scan`` gives, is clamped by JAX: it must be in range)."""
  positions = index if isinstance(index, tuple) else (index,)
  for axis, (i, size) in enumerate(zip(positions, stack)):
    if isinstance(i, (int, np.integer)) and not -size <= i < size:
      raise CaptureError(
        f'{kind} {where!r}: index= {index!r} is outside its stack of '
        f'{stack} (axis {axis} has {size}).'
      )


def _report(
  op: Callable[..., Any],
  layer_type: LayerType,
  params: Mapping[str, jax.Array],
  inputs: jax.Array,
  outputs: jax.Array,
  name: str | None,
  index: Any,
) -> jax.Array:
  """Reports one op's application to the current session, if any."""
  session = current()
  if session is None:
    return outputs
  session.saw_call()
  kind = f'tags.{op.__name__}'
  if not session.selection.takes(op):
    return outputs
  path = _path(session, kind, params, layer_type.weight, name)
  if path is None:
    return outputs
  return session.apply(
    LayerCall(
      path=path,
      layer_type=layer_type,
      layer=None,
      inputs=inputs,
      kwargs={},
      outputs=outputs,
      params=params,
      description=kind,
      probe=lambda: _sliced_probe(session, kind, path, index),
    )
  )


def _fixed(rule: rules.Rule, config: rules.Config, **names) -> LayerType:
  """The layer type of one op call, whose configuration is known."""
  return LayerType(rule, lambda layer, x, kwargs: config, **names)


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
  layer_type = _fixed(rules.DENSE, rules.Dense(use_bias='bias' in params))
  return _report(dense, layer_type, params, x, y, name, index)


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
  return _report(conv, _fixed(rules.CONV, config), params, x, y, name, index)


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
  layer_type = _fixed(
    rules.EMBED,
    rules.Embed(num_embeddings=table.shape[0]),
    weight='embedding',
    bias=None,
  )
  return _report(embed, layer_type, params, ids, y, name, index)


#: The ops, as ``layers=`` and ``exclude=`` of
#: :func:`adafisher_optax.value_and_grad_with_curvature` accept them.
OPS: tuple[Callable[..., Any], ...] = (dense, conv, embed)

__all__ = ['OPS', 'conv', 'dense', 'embed']
