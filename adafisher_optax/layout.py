"""Which factor vectors the state keeps, and which parameters they cover.

A :class:`Block` is one rule's contribution to the curvature of a layer's
parameters: a layer read by one rule (a Dense layer) has one block; a
parameter read by two rules (a tied embedding: lookup and ``attend``) has
one block per rule, and its ``F~`` sums their curvatures. A layer stacked
along leading axes (``nn.scan``) has one *slice* per stacked layer. The
:class:`FactorLayout` of all blocks is static: it sizes a new state, and
each block's factors carry their block in the state's structure.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

from adafisher_optax import _tree, rules
from adafisher_optax import statistics as statistics_lib

#: ``(layer path, rule name)``.
BlockKey = tuple[_tree.Path, str]
Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Block:
  """One rule's contribution to the curvature of a layer's parameters.

  Attributes:
    path: the layer's path in the params.
    rule: the name of the rule whose maths builds ``K`` (for a state sized
      from parameter names, the rule the names suggest: a convolution's
      kernel reads as ``dense``, whose factors and ``K`` are a
      convolution's too).
    roles: ``((parameter name, 'weight' | 'bias'), ...)`` it covers.
    h_shape: the shape ``[*stack, n]`` of its ``H`` factor.
    s_shape: the shape of its ``S`` factor.
  """

  path: _tree.Path
  rule: str
  roles: tuple[tuple[str, str], ...]
  h_shape: Shape
  s_shape: Shape

  @property
  def key(self) -> BlockKey:
    return self.path, self.rule

  @property
  def stack(self) -> Shape:
    return self.h_shape[:-1]

  @property
  def layer_rule(self) -> rules.Rule:
    return rules.RULES[self.rule]

  def role_of(self, name: str) -> str | None:
    return dict(self.roles).get(name)


def same_maths(rule_a: str, rule_b: str) -> bool:
  """Whether two rules build ``K`` from factors of one kind the same way."""
  curvature = [type(rules.RULES[r]).curvature for r in (rule_a, rule_b)]
  return curvature[0] is curvature[1]


class FactorLayout:
  """Every block of a model, by key and by layer."""

  def __init__(self, blocks: Mapping[BlockKey, Block]):
    self.blocks: tuple[Block, ...] = tuple(blocks[k] for k in sorted(blocks))

  @functools.cached_property
  def by_key(self) -> dict[BlockKey, Block]:
    return {block.key: block for block in self.blocks}

  @functools.cached_property
  def layers(self) -> dict[_tree.Path, tuple[Block, ...]]:
    """``{layer path: its blocks, sorted by rule}``."""
    found: dict[_tree.Path, list[Block]] = {}
    for block in self.blocks:
      found.setdefault(block.path, []).append(block)
    return {path: tuple(blocks) for path, blocks in found.items()}

  def blocks_of(self, path: _tree.Path) -> tuple[Block, ...]:
    """The blocks covering the parameter at ``path``."""
    return tuple(
      block
      for block in self.layers.get(path[:-1], ())
      if block.role_of(path[-1]) is not None
    )


def _block(path, rule, input_shapes, output_shapes, roles, numerics) -> Block:
  h, s = rule.factor_shapes(input_shapes, output_shapes, numerics)
  return Block(
    path=path,
    rule=rule.name,
    roles=tuple(sorted(roles.items())),
    h_shape=tuple(h),
    s_shape=tuple(s),
  )


def from_curvature(curvature: Any, numerics: rules.Numerics) -> FactorLayout:
  """The layout of a curvature tree (or its shapes, e.g. a ``layout=``)."""
  return FactorLayout(
    {
      key: _block(
        key[0],
        stats.layer_rule,
        [tuple(a.shape) for a in stats.input_sums],
        [tuple(a.shape) for a in stats.output_sums],
        stats.roles(),
        numerics,
      )
      for key, stats in statistics_lib.by_block(curvature).items()
    }
  )


def from_guesses(guesses: Mapping[_tree.Path, Any], numerics) -> FactorLayout:
  """The layout of :func:`adafisher_optax.conventions.guess` results."""
  return FactorLayout(
    {
      (path, g.rule.name): _block(
        path, g.rule, g.input_shapes, g.output_shapes, g.roles, numerics
      )
      for path, g in guesses.items()
    }
  )
