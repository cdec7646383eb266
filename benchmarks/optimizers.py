"""Every optimizer of the benchmarks, and the only door to ``adafisher_optax``.

An :class:`Arm` names one optimizer configuration; :func:`make` builds its
optax transformation for a learning rate (a float or a schedule) and, for
the arms whose decay is tuned, a weight decay; :func:`gradients` gives its
gradient function (with the curvature statistics for AdaFisher, plain
``jax.value_and_grad`` otherwise) and :func:`update` applies one step. The
README loop's helpers (:func:`curvature_grad`, :func:`curvature_layout`,
:func:`refresh_flags`, :func:`nnx_curvature_grad`) are here too. No other
module of ``benchmarks/`` imports the library, so a change of its API is a
change here (the benchmark controls in one function, :func:`_control`).
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
UnsupportedLayer = afo.UnsupportedLayerWarning
ADAFISHER_ALIASES = ('adafisher', 'adafisherw', 'adafisher_like_adam')


@dataclasses.dataclass(frozen=True)
class Arm:
  """One optimizer configuration.

  Attributes:
    name: short key (``adam``, ``adafisher-rel-0.1``, ...).
    label: what tables print.
    family: ``optax`` (``options['optimizer']``: ``adam``, ``adamw``,
      ``sgd``, ``adafactor`` or ``muon``, the other options its keyword
      arguments), ``adafisher`` (``options['alias']``: ``adafisher``
      (default), ``adafisherw`` or ``adafisher_like_adam``, the other
      options its keyword arguments, ``control`` a benchmark control) or
      ``kfac`` (keyword arguments of
      :func:`benchmarks.kfac.make_kfac_train_step`).
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

  @property
  def decays(self) -> bool:
    """Whether the arm has a weight decay (``weight_decay`` option) that
    :func:`make` may override per run."""
    return 'weight_decay' in self.kwargs

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


def make(
  arm: Arm, learning_rate, *, weight_decay=None, layout=None
) -> optax.GradientTransformation:
  """The transformation of a (non-kfac) arm.

  ``learning_rate`` may be a schedule and ``weight_decay`` (replacing the
  arm's own) a traced value (e.g. under ``jax.vmap``); ``layout``
  (:func:`curvature_layout`) sizes AdaFisher's factors exactly.
  """
  options = arm.kwargs
  if weight_decay is not None:
    if not arm.decays:
      raise ValueError(f'{arm.name} has no weight decay to set')
    options['weight_decay'] = weight_decay
  if arm.family == 'optax':
    return _optax(options.pop('optimizer'), learning_rate, options)
  if arm.family == 'adafisher':
    alias = options.pop('alias', 'adafisher')
    control = options.pop('control', None)
    if layout is not None:
      options['layout'] = layout
    if control is not None:
      return _control(alias, learning_rate, control, options)
    return getattr(afo, alias)(learning_rate, **options)
  raise ValueError(f'{arm.name}: no optax transformation for {arm.family}')


def _control(alias: str, learning_rate, control: str, options: dict):
  """A benchmark control (``permuted`` factors, ``layer_mean`` F~) of the
  ``adafisher`` or ``adafisherw`` chain: the one place that names the
  library's control API (``afo.controls``)."""
  decay = options.pop('weight_decay', 0.0 if alias == 'adafisher' else 1e-2)
  mask = options.pop('mask', None)
  core = afo.controls.scale_by_adafisher_control(control, **options)
  if alias == 'adafisher':
    chain = [optax.add_decayed_weights(decay, mask), core]
  elif alias == 'adafisherw':
    chain = [core, optax.add_decayed_weights(decay, mask)]
  else:
    raise ValueError(f'no control of {alias}')
  return optax.chain(*chain, optax.scale_by_learning_rate(learning_rate))


