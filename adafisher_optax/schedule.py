"""When to capture: the host-side schedule of factor refreshes.

A train step that captures statistics only on refresh steps (and runs plain
``jax.value_and_grad`` otherwise) needs to know, on the host, which steps
those are. :func:`refresh_schedule` reads the optimizer state once (the
step count, the latest refresh and ``t_cov``), reports a state whose
refreshes are overdue, and then yields one flag per step without touching
the device again.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import jax

from adafisher_optax.transform import AdaFisherState


class StaleFactorsWarning(UserWarning):
  """The factors were not refreshed for longer than ``t_cov`` updates."""


def adafisher_state(opt_state: Any) -> AdaFisherState:
  """The one :class:`AdaFisherState` inside a (chained, wrapped) state.

  ``adafisher`` chains the coupled decay first (its AdaFisher state is
  ``opt_state[1]``), ``adafisherw`` the decoupled decay after (``[0]``);
  this finds it in either, and inside ``inject_hyperparams``,
  ``masked``, ``multi_steps`` or an ``nnx.Optimizer``'s ``opt_state``.
  """
  found = [
    node
    for node in jax.tree.leaves(
      opt_state, is_leaf=lambda n: isinstance(n, AdaFisherState)
    )
    if isinstance(node, AdaFisherState)
  ]
  if len(found) != 1:
    raise ValueError(
      f'opt_state must contain exactly one AdaFisherState, found {len(found)}.'
    )
  return found[0]


def overdue(state: AdaFisherState) -> int:
  """Updates since a refresh was due and none happened (0 if none is late)."""
  count, last, t_cov = (
    int(state.count),
    int(state.last_refresh),
    int(state.t_cov),
  )
  if last < 0:
    return count
  return max(0, count - last - t_cov)


def refresh_schedule(opt_state: Any) -> Iterator[bool]:
  """Yields, step after step, whether the next update refreshes the factors.

  Reads the state once (one device sync), so call it after ``init`` and
  after restoring a checkpoint; it warns (:class:`StaleFactorsWarning`)
  when refreshes are already overdue. Each ``next()`` is one update:
  ``True`` when the update should bring ``curvature`` (capture on),
  ``False`` for a plain step. Passing curvature on other steps does no
  harm (the optimizer refreshes only when due); never passing it leaves
  the factors stale, which :func:`adafisher_optax.diagnostics` shows.

  Example::

    schedule = afo.refresh_schedule(opt_state)
    for x, y in batches:
      params, opt_state, loss = train_step(
        params, opt_state, x, y, refresh=next(schedule)
      )
  """
  state = adafisher_state(opt_state)
  late = overdue(state)
  if late:
    warnings.warn(
      f'AdaFisher: the factors are {late} updates overdue for a refresh '
      f'(t_cov={int(state.t_cov)}): the next update should bring curvature.',
      StaleFactorsWarning,
      stacklevel=2,
    )
  return _flags(int(state.count), int(state.last_refresh), int(state.t_cov))


def _flags(count: int, last: int, t_cov: int) -> Iterator[bool]:
  while True:
    due = last < 0 or count - last >= t_cov
    if due:
      last = count
    count += 1
    yield due
