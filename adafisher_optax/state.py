"""The optimizer state of AdaFisher, and what the host reads from it.

:class:`AdaFisherState` is optax-shaped (a NamedTuple with ``count``); its
``settings`` (:class:`Settings`) is static, a node without leaves: it says
what the optimizer that returned the state does (numerics, ``t_cov``,
damping), so that :func:`adafisher_optax.refresh_schedule` and
:func:`adafisher_optax.diagnostics` follow the optimizer the user runs now.
A state restored into the structure of a new optimizer's ``init`` (as orbax
restores into a target) carries the new optimizer's settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import optax

from adafisher_optax import _tree

#: Marks a hyperparameter that ``optax.inject_hyperparams`` passes traced.
INJECTED = 'injected'


class StaleFactorsWarning(UserWarning):
  """The factors are not refreshed: no update brought curvature in time."""


_PLANNED = {'refreshes': False}


def plan_refreshes() -> None:
  """Notes that this process runs a loop that refreshes the factors (a
  :func:`adafisher_optax.refresh_schedule` was built, or an update with
  curvature traced)."""
  _PLANNED['refreshes'] = True


def refreshes_planned() -> bool:
  return _PLANNED['refreshes']


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Settings:
  """The static settings of the optimizer that returned a state.

  Attributes:
    numerics: ``'reference'`` or ``'paper'``.
    t_cov: updates between factor refreshes.
    damping: the absolute damping, or :data:`INJECTED`.
    relative_damping: the relative damping (``None``: absolute damping is
      used), or :data:`INJECTED`.
    grafting: ``None``, ``'rms'`` or ``'adam'``.
  """

  numerics: str
  t_cov: int
  damping: float | str
  relative_damping: float | str | None
  grafting: str | None


class AdaFisherState(NamedTuple):
  """State of :func:`adafisher_optax.scale_by_adafisher`.

  Attributes:
    count: number of updates so far (int32).
    mu: first moment of the gradients, like the params.
    nu: Adam's second moment, like the params, under ``grafting='adam'``;
      ``()`` (no leaves) otherwise.
    factors: the :class:`adafisher_optax.Factors` of every captured layer,
      in nested dicts keyed like the params (a tuple sorted by rule where
      several rules read one layer, as a tied embedding's lookup and
      ``attend``).
    last_refresh: the ``count`` of the latest refresh (int32; -1 before the
      first).
    settings: the optimizer's :class:`Settings` (static, no leaves).
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  factors: Any
  last_refresh: jax.Array
  settings: Settings


def refresh_due(count: Any, last_refresh: Any, t_cov: Any) -> Any:
  """Whether an update at ``count`` refreshes the factors (given statistics).

  Due when none happened yet or ``t_cov`` updates have passed since the
  latest one: a refresh whose statistics come late happens late, never
  never. Python ints give a bool, arrays an array.
  """
  return (last_refresh < 0) | (count - last_refresh >= t_cov)


def overdue(state: AdaFisherState) -> int:
  """Updates since a refresh was due and none happened (0 if none is late)."""
  count, last = int(state.count), int(state.last_refresh)
  if last < 0:
    return count
  return max(0, count - last - state.settings.t_cov)


def one_replica(state: AdaFisherState, caller: str) -> AdaFisherState:
  """``state``, checked to be one replica's (a scalar ``count``): the host
  functions read one state, not one per device of a ``jax.pmap``."""
  shape = getattr(state.count, 'shape', ())
  if shape:
    raise ValueError(
      f'{caller}: the AdaFisher state has a leading axis of {shape[0]} (a '
      'state replicated by jax.pmap?); pass one replica: '
      'jax.tree.map(lambda x: x[0], opt_state) (and params[0]).'
    )
  return state


def check_params(params: Any, state: AdaFisherState, caller: str) -> None:
  """Raises, naming a path, unless ``params`` are the params (paths and
  shapes) that ``state`` was initialised for."""
  differences = _tree.shape_differences(params, state.mu)
  not_those = (
    'the params are not those the state was initialised for (another '
    'model, or the whole variables dict?).'
  )
  for path, (shape, held) in differences.items():
    where = _tree.format_path(path)
    if shape is None:  # after every path params has: only missing ones
      missing = sum(given is None for given, _ in differences.values())
      raise ValueError(
        f'{caller}: params has no {where!r}, which the state holds '
        f'({missing} such): ' + not_those
      )
    if held is None:
      raise ValueError(
        f'{caller}: params {where!r} is not in the state: ' + not_those
      )
    raise ValueError(
      f'{caller}: params {where!r} has shape {shape}, the state holds '
      f'{held}: ' + not_those
    )


def adafisher_state(opt_state: Any) -> AdaFisherState:
  """The one :class:`AdaFisherState` inside a (chained, wrapped) state.

  Found inside chains, ``inject_hyperparams``, ``masked``, ``multi_steps``
  or an ``nnx.Optimizer``'s ``opt_state``.
  """
  found = _tree.nodes_of(opt_state, AdaFisherState)
  if len(found) != 1:
    hint = (
      ' (pass the part of the state that holds the one you mean, e.g. '
      "opt_state.inner_states['label'] of an optax.multi_transform)"
      if found
      else ''
    )
    raise ValueError(
      'opt_state must contain exactly one AdaFisherState, found '
      f'{len(found)}{hint}.'
    )
  return found[0]


def _injected(node: Any) -> bool:
  """An ``optax.inject_hyperparams`` state (stateless or stateful flavour)."""
  kinds = (
    getattr(optax, 'InjectHyperparamsState', ()),
    getattr(optax, 'InjectStatefulHyperparamsState', ()),
  )
  return isinstance(node, kinds)


def injected_hyperparameters(opt_state: Any) -> dict[str, Any]:
  """The hyperparameters of the ``optax.inject_hyperparams`` states around
  AdaFisher (an inner one's win; those around other optimizers, as in an
  ``optax.multi_transform``, are not AdaFisher's).

  Empty when there is none (the settings are then all static).
  """
  found = {}
  for node in jax.tree.leaves(opt_state, is_leaf=_injected):
    if _injected(node) and _tree.nodes_of(node.inner_state, AdaFisherState):
      found.update(node.hyperparams)
      found.update(injected_hyperparameters(node.inner_state))
  return found
