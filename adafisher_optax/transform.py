"""``scale_by_adafisher``: the AdaFisher step as an optax transformation.

One update: (on a step that brings ``curvature``) fold the statistics into
the factor EMAs (:mod:`~adafisher_optax.factors`) if a refresh is due; then,
per parameter, momentum and bias correction as in ``optax.scale_by_adam``,
divided by ``F~`` (:mod:`~adafisher_optax.preconditioner`), which is built on
the fly from the layer's factor vectors. A step without ``curvature`` is a
plain step: no statistics, no refresh, the stored factors.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import tree as otu

from adafisher_optax import _devices, _tree, rules
from adafisher_optax import factors as factors_lib
from adafisher_optax import grafting as grafting_lib
from adafisher_optax import hyperparameters as hp
from adafisher_optax import statistics as statistics_lib
from adafisher_optax.preconditioner import (
  Ablation,
  curvature_mean,
  preconditioner,
)


class UnpreconditionedParametersWarning(UserWarning):
  """Parameters without curvature statistics are updated with ``F~ = 1``."""


class AdaFisherState(NamedTuple):
  """State of :func:`scale_by_adafisher`.

  Attributes:
    count: number of updates so far (int32).
    mu: first moment of the gradients, like the params.
    factors: the :class:`adafisher_optax.factors.Factors` of every
      preconditioned layer, in nested dicts keyed like the params (one entry
      per layer path). Their type says the numerics (``ReferenceFactors`` or
      ``PaperFactors``), so a checkpoint of the other numerics does not fit.
    last_refresh: the ``count`` of the latest refresh (int32; -1 before the
      first).
    t_cov: the updates between refreshes (int32), as the latest refresh (or
      ``init``) saw it; :func:`adafisher_optax.refresh_schedule` reads it.
    damping: ``damping`` at the latest refresh (-1 before the first).
    relative_damping: ``relative_damping`` at the latest refresh (-1 when
      the absolute ``damping`` is used).
    nu: Adam's second moment, like the params, under ``grafting='adam'``;
      ``()`` (no leaves) otherwise.
  """

  count: jax.Array
  mu: optax.Updates
  factors: Any
  last_refresh: jax.Array
  t_cov: jax.Array
  damping: jax.Array
  relative_damping: jax.Array
  nu: optax.Updates = ()


def layer_factors(factors: Any) -> dict[_tree.Path, factors_lib.Factors]:
  """``{layer path: Factors}`` of a state's ``factors`` tree."""
  flat = jax.tree_util.tree_flatten_with_path(
    factors, is_leaf=factors_lib.is_factors
  )[0]
  return {_tree.keypath_to_path(kp): f for kp, f in flat}


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
  grads = dict(_tree.leaves_with_paths(updates))
  moments = dict(_tree.leaves_with_paths(mu))
  for path in sorted(set(grads) | set(moments)):
    where = _tree.format_path(path)
    if path not in moments:
      raise ValueError(
        f'AdaFisher: gradient {where!r} has no momentum in the state: the '
        'gradients are not of the params the state was initialised for.'
      )
    if path not in grads:
      raise ValueError(
        f'AdaFisher: no gradient for {where!r}, which the state has: the '
        'gradients are not of the params the state was initialised for.'
      )
    if tuple(grads[path].shape) != tuple(moments[path].shape):
      raise ValueError(
        f'AdaFisher: gradient {where!r} has shape {grads[path].shape}, the '
        f'params (momentum) {moments[path].shape}.'
      )


def _check_state(state: Any, numerics: str) -> None:
  if not isinstance(state, AdaFisherState):
    raise TypeError(
      'scale_by_adafisher: the state is a '
      f'{type(state).__name__}, not an AdaFisherState: pass the state that '
      "this optimizer's init returned (a multi_steps state goes to the "
      'multi_steps optimizer).'
    )
  wanted = factors_lib.FACTOR_TYPES[numerics]
  for path, factors in layer_factors(state.factors).items():
    if type(factors) is not wanted:
      raise ValueError(
        f'AdaFisher state: the factors of {_tree.format_path(path)!r} are for '
        f'numerics={factors_lib.numerics_of(factors)!r}, the optimizer uses '
        f'numerics={numerics!r} (a checkpoint of another configuration?).'
      )


