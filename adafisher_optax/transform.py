"""``scale_by_adafisher``: the AdaFisher step as an optax transformation.

Data path of one update: curvature statistics (from
:func:`adafisher_optax.value_and_grad_with_curvature`) -> factor EMA
(:mod:`adafisher_optax.factors`) -> per-parameter preconditioner ``F~``
(:mod:`adafisher_optax.layers`) -> ``m_hat / F~**p``.
"""

from __future__ import annotations

import math
import numbers
import warnings
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import tree as otu

from adafisher_optax import _devices, _tree
from adafisher_optax import factors as factors_lib
from adafisher_optax import layers as layers_lib
from adafisher_optax import statistics as statistics_lib
from adafisher_optax.taps import check_numerics

#: ``T_cov`` (steps between factor refreshes) by numerics.
DEFAULT_T_COV = {'reference': 100, 'paper': 1}


class UnpreconditionedParametersWarning(UserWarning):
  """Parameters without curvature statistics are updated with ``F~ = 1``."""


class AdaFisherState(NamedTuple):
  """State of :func:`scale_by_adafisher`.

  Attributes:
    count: number of updates so far (int32).
    mu: first moment of the gradients, like the params.
    factors: :class:`adafisher_optax.KroneckerFactors` per layer, in nested
      dicts keyed like the params (one entry per layer path).
  """

  count: jax.Array
  mu: optax.Updates
  factors: Any


def _check_hyperparameter(name: str, value: Any, ok, requirement: str) -> None:
  """Raises when a concrete hyperparameter breaks its requirement.

  Traced values (``optax.inject_hyperparams``) and schedules are not checked.
  """
  if value is None or callable(value):
    return
  try:
    number = np.asarray(value)
  except (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
  ):
    return
  if (
    number.dtype.kind not in 'biuf'
    or not np.all(np.isfinite(number))
    or (not ok(number))
  ):
    raise ValueError(f'{name} must be {requirement}, got {value!r}.')


def check_hyperparameters(**values: Any) -> None:
  """Validates AdaFisher hyperparameters that are concrete numbers."""
  rules = {
    'b1': (lambda v: np.all((v >= 0) & (v < 1)), 'in [0, 1)'),
    'damping': (lambda v: np.all(v > 0), 'positive'),
    'gamma': (lambda v: np.all((v >= 0) & (v <= 1)), 'in [0, 1]'),
    'fisher_power': (lambda v: np.all(v > 0), 'positive'),
    'weight_decay': (lambda v: np.all(v >= 0), 'non-negative'),
    'learning_rate': (lambda v: np.all(v >= 0), 'non-negative'),
    't_cov': (
      lambda v: np.all((v >= 1) & (v == np.round(v))),
      'a positive integer (or None for the numerics default)',
    ),
  }
  for name, value in values.items():
    _check_hyperparameter(name, value, *rules[name])


def _layer_dicts(params: Any):
  """Yields ``(path, mapping)`` for every mapping that holds array leaves."""

  def visit(node, path):
    if not isinstance(node, Mapping):
      return
    if any(not isinstance(v, Mapping) for v in node.values()):
      yield path, node
    for key, value in node.items():
      yield from visit(value, path + (str(key),))

  yield from visit(params, ())


def _check_params(tree: Any, what: str = 'parameter') -> None:
  for path, leaf in _tree.leaves_with_paths(tree):
    dtype = getattr(leaf, 'dtype', None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f'AdaFisher: {what} {_tree.format_path(path)!r} has dtype {dtype}; '
        'only floating-point parameters can be optimised (freeze others '
        'with optax.masked or keep them out of the params).'
      )


def _factor_shapes(stats: statistics_lib.LayerStatistics):
  return layers_lib.REGISTRY[stats.kind].factor_shapes(
    tuple(stats.input.shape), tuple(stats.output.shape), stats.variant
  )


