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
the statistics belong to the layer's true inputs and outputs.
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import numpy as np
from flax.linen.linear import canonicalize_padding

from adafisher_optax import _tree, capture, layers, rules

PROBE = capture.PROBE


# ---------------------------------------------------------------------------
# Adapters: linen layers as rule configurations.
# ---------------------------------------------------------------------------


def _dense(module: nn.Dense, x, kwargs) -> rules.Dense:
  return rules.Dense(use_bias=module.use_bias)


def _dense_general(module: nn.DenseGeneral, x, kwargs) -> rules.Dense:
  if tuple(np.atleast_1d(module.batch_dims)):
    raise layers.UnsupportedCall('DenseGeneral with batch_dims')
  return rules.Dense(
    in_axes=tuple(int(a) for a in np.atleast_1d(module.axis)),
    out_ndim=len(np.atleast_1d(module.features)),
    use_bias=module.use_bias,
  )


def conv_config(module, x, kwargs) -> rules.Conv:
  """``nn.Conv`` and ``nnx.Conv`` (the same attribute names)."""
  kernel_size = tuple(np.atleast_1d(module.kernel_size))
  n = len(kernel_size)
  padding = canonicalize_padding(module.padding, n)
  return rules.Conv(
    kernel_size=kernel_size,
    strides=rules.per_dim(module.strides, n, 'strides'),
    padding=padding if isinstance(padding, str) else tuple(map(tuple, padding)),
    input_dilation=rules.per_dim(module.input_dilation, n, 'input_dilation'),
    kernel_dilation=rules.per_dim(module.kernel_dilation, n, 'kernel_dilation'),
    groups=module.feature_group_count,
    use_bias=module.use_bias,
  )


def embed_config(module, x, kwargs) -> rules.Embed:
  return rules.Embed(module.num_embeddings)


def _norm_axes(feature_axes, ndim: int) -> tuple[int, ...]:
  return tuple(sorted({int(a) % ndim for a in np.atleast_1d(feature_axes)}))


def _check_norm_call(module, x, kwargs) -> None:
  if kwargs.get('mask') is not None:
    raise layers.UnsupportedCall(f'{type(module).__name__} called with a mask')
  if x.ndim < 2:
    raise layers.UnsupportedCall('input without a batch axis')


def token_norm_config(module, x, kwargs) -> rules.Norm:
  """LayerNorm and RMSNorm (linen or NNX): the reference surrogate axis is
  axis 1 of the input as given (the token axis of ``[B, T, D]``), as the
  authors' hooks see a batch-first tensor."""
  _check_norm_call(module, x, kwargs)
  return rules.Norm(
    feature_axes=_norm_axes(module.feature_axes, x.ndim),
    surrogate_axis=1,
    use_scale=module.use_scale,
    use_bias=getattr(module, 'use_bias', False),
  )


def channel_norm_config(module, x, kwargs) -> rules.Norm:
  """BatchNorm (its ``axis``) and GroupNorm (the last axis), linen or NNX:
  the reference surrogate axis is the channel axis, which PyTorch's NCHW
  layout puts at axis 1."""
  _check_norm_call(module, x, kwargs)
  axes = (
    (x.ndim - 1,)
    if hasattr(module, 'num_groups')
    else _norm_axes(module.axis, x.ndim)
  )
  if len(axes) != 1:
    raise layers.UnsupportedCall('more than one feature axis')
  if axes[0] == 0:
    raise layers.UnsupportedCall('input without a batch axis')
  return rules.Norm(
    feature_axes=axes,
    surrogate_axis=axes[0],
    use_scale=module.use_scale,
    use_bias=module.use_bias,
  )


for _cls, _rule, _adapter, _names in (
  (nn.Dense, rules.DENSE, _dense, ('kernel', 'bias')),
  (nn.DenseGeneral, rules.DENSE, _dense_general, ('kernel', 'bias')),
  (nn.Conv, rules.CONV, conv_config, ('kernel', 'bias')),
  (nn.Embed, rules.EMBED, embed_config, ('embedding', None)),
  (nn.LayerNorm, rules.NORM, token_norm_config, ('scale', 'bias')),
  (nn.RMSNorm, rules.NORM, token_norm_config, ('scale', None)),
  (nn.BatchNorm, rules.NORM, channel_norm_config, ('scale', 'bias')),
  (nn.GroupNorm, rules.NORM, channel_norm_config, ('scale', 'bias')),
):
  layers.register_layer(_cls, _rule, _adapter, weight=_names[0], bias=_names[1])