def _parameter_shapes(updates, path, names: Mapping[str, str]):
  """``{role: shape}`` of a layer's parameters present in ``updates``."""
  shapes = {}
  for name, role in names.items():
    leaf = _tree.unbox(_tree.get_node(updates, path + (name,)))
    if leaf is not None and hasattr(leaf, 'shape'):
      shapes[role] = tuple(leaf.shape)
  return shapes


def _check_layer(path, stats, factors, shapes, numerics):
  where = _tree.format_path(path)
  for field in ('input_sums', 'output_sums', 'rows'):
    for value in jax.tree.leaves(getattr(stats, field)):
      if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(
          f'curvature[{where!r}].{field} has dtype {value.dtype}; '
          'statistics are floating-point (pass the curvature of '
          'value_and_grad_with_curvature unchanged).'
        )
  if factors is None:
    raise ValueError(
      f'curvature has statistics for layer {where!r} but the optimizer state '
      'has no factors for it: the curvature comes from another model, the '
      "state was initialised for other params, or the layer's weight is "
      'masked out (then build the optimizer with '
      'layout=adafisher_optax.curvature_layout(grad_fn, params, *batch)).'
    )
  rule = stats.layer_rule
  if type(rule).curvature is not type(rules.RULES[factors.rule]).curvature or (
    stats.weight_name,
    stats.bias_name,
  ) != (
    factors.weight,
    factors.bias,
  ):
    raise ValueError(
      f'Layer {where!r}: the state holds factors of a {factors.rule!r} layer '
      f'with parameters {sorted(factors.roles())}, the curvature is of a '
      f'{stats.rule!r} layer with parameters {sorted(stats.parameter_names())}'
      ': the curvature comes from another model, or the state was sized '
      'without a layout (build the optimizer with '
      'layout=adafisher_optax.curvature_layout(grad_fn, params, *batch)).'
    )
  want = (tuple(factors.h.shape), tuple(factors.s.shape))
  got = rule.factor_shapes(
    [tuple(a.shape) for a in stats.input_sums],
    [tuple(a.shape) for a in stats.output_sums],
    numerics,
  )
  if want != got:
    raise ValueError(
      f'Layer {where!r}: the optimizer state holds factors of shapes {want} '
      f'but the curvature needs factors of shapes {got}. Either the '
      'curvature comes from another model, or the factor sizes could not be '
      'inferred from parameter names (nn.scan stacks, bias-free DenseGeneral '
      'with several output axes): build the optimizer with '
      'layout=adafisher_optax.curvature_layout(grad_fn, params, *batch).'
    )
  n_stack = len(want[0]) - 1
  d_out = want[1][-1]
  for role, shape in shapes.items():
    ok = tuple(shape[:n_stack]) == want[0][:-1] and (
      math.prod(shape[n_stack:]) % d_out == 0
    )
    if not ok:
      raise ValueError(
        f'The {role} of layer {where!r} has shape {shape}, which does not '
        f'fit statistics of shapes {got}: the curvature comes from another '
        'model.'
      )


def _axis_names(axis_name: Any) -> tuple:
  if axis_name is None:
    return ()
  if isinstance(axis_name, (tuple, list)):
    return tuple(axis_name)
  return (axis_name,)


def _over_devices(stats, axis_name):
  """Global-batch statistics: raw sums added over devices (spec section 4).

  Statistics combine across devices as JAX combines the gradients of
  replicated parameters: inside ``shard_map`` JAX has already summed them in
  the backward pass (they flow back through replicated probes), so they no
  longer vary along the mesh axes. Under ``pmap`` each device's loss is the
  mean over its own batch and the user averages gradients with ``pmean``;
  there the statistics still differ between devices, ``axis_name`` sums them
  and they are rescaled to the averaged objective.

  Args:
    stats: ``{layer path: LayerStatistics}``.
    axis_name: the optimizer's ``axis_name``.

  Returns:
    ``{layer path: LayerStatistics}`` of the global batch.
  """
  names = _axis_names(axis_name)
  combined = {}
  for path, layer in stats.items():
    varying = _devices.varying_axes(layer.rows)
    stray = varying - set(names)
    if stray:
      raise ValueError(
        f'curvature[{_tree.format_path(path)!r}] differs between devices '
        f'along mesh axes {sorted(stray)}: pass '
        f'axis_name={sorted(stray)[0]!r} (or a tuple) to the optimizer, or '
        'every device preconditions with its own statistics and the '
        'replicas drift apart.'
      )
    axes = tuple(
      n for n in names if n in varying or not _devices.tracks_varying(n)
    )
    if axes:
      layer = layer.psum(axes).average_of(jax.lax.psum(1, axes))
    combined[path] = layer
  return combined