def _initial_factors(params: Any, layout: Any, numerics: str) -> dict:
  dtype = layers_lib.statistics_dtype()
  if layout is not None:
    shapes = {
      path: _factor_shapes(stats)
      for path, stats in statistics_lib.flatten(layout).items()
    }
  else:
    shapes = {}
    for path, node in _layer_dicts(params):
      found = layers_lib.conventional_factor_shapes(node, numerics)
      if found is not None:
        shapes[path] = found
  return _tree.nest(
    {path: factors_lib.initial(s, dtype) for path, s in shapes.items()}
  )


def _leaf_shape(updates: Any, path: _tree.Path, name: str | None):
  if name is None:
    return None
  leaf = _tree.get_node(updates, path + (name,))
  return (
    None
    if leaf is None or isinstance(leaf, optax.MaskedNode)
    else tuple(leaf.shape)
  )


def _check_layer(path, stats, factors, weight_shape, bias_shape, numerics):
  where = _tree.format_path(path)
  for field in ('input', 'output', 'rows'):
    dtype = getattr(stats, field).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f'curvature[{where!r}].{field} has dtype {dtype}; statistics are '
        'floating-point (pass the curvature of value_and_grad_with_curvature '
        'unchanged).'
      )
  if stats.variant is not None and stats.variant != numerics:
    raise ValueError(
      f'curvature[{where!r}] was captured with numerics={stats.variant!r} '
      f'but the optimizer uses numerics={numerics!r}: pass '
      f'numerics={numerics!r} to value_and_grad_with_curvature.'
    )
  if factors is None:
    raise ValueError(
      f'curvature has statistics for layer {where!r} but the optimizer state '
      'has no factors for it: the curvature comes from another model, the '
      "state was initialised for other params, or the layer's weight is "
      'masked out (then build the optimizer with '
      'layout=adafisher_optax.curvature_layout(grad_fn, params, *batch)).'
    )
  want = (tuple(factors.input.shape), tuple(factors.output.shape))
  got = _factor_shapes(stats)
  if want != got:
    raise ValueError(
      f'Layer {where!r}: the optimizer state holds factors of shapes {want} '
      f'but the curvature needs factors of shapes {got}. Either the '
      'curvature comes from another model, or the factor sizes could not be '
      'inferred from parameter names (nn.scan stacks, bias-free DenseGeneral '
      'with several output axes): build the optimizer with '
      'layout=adafisher_optax.curvature_layout(grad_fn, params, *batch).'
    )
  n_stack = stats.input.ndim - 1
  stack = stats.input.shape[:-1]
  d_out = stats.output.shape[-1]
  for name, shape in (
    (stats.weight_name, weight_shape),
    (stats.bias_name, bias_shape),
  ):
    if shape is None:
      continue
    ok = tuple(shape[:n_stack]) == tuple(stack) and (
      math.prod(shape[n_stack:]) % d_out == 0
    )
    if not ok:
      raise ValueError(
        f'Parameter {where}/{name} has shape {shape}, which does not fit '
        f'statistics of shapes {got}: the curvature comes from another '
        'model.'
      )


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _axis_names(axis_name: Any) -> tuple:
  if axis_name is None:
    return ()
  if isinstance(axis_name, (tuple, list)):
    return tuple(axis_name)
  return (axis_name,)


def _over_devices(stats, axis_name):
  """Global-batch statistics: raw sums added over devices (spec section 4).

  Statistics combine across devices as JAX combines the gradients of
  replicated parameters. Inside ``shard_map`` JAX sums them in the backward
  pass (the probes are replicated inputs; ``summed_over``), so nothing is
  left to do. Under ``pmap`` each device's loss is the mean over its own
  batch and the user averages gradients with ``pmean``; then ``axis_name``
  sums the statistics here (the caller runs this on refresh steps only) and
  rescales them to the averaged objective.

  Args:
    stats: ``{layer path: LayerStatistics}``.
    axis_name: the optimizer's ``axis_name``.

  Returns:
    ``{layer path: LayerStatistics}`` of the global batch.
  """
  names = _axis_names(axis_name)
  combined = {}
  for path, layer in stats.items():
    stray = _devices.varying_axes(layer.input) - set(names)
    if stray:
      raise ValueError(
        f'curvature[{_tree.format_path(path)!r}] differs between devices '
        f'along mesh axes {sorted(stray)}: pass '
        f'axis_name={sorted(stray)[0]!r} (or a tuple) to the optimizer, or '
        'every device preconditions with its own statistics and the '
        'replicas drift apart.'
      )
    axes = tuple(n for n in names if n not in layer.summed_over)
    if axes:
      layer = layer.psum(axes).average_of(jax.lax.psum(1, axes))
    combined[path] = layer
  return combined