#: The linen layer types the authors' PyTorch code preconditions (Linear,
#: Conv2d, BatchNorm2d, LayerNorm). ``layers=REFERENCE_LAYERS`` reproduces
#: their coverage: everything else gets ``F~ = 1``.
REFERENCE_LAYERS: tuple[type, ...] = (
  nn.Dense,
  nn.DenseGeneral,
  nn.Conv,
  nn.BatchNorm,
  nn.LayerNorm,
)


def supported_layers() -> tuple[type, ...]:
  """Every registered linen layer class."""
  return tuple(c for c in layers.registered() if issubclass(c, nn.Module))


# ---------------------------------------------------------------------------
# The interceptor.
# ---------------------------------------------------------------------------

_BASE_METHODS: dict[type, dict[Any, str]] = {}


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
        found.setdefault(getattr(attr, '__wrapped__', attr), name)
    _BASE_METHODS[base] = found
  return found


def _original_function(context) -> Any:
  func = getattr(context.orig_method, 'func', None)
  if func is None:
    raise capture.CaptureError(
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


def _by_identity(session: capture.Session, params) -> dict:
  """``{path relative to the entry: layer path in the first argument}``.

  A layer matches when each of its params reaching the entry is an array of
  the first argument, all at one layer path.
  """
  by_layer: dict[_tree.Path, set] = {}
  for rel, leaf in params:
    found = session.leaf_paths.get(id(leaf))
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


def _by_structure(session: capture.Session, params) -> dict:
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
    for path in session.leaf_paths.values()
    if path[len(path) - len(first) :] == first
  }
  prefixes = {
    prefix
    for prefix in prefixes
    if all(prefix + rel in session.first_paths for rel, _ in params)
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

  def __init__(
    self, session: capture.Session, allowed: tuple[type, ...] | None
  ):
    self.session = session
    self.allowed = allowed
    self.entries: list[tuple[_tree.Path, dict]] = []

  def __call__(self, next_fun, args, kwargs, context):
    self.session.calls += 1
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
        rel + (PROBE,): self.session.probes[path]
        for rel, path in matched.items()
        if path in self.session.probes and not structural
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

  def _layer_call(self, next_fun, args, kwargs, context):
    module = context.module
    found = layers.lookup(module)
    if (
      found is None
      or module.is_initializing()
      or (self.allowed is not None and not isinstance(module, self.allowed))
    ):
      return next_fun(*args, **kwargs)
    base, layer_type = found
    method = _base_methods(base).get(_original_function(context))
    entry_path, matched = self.entries[-1] if self.entries else ((), {})
    path = matched.get(tuple(module.path)[len(entry_path) :])
    if method is None:  # a subclass's method; its base call is captured
      before = self.session.applications.get(path, 0)
      outputs = next_fun(*args, **kwargs)
      overridden = context.method_name in layer_type.methods
      if (
        path is not None
        and overridden
        and self.session.applications.get(path, 0) == before
      ):
        raise capture.CaptureError(
          f'Layer {_tree.format_path(path)!r} ({type(module).__name__}) ran '
          f'but was not captured: its {context.method_name} does not call '
          f'{base.__name__}.{context.method_name} (or Flax changed how it '
          'wraps methods). Register its class with '
          'adafisher_optax.register_layer, or leave it out with layers=.'
        )
      return outputs
    outputs = next_fun(*args, **kwargs)
    if path is None:  # its params are not arrays of the first argument
      if self.session.discovering:
        self.session.unmatched.append(
          f'{_tree.format_path(tuple(module.path))} ({type(module).__name__})'
        )
      return outputs
    if self.session.mode == 'structural' and not (
      self.session.discovering or _has_probe(module)
    ):
      return outputs  # params of another tree with the same paths
    return self.session.apply(
      path,
      layer_type,
      method,
      module,
      args,
      kwargs,
      outputs,
      get_param=lambda name: _tree.unbox(module.get_variable('params', name)),
      get_probe=lambda: module.get_variable('params', PROBE),
      description=type(module).__name__,
    )


def _has_probe(module: nn.Module) -> bool:
  return module.get_variable('params', PROBE) is not None


def with_probes_in_params(params: Any, probes: dict) -> Any:
  """``params`` with each layer's probe next to its params (structural mode)."""
  for path, probe in probes.items():
    params = _tree.set_in(params, path + (PROBE,), probe)
  return params


@contextlib.contextmanager
def intercepting(session: capture.Session, allowed: tuple[type, ...] | None):
  """Reports the linen layers applied inside the block to ``session``."""
  with nn.intercept_methods(_Interceptor(session, allowed)):
    yield
