"""What the preconditioner does to your model, layer by layer.

Everything is read from the optimizer state (its factors, and the settings
of the optimizer that returned it: numerics, damping, with the values of an
``optax.inject_hyperparams`` around it) and the params' shapes, so the
report is what the next update does. The authors' constants make
``F~ = H (x) S + lambda`` damping-dominated almost everywhere in
``reference`` numerics; :func:`diagnostics` shows how much of that holds
for a given model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from adafisher_optax import _tree
from adafisher_optax import factors as factors_lib
from adafisher_optax.preconditioner import curvature, preconditioner
from adafisher_optax.state import (
  INJECTED,
  adafisher_state,
  check_params,
  injected_hyperparameters,
  one_replica,
  overdue,
)


@dataclasses.dataclass(frozen=True)
class LayerDiagnostics:
  """The preconditioner of one layer.

  Attributes:
    rule: the rule(s) the factors were sized for (``dense``, ``conv``,
      ``embed``, ``norm``, ``attend+embed`` for a tied embedding, ...): the
      layer's own with a ``layout``; sized from parameter names alone,
      every kernel reads as ``dense`` (a convolution's factors and ``F~``
      are the same).
    parameters: the parameters it preconditions.
    f_min: smallest entry of ``F~`` over those parameters (NaN before the
      first refresh).
    f_max: largest entry of ``F~``.
    damping_dominated: fraction of entries where the damping term is larger
      than the curvature term ``K`` (``K < damping``, or ``K < a mean(K)``
      under relative damping).
    refreshes: refreshes folded into the factors so far (the fewest over the
      slices of a stacked layer and the layer's blocks).
    skipped: refreshes skipped because the statistics were not finite
      (overflowing activations, a NaN batch).
  """

  rule: str
  parameters: tuple[str, ...]
  f_min: float
  f_max: float
  damping_dominated: float
  refreshes: int
  skipped: int


@dataclasses.dataclass(frozen=True)
class Diagnostics:
  """Per-layer :class:`LayerDiagnostics` and the state of the refreshes.

  Attributes:
    layers: ``{layer path: LayerDiagnostics}``.
    unpreconditioned: params with ``F~ = 1`` (no factors cover them).
    numerics: the optimizer's numerics.
    count: updates so far.
    last_refresh: the update of the latest refresh (-1: none yet).
    overdue: updates by which the next refresh is late (0: on time).
  """

  layers: dict[str, LayerDiagnostics]
  unpreconditioned: list[str]
  numerics: str
  count: int
  last_refresh: int
  overdue: int

  def __str__(self) -> str:
    lines = [
      f'{self.numerics} numerics, {self.count} updates, latest refresh at '
      f'{self.last_refresh}'
      + (f' ({self.overdue} updates overdue)' if self.overdue else ''),
      '| layer | rule | F~ min | F~ max | damping-dominated | refreshes '
      '| skipped |',
      '|---|---|---:|---:|---:|---:|---:|',
    ]
    for path, d in self.layers.items():
      lines.append(
        f'| {path} | {d.rule} | {d.f_min:.3g} | {d.f_max:.3g} | '
        f'{100 * d.damping_dominated:.1f}% | {d.refreshes} | {d.skipped} |'
      )
    if self.unpreconditioned:
      lines.append(
        'F~ = 1 (no statistics): ' + ', '.join(self.unpreconditioned)
      )
    return '\n'.join(lines)


def _hyperparameter(state, opt_state, name: str, given: Any) -> float | None:
  """What the next update uses for ``name`` (``None``: not set); ``given``
  is the caller's value, needed where the state does not hold it."""
  recorded = getattr(state.settings, name)
  value = recorded
  if recorded == INJECTED:
    value = injected_hyperparameters(opt_state).get(name)
    if value is None and given is None:
      raise ValueError(
        f'diagnostics: {name} was given to the optimizer as an array, or '
        'injected under another name, so the state does not hold it: pass '
        f'diagnostics(opt_state, params, {name}=<its value>).'
      )
    if value is None:
      return float(given)
  # (an injected bfloat16 value equals the given one to 1%)
  if given is not None and (
    value is None
    or not np.isclose(float(given), float(value), rtol=1e-2, atol=0)
  ):
    raise ValueError(
      f'diagnostics: {name}={given!r} was given, but the next update uses '
      f'{None if value is None else float(value)!r} (the state records '
      f'it): pass {name}= only when the optimizer took it as an array or '
      'injected it under another name.'
    )
  return None if value is None else float(value)


def diagnostics(
  opt_state: Any,
  params: Any,
  *,
  damping: float | None = None,
  relative_damping: float | None = None,
) -> Diagnostics:
  """Reports, per layer, the range of ``F~`` and how much damping dominates.

  Args:
    opt_state: the optimizer state (a chain's, an ``nnx.Optimizer``'s
      ``opt_state``, ... is searched for its one ``AdaFisherState``).
    params: the params, or their shapes: a dict, boxed params, or an
      ``nnx.State`` (``nnx.state(model, nnx.Param)``).
    damping: the optimizer's ``damping``, needed only when it was given as
      an array or injected under another name (the state then does not
      record it; ``optax.inject_hyperparams(...)(damping=...)`` it does).
    relative_damping: the same for ``relative_damping``.

  Returns:
    A :class:`Diagnostics`; ``str()`` of it is a Markdown table.
  """
  state = one_replica(adafisher_state(opt_state), 'diagnostics')
  numerics = state.settings.numerics
  damping = _hyperparameter(state, opt_state, 'damping', damping)
  relative = _hyperparameter(
    state, opt_state, 'relative_damping', relative_damping
  )
  factors = factors_lib.by_block(state.factors)
  layout = factors_lib.layout_of(state.factors)
  shapes = {  # optax.masked's other params are not AdaFisher's
    path: tuple(np.shape(leaf))
    for path, leaf in _tree.leaves_with_paths(params)
    if not _tree.masked_out(state.mu, path)
  }
  check_params(params, state, 'diagnostics')
  report = {}
  for layer, blocks in layout.layers.items():
    # Weights first, then biases (a layer's declared order), by name within.
    names = sorted(
      {
        (role != 'weight', name)
        for b in blocks
        for name, role in b.roles
        if layer + (name,) in shapes
      }
    )
    names = [name for _, name in names]
    if not names:
      continue
    values, dominated = [], []
    for name in names:
      path, shape = layer + (name,), shapes[layer + (name,)]
      k, mean, _ = curvature(factors, layout, path, shape, numerics=numerics)
      f = preconditioner(
        factors,
        layout,
        path,
        shape,
        numerics=numerics,
        damping=damping,
        relative_damping=relative,
      )
      term = damping if relative is None else relative * mean
      values.append(jnp.ravel(f))
      dominated.append(jnp.ravel(jnp.broadcast_to(k < term, shape)))
    views = [factors[b.key] for b in blocks]
    refreshes = min(int(jnp.min(v.refreshes)) for v in views)
    values = jnp.concatenate(values)
    nan = math.nan
    report[_tree.format_path(layer)] = LayerDiagnostics(
      rule='+'.join(b.rule for b in blocks),
      parameters=tuple(names),
      f_min=float(values.min()) if refreshes else nan,
      f_max=float(values.max()) if refreshes else nan,
      damping_dominated=float(jnp.concatenate(dominated).mean())
      if refreshes
      else nan,
      refreshes=refreshes,
      skipped=max(int(jnp.max(v.skipped)) for v in views),
    )
  return Diagnostics(
    layers=report,
    unpreconditioned=[
      _tree.format_path(p) for p in shapes if not layout.blocks_of(p)
    ],
    numerics=numerics,
    count=int(state.count),
    last_refresh=int(state.last_refresh),
    overdue=overdue(state),
  )
