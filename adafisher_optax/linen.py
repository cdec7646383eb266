"""The Flax linen front end: capture through ``nn.intercept_methods``.

Each entry into the model from the user's function (``model.apply``, or a
method a ``method=`` function calls first) is matched to the first argument
by the identity of the arrays in its ``params``: the layers whose params are
arrays of the first argument are the model's; a teacher or target network
applied to other arrays is left alone. In the capture pass the entry call is
re-run under ``nn.map_variables`` with each matched layer's probe added next
to its params, so the user's function sees its params unchanged while Flax's
lifted transforms slice probes like params (``nn.scan``), sum them over
shared uses and recompute them (``nn.remat``).

When no array matches (params cast inside the user's function, or a model
whose top-level module is itself a lifted transform such as
``nn.scan(Block)``, which hands its layers sliced or re-traced params), the
capture falls back to matching paths (``mode='structural'``): the probes are
then put next to the params in the first argument, where they follow the
data into the model, and the user's function sees them.

A subclass of a registered layer is captured at its base class's method, so
the statistics belong to the layer's true inputs and outputs; a subclass
whose method never calls its base's is reported (``F~ = 1``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from adafisher_optax import _tree, flax_serialization, linen_layers, registry
from adafisher_optax.arguments import layer_arguments
from adafisher_optax.session import PROBE, CaptureError, LayerCall, Session

flax_serialization.register()

BUILT_IN = linen_layers.BUILT_IN
REFERENCE_LAYERS = linen_layers.REFERENCE_LAYERS


def register_built_in_layers() -> None:
  """Registers the built-in linen layers (:data:`BUILT_IN`)."""
  registry.register_all(BUILT_IN)


def supported_layers() -> tuple[type, ...]:
  """Every registered linen layer class."""
  register_built_in_layers()
  return tuple(c for c in registry.registered() if issubclass(c, nn.Module))


_BASE_METHODS: dict[type, dict[Any, str]] = {}


def _unwrapped(function: Any) -> Any:
  return getattr(function, '__wrapped__', function)


def _base_methods(base: type) -> dict[Any, str]:
  """``{original function: name}`` of the public methods of ``base``'s MRO."""
  found = _BASE_METHODS.get(base)
  if found is None:
    found = {}
    for cls in base.__mro__:
      if not issubclass(cls, nn.Module) or cls is nn.Module:
        continue
      for name, attr in vars(cls).items():
        if name == 'setup' or (name.startswith('_') and name != '__call__'):
          continue
        found.setdefault(_unwrapped(attr), name)
    _BASE_METHODS[base] = found
  return found


def _original_function(context) -> Any:
  func = getattr(context.orig_method, 'func', None)
  if func is None:
    raise CaptureError(
      'flax.linen.intercept_methods no longer passes the original method as '
      'a functools.partial (InterceptorContext.orig_method.func); this '
      'version of adafisher_optax cannot recognise layer calls with this '
      'Flax version.'
    )
  return func


def _params_of(module: nn.Module) -> list[tuple[_tree.Path, Any]]:
  """The params reaching ``module`` (relative paths), probes left out."""
  params = module.variables.get('params', {})
  return [
    (rel, leaf)
    for rel, leaf in _tree.leaves_with_paths(params)
    if PROBE not in rel
  ]


def _by_identity(session: Session, params) -> dict:
  """``{path relative to the entry: layer path in the first argument}``.

  A layer matches when each of its params reaching the entry is an array of
  the first argument, all at one layer path.
  """
  by_layer: dict[_tree.Path, set] = {}
  for rel, leaf in params:
    found = session.owner(leaf)
    if found is not None and found[len(found) - len(rel) :] == rel:
      layer = found[:-1]
    else:
      layer = None
    by_layer.setdefault(rel[:-1], set()).add(layer)
  return {
    rel: next(iter(paths))
    for rel, paths in by_layer.items()
    if len(paths) == 1 and None not in paths
  }


def _by_structure(session: Session, params) -> dict:
  """Like :func:`_by_identity`, matching paths instead of arrays.

  The entry's params are found as one sub-tree of the first argument with
  the same paths; their shapes are checked later (a lifted transform may
  have sliced them).
  """
  if not params:
    return {}
  first = params[0][0]
  prefixes = {
    path[: len(path) - len(first)]
    for path in session.paths
    if path[len(path) - len(first) :] == first
  }
  prefixes = {
    prefix
    for prefix in prefixes
    if all(prefix + rel in session.paths for rel, _ in params)
  }
  if len(prefixes) != 1:
    return {}
  (prefix,) = prefixes
  return {rel[:-1]: prefix + rel[:-1] for rel, _ in params}


