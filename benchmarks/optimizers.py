"""Every optimizer of the benchmarks, and the only door to ``adafisher_optax``.

An :class:`Arm` names one optimizer configuration; :func:`make` builds its
optax transformation for a learning rate (a float or a schedule),
:func:`gradients` its gradient function (with the curvature statistics for
AdaFisher, plain ``jax.value_and_grad`` otherwise) and :func:`update` applies
one step. The benchmarks call the library through these three functions
only, so a change of the library's API is a change here.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import optax

import adafisher_optax as afo

Unpreconditioned = afo.UnpreconditionedParametersWarning


@dataclasses.dataclass(frozen=True)
class Arm:
  """One optimizer configuration.

  Attributes:
    name: short key (``adam``, ``adafisher-rel-0.1``, ...).
    label: what tables print.
    family: ``optax`` (``options['optimizer']`` is ``adam``, ``adamw`` or
      ``sgd``), ``adafisher`` (keyword arguments of ``afo.adafisher``) or
      ``kfac`` (keyword arguments of :func:`benchmarks.kfac.make_kfac_train_step`).
    options: the keyword arguments, as sorted ``(name, value)`` pairs.
  """

  name: str
  label: str
  family: str
  options: tuple[tuple[str, Any], ...] = ()

  @property
  def kwargs(self) -> dict[str, Any]:
    return dict(self.options)

  @property
  def numerics(self) -> str:
    return self.kwargs.get('numerics', 'reference')

  @property
  def captures(self) -> bool:
    """Whether the step needs the curvature statistics."""
    return self.family == 'adafisher'

  @property
  def has_learning_rate(self) -> bool:
    """kfac-jax's recommended configuration adapts its own."""
    return not (self.family == 'kfac' and self.kwargs.get('adaptive'))

  def variant(self, name: str, label: str, **options) -> Arm:
    """This arm with some options replaced."""
    merged = {**self.kwargs, **options}
    return Arm(name, label, self.family, tuple(sorted(merged.items())))

  def describe(self) -> dict[str, Any]:
    options = {
      k: (repr(v) if isinstance(v, float) and math.isinf(v) else v)
      for k, v in self.options
    }
    return {
      'name': self.name,
      'label': self.label,
      'family': self.family,
      'options': options,
    }


def arm(name: str, label: str, family: str, **options) -> Arm:
  return Arm(name, label, family, tuple(sorted(options.items())))


def make(arm: Arm, learning_rate) -> optax.GradientTransformation:
  """The transformation of a (non-kfac) arm; ``learning_rate`` may be a
  schedule (it may close over traced values, e.g. under ``jax.vmap``)."""
  options = arm.kwargs
  if arm.family == 'optax':
    kind = options.pop('optimizer')
    return getattr(optax, kind)(learning_rate, **options)
  if arm.family == 'adafisher':
    return afo.adafisher(learning_rate, **options)
  raise ValueError(f'{arm.name}: no optax transformation for {arm.family}')


def curvature_grad(loss: Callable, *, has_aux=True, layers=None) -> Callable:
  """``afo.value_and_grad_with_curvature``: ``fn(params, *args,
  capture=True) -> (value, grads, curvature or None)``."""
  return afo.value_and_grad_with_curvature(loss, has_aux=has_aux, layers=layers)


def gradients(arm: Arm, loss: Callable, *, has_aux=True) -> Callable:
  """``fn(params, *args, capture=True) -> (value, grads, curvature or
  None)``; ``capture`` (static) matters to AdaFisher only."""
  if arm.captures:
    return curvature_grad(loss, has_aux=has_aux)
  plain = jax.value_and_grad(loss, has_aux=has_aux)

  def fn(params, *args, capture=True):
    del capture
    value, grads = plain(params, *args)
    return value, grads, None

  return fn


def refresh_period(arm: Arm) -> int:
  """Updates between AdaFisher's factor refreshes (1 for other arms): the
  steps that capture statistics, one in ``refresh_period``."""
  if not arm.captures:
    return 1
  default = {'reference': 100, 'paper': 1}[arm.numerics]
  t_cov = arm.kwargs.get('t_cov')
  return default if t_cov is None else t_cov


def refresh_flags(arm: Arm, opt_state) -> Iterator[bool]:
  """Per step, whether it captures statistics (AdaFisher's refresh steps:
  :func:`adafisher_optax.refresh_schedule`; never for other arms)."""
  if arm.captures:
    return afo.refresh_schedule(opt_state)
  return itertools.repeat(False)


def update(tx, grads, opt_state, params, curvature=None):
  """``tx.update``, with the curvature where there is one."""
  if curvature is None:
    return tx.update(grads, opt_state, params)
  return tx.update(grads, opt_state, params, curvature=curvature)


def unpreconditioned(params, curvature) -> list[str]:
  """Parameters AdaFisher leaves at ``F~ = 1`` (none for the benchmark models)."""
  return afo.unpreconditioned_parameters(params, curvature)


# The arms of the evidence benchmark. Learning rates come from the grids.
ADAM = arm('adam', 'Adam', 'optax', optimizer='adam')
ADAMW = arm(
  'adamw',
  'AdamW (decoupled decay 0.1)',
  'optax',
  optimizer='adamw',
  weight_decay=0.1,
)
SGDM = arm('sgdm', 'SGD, momentum 0.9', 'optax', optimizer='sgd', momentum=0.9)
REF = arm(
  'adafisher-ref',
  'AdaFisher reference (t_cov=100)',
  'adafisher',
  numerics='reference',
)
REF_T1 = arm(
  'adafisher-ref-t1',
  'AdaFisher reference, t_cov=1',
  'adafisher',
  numerics='reference',
  t_cov=1,
)
PAPER = {
  d: arm(
    f'adafisher-paper-{d:g}',
    f'AdaFisher paper, damping {d:g}',
    'adafisher',
    numerics='paper',
    damping=d,
  )
  for d in (1e-3, 1e-2, 1e-1)
}
RELATIVE = {
  a: arm(
    f'adafisher-rel-{a:g}',
    f'AdaFisher paper, relative damping a={a:g}',
    'adafisher',
    numerics='paper',
    relative_damping=a,
  )
  for a in (math.inf, 1.0, 0.1, 0.01)
}
KFAC = arm(
  'kfac',
  'kfac-jax (adaptive lr, momentum, damping)',
  'kfac',
  adaptive=True,
  initial_damping=1.0,
  l2_reg=1e-3,
)


def layer_mean(base: Arm) -> Arm:
  """Control: ``F~`` replaced by its layer mean (per-layer step size only)."""
  return base.variant(
    f'{base.name}+mean', f'{base.label}, F~ layer mean', ablation='layer_mean'
  )


def permuted(base: Arm) -> Arm:
  """Control: the factor vectors shuffled within each layer."""
  return base.variant(
    f'{base.name}+perm', f'{base.label}, F~ permuted', ablation='permuted'
  )
