"""``scale_by_adafisher``: the AdaFisher step as an optax transformation.

One update: (on a step that brings ``curvature``) fold the statistics into
the factor EMAs if a refresh is due (:mod:`~adafisher_optax.refresh`); then,
per parameter, momentum and bias correction as in ``optax.scale_by_adam``,
divided by ``F~`` (:mod:`~adafisher_optax.preconditioner`), optionally
rescaled per layer (:mod:`~adafisher_optax.grafting`). A step without
``curvature`` is a plain step: no statistics, no refresh, the stored
factors.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax import tree as otu

from adafisher_optax import (
  _devices,
  _tree,
  conventions,
  flax_serialization,
  rules,
)
from adafisher_optax import factors as factors_lib
from adafisher_optax import grafting as grafting_lib
from adafisher_optax import hyperparameters as hp
from adafisher_optax import layout as layout_lib
from adafisher_optax import refresh as refresh_lib
from adafisher_optax.preconditioner import ABLATIONS, Ablation, preconditioner
from adafisher_optax.state import (
  INJECTED,
  AdaFisherState,
  Settings,
  StaleFactorsWarning,
  plan_refreshes,
  refreshes_planned,
)


class UnpreconditionedParametersWarning(UserWarning):
  """Parameters without curvature statistics are updated with ``F~ = 1``."""


def _static(value: Any) -> Any:
  """A hyperparameter as the state's settings record it."""
  if value is None or isinstance(value, numbers.Number):
    return value
  return INJECTED  # an array: optax.inject_hyperparams passes them


def _check_parameters(tree: Any, what: str) -> None:
  found = _tree.first_leaf_not_of(tree, jnp.floating)
  if found is not None:
    raise TypeError(
      f'AdaFisher: {what} {_tree.format_path(found[0])!r} has dtype '
      f'{found[1]}; only floating-point parameters can be optimised (freeze '
      'others with optax.masked or keep them out of the params).'
    )


def _check_gradients(updates: Any, mu: Any) -> None:
  """Gradients must have the params' structure and shapes (those of ``mu``)."""
  _check_parameters(updates, 'gradient')
  differences = _tree.shape_differences(updates, mu)
  for path in sorted(differences):
    where = _tree.format_path(path)
    shape, held = differences[path]
    if held is None:
      raise ValueError(
        f'AdaFisher: gradient {where!r} has no momentum in the state: the '
        'gradients are not of the params the state was initialised for.'
      )
    if shape is None:
      raise ValueError(
        f'AdaFisher: no gradient for {where!r}, which the state has: the '
        'gradients are not of the params the state was initialised for.'
      )
    raise ValueError(
      f'AdaFisher: gradient {where!r} has shape {shape}, the params '
      f'(momentum) {held}.'
    )
  try:
    jax.tree.map(lambda *_: None, updates, mu, is_leaf=_tree.is_box)
  except (TypeError, ValueError) as error:
    raise TypeError(
      'AdaFisher: the gradients have the paths and shapes of the params the '
      'state was initialised for, in other containers (such as a FrozenDict '
      "where the params have a dict): pass them in the params' own types "
      '(flax.core.freeze / unfreeze).'
    ) from error


def _check_state(state: Any, settings: Settings) -> None:
  if not isinstance(state, AdaFisherState):
    raise TypeError(
      'scale_by_adafisher: the state is a '
      f'{type(state).__name__}, not an AdaFisherState: pass the state that '
      "this optimizer's init returned (a multi_steps state goes to the "
      'multi_steps optimizer).'
    )
  if state.settings.numerics != settings.numerics:
    raise ValueError(
      'AdaFisher state: its factors are for '
      f'numerics={state.settings.numerics!r}, the optimizer uses '
      f'numerics={settings.numerics!r} (a checkpoint of another '
      'configuration?).'
    )
  held, wanted = state.settings.grafting, settings.grafting
  if (held == 'adam') != (wanted == 'adam'):
    raise ValueError(
      f'AdaFisher state: made with grafting={held!r}, the optimizer uses '
      f"grafting={wanted!r}; only grafting='adam' keeps Adam's second "
      'moment in the state. Restore into an optimizer with '
      f"grafting={held!r}, or start from this optimizer's init."
    )


