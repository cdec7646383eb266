"""When to capture: the host-side schedule of factor refreshes.

A train step that captures statistics only on refresh steps (and runs plain
``jax.value_and_grad`` otherwise) needs to know, on the host, which steps
those are. :func:`refresh_schedule` reads the optimizer state once (the
step count, the latest refresh, and ``t_cov`` from the settings of the
optimizer that returned the state), reports a state whose refreshes are
overdue, and then yields one flag per call of ``tx.update`` without
touching the device again: per micro-batch for a
:func:`adafisher_optax.multi_steps` state.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import optax

from adafisher_optax import _tree
from adafisher_optax.accumulation import MultiStepsState
from adafisher_optax.state import (
  StaleFactorsWarning,
  adafisher_state,
  one_replica,
  overdue,
  plan_refreshes,
  refresh_due,
)


def _multi_steps_state(opt_state: Any) -> MultiStepsState | None:
  found = _tree.nodes_of(opt_state, MultiStepsState)
  if not found and _tree.nodes_of(opt_state, optax.MultiStepsState):
    raise ValueError(
      'refresh_schedule: the AdaFisher state is inside optax.MultiSteps, '
      'which calls AdaFisher once per window of micro-batches with the '
      "curvature of the window's last micro-batch only; its state does not "
      'say how long a window is, so no flag per micro-batch can hit the '
      'updates that refresh. Use adafisher_optax.multi_steps(tx, k, '
      'layout=layout) instead (it sums the statistics of every micro-batch, '
      'and its schedule gives one flag per micro-batch), or keep '
      'optax.MultiSteps and capture on every micro-batch (capture=True).'
    )
  return found[0] if found else None


def refresh_schedule(opt_state: Any) -> Iterator[bool]:
  """Yields, call after call of ``tx.update``, whether to bring curvature.

  Reads the state once (one device sync), so call it after ``init`` and
  after restoring a checkpoint (restored into the structure of the
  optimizer you run now, e.g. ``target=tx.init(params)``: the schedule
  follows that optimizer's ``t_cov``); it warns
  (:class:`StaleFactorsWarning`) when refreshes are already overdue.
  ``True`` means: capture (``capture=True``) and pass the ``curvature``;
  ``False``: a plain step. For a :func:`adafisher_optax.multi_steps` state
  there is one flag per micro-batch, the same for every micro-batch of a
  window, so that a refreshing update sees the statistics of its whole
  batch. Passing curvature on other steps does no harm (the optimizer
  refreshes only when due); never passing it leaves the factors stale,
  which :func:`adafisher_optax.diagnostics` shows.

  Example::

    schedule = afo.refresh_schedule(opt_state)
    for x, y in batches:
      params, opt_state, loss = train_step(
        params, opt_state, x, y, refresh=next(schedule)
      )
  """
  plan_refreshes()
  state = one_replica(adafisher_state(opt_state), 'refresh_schedule')
  late = overdue(state)
  if late:
    warnings.warn(
      f'AdaFisher: the factors are {late} updates overdue for a refresh '
      f'(t_cov={state.settings.t_cov}): the next update should bring '
      'curvature.',
      StaleFactorsWarning,
      stacklevel=2,
    )
  flags = _update_flags(
    int(state.count), int(state.last_refresh), state.settings.t_cov
  )
  accumulating = _multi_steps_state(opt_state)
  if accumulating is None:
    return flags
  return _micro_batch_flags(flags, accumulating)


def _update_flags(count: int, last: int, t_cov: int) -> Iterator[bool]:
  """Whether each coming update refreshes (given curvature)."""
  while True:
    due = bool(refresh_due(count, last, t_cov))
    if due:
      last = count
    count += 1
    yield due


def _micro_batch_flags(
  updates: Iterator[bool], state: MultiStepsState
) -> Iterator[bool]:
  """Each update's flag repeated over the micro-batches of its window."""
  mini_step = int(state.inner.mini_step)
  gradient_step = int(state.inner.gradient_step)
  while True:
    every_k = state.settings.micro_batches(gradient_step)
    due = next(updates)
    for _ in range(every_k - mini_step):
      yield due
    mini_step = 0
    gradient_step += 1
