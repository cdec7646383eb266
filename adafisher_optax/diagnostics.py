"""What the preconditioner does to your model, layer by layer.

The authors' constants make ``F~ = H (x) S + lambda`` damping-dominated almost
everywhere in ``reference`` numerics; :func:`diagnostics` shows how much of
that holds for a given model and optimizer state.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adafisher_optax import _tree
from adafisher_optax import factors as factors_lib
from adafisher_optax import layers as layers_lib
from adafisher_optax import statistics as statistics_lib
from adafisher_optax.transform import AdaFisherState


@dataclasses.dataclass(frozen=True)
class LayerDiagnostics:
  """The preconditioner of one layer.

  Attributes:
    kind: the layer rule (``dense``, ``conv``, ``embed``, ``layer_norm``,
      ``channel_norm``).
    parameters: the parameters it preconditions.
    f_min: smallest entry of ``F~`` over those parameters.
    f_max: largest entry of ``F~``.
    damping_dominated: fraction of entries of ``F~`` where the damping is
      larger than the curvature term (``F~ - lambda < lambda``).
    refreshes: refreshes folded into the factors so far (the fewest over the
      slices of a stacked layer).
  """

  kind: str
  parameters: tuple[str, ...]
  f_min: float
  f_max: float
  damping_dominated: float
  refreshes: int


@dataclasses.dataclass(frozen=True)
class Diagnostics:
  """Per-layer :class:`LayerDiagnostics` and the unpreconditioned params."""

  layers: dict[str, LayerDiagnostics]
  unpreconditioned: list[str]

  def __str__(self) -> str:
    lines = [
      '| layer | kind | F~ min | F~ max | damping-dominated | refreshes |',
      '|---|---|---:|---:|---:|---:|',
    ]
    for path, d in self.layers.items():
      lines.append(
        f'| {path} | {d.kind} | {d.f_min:.3g} | {d.f_max:.3g} | '
        f'{100 * d.damping_dominated:.1f}% | {d.refreshes} |'
      )
    if self.unpreconditioned:
      lines.append(
        'F~ = 1 (no statistics): ' + ', '.join(self.unpreconditioned)
      )
    return '\n'.join(lines)


def _find_state(opt_state: Any) -> AdaFisherState:
  found = [
    node
    for node in jax.tree.leaves(
      opt_state, is_leaf=lambda n: isinstance(n, AdaFisherState)
    )
    if isinstance(node, AdaFisherState)
  ]
  if len(found) != 1:
    raise ValueError(
      'diagnostics: opt_state must contain exactly one AdaFisherState, found '
      f'{len(found)}.'
    )
  return found[0]


def diagnostics(
  opt_state: Any,
  params: Any,
  curvature: Any,
  *,
  damping: float = 1e-3,
  numerics: str = 'reference',
) -> Diagnostics:
  """Reports, per layer, the range of ``F~`` and how much damping dominates.

  Args:
    opt_state: the optimizer state (a chain's state is searched for the one
      :class:`AdaFisherState`).
    params: the params (only their shapes are used).
    curvature: the curvature of a step, or its layout
      (:func:`adafisher_optax.curvature_layout`): it says which layer rule
      applies where.
    damping: the optimizer's ``damping``.
    numerics: the optimizer's ``numerics``.

  Returns:
    A :class:`Diagnostics`; ``str()`` of it is a Markdown table.
  """
  state = _find_state(opt_state)
  factors = dict(
    _tree.leaves_with_paths(
      state.factors,
      is_leaf=lambda n: isinstance(n, factors_lib.KroneckerFactors),
    )
  )
  report = {}
  for path, stats in statistics_lib.flatten(curvature).items():
    if path not in factors:
      continue
    ((h, s),) = factors_lib.for_preconditioning(
      {path: factors[path]}, numerics
    ).values()
    names = [n for n in (stats.weight_name, stats.bias_name) if n is not None]
    shapes = {
      n: tuple(np.shape(_tree.get_node(params, path + (n,)))) for n in names
    }
    weight, bias = layers_lib.REGISTRY[stats.kind].preconditioner(
      h,
      s,
      damping,
      numerics,
      shapes.get(stats.weight_name),
      shapes.get(stats.bias_name),
    )
    values = jnp.concatenate(
      [f.reshape(-1) for f in (weight, bias) if f is not None]
    )
    report[_tree.format_path(path)] = LayerDiagnostics(
      kind=stats.kind,
      parameters=tuple(names),
      f_min=float(values.min()),
      f_max=float(values.max()),
      damping_dominated=float(jnp.mean(values - damping < damping)),
      refreshes=int(jnp.min(factors[path].refreshes)),
    )
  return Diagnostics(
    layers=report,
    unpreconditioned=statistics_lib.unpreconditioned_parameters(
      params, curvature
    ),
  )