class _Interceptor:
  """Routes the linen calls made inside the user's function to a session.

  The first call with params from the user's function (a model entry) is
  matched to the first argument; the calls inside it are the layers'.
  """

  def __init__(self, session: Session):
    self.session = session
    self.entries: list[tuple[_tree.Path, dict]] = []

  def __call__(self, next_fun, args, kwargs, context):
    if context.method_name == 'setup':  # builds submodules, applies none
      return next_fun(*args, **kwargs)
    self.session.saw_call()
    module = context.module
    params = [] if module.is_initializing() else _params_of(module)
    if self.entries or not params:
      return self._layer_call(next_fun, args, kwargs, context)
    structural = self.session.mode == 'structural'
    matched = (_by_structure if structural else _by_identity)(
      self.session, params
    )
    self.entries.append((tuple(module.path), matched))
    try:
      inject = {
        rel + (PROBE,): self.session.probe(path)
        for rel, path in matched.items()
        if self.session.probe(path) is not None and not structural
      }
      if not inject:  # structural: the probes travel in the params
        return self._layer_call(next_fun, args, kwargs, context)
      name = context.method_name

      def call(mdl, *args, **kwargs):
        return getattr(mdl, name)(*args, **kwargs)

      def with_probes(variables):
        params = variables['params']
        for path, probe in inject.items():
          params = _tree.set_in(params, path, probe)
        return {**variables, 'params': params}

      return nn.map_variables(call, 'params', trans_in_fn=with_probes)(
        module, *args, **kwargs
      )
    finally:
      self.entries.pop()

  def _path_of(self, module: nn.Module) -> _tree.Path | None:
    """The module's path in the first argument, if its params are there."""
    entry_path, matched = self.entries[-1] if self.entries else ((), {})
    return matched.get(tuple(module.path)[len(entry_path) :])

  def _subclass_call(self, next_fun, args, kwargs, context, base, path):
    """Runs a subclass's own method; reports it when it overrides a
    registered method of ``base`` without calling it."""
    before = self.session.applied(path)
    outputs = next_fun(*args, **kwargs)
    name = context.method_name
    registered = name in registry.lookup_class(base)[1]
    if path is not None and registered and self.session.applied(path) == before:
      self.session.not_captured(
        path,
        type(context.module).__name__,
        f'its {name} does not call {base.__name__}.{name}',
      )
    return outputs

  def _layer_call(self, next_fun, args, kwargs, context):
    module = context.module
    function = _original_function(context)
    equivalent = linen_layers.equivalent_call(module, function)
    if equivalent is not None:
      return equivalent(module, *args, **kwargs)
    found = registry.lookup(module)
    if (
      found is None
      or module.is_initializing()
      or not self.session.selection.takes(type(module))
    ):
      return next_fun(*args, **kwargs)
    base, entries = found
    method = _base_methods(base).get(_unwrapped(function))
    path = self._path_of(module)
    description = type(module).__name__
    if method is None:  # a subclass's own method: its base call is captured
      return self._subclass_call(next_fun, args, kwargs, context, base, path)
    outputs = next_fun(*args, **kwargs)
    if path is None:  # its params are not arrays of the first argument
      if _own_params(module):  # (a layer without params has nothing to say)
        where = _tree.format_path(tuple(module.path))
        self.session.params_elsewhere(f'{where} ({description})')
      return outputs
    called = layer_arguments(function, args, kwargs)
    if method not in entries or called is None:
      why = 'not captured' if called else 'called without its input'
      self.session.not_captured(path, description, f'method {method!r} {why}')
      return outputs
    return self.session.apply(
      LayerCall(
        path=path,
        layer_type=entries[method],
        layer=module,
        inputs=called[0],
        kwargs=called[1],
        outputs=outputs,
        params=_own_params(module),
        description=description,
        probe=lambda: module.get_variable('params', PROBE),
      )
    )


def _own_params(module: nn.Module) -> dict[str, Any]:
  """The layer's own parameters by name (boxes opened, probe left out)."""
  params = module.variables.get('params', {})
  return {
    name: _tree.unbox(value)
    for name, value in params.items()
    if name != PROBE and not isinstance(value, Mapping)
  }


def with_probes_in_params(params: Any, session: Session) -> Any:
  """``params`` with each layer's probe next to its params (structural mode)."""
  for path in {p[:-1] for p in session.paths}:
    probe = session.probe(path)
    if probe is not None:
      params = _tree.set_in(params, path + (PROBE,), probe)
  return params


@contextlib.contextmanager
def intercepting(session: Session):
  """Reports the linen layers applied inside the block to ``session``."""
  with nn.intercept_methods(_Interceptor(session)):
    yield