def _warn_if_never_refreshed(settings: Settings) -> None:
  """At the trace of a plain update, when nothing in this process plans a
  refresh (no :func:`adafisher_optax.refresh_schedule` built, no update with
  curvature traced): a loop that never passes curvature is momentum SGD."""
  if not refreshes_planned():
    plan_refreshes()  # once
    warnings.warn(
      'AdaFisher: an update without curvature= was traced and no update '
      'with curvature= (nor a refresh_schedule) exists in this process: '
      'the factors are never refreshed and F~ stays 1 (momentum SGD at '
      f'learning_rate). Pass curvature= every t_cov={settings.t_cov} '
      'updates (afo.refresh_schedule(opt_state) says when); ignore this if '
      'a later step of your loop does.',
      StaleFactorsWarning,
      stacklevel=4,
    )


def _warn_on_new_t_cov(held: Settings, settings: Settings) -> None:
  if held.t_cov != settings.t_cov:
    warnings.warn(
      f'AdaFisher: the state was returned by an optimizer with '
      f't_cov={held.t_cov}; this one refreshes every {settings.t_cov} '
      'updates. A refresh_schedule built from that state keeps its rhythm: '
      'build it again from the state this update returns (or restore '
      'checkpoints into target=tx.init(params) of the new optimizer).',
      StaleFactorsWarning,
      stacklevel=4,
    )


def _warn_unpreconditioned(layout, updates, refreshed: Any) -> None:
  """One warning listing the parameters no block covers (updated with
  ``F~ = 1``) and, on a refresh, those whose blocks got no statistics from
  this curvature (``refreshed``: the keys that did), which keep their
  factors."""
  uncovered, unrefreshed = [], []
  for path, _ in _tree.leaves_with_paths(updates):
    blocks = layout.blocks_of(path)
    if not blocks:
      uncovered.append(_tree.format_path(path))
    elif refreshed is not None and not any(b.key in refreshed for b in blocks):
      unrefreshed.append(_tree.format_path(path))
  said = []
  if uncovered:
    said.append(
      'no curvature statistics for these parameters; they are updated '
      'with F~ = 1 (bias-corrected momentum): ' + ', '.join(uncovered)
    )
  if unrefreshed:
    said.append(
      'this curvature has no statistics for these parameters (their layer '
      'was not applied, or not captured); they keep the factors of their '
      'latest refresh (F~ = 1 until their first): ' + ', '.join(unrefreshed)
    )
  if said:
    warnings.warn(
      'AdaFisher: ' + '. '.join(said),
      UnpreconditionedParametersWarning,
      stacklevel=4,
    )