ABLATIONS = (None, 'layer_mean', 'permuted')


def _per_slice_mean(arrays, n_stack):
  """Mean over every entry of ``arrays`` but their ``n_stack`` leading axes."""
  total = sum(jnp.sum(a, axis=tuple(range(n_stack, a.ndim))) for a in arrays)
  count = sum(math.prod(a.shape[n_stack:]) for a in arrays)
  return total / count


def _permuted(x, path, salt):
  """``x`` with its last axis shuffled by a permutation fixed by ``path``."""
  seed = zlib.crc32(repr((path, salt)).encode())
  order = np.random.default_rng(seed).permutation(x.shape[-1])
  return x[..., order]


def _damped_preconditioner(
  rule, h, s, numerics, shapes, damping, relative_damping, ablation, path
):
  """``F~`` of a layer's weight and bias (``None`` where absent).

  Absolute damping: ``K + damping``; relative damping ``a``:
  ``(K + a * mean(K)) / ((1 + a) * mean(K))``, ``1`` where ``mean(K) = 0``
  (spec section 3a). Ablations (benchmark controls): ``'permuted'`` shuffles
  the factor vectors within the layer; ``'layer_mean'`` replaces ``F~`` by
  its mean over the layer.
  """
  if ablation == 'permuted':
    h, s = _permuted(h, path, 'h'), _permuted(s, path, 's')
  n_stack = h.ndim - 1
  if relative_damping is None:
    parts = rule.preconditioner(h, s, damping, numerics, *shapes)
  else:
    k = rule.preconditioner(h, s, 0.0, numerics, *shapes)
    present = [a for a in k if a is not None]
    mean = _per_slice_mean(present, n_stack)
    a = relative_damping

    def damp(part):
      if part is None:
        return None
      m = mean.reshape(mean.shape + (1,) * (part.ndim - n_stack))
      if isinstance(a, numbers.Number) and math.isinf(a):
        return jnp.ones_like(part)
      safe = jnp.where(m > 0, m, 1.0)
      return jnp.where(m > 0, (part + a * safe) / ((1 + a) * safe), 1.0)

    parts = tuple(damp(part) for part in k)
  if ablation == 'layer_mean':
    present = [a for a in parts if a is not None]
    mean = _per_slice_mean(present, n_stack)
    parts = tuple(
      None
      if part is None
      else jnp.broadcast_to(
        mean.reshape(mean.shape + (1,) * (part.ndim - n_stack)), part.shape
      )
      for part in parts
    )
  return parts


