"""What the preconditioner does to your model, layer by layer.

Everything is read from the optimizer state (the numerics from the factors'
type, the damping from the latest refresh) and the params' shapes, so the
report cannot disagree with the optimizer. The authors' constants make
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

from adafisher_optax import _tree, rules
from adafisher_optax import factors as factors_lib
from adafisher_optax.preconditioner import preconditioner
from adafisher_optax.schedule import adafisher_state, overdue
from adafisher_optax.transform import layer_factors


@dataclasses.dataclass(frozen=True)
class LayerDiagnostics:
  """The preconditioner of one layer.

  Attributes:
    rule: the rule the factors were sized for (``dense``, ``conv``,
      ``embed``, ``norm``, ...): the layer's own with a ``layout``; sized
      from parameter shapes alone, every kernel reads as ``dense`` (a
      convolution's factors and ``F~`` are the same).
    parameters: the parameters it preconditions.
    f_min: smallest entry of ``F~`` over those parameters (NaN before the
      first refresh).
    f_max: largest entry of ``F~``.
    damping_dominated: fraction of entries where the damping term is larger
      than the curvature term ``K`` (``K < damping``, or ``K < a mean(K)``
      under relative damping).
    refreshes: refreshes folded into the factors so far (the fewest over the
      slices of a stacked layer).
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


def diagnostics(opt_state: Any, params: Any) -> Diagnostics:
  """Reports, per layer, the range of ``F~`` and how much damping dominates.

  Args:
    opt_state: the optimizer state (a chain's, an ``nnx.Optimizer``'s
      ``opt_state``, ... is searched for its one ``AdaFisherState``).
    params: the params, or their shapes: a dict, boxed params, or an
      ``nnx.State`` (``nnx.state(model, nnx.Param)``).

  Returns:
    A :class:`Diagnostics`; ``str()`` of it is a Markdown table.
  """
  state = adafisher_state(opt_state)
  shapes = {
    path: tuple(np.shape(leaf))
    for path, leaf in _tree.leaves_with_paths(params)
  }
  damping = float(state.damping)
  relative = float(state.relative_damping)
  refreshed = damping >= 0
  report, covered = {}, set()
  for path, factors in layer_factors(state.factors).items():
    rule = rules.RULES[factors.rule]
    numerics = factors_lib.numerics_of(factors)
    names, values, dominated = [], [], []
    for name, role in factors.roles().items():
      shape = shapes.get(path + (name,))
      if shape is None:
        continue
      covered.add(path + (name,))
      names.append(name)
      k = rule.curvature(factors.h, factors.s, numerics, role, shape)
      f = preconditioner(
        factors,
        rule,
        role,
        shape,
        damping=damping,
        relative_damping=None if relative < 0 else relative,
        ablation=None,
        path=path,
      )
      n_stack = factors.h.ndim - 1
      mean = factors.curvature_mean.reshape(
        factors.curvature_mean.shape + (1,) * (len(shape) - n_stack)
      )
      term = damping if relative < 0 else relative * mean
      values.append(jnp.ravel(f))
      dominated.append(jnp.ravel(jnp.broadcast_to(k < term, shape)))
    if not names:
      continue
    values = jnp.concatenate(values)
    nan = math.nan
    report[_tree.format_path(path)] = LayerDiagnostics(
      rule=factors.rule,
      parameters=tuple(names),
      f_min=float(values.min()) if refreshed else nan,
      f_max=float(values.max()) if refreshed else nan,
      damping_dominated=float(jnp.concatenate(dominated).mean())
      if refreshed
      else nan,
      refreshes=int(jnp.min(factors.refreshes)),
      skipped=int(jnp.max(factors.skipped)),
    )
  numerics = next(
    (factors_lib.numerics_of(f) for f in layer_factors(state.factors).values()),
    'reference',
  )
  return Diagnostics(
    layers=report,
    unpreconditioned=[_tree.format_path(p) for p in shapes if p not in covered],
    numerics=numerics,
    count=int(state.count),
    last_refresh=int(state.last_refresh),
    overdue=overdue(state),
  )