def scale_by_adafisher(
  b1: jax.typing.ArrayLike = 0.9,
  damping: jax.typing.ArrayLike = 1e-3,
  gamma: jax.typing.ArrayLike = 0.8,
  t_cov: int | None = None,
  numerics: rules.Numerics = 'reference',
  fisher_power: jax.typing.ArrayLike = 1.0,
  *,
  relative_damping: jax.typing.ArrayLike | None = None,
  grafting: grafting_lib.Grafting = None,
  b2: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  axis_name: Any = None,
  mu_dtype: Any = None,
  layout: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by AdaFisher's diagonal Kronecker-factored Fisher.

  Per parameter: ``m <- b1 m + (1 - b1) g``; ``m_hat = m / (1 - b1**t)``;
  update ``m_hat / F~**fisher_power`` where ``F~ = H (x) S + damping`` is
  built from the layer's factor vectors. ``update`` takes the keyword
  argument ``curvature`` (from
  :func:`adafisher_optax.value_and_grad_with_curvature`) on the steps that
  may refresh the factors: the factors are refreshed when a step brings
  ``curvature`` and none was refreshed in the last ``t_cov`` updates. A step
  without ``curvature`` preconditions with the stored factors.

  Parameters of layers without factors get ``F~ = 1`` (bias-corrected
  momentum) and are listed once in an
  :class:`UnpreconditionedParametersWarning`. A gradient entry that is not
  finite keeps its momentum and gets a zero update; wrap the optimizer in
  ``optax.apply_if_finite`` to skip whole steps instead. Updates are
  float32 (or wider) whatever the parameter dtype, so ``m_hat / F~`` does
  not overflow in float16; ``optax.apply_updates`` casts back.

  Args:
    b1: momentum decay.
    damping: ``lambda``, added to ``K = H (x) S``.
    gamma: factor EMA decay (see ``numerics``).
    t_cov: the number of updates between factor refreshes; ``None`` means
      100 for ``reference``, 1 for ``paper``.
    numerics: ``"reference"`` (the authors' code: min-max with absolute
      epsilon folded in as ``0.08*old + 0.008*new`` at ``gamma=0.8``) or
      ``"paper"`` (plain EMA, scale-free min-max when preconditioning).
    fisher_power: ``p``; 0.5 gives the square-root variant.
    relative_damping: ``a > 0`` (``math.inf`` allowed) replaces ``damping``:
      ``F~ = (K + a mean(K)) / ((1 + a) mean(K))`` per layer, so ``F~`` has
      mean 1 (spec section 3a); ``math.inf`` is bias-corrected momentum.
    grafting: ``None`` (the authors' step), ``'rms'`` or ``'adam'``: keep
      AdaFisher's direction and rescale each layer's update (weight and
      bias together; an unpreconditioned parameter alone) to the RMS
      :data:`adafisher_optax.grafting.RMS_TARGET` (no extra state) or to the
      norm of Adam's update of that layer (Adam's second moment kept in the
      state), so that Adam's learning rate carries over.
    b2: Adam's second-moment decay, used by ``grafting='adam'``.
    eps: Adam's epsilon, used by ``grafting='adam'``.
    axis_name: the ``pmap`` axis (or axes) over which raw statistics are
      summed on refresh steps, giving global-batch factors. Not needed in
      ``shard_map`` or a sharded ``jit``.
    mu_dtype: optional dtype of the momentum (and of ``nu``, which is
      float32 for float16 params when it is not given).
    layout: the curvature's shapes, from
      :func:`adafisher_optax.curvature_layout`, to size the factors exactly;
      without it they are guessed from Flax's parameter names.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  References:
    Gomes et al., `AdaFisher: Adaptive Second Order Optimization via Fisher
    Information <https://arxiv.org/abs/2405.16397>`_, ICLR 2025.
  """
  return _scale_by_adafisher(**locals(), ablation=None)


def _settings(numerics, t_cov, damping, relative_damping, grafting) -> Settings:
  """The checked static settings of an optimizer."""
  numerics = hp.check_choice('numerics', numerics, rules.NUMERICS)
  return Settings(
    numerics=numerics,
    t_cov=hp.check_t_cov(t_cov, numerics),
    damping=_static(damping),
    relative_damping=_static(hp.check_relative_damping(relative_damping)),
    grafting=hp.check_choice('grafting', grafting, grafting_lib.GRAFTINGS),
  )


def _with_curvature(state, updates, curvature, gamma, axis_names):
  """``(state, layout)`` after the refresh a ``curvature`` may bring, with
  one warning listing the parameters updated with ``F~ = 1``."""
  settings = state.settings
  layout = factors_lib.layout_of(state.factors)
  refreshed = None
  if curvature is None:
    _warn_if_never_refreshed(settings)
  else:
    plan_refreshes()
    matched = refresh_lib.match(layout, curvature, updates, settings.numerics)
    refreshed = set(matched)
    state = refresh_lib.refresh_if_due(
      state, matched, gamma=gamma, axis_names=axis_names
    )
  _warn_unpreconditioned(layout, updates, refreshed)
  return state, layout


def _scale_by_adafisher(
  b1, damping, gamma, t_cov, numerics, fisher_power, *, relative_damping,
  grafting, b2, eps, axis_name, mu_dtype, layout, ablation: Ablation,
) -> optax.GradientTransformationExtraArgs:  # fmt: skip
  """:func:`scale_by_adafisher`, with a benchmark control (``ablation``)."""
  settings = _settings(numerics, t_cov, damping, relative_damping, grafting)
  numerics = settings.numerics
  hp.check_all(b1=b1, damping=damping, gamma=gamma, fisher_power=fisher_power)
  for name, value in dict(b2=b2, eps=eps).items():
    # Ranges only where used: inject_hyperparams casts b2 to bfloat16 (1.0).
    (hp.check if grafting == 'adam' else hp.check_number)(name, value)
  ablation = hp.check_choice('ablation', ablation, ABLATIONS)
  mu_dtype = hp.check_mu_dtype(mu_dtype)
  axis_names = hp.check_axis_name(axis_name)
  fixed_layout = (
    None if layout is None else layout_lib.from_curvature(layout, numerics)
  )

  def init_fn(params):
    _check_parameters(params, 'parameter')
    flax_serialization.register_if_flax_loaded()
    no_params = not _tree.is_container(params)
    if fixed_layout is None and no_params and not jax.tree.leaves(params):
      raise TypeError(
        f'AdaFisher: init got a {type(params).__name__}, not params: the '
        'factor sizes are guessed from the params (optax.tree_utils.'
        'tree_map_params passes a placeholder). Build the optimizer with '
        'layout=adafisher_optax.curvature_layout(grad_fn, params, *batch).'
      )
    factor_layout = fixed_layout or layout_lib.from_guesses(
      conventions.guess(params), numerics
    )
    return AdaFisherState(
      count=jnp.zeros([], jnp.int32),
      mu=otu.zeros_like(params, dtype=mu_dtype),
      nu=grafting_lib.initial_nu(params, mu_dtype)
      if grafting == 'adam'
      else (),
      factors=factors_lib.initial(
        factor_layout, numerics == 'paper', rules.statistics_dtype()
      ),
      last_refresh=jnp.asarray(-1, jnp.int32),
      settings=settings,
    )

  def update_fn(updates, state, params=None, *, curvature=None, **extra_args):
    del params, extra_args
    _check_state(state, settings)
    _check_axes_bound(axis_names)
    _check_gradients(updates, state.mu)
    _warn_on_new_t_cov(state.settings, settings)
    state, layout = _with_curvature(
      state._replace(settings=settings), updates, curvature, gamma, axis_names
    )
    factors = factors_lib.by_block(state.factors)

    def moment(path, g, m):
      return jnp.where(jnp.isfinite(g), (1 - b1) * g + b1 * m, m)

    mu = _tree.map_with_path(moment, updates, state.mu)
    count_inc = optax.safe_increment(state.count)
    correction = 1 - b1**count_inc

    def precondition(path, g, m):
      m_hat = m / correction.astype(m.dtype)
      m_hat = m_hat.astype(jnp.promote_types(m_hat.dtype, jnp.float32))
      f = preconditioner(
        factors, layout, path, m.shape, numerics=numerics, damping=damping,
        relative_damping=relative_damping, ablation=ablation,
      )  # fmt: skip
      if f is not None:
        m_hat = m_hat / _power(f, fisher_power)
      return jnp.where(jnp.isfinite(g), m_hat, 0)  # the non-finite guard

    new_updates = _tree.map_with_path(precondition, updates, mu)
    nu = state.nu
    if grafting is not None:
      new_updates, nu = grafting_lib.graft(
        grafting, new_updates, updates, mu, nu, layout,
        count=count_inc, b1=b1, b2=b2, eps=eps,
      )  # fmt: skip
    return new_updates, state._replace(
      count=count_inc, mu=otu.cast(mu, mu_dtype), nu=otu.cast(nu, mu_dtype)
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_axes_bound(axis_names: tuple) -> None:
  unbound = _devices.unbound_axes(axis_names)
  if unbound:
    raise ValueError(
      f'AdaFisher was built with axis_name={unbound[0]!r}, but this update '
      'runs outside a jax.pmap (or shard_map) over that axis: run it inside '
      'one, or build the optimizer without axis_name (under a sharded jit '
      'the statistics and gradients are global already).'
    )


def _power(f: jax.Array, power: Any) -> jax.Array:
  """``f**power``; a Python 1 or 0.5 as no op or ``sqrt`` (XLA keeps a
  ``power`` by a constant 0.5, an ``exp(log)`` per element on CPU)."""
  if isinstance(power, (int, float)):
    if power == 1:
      return f
    if power == 0.5:
      return jnp.sqrt(f)
  return f**power
