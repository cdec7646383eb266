"""Per-layer curvature statistics: what the capture hands to the optimizer.

A layer's statistics are *sums over rows* plus the number of rows, so that
several applications of one module, several scan iterations or several devices
combine exactly by addition before the optimizer divides (spec section 1, 4).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from adafisher_optax import _tree, layers


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStatistics:
  """Instantaneous statistics of one layer for one step.

  Attributes:
    input: sum over rows of the input-side statistic, shape
      ``[*stack, len]``; ``stack`` are leading axes of stacked parameters
      (``nn.scan``/``nn.vmap`` over layers).
    output: sum over rows of the output-gradient statistic, shape
      ``[*stack, len_S]``.
    rows: number of rows behind the sums, shape ``[*stack]``.
    kind: name of the layer rule in :data:`adafisher_optax.layers.REGISTRY`.
    variant: the numerics the statistics were captured for, or ``None`` when
      the rule's statistics are the same for both numerics.
    weight_name: the layer's weight parameter (``kernel``, ``embedding``,
      ``scale``) or ``None``.
    bias_name: the layer's bias/shift parameter or ``None``.
    summed_over: ``shard_map`` mesh axes over which JAX already summed the
      statistics in the backward pass (as it sums replicated gradients).
  """

  input: jax.Array
  output: jax.Array
  rows: jax.Array
  kind: str = dataclasses.field(metadata=dict(static=True))
  variant: str | None = dataclasses.field(metadata=dict(static=True))
  weight_name: str | None = dataclasses.field(metadata=dict(static=True))
  bias_name: str | None = dataclasses.field(metadata=dict(static=True))
  summed_over: tuple[str, ...] = dataclasses.field(
    default=(), metadata=dict(static=True)
  )

  def means(self) -> tuple[jax.Array, jax.Array]:
    """Returns ``(H_hat, S_hat)`` from the sums, as the layer's rule says.

    Layers whose rows are zero (never reached by the backward pass) give
    zeros; the optimizer skips their refresh.
    """
    return layers.REGISTRY[self.kind].normalize(
      self.input, self.output, self.rows, self.variant
    )

  def average_of(self, parts: Any) -> LayerStatistics:
    """The statistics of the mean of ``parts`` losses, from those of their sum.

    Statistics summed over devices or micro-batches come from the gradients
    of each part's own loss; the averaged objective's output gradients are
    ``1 / parts`` times those.
    """
    degree = layers.REGISTRY[self.kind].output_degree(self.variant)
    factor = 1 / jnp.asarray(parts, self.output.dtype)
    return dataclasses.replace(self, output=self.output * factor**degree)

  def psum(self, axis_name: Any) -> LayerStatistics:
    """Sums the statistics over a mapped axis (exact global-batch sums)."""
    summed = jax.lax.psum((self.input, self.output, self.rows), axis_name)
    return dataclasses.replace(
      self, input=summed[0], output=summed[1], rows=summed[2]
    )


def is_layer_statistics(node: Any) -> bool:
  return isinstance(node, LayerStatistics)


def flatten(curvature: Any) -> dict[_tree.Path, LayerStatistics]:
  """Returns ``{layer path: LayerStatistics}`` of a curvature tree."""
  if curvature is None:
    return {}
  flat = _tree.leaves_with_paths(curvature, is_leaf=is_layer_statistics)
  out = {}
  for path, node in flat:
    if not isinstance(node, LayerStatistics):
      raise TypeError(
        'curvature must be the tree returned by value_and_grad_with_curvature'
        f'; found a {type(node).__name__} at {_tree.format_path(path)!r}.'
      )
    out[path] = node
  return out


def unpreconditioned_parameters(params: Any, curvature: Any) -> list[str]:
  """Paths of the parameters that get ``F~ = 1`` (no statistics cover them)."""
  covered = {
    path + (name,)
    for path, stats in flatten(curvature).items()
    for name in (stats.weight_name, stats.bias_name)
    if name is not None
  }
  return [
    _tree.format_path(path)
    for path, _ in _tree.leaves_with_paths(params)
    if path not in covered
  ]
