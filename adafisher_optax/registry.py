"""Which layers AdaFisher captures: one table, one function to extend it.

Each registered (class, method) pair (a Flax linen module, a Flax NNX module,
or any class a front end applies) maps to a :class:`LayerType`: the rule of
:mod:`adafisher_optax.rules` that does its maths, an *adapter* that reads
one application of the layer into the rule's configuration, and the names
of its weight and bias parameters. A class may be registered once per
method (``nn.Embed.__call__`` is a lookup, ``nn.Embed.attend`` an output
projection). Subclasses of a registered class are captured with their
base's entries. The built-in entries are tables in the front ends
(:data:`adafisher_optax.linen.BUILT_IN`, :data:`adafisher_optax.nnx.BUILT_IN`),
registered by :func:`register_all` when a front end is first used.

To support your own layer, register it once::

  afo.register_layer(
    MyDense, afo.rules.DENSE, lambda layer, x, kwargs: afo.rules.Dense()
  )

(``docs/layers.md`` works through an example.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from adafisher_optax import rules

Adapter = Callable[[Any, Any, Mapping[str, Any]], rules.Config]
Role = Literal['weight', 'bias']


class UnsupportedCall(Exception):
  """Raised by an adapter for an application its rule cannot follow.

  The message says why; the layer is then reported and left at ``F~ = 1``.
  """


@dataclasses.dataclass(frozen=True)
class LayerType:
  """How one method of a layer class is captured.

  Attributes:
    rule: the maths (e.g. :data:`adafisher_optax.rules.DENSE`).
    adapter: ``adapter(layer, inputs, kwargs)`` returns the rule's
      configuration for one application (``inputs``: the first argument of
      the call; ``kwargs``: the other arguments by name), or raises
      :class:`UnsupportedCall`.
    weight: the name of the weight parameter (``None``: none).
    bias: the name of the bias (shift) parameter (``None``: none).
  """

  rule: rules.Rule
  adapter: Adapter
  weight: str | None = 'kernel'
  bias: str | None = 'bias'

  def roles(self, config: Any) -> dict[str, Role]:
    """``{parameter name: 'weight' | 'bias'}`` of one application."""
    has_weight, has_bias = self.rule.has_parameters(config)
    named = {self.weight: has_weight, self.bias: has_bias}
    roles: dict[str, Role] = {}
    for (name, present), role in zip(named.items(), ('weight', 'bias')):
      if name is not None and present:
        roles[name] = role
    return roles


@dataclasses.dataclass(frozen=True)
class BuiltIn:
  """One row of a front end's table of built-in layers."""

  layer_class: type
  rule: rules.Rule
  adapter: Adapter
  weight: str | None = 'kernel'
  bias: str | None = 'bias'
  method: str = '__call__'


_REGISTRY: dict[type, dict[str, LayerType]] = {}


def register_layer(
  layer_class: type,
  rule: rules.Rule,
  adapter: Adapter,
  *,
  weight: str | None = 'kernel',
  bias: str | None = 'bias',
  methods: Sequence[str] = ('__call__',),
) -> None:
  """Makes AdaFisher capture (and precondition) a layer class.

  Registering a class again for other ``methods`` adds them (each method
  may have its own rule: ``nn.Embed`` has ``__call__`` as a lookup and
  ``attend`` as an output projection); registering a method again replaces
  its entry.

  Args:
    layer_class: a Flax linen or NNX module class (its subclasses follow).
    rule: the rule doing the maths: :data:`~adafisher_optax.rules.DENSE`,
      :data:`~adafisher_optax.rules.CONV`,
      :data:`~adafisher_optax.rules.EMBED`,
      :data:`~adafisher_optax.rules.ATTEND`,
      :data:`~adafisher_optax.rules.NORM`, or your own
      :class:`~adafisher_optax.rules.Rule` subclass (registered by name).
    adapter: ``adapter(layer, inputs, kwargs) -> config`` for one
      application; raise :class:`UnsupportedCall` (with the reason) for
      applications the rule cannot follow.
    weight: the name of the layer's weight parameter.
    bias: the name of its bias parameter (used when the configuration says
      the layer has one).
    methods: the methods to capture with this rule.

  Raises:
    TypeError: for a ``layer_class`` that is not a Flax Module class, a
      ``rule`` that is not a named :class:`~adafisher_optax.rules.Rule` or
      an adapter that is not callable.
    ValueError: for a name in ``methods`` that ``layer_class`` has no
      method of.
  """
  if not isinstance(layer_class, type) or not _is_flax_module(layer_class):
    raise TypeError(
      'layer_class must be a Flax linen or NNX Module class, got '
      f'{layer_class!r}.'
    )
  if not callable(adapter):
    raise TypeError(f'adapter must be callable, got {adapter!r}.')
  if isinstance(methods, str) or not all(isinstance(m, str) for m in methods):
    raise TypeError(f'methods must be a tuple of names, got {methods!r}.')
  missing = [m for m in methods if not callable(getattr(layer_class, m, None))]
  if missing:
    raise ValueError(
      f'{layer_class.__name__} has no method {missing[0]!r} (methods='
      f'{tuple(methods)!r}); its own methods: '
      f'{", ".join(_own_methods(layer_class)) or "none"}.'
    )
  layer_type = LayerType(rules.check_rule(rule), adapter, weight, bias)
  entries = _REGISTRY.setdefault(layer_class, {})
  for method in methods:
    entries[method] = layer_type


