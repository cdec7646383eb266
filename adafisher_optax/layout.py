"""Where each layer's factor vectors live in the optimizer state.

The state keeps the factors of the whole model in a few arrays: every ``H``
vector of length ``n`` is one row of the ``[rows, n]`` array of that length,
and likewise for ``S`` (a GPT has a handful of distinct lengths, so a
refresh is a handful of large ops whatever the number of layers). A
:class:`Block` is one contribution to the curvature of a layer's
parameters: a layer read by one rule (a Dense layer) has one block; a
parameter read by two rules (a tied embedding: lookup and ``attend``) has
one block per rule, and its ``F~`` sums their curvatures. A layer stacked
along leading axes (``nn.scan``) has one row, and one *slice*, per stacked
layer. The :class:`FactorLayout` of all blocks is static: it is part of the
state's structure, not of its data.
"""

from __future__ import annotations

import dataclasses
import functools
import math
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
    stack: the leading axes of stacked layers (``()`` for one layer).
    h_length: the length of its ``H`` vectors.
    s_length: the length of its ``S`` vectors.
    h_row: its first row in the ``H`` array of its length.
    s_row: its first row in the ``S`` array of its length.
    first_slice: its first index in the per-slice arrays.
  """

  path: _tree.Path
  rule: str
  roles: tuple[tuple[str, str], ...]
  stack: Shape
  h_length: int
  s_length: int
  h_row: int = 0
  s_row: int = 0
  first_slice: int = 0

  @property
  def key(self) -> BlockKey:
    return self.path, self.rule

  @property
  def slices(self) -> int:
    return math.prod(self.stack)

  @property
  def layer_rule(self) -> rules.Rule:
    return rules.RULES[self.rule]

  def role_of(self, name: str) -> str | None:
    return dict(self.roles).get(name)


def same_maths(rule_a: str, rule_b: str) -> bool:
  """Whether two rules build ``K`` from factors of one kind the same way."""
  return (
    type(rules.RULES[rule_a]).curvature is type(rules.RULES[rule_b]).curvature
  )


class FactorLayout:
  """Every block of a model, with its rows in the arrays of the state.

  Static (hashable, compared by content) and cheap to compare with itself,
  since it is part of the state's tree structure.
  """

  def __init__(self, blocks: Mapping[BlockKey, Block]):
    rows = {'h': {}, 's': {}}
    slices = 0
    placed = []
    for key in sorted(blocks):
      block = blocks[key]
      h_row = rows['h'].get(block.h_length, 0)
      s_row = rows['s'].get(block.s_length, 0)
      placed.append(
        dataclasses.replace(block, h_row=h_row, s_row=s_row, first_slice=slices)
      )
      rows['h'][block.h_length] = h_row + block.slices
      rows['s'][block.s_length] = s_row + block.slices
      slices += block.slices
    self.blocks: tuple[Block, ...] = tuple(placed)
    self.h_rows: dict[int, int] = dict(sorted(rows['h'].items()))
    self.s_rows: dict[int, int] = dict(sorted(rows['s'].items()))
    self.slices = slices

  @functools.cached_property
  def _identity(self) -> tuple:
    return self.blocks

  def __eq__(self, other: Any) -> bool:
    return self is other or (
      isinstance(other, FactorLayout) and self._identity == other._identity
    )

  @functools.cached_property
  def _hash(self) -> int:
    return hash(self._identity)

  def __hash__(self) -> int:
    return self._hash

  def __repr__(self) -> str:
    return f'FactorLayout({len(self.blocks)} blocks, {self.slices} slices)'

  @functools.cached_property
  def by_key(self) -> dict[BlockKey, Block]:
    return {block.key: block for block in self.blocks}

  @functools.cached_property
  def layers(self) -> dict[_tree.Path, tuple[Block, ...]]:
    """``{layer path: its blocks}``."""
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


def _block(
  path: _tree.Path,
  rule: rules.Rule,
  input_shapes: list[Shape],
  output_shapes: list[Shape],
  roles: Mapping[str, str],
  numerics: rules.Numerics,
) -> Block:
  h, s = rule.factor_shapes(input_shapes, output_shapes, numerics)
  return Block(
    path=path,
    rule=rule.name,
    roles=tuple(sorted(roles.items())),
    stack=tuple(h[:-1]),
    h_length=h[-1],
    s_length=s[-1],
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
