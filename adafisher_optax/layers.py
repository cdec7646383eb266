"""Which layer types AdaFisher captures: one table, one function to extend it.

Each registered class (a Flax linen module, a Flax NNX module, or any class a
front end applies) maps to a :class:`LayerType`: the rule of
:mod:`adafisher_optax.rules` that does its maths, an *adapter* that reads one
application of the layer into the rule's configuration, and the names of its
weight and bias parameters. Subclasses of a registered class are captured
with their base's entry. The built-in entries live next to their front end
(:mod:`adafisher_optax.linen`, :mod:`adafisher_optax.nnx`).

To support your own layer, register it once::

  afo.register_layer(
    MyDense, afo.rules.DENSE, lambda layer, x, kwargs: afo.rules.Dense()
  )

(``docs/layers.md`` works through an example.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from adafisher_optax import rules

Adapter = Callable[[Any, Any, Mapping[str, Any]], rules.Config]


class UnsupportedCall(Exception):
  """Raised by an adapter for an application its rule cannot follow.

  The message says why; the layer is then reported and left at ``F~ = 1``.
  """


@dataclasses.dataclass(frozen=True)
class LayerType:
  """How one layer class is captured.

  Attributes:
    rule: the maths (e.g. :data:`adafisher_optax.rules.DENSE`).
    adapter: ``adapter(layer, inputs, kwargs)`` returns the rule's
      configuration for one application (``inputs``: the first argument of
      the call; ``kwargs``: the other arguments by name), or raises
      :class:`UnsupportedCall`.
    weight: the name of the weight parameter (``None``: none).
    bias: the name of the bias (shift) parameter (``None``: none).
    methods: the methods whose applications are captured; other methods of
      the class are reported as unsupported.
  """

  rule: rules.Rule
  adapter: Adapter
  weight: str | None = 'kernel'
  bias: str | None = 'bias'
  methods: tuple[str, ...] = ('__call__',)

  def parameter_names(self, config: Any) -> tuple[str | None, str | None]:
    """``(weight, bias)`` names of an application's parameters."""
    has_weight, has_bias = self.rule.has_parameters(config)
    return (
      self.weight if has_weight else None,
      self.bias if has_bias else None,
    )


_REGISTRY: dict[type, LayerType] = {}


def register_layer(
  layer_class: type,
  rule: rules.Rule,
  adapter: Adapter,
  *,
  weight: str | None = 'kernel',
  bias: str | None = 'bias',
  methods: tuple[str, ...] = ('__call__',),
) -> None:
  """Makes AdaFisher capture (and precondition) a layer class.

  Args:
    layer_class: a Flax linen or NNX module class (its subclasses follow).
    rule: the rule doing the maths: :data:`~adafisher_optax.rules.DENSE`,
      :data:`~adafisher_optax.rules.CONV`,
      :data:`~adafisher_optax.rules.EMBED`,
      :data:`~adafisher_optax.rules.NORM`, or your own
      :class:`~adafisher_optax.rules.Rule` subclass (registered by name).
    adapter: ``adapter(layer, inputs, kwargs) -> config`` for one
      application; raise :class:`UnsupportedCall` (with the reason) for
      applications the rule cannot follow.
    weight: the name of the layer's weight parameter.
    bias: the name of its bias parameter (used when the configuration says
      the layer has one).
    methods: the methods to capture.

  Raises:
    TypeError: for a ``layer_class`` that is not a class, a ``rule`` that is
      not a :class:`~adafisher_optax.rules.Rule` or an adapter that is not
      callable.
  """
  if not isinstance(layer_class, type):
    raise TypeError(f'layer_class must be a class, got {layer_class!r}.')
  if not callable(adapter):
    raise TypeError(f'adapter must be callable, got {adapter!r}.')
  if isinstance(methods, str) or not all(isinstance(m, str) for m in methods):
    raise TypeError(f'methods must be a tuple of names, got {methods!r}.')
  _REGISTRY[layer_class] = LayerType(
    rules.check_rule(rule), adapter, weight, bias, tuple(methods)
  )


def lookup_class(layer_class: type) -> tuple[type, LayerType] | None:
  """``(registered base class, LayerType)`` of a class, or ``None``."""
  for cls in layer_class.__mro__:
    entry = _REGISTRY.get(cls)
    if entry is not None:
      return cls, entry
  return None


def lookup(layer: Any) -> tuple[type, LayerType] | None:
  """``(registered base class, LayerType)`` of a layer object, or ``None``."""
  return lookup_class(type(layer))


def registered() -> dict[type, LayerType]:
  """A copy of the registry (``{class: LayerType}``)."""
  return dict(_REGISTRY)