def _flax_class(cls: type) -> bool:
  return cls.__module__.split('.')[0] == 'flax'


def _is_flax_module(layer_class: type) -> bool:
  """A subclass of linen's or NNX's ``Module`` (duck-typed: Flax is not
  imported here)."""
  return any(
    c.__name__ == 'Module' and _flax_class(c) for c in layer_class.__mro__
  )


def _own_methods(layer_class: type) -> list[str]:
  """The public methods a layer class defines beyond Flax's Module."""
  return sorted(
    {
      name
      for c in layer_class.__mro__
      if not _flax_class(c) and c is not object
      for name, value in vars(c).items()
      if callable(value) and (name == '__call__' or not name.startswith('_'))
    }
  )


def register_all(table: Iterable[BuiltIn]) -> None:
  """Registers a front end's built-in layers (once; user entries win)."""
  for row in table:
    if row.method not in _REGISTRY.get(row.layer_class, {}):
      register_layer(
        row.layer_class,
        row.rule,
        row.adapter,
        weight=row.weight,
        bias=row.bias,
        methods=(row.method,),
      )


def lookup_class(layer_class: type) -> tuple[type, dict[str, LayerType]] | None:
  """``(registered base class, {method: LayerType})`` of a class, or ``None``.

  The base is the nearest registered class in the MRO; the methods are those
  of every registered class in it (a subclass registered with an extra method
  keeps its base's), the nearer registration winning for a method.
  """
  registered = [cls for cls in layer_class.__mro__ if _REGISTRY.get(cls)]
  if not registered:
    return None
  entries: dict[str, LayerType] = {}
  for cls in reversed(registered):
    entries.update(_REGISTRY[cls])
  return registered[0], entries


def lookup(layer: Any) -> tuple[type, dict[str, LayerType]] | None:
  """``(registered base class, {method: LayerType})`` of a layer object."""
  return lookup_class(type(layer))


def registered() -> dict[type, dict[str, LayerType]]:
  """A copy of the registry (``{class: {method: LayerType}}``)."""
  return {cls: dict(entries) for cls, entries in _REGISTRY.items()}


@dataclasses.dataclass(frozen=True)
class Selection:
  """Which registered layers a capture takes (``layers=``, ``exclude=``).

  A layer is taken when it is an instance of an included class (every
  registered class when ``include`` is ``None``) and of no excluded class;
  a tags op when it is included (or ``include`` is ``None``) and not
  excluded. Excluding a subclass keeps its base.
  """

  include: tuple[Any, ...] | None = None
  exclude: tuple[Any, ...] = ()

  def takes(self, layer: Any) -> bool:
    """Whether ``layer`` (a layer class or a tags op) is captured."""
    if isinstance(layer, type):
      classes = tuple(c for c in self.exclude if isinstance(c, type))
      included = self.include is None or issubclass(
        layer, tuple(c for c in self.include if isinstance(c, type))
      )
      return included and not issubclass(layer, classes)
    return (self.include is None or layer in self.include) and (
      layer not in self.exclude
    )


def selection(
  include: Sequence[Any] | None,
  exclude: Sequence[Any],
  ops: Sequence[Callable[..., Any]] = (),
) -> Selection:
  """Checks ``layers=`` and ``exclude=``: registered classes or tags ``ops``."""
  checked = []
  for name, given in (('layers', include), ('exclude', exclude)):
    if given is None:
      checked.append(None)
      continue
    if isinstance(given, type) or not isinstance(given, Sequence):
      raise TypeError(
        f'{name} must be a sequence of layer classes, got {given!r}.'
      )
    for layer in given:
      known = isinstance(layer, type) and lookup_class(layer) is not None
      if not (known or any(layer is op for op in ops)):
        names = sorted(t.__name__ for t in _REGISTRY)
        names += [f'tags.{op.__name__}' for op in ops]
        raise TypeError(
          f'{name}: {layer!r} is not a registered layer class (or a '
          f'subclass of one) or a tags op; registered: {", ".join(names)}.'
        )
    checked.append(tuple(given))
  return Selection(checked[0], checked[1])
