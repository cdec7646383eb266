"""What a front end reports to while the user's function is traced.

A front end (:mod:`adafisher_optax.linen`, :mod:`adafisher_optax.nnx`,
:mod:`adafisher_optax.tags`) sees the layers the user's function applies
and reports each application of a registered layer as a :class:`LayerCall`
to the :class:`Session` of the current trace (:func:`current`). The
session tells it, in return, which arrays are the first argument's
(:meth:`Session.owner`) and which probe a layer carries
(:meth:`Session.probe`). The two sessions of a capture, discovery and
capture, are in :mod:`adafisher_optax.capture`; front ends know only this
interface.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax

from adafisher_optax import _tree
from adafisher_optax.registry import LayerType, Selection

#: Where a front end puts a layer's probe (a params entry, an attribute).
PROBE = '__adafisher_probe__'

#: How a front end tells the model's layers: ``'identity'`` (their params
#: are arrays of the first argument) or ``'structural'`` (their params sit
#: at the same paths: the linen front end's fallback).
Mode = Literal['identity', 'structural']


class CaptureError(ValueError):
  """The model cannot be captured as written; the message says why and where."""


class UnsupportedLayerWarning(UserWarning):
  """A registered layer was applied in a way the capture cannot follow."""


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """One application of a registered layer, as a front end saw it.

  Attributes:
    path: the layer's path in the first argument (its params' parent).
    layer_type: the registry entry of the applied method.
    layer: the layer object (handed to the adapter).
    inputs: the call's first positional argument.
    kwargs: its other arguments, by name.
    outputs: its outputs.
    params: the layer's parameters as the layer sees them, by name.
    description: the layer's type, for messages.
    probe: returns the probe that reached the layer (``None`` if none).
    frozen: names of the layer's variables that are not trained (an NNX
      bias held as another ``Variable`` type than ``nnx.Param``).
  """

  path: _tree.Path
  layer_type: LayerType
  layer: Any
  inputs: Any
  kwargs: Mapping[str, Any]
  outputs: Any
  params: Mapping[str, Any]
  description: str
  probe: Callable[[], Any] = lambda: None
  frozen: frozenset[str] = frozenset()


class Session(abc.ABC):
  """One trace of the user's function, as the front ends see it."""

  def __init__(
    self, first_argument: Any, mode: Mode, selection: Selection
  ) -> None:
    self.mode = mode
    self.selection = selection
    self._owners = {
      id(leaf): path for path, leaf in _tree.leaves_with_paths(first_argument)
    }
    self.paths = frozenset(self._owners.values())
    self.calls = 0
    self.losses: list[jax.Array] = []
    self._applied: dict[_tree.Path, int] = {}

  def __enter__(self) -> Session:
    _LOCAL.sessions = (*getattr(_LOCAL, 'sessions', ()), self)
    return self

  def __exit__(self, *exc) -> None:
    _LOCAL.sessions = tuple(s for s in _LOCAL.sessions if s is not self)

  def owner(self, leaf: Any) -> _tree.Path | None:
    """The path of ``leaf`` in the first argument, if it is one of its arrays."""
    return self._owners.get(id(leaf))

  def saw_call(self) -> None:
    """Counts a layer method call (to report a function that applied none)."""
    self.calls += 1

  def applied(self, path: _tree.Path) -> int:
    """How many applications of the layer at ``path`` were reported."""
    return self._applied.get(path, 0)

  def apply(self, call: LayerCall) -> Any:
    """Reports one application; returns its outputs (tapped when capturing)."""
    self._applied[call.path] = self.applied(call.path) + 1
    return self._apply(call)

  def register_loss(self, logits: jax.Array, value: jax.Array) -> jax.Array:
    """Records the logits of :func:`adafisher_optax.softmax_cross_entropy`
    and returns its ``value`` (tapped for its weight in the loss when the
    capture samples the Fisher)."""
    self.losses.append(logits)
    return value

  @abc.abstractmethod
  def _apply(self, call: LayerCall) -> Any: ...

  @abc.abstractmethod
  def probe(self, path: _tree.Path) -> Any:
    """The probe to hand to the layer at ``path`` (``None``: none)."""

  @abc.abstractmethod
  def stack(self, path: _tree.Path) -> tuple[int, ...]:
    """The leading axes by which the layer's params are stacked."""

  def probe_stacks(self, path: _tree.Path) -> dict[str, tuple[int, ...]]:
    """``{rule: shape}`` of the row counts in the probe of one application
    of the layer at ``path`` (``{}``: not known in this session)."""
    del path
    return {}

  @abc.abstractmethod
  def not_captured(self, path: _tree.Path, description: str, why: str) -> None:
    """Reports a registered layer the capture cannot follow (``F~ = 1``)."""

  @abc.abstractmethod
  def params_elsewhere(self, description: str) -> None:
    """Reports a layer whose params are not arrays of the first argument."""


_LOCAL = threading.local()


def current() -> Session | None:
  """The session whose function is being traced in this thread, if any."""
  stack = getattr(_LOCAL, 'sessions', ())
  return stack[-1] if stack else None
