"""Gradient accumulation that keeps the statistics of every micro-batch.

``optax.MultiSteps`` hands its inner optimizer the extra arguments of the
last micro-batch only; :func:`multi_steps` sums the curvature statistics of
all micro-batches alongside the gradients, so ``k`` micro-batches of size
``B`` give the factors of one batch of size ``k * B``.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adafisher_optax import statistics as statistics_lib


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Accumulation:
  """The static settings of a :func:`multi_steps` optimizer.

  Attributes:
    every_k: micro-batches per update: an int or a schedule of the update
      count.
  """

  every_k: int | Callable[[Any], Any]

  def micro_batches(self, gradient_step: int) -> int:
    """The micro-batches of update number ``gradient_step``."""
    if callable(self.every_k):
      return int(self.every_k(gradient_step))
    return self.every_k


class MultiStepsState(NamedTuple):
  """State of :func:`multi_steps`.

  Attributes:
    inner: the ``optax.MultiSteps`` state (accumulated gradients, the inner
      optimizer's state, the micro-step counter).
    curvature: the statistics summed over the window's micro-batches that
      brought curvature.
    captured: how many micro-batches of the window brought curvature.
    settings: :class:`Accumulation` (static).
  """

  inner: optax.MultiStepsState
  curvature: Any
  captured: jax.Array
  settings: Accumulation


_OTHER_SETTINGS = (
  'multi_steps: the state holds an AdaFisher state of other settings '
  '(t_cov, damping, numerics, ...) than this optimizer: optax.MultiSteps '
  'keeps either the inner state or its update, which must have the same '
  "settings. Restore the checkpoint into this optimizer's state "
  '(afo.checkpoint.restore(directory, tx.init(params))), which takes the '
  'new settings.'
)


def _check_every_k(every_k_schedule: Any) -> None:
  if callable(every_k_schedule):
    return
  if (
    isinstance(every_k_schedule, bool)
    or not isinstance(every_k_schedule, numbers.Integral)
    or every_k_schedule < 1
  ):
    raise ValueError(
      'every_k_schedule must be a positive integer (micro-batches per '
      f'update) or a schedule, got {every_k_schedule!r}.'
    )


def _check_state(state: Any, curvature: Any, structure: Any) -> None:
  if not isinstance(state, MultiStepsState):
    raise TypeError(
      f'multi_steps: the state is a {type(state).__name__}, not the '
      "MultiStepsState of this optimizer's init."
    )
  if curvature is not None and jax.tree.structure(curvature) != structure:
    raise ValueError(
      'multi_steps: curvature does not match the layout given at '
      f'construction:\n  layout:    {structure}\n  curvature: '
      f'{jax.tree.structure(curvature)}'
    )


def _averaged(total: Any, parts: jax.Array) -> Any:
  """The statistics of the mean of ``parts`` micro-batch losses."""
  return jax.tree.map(
    lambda s: s.average_of(parts),
    total,
    is_leaf=statistics_lib.is_layer_statistics,
  )


def multi_steps(
  tx: optax.GradientTransformation,
  every_k_schedule: int | optax.Schedule,
  *,
  layout: Any,
  **multi_steps_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """``optax.MultiSteps`` for AdaFisher: accumulates gradients and statistics.

  Every micro-batch's ``curvature`` is added to a running sum; the inner
  optimizer sees the sum with the output gradients rescaled to the averaged
  objective, exactly as if one batch of all micro-batches had been captured.
  Micro-batches without ``curvature`` (plain steps) accumulate gradients
  only; an update refreshes only when its last micro-batch brings
  curvature, and a window's statistics never reach the next window.
  :func:`adafisher_optax.refresh_schedule` of this optimizer's state yields
  one flag per micro-batch, the same over each window. A micro-batch that
  ``should_skip_update_fn`` rejects contributes neither gradients nor
  statistics.

  Args:
    tx: the optimizer (e.g. :func:`adafisher_optax.adafisher`).
    every_k_schedule: micro-batches per update (int or schedule), as for
      ``optax.MultiSteps``.
    layout: the curvature's shapes, from
      :func:`adafisher_optax.curvature_layout` (the running sum is part of
      the state, so its structure is fixed at ``init``).
    **multi_steps_kwargs: passed to ``optax.MultiSteps``.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes
    ``curvature=`` like AdaFisher's.
  """
  _check_every_k(every_k_schedule)
  if layout is None or not statistics_lib.by_block(layout):
    raise ValueError(
      'multi_steps needs layout=adafisher_optax.curvature_layout(grad_fn, '
      'params, *batch) to size its running sum of statistics.'
    )
  inner = optax.MultiSteps(tx, every_k_schedule, **multi_steps_kwargs)
  structure = jax.tree.structure(layout)

  settings = Accumulation(every_k_schedule)

  def init_fn(params):
    return MultiStepsState(
      inner=inner.init(params),
      # New arrays on every init: a donated state must not take them along.
      curvature=jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), layout),
      captured=jnp.zeros([], jnp.int32),
      settings=settings,
    )

  def update_fn(updates, state, params=None, *, curvature=None, **extra_args):
    _check_state(state, curvature, structure)
    total, captured, inner_args = state.curvature, state.captured, {}
    if curvature is not None:
      total = jax.tree.map(jnp.add, total, curvature)
      captured = captured + 1
      inner_args['curvature'] = _averaged(total, captured)
    try:
      new_updates, inner_state = inner.update(
        updates, state.inner, params, **inner_args, **extra_args
      )
    except (TypeError, ValueError) as error:
      if 'Settings(' not in str(error):
        raise
      raise ValueError(_OTHER_SETTINGS) from error
    # A micro-batch that should_skip_update_fn rejects moves no counter;
    # its statistics are dropped with its gradients.
    skipped = (inner_state.mini_step == state.inner.mini_step) & (
      inner_state.gradient_step == state.inner.gradient_step
    )
    emitted = ~skipped & (inner_state.mini_step == 0)  # a window ends
    kept = jax.tree.map(
      lambda t, old: jnp.where(skipped, old, t), total, state.curvature
    )
    return new_updates, MultiStepsState(
      inner=inner_state,
      curvature=jax.tree.map(lambda t: jnp.where(emitted, 0, t), kept),
      captured=jnp.where(
        emitted, 0, jnp.where(skipped, state.captured, captured)
      ),
      settings=settings,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
