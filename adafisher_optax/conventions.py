"""Flax's parameter names, read to size the factors when no layout is given.

Without a ``layout`` (:func:`adafisher_optax.curvature_layout`), a new
state guesses each layer from the names and shapes of its parameters, as
Flax names them: ``kernel`` (+ ``bias``) is a Dense-like layer (a
convolution's factors are a Dense layer's), ``embedding`` ``[V, D]`` an
embedding, ``scale`` and/or ``bias`` alone a normalisation. The guess is
the statistics' shapes; the rule sizes the factors from them, as it does
for a layout. Layers stacked without a bias, bias-free ``DenseGeneral``
layers with several output axes, stacked normalisations and tied
embeddings cannot be read from names: pass a layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from adafisher_optax import _tree, rules

Shape = tuple[int, ...]


class Guess(NamedTuple):
  """The statistics a layer's parameters suggest."""

  rule: rules.Rule
  input_shapes: list[Shape]
  output_shapes: list[Shape]
  roles: dict[str, str]


def _kernel(kernel: Shape, bias: Shape | None) -> Guess:
  """A ``kernel`` (+ ``bias``) layer, stacked when both share leading axes.

  Leading axes shared by kernel and bias beyond the bias's own are a stack
  (``nn.scan`` over layers); without a bias the kernel's last axis is the
  output.
  """
  if bias is not None:
    for n_stack in range(len(bias)):
      out = bias[n_stack:]
      fits = (
        bias[:n_stack] == kernel[:n_stack]
        and len(kernel) - n_stack - len(out) >= 1
        and kernel[len(kernel) - len(out) :] == out
      )
      if fits:
        d_in = math.prod(kernel[n_stack : len(kernel) - len(out)])
        stack = kernel[:n_stack]
        return Guess(
          rules.DENSE,
          [stack + (d_in + 1,)],
          [stack + (math.prod(out),)],
          {'kernel': 'weight', 'bias': 'bias'},
        )
  return Guess(
    rules.DENSE,
    [(math.prod(kernel[:-1]),)],
    [(kernel[-1],)],
    {'kernel': 'weight'},
  )


def _guess(shapes: Mapping[str, Shape | None]) -> Guess | None:
  """``shapes``: by name; ``None`` for a leaf without one (``optax.masked``
  puts a ``MaskedNode`` where a parameter is masked out)."""
  kernel, embedding = shapes.get('kernel'), shapes.get('embedding')
  if kernel is not None and len(kernel) >= 2:
    bias = None
    if 'bias' in shapes:  # a masked-out bias: as wide as the output
      bias = shapes['bias'] or kernel[-1:]
    return _kernel(kernel, bias)
  if embedding is not None and len(embedding) == 2:
    return Guess(
      rules.EMBED, [embedding[:1]], [embedding[1:]], {'embedding': 'weight'}
    )
  if 'kernel' in shapes or 'embedding' in shapes:
    return None  # masked out, or not a layer's
  features = shapes.get('scale') or shapes.get('bias')
  if features is None:
    return None
  n = (math.prod(features),)
  roles = {'scale': 'weight', 'bias': 'bias'}
  return Guess(
    rules.NORM,
    [(1,), n, (1,)],
    [n, n],
    {name: role for name, role in roles.items() if name in shapes},
  )


def _layer_dicts(params: Any) -> Iterator[tuple[_tree.Path, Mapping]]:
  """``(path, mapping)`` for every mapping of array leaves only.

  A mapping that also holds sub-mappings (or lists, tuples) is a module
  with layers and free parameters (e.g. a top-level ``scale``), not a
  layer; lists and tuples are walked by index.
  """

  def visit(node, path):
    if _tree.is_sequence(node):  # e.g. an ensemble's list of params
      for index, value in enumerate(node):
        yield from visit(value, path + (str(index),))
    if not isinstance(node, Mapping):
      return
    if node and all(not _tree.is_container(v) for v in node.values()):
      yield path, node
    for key, value in node.items():
      yield from visit(value, path + (str(key),))

  yield from visit(_tree.unbox_tree(params), ())


def guess(params: Any) -> dict[_tree.Path, Guess]:
  """``{layer path: Guess}`` for the layers Flax's names make out."""
  found = {}
  for path, node in _layer_dicts(params):
    shapes = {
      name: tuple(value.shape) if hasattr(value, 'shape') else None
      for name, value in node.items()
    }
    layer = _guess(shapes)
    if layer is not None:
      found[path] = layer
  return found