def _refresh_factors(
  updates,
  factors,
  curvature,
  *,
  due,
  gamma,
  damping,
  relative_damping,
  ablation,
  numerics,
  axis_name,
):
  """Refreshes the factors of every layer in ``curvature``.

  Returns:
    ``(new factors tree, {parameter path: F~}, whether every statistic of
    this device was finite)``.
  """
  old = dict(
    _tree.leaves_with_paths(
      factors, is_leaf=lambda x: isinstance(x, factors_lib.KroneckerFactors)
    )
  )
  layers, shapes = {}, {}
  for path, stats in statistics_lib.flatten(curvature).items():
    if not isinstance(_tree.get_node(updates, path), Mapping):
      raise ValueError(
        f'curvature has statistics for layer {_tree.format_path(path)!r} '
        'but the updates have no such layer: the curvature comes from '
        'another model.'
      )
    weight_shape = _leaf_shape(updates, path, stats.weight_name)
    bias_shape = _leaf_shape(updates, path, stats.bias_name)
    if weight_shape is None and bias_shape is None:
      continue  # every parameter of the layer is masked out
    _check_layer(path, stats, old.get(path), weight_shape, bias_shape, numerics)
    layers[path] = stats
    shapes[path] = (weight_shape, bias_shape)
  if not layers:
    return factors, {}, jnp.asarray(True)
  finite = _all_finite(
    jnp.concatenate(
      [jnp.ravel(a) for st in layers.values() for a in (st.input, st.output)]
    )
  )

  current = {p: old[p] for p in layers}

  def refresh(current):
    combined = _over_devices(layers, axis_name)
    return factors_lib.refresh(
      current,
      {p: s.means() for p, s in combined.items()},
      {p: s.rows for p, s in combined.items()},
      gamma=gamma,
      numerics=numerics,
    )

  if _axis_names(axis_name):
    # Collectives on refresh steps only.
    refreshed = jax.lax.cond(due, refresh, lambda c: c, current)
  else:
    # A few small kernels, cheaper than a conditional on accelerators.
    refreshed = otu.where(due, refresh(current), current)
  preconditioners = {}
  normalized = factors_lib.for_preconditioning(refreshed, numerics)
  for path, (h, s) in normalized.items():
    stats = layers[path]
    f_weight, f_bias = _damped_preconditioner(
      layers_lib.REGISTRY[stats.kind],
      h,
      s,
      numerics,
      shapes[path],
      damping,
      relative_damping,
      ablation,
      path,
    )
    for name, f in ((stats.weight_name, f_weight), (stats.bias_name, f_bias)):
      if f is not None:
        preconditioners[path + (name,)] = f
  return _tree.nest({**old, **refreshed}), preconditioners, finite


