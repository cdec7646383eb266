"""Flax serialization of the optimizer state: ``flax.serialization``'s
``to_state_dict``/``to_bytes`` (``flax.training.checkpoints``, msgpack).

:class:`~adafisher_optax.Factors` (and the running sums of
:func:`~adafisher_optax.multi_steps`,
:class:`~adafisher_optax.LayerStatistics`) are stored as their arrays and
restored into the target's block, with the shapes and the numerics
checked; the static settings (``Settings``, ``Accumulation``) store
nothing (the restoring optimizer's own are kept). The core does not import
Flax: :func:`register_if_flax_loaded` registers them once Flax is there
(at import, in the Flax front ends and in ``init``).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import numpy as np

from adafisher_optax.accumulation import Accumulation
from adafisher_optax.factors import Factors
from adafisher_optax.state import Settings
from adafisher_optax.statistics import LayerStatistics

_registered = False


def _numerics_match(target: Factors, state: dict, where: str) -> None:
  if (target.emas is None) != (state['emas'] is None):
    kinds = {True: "'reference'", False: "'paper'"}
    raise ValueError(
      f'{where}: the checkpoint holds factors of {kinds[state["emas"] is None]}'
      f' numerics, the optimizer restoring it uses '
      f'{kinds[target.emas is None]} numerics.'
    )


def _handlers(fields: tuple[str, ...], check=None):
  """``(to_state_dict, from_state_dict)`` of a dataclass stored as the
  ``fields`` that hold its arrays (its static fields come from the target)."""
  from flax import serialization

  def to_state_dict(value) -> dict[str, Any]:
    return {f: serialization.to_state_dict(getattr(value, f)) for f in fields}

  def from_state_dict(target, state):
    where = serialization.current_path()
    name = type(target).__name__
    if not isinstance(state, dict) or set(state) != set(fields):
      keys = sorted(state) if isinstance(state, dict) else type(state).__name__
      raise ValueError(
        f'{where}: a {name} is stored as {list(fields)}, the checkpoint has '
        f'{keys}.'
      )
    if check is not None:
      check(target, state, where)
    restored = {}
    for field in fields:
      want, value = getattr(target, field), state[field]
      if hasattr(want, 'shape') and np.shape(value) != np.shape(want):
        raise ValueError(
          f'{where}/{field}: the checkpoint has shape {np.shape(value)}, the '
          f'{name} restored into has {np.shape(want)}: the checkpoint is of '
          'another model or layout.'
        )
      restored[field] = serialization.from_state_dict(want, value, name=field)
    return dataclasses.replace(target, **restored)

  return to_state_dict, from_state_dict


def register() -> None:
  """Registers the state's dataclasses with Flax (once)."""
  global _registered
  if _registered:
    return
  from flax import serialization

  for cls, fields, check in (
    (Factors, ('vectors', 'counts', 'emas'), _numerics_match),
    (LayerStatistics, ('input_sums', 'output_sums', 'rows'), None),
  ):
    serialization.register_serialization_state(
      cls, *_handlers(fields, check), override=True
    )
  for static in (Settings, Accumulation):
    serialization.register_serialization_state(
      static, lambda _: {}, lambda target, _: target, override=True
    )
  _registered = True


def register_if_flax_loaded() -> None:
  """:func:`register` if Flax is imported (never imports it)."""
  if not _registered and 'flax' in sys.modules:
    register()