def _optax(kind: str, learning_rate, options: dict):
  if kind == 'sgd' and 'weight_decay' in options:
    # SGD's weight decay is coupled L2 (as torch.optim.SGD's).
    decay = options.pop('weight_decay')
    return optax.chain(
      optax.add_decayed_weights(decay),
      optax.sgd(learning_rate, **options),
    )
  if kind == 'muon':
    return optax.contrib.muon(
      learning_rate, muon_weight_dimension_numbers=muon_matrices, **options
    )
  return getattr(optax, kind)(learning_rate, **options)


#: Parameters that Muon leaves to its AdamW: embeddings and the output head
#: (as Muon's authors recommend), and everything that is not a kernel.
MUON_EXCLUDED = ('tokens', 'positions', 'head', 'embedding')


def muon_matrices(params):
  """Muon's dimension numbers: every Dense/Conv kernel as one matrix
  (inputs: every axis but the last; an attention output projection
  ``[heads, head_dim, d]``: the first two), ``None`` (AdamW) for the rest."""
  dims = optax.contrib.MuonDimensionNumbers

  def spec(path, leaf):
    names = [getattr(k, 'key', str(k)) for k in path]
    if names[-1] != 'kernel' or leaf.ndim < 2:
      return None
    if any(n in MUON_EXCLUDED for n in names):
      return None
    if leaf.ndim == 3 and names[-2] != 'out':  # DenseGeneral [d, heads, dh]
      return dims(reduction_axis=(0,), output_axis=(1, 2))
    return dims(
      reduction_axis=tuple(range(leaf.ndim - 1)), output_axis=leaf.ndim - 1
    )

  return jax.tree_util.tree_map_with_path(spec, params)


def curvature_grad(loss: Callable, *, has_aux=True, layers=None) -> Callable:
  """``afo.value_and_grad_with_curvature``: ``fn(params, *args,
  capture=True) -> (value, grads, curvature or None)``."""
  return afo.value_and_grad_with_curvature(loss, has_aux=has_aux, layers=layers)


def nnx_curvature_grad(loss: Callable) -> Callable:
  """``afo.nnx.value_and_grad_with_curvature`` (NNX models)."""
  return afo.nnx.value_and_grad_with_curvature(loss)


def curvature_layout(grad_fn: Callable, params, *args, **kwargs):
  """``afo.curvature_layout``: the factor shapes, without FLOPs."""
  return afo.curvature_layout(grad_fn, params, *args, **kwargs)


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


def programs(arm: Arm) -> list[str]:
  """The compiled programs of a training step: ``['step']``, or AdaFisher's
  ``['refresh']`` (``t_cov=1``) or ``['refresh', 'plain']``."""
  if not arm.captures:
    return ['step']
  return ['refresh'] + ['plain'] * (refresh_period(arm) > 1)


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


def state_shardings(tx, params, param_shardings):
  """``afo.state_shardings``: the optimizer state's shardings (AdaFisher's
  factors follow their parameters'; other optax states via optax)."""
  return afo.state_shardings(tx, params, param_shardings)


def unpreconditioned(params, curvature) -> list[str]:
  """Parameters AdaFisher leaves at ``F~ = 1``."""
  return afo.unpreconditioned_parameters(params, curvature)


# ------------------------------------------------------------------ arms
# Learning rates (and tuned decays) come from the grids.

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
#: kfac-jax at a fixed learning rate, momentum 0.9 and damping 1e-3 (the
#: step-cost row: no extra forward passes).
KFAC_FIXED = arm(
  'kfac-fixed', 'kfac-jax (fixed lr, momentum 0.9, damping 1e-3)', 'kfac'
)
LIKE_ADAM = arm(
  'adafisher-like-adam',
  'afo.adafisher_like_adam',
  'adafisher',
  alias='adafisher_like_adam',
)


def layer_mean(base: Arm) -> Arm:
  """Control: ``F~`` replaced by its layer mean (per-layer step size only)."""
  return base.variant(
    f'{base.name}+mean', f'{base.label}, F~ layer mean', control='layer_mean'
  )


def permuted(base: Arm) -> Arm:
  """Control: the factor vectors shuffled within each layer."""
  return base.variant(
    f'{base.name}+perm', f'{base.label}, F~ permuted', control='permuted'
  )