def scale_by_adafisher(
  b1: Any = 0.9,
  damping: Any = 1e-3,
  gamma: Any = 0.8,
  t_cov: Any = None,
  numerics: str = 'reference',
  fisher_power: Any = 1.0,
  axis_name: Any = None,
  *,
  mu_dtype: Any = None,
  layout: Any = None,
  relative_damping: Any = None,
  ablation: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Rescales updates by AdaFisher's diagonal Kronecker-factored Fisher.

  Per parameter: ``m <- b1 m + (1 - b1) g``; ``m_hat = m / (1 - b1**t)``;
  update ``m_hat / F~**fisher_power`` where ``F~ = H (x) S + damping`` is
  built from the layer's factor EMAs. Parameters without statistics get
  ``F~ = 1`` and are listed once in an
  :class:`UnpreconditionedParametersWarning`. ``update`` needs the keyword
  argument ``curvature`` from
  :func:`adafisher_optax.value_and_grad_with_curvature`.

  Args:
    b1: momentum decay.
    damping: ``lambda``, added to the Kronecker product.
    gamma: factor EMA decay (see ``numerics``).
    t_cov: refresh the factors on steps whose 0-based count is a multiple of
      ``t_cov``; ``None`` means 100 for ``reference``, 1 for ``paper``.
    numerics: ``"reference"`` (the authors' code: min-max with absolute
      epsilon folded in as ``0.08*old + 0.008*new`` at ``gamma=0.8``) or
      ``"paper"`` (plain EMA, scale-free min-max when preconditioning).
    fisher_power: ``p``; 0.5 gives the square-root variant.
    axis_name: name of a mapped axis (``pmap``/``shard_map``) over which raw
      statistics are summed on refresh steps, giving global-batch factors.
    mu_dtype: optional dtype of the momentum.
    layout: the curvature's shapes, from
      :func:`adafisher_optax.curvature_layout`, to size the factors exactly;
      by default they are inferred from parameter names and shapes.
    relative_damping: ``a >= 0`` (``math.inf`` allowed) replaces the absolute
      ``damping``: ``F~ = (K + a mean(K)) / ((1 + a) mean(K))`` per layer with
      ``K = H (x) S`` (spec section 3a); ``None`` keeps ``K + damping``.
    ablation: a benchmark control, ``None`` (the method), ``'layer_mean'``
      (``F~`` replaced by its layer mean) or ``'permuted'`` (the factor
      vectors shuffled within each layer).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  References:
    Gomes et al., `AdaFisher: Adaptive Second Order Optimization via Fisher
    Information <https://arxiv.org/abs/2405.16397>`_, ICLR 2025.
  """
  numerics = check_numerics(numerics)
  check_hyperparameters(
    b1=b1, damping=damping, gamma=gamma, t_cov=t_cov, fisher_power=fisher_power
  )
  t_cov = DEFAULT_T_COV[numerics] if t_cov is None else t_cov
  if relative_damping is not None and not (
    isinstance(relative_damping, numbers.Number)
    and relative_damping == math.inf
  ):
    _check_hyperparameter(
      'relative_damping',
      relative_damping,
      lambda v: np.all(v >= 0),
      'non-negative (math.inf allowed) or None',
    )
  if ablation not in ABLATIONS:
    raise ValueError(f'ablation must be one of {ABLATIONS}, got {ablation!r}.')
  if mu_dtype is not None:
    mu_dtype = jax.dtypes.canonicalize_dtype(mu_dtype)

  def init_fn(params):
    _check_params(params)
    return AdaFisherState(
      count=jnp.zeros([], jnp.int32),
      mu=otu.zeros_like(params, dtype=mu_dtype),
      factors=_initial_factors(params, layout, numerics),
    )

  def update_fn(updates, state, params=None, *, curvature=None, **extra_args):
    del params, extra_args
    if curvature is None:
      raise TypeError(
        'AdaFisher update needs the keyword argument `curvature`: '
        'tx.update(grads, opt_state, params, curvature=curvature) with the '
        'curvature returned by value_and_grad_with_curvature.'
      )
    _check_params(updates, what='gradient')
    due = (state.count % jnp.asarray(t_cov, state.count.dtype)) == 0
    factors, preconditioners, finite = _refresh_factors(
      updates,
      state.factors,
      curvature,
      due=due,
      gamma=gamma,
      damping=damping,
      relative_damping=relative_damping,
      ablation=ablation,
      numerics=numerics,
      axis_name=axis_name,
    )
    mu = otu.update_moment(updates, state.mu, b1, 1)
    count_inc = optax.safe_increment(state.count)
    mu_hat = otu.bias_correction(mu, b1, count_inc)
    unpreconditioned = []

    def precondition(keypath, m, g):
      path = _tree.keypath_to_path(keypath)
      f = preconditioners.get(path)
      if f is None:
        unpreconditioned.append(_tree.format_path(path))
        return m.astype(g.dtype)
      if not (isinstance(fisher_power, numbers.Number) and fisher_power == 1):
        f = f**fisher_power
      return (m / f).astype(g.dtype)

    new_updates = jax.tree_util.tree_map_with_path(
      precondition, mu_hat, updates
    )
    if unpreconditioned:
      warnings.warn(
        'AdaFisher: no curvature statistics for these parameters; they are '
        'updated with F~ = 1 (bias-corrected momentum): '
        + ', '.join(unpreconditioned),
        UnpreconditionedParametersWarning,
        stacklevel=3,
      )
    new_state = AdaFisherState(
      count=count_inc, mu=otu.cast(mu, mu_dtype), factors=factors
    )
    # A step with non-finite gradients changes nothing and moves nothing. A
    # captured layer's gradients are sums of products of its inputs and
    # output gradients, whose squares its statistics sum: they are finite
    # when its statistics are, and only the other gradients need a look.
    # Under pmap the statistics are this device's while the gradients are
    # averaged over all: there, every gradient is checked.
    unchecked = [
      g
      for path, g in _tree.leaves_with_paths(updates)
      if _axis_names(axis_name) or path not in preconditioners
    ]
    finite &= _all_finite(unchecked)
    new_state = otu.where(finite, new_state, state)
    new_updates = otu.where(finite, new_updates, otu.zeros_like(new_updates))
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
