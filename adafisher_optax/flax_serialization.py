"""Flax serialization of the optimizer state: ``flax.serialization``'s
``to_state_dict``/``to_bytes`` (``flax.training.checkpoints``, msgpack).

:class:`~adafisher_optax.Factors` is stored as its arrays and restored into
the target's block, with the shapes and numerics checked; the static
``Settings`` store nothing (the restoring optimizer's own are kept). The
core does not import Flax: :func:`register_if_flax_loaded` registers both
classes once Flax is there (at import, in the Flax front ends and in
``init``).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import numpy as np

from adafisher_optax.factors import Factors
from adafisher_optax.state import Settings

_ARRAYS = ('vectors', 'counts', 'emas')
_registered = False


def _factors_to_state_dict(factors: Factors) -> dict[str, Any]:
  from flax import serialization

  return {f: serialization.to_state_dict(getattr(factors, f)) for f in _ARRAYS}


def _factors_from_state_dict(target: Factors, state: Any) -> Factors:
  from flax import serialization

  where = serialization.current_path()
  if not isinstance(state, dict) or set(state) != set(_ARRAYS):
    keys = sorted(state) if isinstance(state, dict) else type(state).__name__
    raise ValueError(
      f'{where}: AdaFisher factors are stored as {list(_ARRAYS)}, the '
      f'checkpoint has {keys}.'
    )
  if (target.emas is None) != (state['emas'] is None):
    kinds = {True: "'reference'", False: "'paper'"}
    raise ValueError(
      f'{where}: the checkpoint holds factors of {kinds[state["emas"] is None]}'
      f' numerics, the optimizer restoring it uses '
      f'{kinds[target.emas is None]} numerics.'
    )
  restored = {}
  for field in _ARRAYS:
    want, value = getattr(target, field), state[field]
    if want is not None and np.shape(value) != np.shape(want):
      raise ValueError(
        f'{where}/{field}: the checkpoint has shape {np.shape(value)}, the '
        f'optimizer state {np.shape(want)}: the checkpoint is of another '
        'model or layout.'
      )
    restored[field] = serialization.from_state_dict(want, value, name=field)
  return dataclasses.replace(target, **restored)


def register() -> None:
  """Registers :class:`Factors` and ``Settings`` with Flax (once)."""
  global _registered
  if _registered:
    return
  from flax import serialization

  serialization.register_serialization_state(
    Factors, _factors_to_state_dict, _factors_from_state_dict, override=True
  )
  serialization.register_serialization_state(
    Settings, lambda _: {}, lambda target, _: target, override=True
  )
  _registered = True


def register_if_flax_loaded() -> None:
  """:func:`register` if Flax is imported (never imports it)."""
  if not _registered and 'flax' in sys.modules:
    register()
