"""Per-layer curvature statistics: what a capture hands to the optimizer.

A layer's statistics are *sums over rows* plus the number of rows, so that
several applications of one module, several scan iterations, micro-batches or
devices combine exactly by addition before the optimizer divides (spec
sections 1 and 4). They hold what both numerics need; the optimizer picks.

A curvature tree is keyed like the params: at a layer's path it holds the
layer's :class:`LayerStatistics`, or, when several rules read the layer's
parameters (a tied embedding's lookup and ``attend``), a tuple of them
sorted by rule name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from adafisher_optax import _devices, _tree, rules


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStatistics:
  """Instantaneous statistics of one layer for one step.

  Attributes:
    input_sums: forward-pass sums over rows (the ``H`` side), each of shape
      ``[*stack, n]``; ``stack`` are the leading axes of stacked parameters
      (``nn.scan``/``nn.vmap`` over layers).
    output_sums: backward-pass sums over rows (the ``S`` side).
    rows: the number of rows behind the sums, shape ``[*stack]``.
    rule: the name of the layer's rule in
      :data:`adafisher_optax.rules.RULES`.
    weight_name: the layer's weight parameter (``kernel``, ``embedding``,
      ``scale``) or ``None``.
    bias_name: the layer's bias (shift) parameter or ``None``.
  """

  input_sums: tuple[jax.Array, ...]
  output_sums: tuple[jax.Array, ...]
  rows: jax.Array
  rule: str = dataclasses.field(metadata=dict(static=True))
  weight_name: str | None = dataclasses.field(metadata=dict(static=True))
  bias_name: str | None = dataclasses.field(metadata=dict(static=True))

  @property
  def layer_rule(self) -> rules.Rule:
    return rules.RULES[self.rule]

  def roles(self) -> dict[str, str]:
    """``{parameter name: 'weight' | 'bias'}`` of the parameters it covers."""
    names = {self.weight_name: 'weight', self.bias_name: 'bias'}
    return {name: role for name, role in names.items() if name is not None}

  def means(self, numerics: rules.Numerics = 'reference'):
    """``(H_hat, S_hat)`` of the given numerics (only norms depend on it).

    Layers whose rows are zero (never reached by the backward pass) give
    zeros; the optimizer skips their refresh.
    """
    return self.layer_rule.means(
      self.input_sums, self.output_sums, self.rows, numerics
    )

  def average_of(self, parts: Any) -> LayerStatistics:
    """The statistics of the mean of ``parts`` losses, from those of their sum.

    Statistics summed over devices or micro-batches come from the gradients
    of each part's own loss; the averaged objective's output gradients are
    ``1 / parts`` times those.
    """
    degrees = self.layer_rule.output_degrees
    outputs = tuple(
      s * (1 / jnp.asarray(parts, s.dtype)) ** d
      for s, d in zip(self.output_sums, degrees)
    )
    return dataclasses.replace(self, output_sums=outputs)

  def psum(self, axis_name: Any) -> LayerStatistics:
    """Sums the statistics over a mapped axis (exact global-batch sums)."""
    inputs, outputs, rows = jax.lax.psum(
      (self.input_sums, self.output_sums, self.rows), axis_name
    )
    return dataclasses.replace(
      self, input_sums=inputs, output_sums=outputs, rows=rows
    )


def is_layer_statistics(node: Any) -> bool:
  return isinstance(node, LayerStatistics)


def _is_layer_node(node: Any) -> bool:
  return is_layer_statistics(node) or (
    isinstance(node, tuple)
    and bool(node)
    and all(is_layer_statistics(n) for n in node)
  )


def by_block(curvature: Any) -> dict[tuple[_tree.Path, str], LayerStatistics]:
  """``{(layer path, rule name): LayerStatistics}`` of a curvature tree."""
  if curvature is None:
    return {}
  flat = jax.tree_util.tree_flatten_with_path(curvature, is_leaf=_is_layer_node)
  out = {}
  for keypath, node in flat[0]:
    path = _tree.keypath_to_path(keypath)
    if not _is_layer_node(node):
      raise TypeError(
        'curvature must be the tree returned by value_and_grad_with_curvature'
        f'; found a {type(node).__name__} at {_tree.format_path(path)!r}.'
      )
    for stats in node if isinstance(node, tuple) else (node,):
      if (path, stats.rule) in out:
        raise ValueError(
          f'curvature[{_tree.format_path(path)!r}] holds two statistics of '
          f'rule {stats.rule!r}; a layer has one per rule.'
        )
      out[path, stats.rule] = stats
  return out


def over_devices(
  stats: dict[Any, LayerStatistics], axis_names: tuple
) -> dict[Any, LayerStatistics]:
  """Global-batch statistics: raw sums added over devices (spec section 4).

  Statistics combine across devices as JAX combines the gradients of
  replicated parameters: inside ``shard_map`` JAX has already summed them in
  the backward pass (they flow back through replicated probes), so they no
  longer vary along the mesh axes. Under ``pmap`` each device's loss is the
  mean over its own batch and the user averages gradients with ``pmean``;
  there the statistics still differ between devices, ``axis_names`` sums
  them and they are rescaled to the averaged objective.

  Args:
    stats: ``{key: LayerStatistics}``, the key's first entry a layer path.
    axis_names: the optimizer's ``axis_name`` as a tuple.

  Returns:
    ``{key: LayerStatistics}`` of the global batch.
  """
  combined = {}
  for key, layer in stats.items():
    varying = _devices.varying_axes(layer.rows)
    unnamed = _devices.untracked_axes(layer.rows) - set(axis_names)
    if unnamed:
      raise ValueError(
        f'curvature[{_tree.format_path(key[0])!r}] is computed inside a '
        f'pmap over axes {sorted(unnamed)} that the optimizer was not '
        f'given: pass axis_name={sorted(unnamed)[0]!r} (or a tuple) to the '
        'optimizer, or every device preconditions with its own statistics '
        'and the replicas drift apart.'
      )
    stray = varying - set(axis_names)
    if stray:
      raise ValueError(
        f'curvature[{_tree.format_path(key[0])!r}] differs between devices '
        f'along mesh axes {sorted(stray)}: pass '
        f'axis_name={sorted(stray)[0]!r} (or a tuple) to the optimizer, or '
        'every device preconditions with its own statistics and the '
        'replicas drift apart.'
      )
    axes = tuple(
      n for n in axis_names if n in varying or not _devices.tracks_varying(n)
    )
    if axes:
      layer = layer.psum(axes).average_of(jax.lax.psum(1, axes))
    combined[key] = layer
  return combined


def unpreconditioned_parameters(params: Any, curvature: Any) -> list[str]:
  """Paths of the parameters that get ``F~ = 1`` (no statistics cover them).

  ``params`` may be a params dict, boxed params (``nn.Partitioned``), or an
  ``nnx.State`` (``nnx.state(model, nnx.Param)``, NNX gradients).
  """
  covered = {
    path + (name,)
    for (path, _), stats in by_block(curvature).items()
    for name in stats.roles()
  }
  return [
    _tree.format_path(path)
    for path, _ in _tree.leaves_with_paths(params)
    if path not in covered
  ]
