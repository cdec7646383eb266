"""Checks of AdaFisher's hyperparameters, run when an optimizer is built.

A bad value raises a ``ValueError`` (or ``TypeError``) naming the
argument: a non-scalar, a bool, or a concrete value out of range. The
values of traced ones (``optax.inject_hyperparams``) are not checked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adafisher_optax.rules import Numerics

#: ``t_cov`` (steps between factor refreshes) by numerics.
DEFAULT_T_COV: dict[Numerics, int] = {'reference': 100, 'paper': 1}
_MAX_T_COV = 2**31 - 1  # the step count is int32

_RULES: dict[str, tuple[Callable[[np.ndarray], Any], str]] = {
  'learning_rate': (lambda v: v >= 0, 'non-negative'),
  'b1': (lambda v: (v >= 0) & (v < 1), 'in [0, 1)'),
  'b2': (lambda v: (v >= 0) & (v < 1), 'in [0, 1)'),
  'eps': (lambda v: v >= 0, 'non-negative'),
  'damping': (lambda v: v > 0, 'positive'),
  'gamma': (lambda v: (v >= 0) & (v <= 1), 'in [0, 1]'),
  'fisher_power': (lambda v: v > 0, 'positive'),
  'weight_decay': (lambda v: v >= 0, 'non-negative'),
  'relative_damping': (
    lambda v: v > 0,
    'positive (math.inf allowed; with 0, F~ = K / mean(K) is 0 wherever K '
    'is, and the update divides by it: use a small value such as 0.01)',
  ),
}


def _concrete(value: Any) -> np.ndarray | None:
  """``value`` as a NumPy array, or ``None`` when it is traced."""
  try:
    return np.asarray(value)
  except (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
  ):
    return None


def check(name: str, value: Any) -> None:
  """Raises when a hyperparameter breaks its rule.

  Only ``learning_rate`` may be a schedule; every float hyperparameter may be
  traced (``optax.inject_hyperparams``).
  """
  if value is None:
    raise TypeError(
      f'{name} must be a number{" or an optax schedule" if name == "learning_rate" else ""}, got None.'
    )
  if callable(value):
    if name == 'learning_rate':
      return
    raise TypeError(
      f'{name}: only learning_rate takes a schedule; to vary {name} during '
      f'training, use optax.inject_hyperparams(afo.adafisher)({name}=...).'
    )
  number = check_number(name, value)
  if number is None:
    return
  ok, requirement = _RULES[name]
  infinite_ok = name == 'relative_damping'
  number = number.astype(np.float64)
  if (
    np.any(np.isnan(number))
    or (np.any(np.isinf(number)) and not infinite_ok)
    or not np.all(ok(number))
  ):
    raise ValueError(f'{name} must be {requirement}, got {value!r}.')


def check_number(name: str, value: Any) -> np.ndarray | None:
  """Raises unless ``value`` is a real scalar; returns it as a NumPy array
  (``None`` when it is traced)."""
  requirement = _RULES[name][1]
  shape = np.shape(value)
  if shape != ():
    raise ValueError(
      f'{name} must be a scalar ({requirement}), got an array of shape {shape}.'
    )
  number = _concrete(value)
  # jnp.issubdtype: NumPy calls bfloat16 (ml_dtypes) kind 'V'.
  if number is not None and (
    number.dtype.kind not in 'iu'
    and not jnp.issubdtype(number.dtype, jnp.floating)
  ):
    raise TypeError(
      f'{name} must be a real number ({requirement}), got {value!r} of '
      f'dtype {number.dtype}.'
    )
  return number


def check_all(**values: Any) -> None:
  """:func:`check` of each ``name=value``."""
  for name, value in values.items():
    check(name, value)


def check_choice(name: str, value: Any, allowed: tuple) -> Any:
  if value not in allowed:
    raise ValueError(f'{name} must be one of {allowed}, got {value!r}.')
  return value


def check_axis_name(axis_name: Any) -> tuple:
  """The ``pmap`` axis names as a tuple (empty for ``None``)."""
  if axis_name is None:
    return ()
  if isinstance(axis_name, (tuple, list)):
    return tuple(axis_name)
  return (axis_name,)


def check_t_cov(t_cov: Any, numerics: Numerics) -> int:
  """``t_cov`` as an int (the numerics' default for ``None``)."""
  if t_cov is None:
    return DEFAULT_T_COV[numerics]
  if callable(t_cov):
    raise TypeError(
      't_cov must be a positive integer (steps between refreshes), not a '
      'schedule.'
    )
  number = _concrete(t_cov)
  if number is None:
    raise TypeError(
      't_cov is traced: optax.inject_hyperparams passes every numeric '
      "argument as an array; pass static_args=('t_cov',) to it (t_cov sets "
      'the structure of the refresh schedule, not a value in the step).'
    )
  if (
    isinstance(t_cov, bool)
    or number.shape != ()
    or number.dtype.kind not in 'iuf'
    or not np.isfinite(number)
    or number != np.round(number)
    or not 1 <= number <= _MAX_T_COV
  ):
    raise ValueError(
      f't_cov must be an integer in [1, 2**31 - 1] (or None for the '
      f'numerics default), got {t_cov!r}.'
    )
  return int(number)


def check_mu_dtype(mu_dtype: Any) -> Any:
  if mu_dtype is None:
    return None
  try:
    dtype = jnp.dtype(mu_dtype)
  except TypeError as error:
    raise TypeError(f'mu_dtype: {mu_dtype!r} is not a dtype.') from error
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
      f'mu_dtype must be a floating-point dtype (the momentum), got {dtype}.'
    )
  return jax.dtypes.canonicalize_dtype(dtype)


def check_relative_damping(value: Any) -> Any:
  if value is not None:
    check('relative_damping', value)
  return value