def _refresh(
  state,
  updates,
  curvature,
  *,
  t_cov,
  gamma,
  damping,
  relative_damping,
  numerics,
  axis_name,
):
  """``state`` with the factors refreshed from ``curvature`` when one is due.

  A refresh is due when none happened yet or ``t_cov`` updates have passed
  since the latest one; a step whose statistics come later than that
  refreshes late rather than never.
  """
  current = layer_factors(state.factors)
  stats = {}
  for path, layer in statistics_lib.flatten(curvature).items():
    if not isinstance(_tree.get_node(updates, path), Mapping):
      raise ValueError(
        f'curvature has statistics for layer {_tree.format_path(path)!r} '
        'but the updates have no such layer: the curvature comes from '
        'another model.'
      )
    shapes = _parameter_shapes(updates, path, layer.parameter_names())
    if not shapes:
      continue  # every parameter of the layer is masked out
    _check_layer(path, layer, current.get(path), shapes, numerics)
    stats[path] = (layer, shapes)
  silent = [
    _tree.format_path(path + (name,))
    for path in sorted(set(current) - set(stats))
    for name in current[path].roles()
    if _tree.get_node(updates, path + (name,)) is not None
  ]
  if silent:
    warnings.warn(
      'AdaFisher: the curvature has no statistics for these parameters, '
      'which keep F~ = 1 (bias-corrected momentum) until statistics reach '
      'their layer: ' + ', '.join(silent),
      UnpreconditionedParametersWarning,
      stacklevel=4,
    )
  if not stats:
    return state
  due = (state.last_refresh < 0) | (
    state.count - state.last_refresh >= jnp.asarray(t_cov, state.count.dtype)
  )
  old = {path: current[path] for path in stats}

  def refresh(old):
    combined = _over_devices({p: s for p, (s, _) in stats.items()}, axis_name)
    new = factors_lib.refresh(
      old,
      {p: s.means(numerics) for p, s in combined.items()},
      {p: s.rows for p, s in combined.items()},
      gamma=gamma,
    )
    return {
      path: dataclasses.replace(
        f,
        curvature_mean=curvature_mean(
          rules.RULES[f.rule], f.h, f.s, numerics, stats[path][1]
        ).astype(f.curvature_mean.dtype),
      )
      for path, f in new.items()
    }

  if _axis_names(axis_name):  # collectives on due steps only
    new = jax.lax.cond(due, refresh, lambda old: old, old)
  else:  # a few small kernels, cheaper than a conditional on accelerators
    new = otu.where(due, refresh(old), old)
  record = lambda value, old: jnp.where(due, jnp.asarray(value, old.dtype), old)  # noqa: E731
  return state._replace(
    factors=_tree.nest({**current, **new}),
    last_refresh=jnp.where(due, state.count, state.last_refresh),
    t_cov=jnp.asarray(t_cov, state.t_cov.dtype),
    damping=record(damping, state.damping),
    relative_damping=record(
      -1.0 if relative_damping is None else relative_damping,
      state.relative_damping,
    ),
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
  ablation: Ablation = None,
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
    relative_damping: ``a >= 0`` (``math.inf`` allowed) replaces ``damping``:
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
    mu_dtype: optional dtype of the momentum.
    layout: the curvature's shapes, from
      :func:`adafisher_optax.curvature_layout`, to size the factors exactly;
      without it they are inferred from parameter names and shapes.
    ablation: a benchmark control: ``'layer_mean'`` (``F~`` replaced by its
      layer mean) or ``'permuted'`` (``H`` and ``S`` shuffled within each
      layer); ``None`` is the method.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  References:
    Gomes et al., `AdaFisher: Adaptive Second Order Optimization via Fisher
    Information <https://arxiv.org/abs/2405.16397>`_, ICLR 2025.
  """
  numerics = hp.check_numerics(numerics)
  for name, value in dict(
    b1=b1, damping=damping, gamma=gamma, fisher_power=fisher_power
  ).items():
    hp.check(name, value)
  t_cov = hp.check_t_cov(t_cov, numerics)
  relative_damping = hp.check_relative_damping(relative_damping)
  ablation = hp.check_ablation(ablation)
  grafting = hp.check_grafting(grafting)
  if grafting == 'adam':
    hp.check('b2', b2)
    hp.check('eps', eps)
  mu_dtype = hp.check_mu_dtype(mu_dtype)
  if layout is not None:
    statistics_lib.flatten(layout)  # a clear error for a wrong layout

  def init_fn(params):
    _check_parameters(params, 'parameter')

    def minus_one():  # one buffer per field, so a donated state is valid
      return jnp.full([], -1, rules.statistics_dtype())

    return AdaFisherState(
      count=jnp.zeros([], jnp.int32),
      mu=otu.zeros_like(params, dtype=mu_dtype),
      factors=factors_lib.initial_factors(params, layout, numerics),
      last_refresh=jnp.asarray(-1, jnp.int32),
      t_cov=jnp.asarray(t_cov, jnp.int32),
      damping=minus_one(),
      relative_damping=minus_one(),
      nu=otu.zeros_like(params, dtype=mu_dtype) if grafting == 'adam' else (),
    )

  def update_fn(updates, state, params=None, *, curvature=None, **extra_args):
    del params, extra_args
    _check_state(state, numerics)
    _check_gradients(updates, state.mu)
    if curvature is not None:
      state = _refresh(
        state,
        updates,
        curvature,
        t_cov=t_cov,
        gamma=gamma,
        damping=damping,
        relative_damping=relative_damping,
        numerics=numerics,
        axis_name=axis_name,
      )
    layers = layer_factors(state.factors)
    count_inc = optax.safe_increment(state.count)
    correction = 1 - b1**count_inc
    unpreconditioned = []

    def moment(path, g, m):
      return jnp.where(jnp.isfinite(g), (1 - b1) * g + b1 * m, m)

    def step(path, g, m):
      m_hat = m / correction.astype(m.dtype)
      m_hat = m_hat.astype(jnp.promote_types(m_hat.dtype, jnp.float32))
      factors = layers.get(path[:-1])
      role = None if factors is None else factors.roles().get(path[-1])
      if role is None:
        unpreconditioned.append(_tree.format_path(path))
        u = m_hat
      else:
        f = preconditioner(
          factors,
          rules.RULES[factors.rule],
          role,
          m.shape,
          damping=damping,
          relative_damping=relative_damping,
          ablation=ablation,
          path=path[:-1],
        )
        u = m_hat / (f if _is_one(fisher_power) else f**fisher_power)
      return jnp.where(jnp.isfinite(g), u, 0)

    mu = _tree.map_with_path(moment, updates, state.mu)
    new_updates = _tree.map_with_path(step, updates, mu)
    nu = state.nu
    if grafting is not None:
      new_updates, nu = _graft(
        grafting, new_updates, updates, mu, nu, layers, count_inc, b1, b2, eps
      )
    if unpreconditioned:
      warnings.warn(
        'AdaFisher: no curvature statistics for these parameters; they are '
        'updated with F~ = 1 (bias-corrected momentum): '
        + ', '.join(unpreconditioned),
        UnpreconditionedParametersWarning,
        stacklevel=3,
      )
    return new_updates, state._replace(
      count=count_inc,
      mu=otu.cast(mu, mu_dtype),
      nu=otu.cast(nu, mu_dtype),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _graft(mode, new_updates, grads, mu, nu, layers, count, b1, b2, eps):
  """``(updates, nu)`` with each group's update rescaled (``grafting``)."""
  paths = dict(_tree.leaves_with_paths(new_updates))
  roles = {path: f.roles() for path, f in layers.items()}
  groups = {path: grafting_lib.group_of(path, roles) for path in paths}
  if mode == 'rms':
    target = grafting_lib.rms_target_square(paths)
  else:

    def second_moment(path, g, v):
      return jnp.where(jnp.isfinite(g), (1 - b2) * jnp.square(g) + b2 * v, v)

    nu = _tree.map_with_path(second_moment, grads, nu)
    mu_hat = otu.bias_correction(mu, b1, count)
    nu_hat = otu.bias_correction(nu, b2, count)
    adam = jax.tree.map(
      lambda m, v, g: jnp.where(
        jnp.isfinite(g), m / (jnp.sqrt(v) + eps), 0
      ).astype(jnp.promote_types(m.dtype, jnp.float32)),
      mu_hat,
      nu_hat,
      grads,
    )
    target = grafting_lib.norm_target_square(
      dict(_tree.leaves_with_paths(adam))
    )
  scaled = grafting_lib.rescale(paths, groups, target)
  return _tree.map_with_path(lambda path, u: scaled[path], new_updates), nu


def _is_one(value: Any) -> bool:
  return isinstance(value, (int, float)) and value == 1
