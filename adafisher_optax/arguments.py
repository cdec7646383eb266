"""Checks of what the user's function takes and returns, worded as
``jax.value_and_grad`` words them, naming the argument at fault."""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adafisher_optax import _tree


def layer_arguments(
  method: Any, args: tuple, kwargs: dict
) -> tuple[Any, dict] | None:
  """``(input, the other arguments by name)`` of a layer method call
  ``method(self, x, ...)`` whose input comes by position or by name
  (``nn.Dense(4)(inputs=x)``); ``None`` when it has none."""
  names = list(inspect.signature(method).parameters)[1:]
  if args:
    return args[0], {**dict(zip(names[1:], args[1:])), **kwargs}
  if names and names[0] in kwargs:
    others = dict(kwargs)
    return others.pop(names[0]), others
  return None


def with_capture_arguments(wrapper: Any, fun: Any) -> Any:
  """``wrapper`` (a ``functools.wraps`` of ``fun``) with ``fun``'s signature
  plus the keyword-only ``capture`` and ``fisher_key``, so that
  ``jax.jit(wrapper, static_argnames='capture')`` finds them."""
  try:
    signature = inspect.signature(fun)
  except (TypeError, ValueError):  # nothing to read
    return wrapper
  if {'capture', 'fisher_key'} & set(signature.parameters):
    return wrapper
  parameters = list(signature.parameters.values())
  extra = [
    inspect.Parameter('capture', inspect.Parameter.KEYWORD_ONLY, default=True),
    inspect.Parameter(
      'fisher_key', inspect.Parameter.KEYWORD_ONLY, default=None
    ),
  ]
  at = len(parameters)
  if parameters and parameters[-1].kind is inspect.Parameter.VAR_KEYWORD:
    at -= 1
  wrapper.__signature__ = signature.replace(
    parameters=parameters[:at] + extra + parameters[at:]
  )
  return wrapper


def split_output(out: Any, has_aux: bool, name: str) -> tuple[Any, Any]:
  """``(loss, aux)`` of the user's function, checked as ``jax.grad`` does."""
  if has_aux:
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
      raise TypeError(
        f'has_aux=True: `{name}` must return a pair (loss, aux), got '
        f'{type(out).__name__}'
        + (f' of length {len(out)}' if isinstance(out, (tuple, list)) else '')
        + '.'
      )
    loss, aux = out
  else:
    loss, aux = out, None
  shape = getattr(loss, 'shape', None)
  if isinstance(loss, (tuple, list)) or shape is None:
    raise TypeError(
      f'`{name}` must return a scalar loss; it returned {type(loss).__name__}'
      + ('. For (loss, aux), pass has_aux=True.' if not has_aux else '.')
    )
  if shape != ():
    raise TypeError(
      f'Gradient only defined for scalar-output functions: `{name}` returned '
      f'a loss of shape {shape} (reduce it, e.g. with .mean()).'
    )
  if not jnp.issubdtype(loss.dtype, jnp.floating):
    raise TypeError(
      f'`{name}` returned a loss of dtype {loss.dtype}; gradients need a '
      'real floating-point loss.'
    )
  return loss, aux


def check_differentiable(params: Any, name: str) -> None:
  found = _tree.first_leaf_not_of(params, jnp.inexact)
  if found is not None:
    raise TypeError(
      f'The first argument of `{name}` must hold floating-point arrays; '
      f'{_tree.format_path(found[0])!r} has dtype {found[1]} (move integer '
      'state out of the differentiated params).'
    )


def check_call(capture: Any, fisher: str, fisher_key: Any) -> bool:
  """The static ``capture`` flag (returned as a bool) and ``fisher_key``."""
  if not isinstance(capture, (bool, np.bool_)):
    raise TypeError(
      'capture must be a bool (Python or NumPy; mark it static, e.g. '
      "jax.jit(step, static_argnames='refresh')), got "
      f'{type(capture).__name__}.'
    )
  capture = bool(capture)
  if capture and (fisher == 'sampled') != (fisher_key is not None):
    raise TypeError(
      'fisher_key: pass a jax.random key exactly when fisher="sampled" '
      f'(fisher={fisher!r}).'
    )
  if capture and fisher_key is not None and not _is_key(fisher_key):
    raise TypeError(
      'fisher_key must be a jax random key (jax.random.key(seed), or a raw '
      f'uint32 PRNGKey), got {type(fisher_key).__name__} of dtype '
      f'{getattr(fisher_key, "dtype", None)}.'
    )
  return capture


def _is_key(key: Any) -> bool:
  dtype, shape = getattr(key, 'dtype', None), getattr(key, 'shape', None)
  if dtype is None or shape is None:
    return False
  if jnp.issubdtype(dtype, jax.dtypes.prng_key):
    return shape == ()
  return dtype == jnp.uint32 and tuple(shape) == (2,)
