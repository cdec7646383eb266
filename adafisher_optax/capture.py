"""Curvature capture for Flax linen models, without changing model code.

:func:`value_and_grad_with_curvature` runs the user's loss function under
``flax.linen.intercept_methods``. Every application of a supported layer (see
:mod:`adafisher_optax.layers`) is wrapped in an identity ``jax.custom_vjp``
"tap" whose forward pass keeps only the small input reduction and whose
backward pass returns, as the cotangent of a tiny zero *probe*, that reduction,
the reduction of the output gradient and the number of rows. The probes live
in the parameter tree next to the layer's own parameters, so Flax's lifted
transforms treat them like the parameters: ``nn.scan`` over stacked layers
slices them per layer, a shared module sums its applications, ``nn.remat``
recomputes them. One forward and one backward pass, inside the caller's
``jit``, and no activation-sized buffer beyond what the model needs anyway.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta

from adafisher_optax import _devices, _tree
from adafisher_optax import layers as layers_lib
from adafisher_optax.statistics import LayerStatistics

#: Name of the probe entry inserted next to a captured layer's parameters.
PROBE = '__adafisher_probe__'


class CaptureError(ValueError):
  """The model cannot be captured as written; the message says why and where."""


class UnsupportedLayerWarning(UserWarning):
  """A supported layer type was applied in a way the capture cannot follow."""


def check_numerics(numerics: str) -> str:
  if numerics not in layers_lib.NUMERICS:
    raise ValueError(
      f'numerics must be one of {layers_lib.NUMERICS}, got {numerics!r}.'
    )
  return numerics


def _check_layers(layers: Sequence[type] | None) -> tuple[type, ...]:
  if layers is None:
    return layers_lib.SUPPORTED_LAYERS
  if isinstance(layers, type) or not isinstance(layers, Sequence):
    raise TypeError(
      f'layers must be a sequence of Flax layer types, got {layers!r}.'
    )
  for layer in layers:
    if not (
      isinstance(layer, type) and issubclass(layer, layers_lib.SUPPORTED_LAYERS)
    ):
      names = ', '.join(t.__name__ for t in layers_lib.SUPPORTED_LAYERS)
      raise TypeError(
        f'layers: {layer!r} is not a supported layer type (or a subclass of '
        f'one); supported: {names}.'
      )
  return tuple(layers)


def _base_methods(rule: layers_lib.LayerRule) -> dict[Any, str]:
  """Original functions of the rule's base classes' public methods."""
  found = {}
  classes = {
    cls
    for module_type in rule.module_types
    for cls in module_type.__mro__
    if issubclass(cls, nn.Module) and cls is not nn.Module
  }
  for cls in classes:
    for name, attr in vars(cls).items():
      if name == 'setup' or (name.startswith('_') and name != '__call__'):
        continue
      found[getattr(attr, '__wrapped__', attr)] = name
  return found


_BASE_METHODS = {
  kind: _base_methods(rule) for kind, rule in layers_lib.REGISTRY.items()
}


def _classify(context, allowed: tuple[type, ...]):
  """Returns ``(rule, method)`` for a base-class method of a captured layer.

  Subclass methods that wrap the base method are passed through: the base
  method's own call is the one captured, so the statistics belong to the
  layer's true inputs and outputs.
  """
  module = context.module
  rule = layers_lib.rule_for(module)
  if rule is None or not isinstance(module, allowed):
    return None, None
  function = getattr(context.orig_method, 'func', None)
  method = _BASE_METHODS[rule.kind].get(function)
  return (rule, method) if method is not None else (None, None)


@dataclasses.dataclass
class _Layer:
  """What discovery learned about one layer (one module path)."""

  rule: layers_lib.LayerRule
  module_type: type
  weight_name: str | None
  bias_name: str | None
  inner_shapes: dict[str, tuple[int, ...]]
  input_shape: tuple[int, ...] | None = None
  output_shape: tuple[int, ...] | None = None
  unsupported: str | None = None
  stack: tuple[int, ...] = ()
  summed_over: tuple[str, ...] = ()


def _discover(fun, params, args, kwargs, allowed, numerics):
  """Traces ``fun`` abstractly once and returns ``{module path: _Layer}``."""
  found: dict[_tree.Path, _Layer] = {}
  calls = [0]

  def interceptor(next_fun, call_args, call_kwargs, context):
    calls[0] += 1
    rule, method = _classify(context, allowed)
    if rule is None:
      return next_fun(*call_args, **call_kwargs)
    module = context.module
    weight_name, bias_name = rule.param_names(module)
    outputs = next_fun(*call_args, **call_kwargs)
    if weight_name is None and bias_name is None:
      return outputs
    path = tuple(module.path)
    shapes = {
      name: tuple(module.get_variable('params', name).shape)
      for name in (weight_name, bias_name)
      if name is not None
    }
    layer = found.setdefault(
      path, _Layer(rule, type(module), weight_name, bias_name, shapes)
    )
    reason = rule.unsupported_reason(module, method, call_args, call_kwargs)
    if reason is None and layer.unsupported is None:
      application = rule.statistics(
        module, call_args, call_kwargs, outputs, numerics
      )
      s_shape = jax.eval_shape(application.output_statistics, outputs).shape
      shapes_now = (tuple(application.input.shape), tuple(s_shape))
      if layer.input_shape is None:
        layer.input_shape, layer.output_shape = shapes_now
      elif shapes_now != (layer.input_shape, layer.output_shape):
        reason = 'applications with different statistics shapes'
    if reason is not None:
      layer.unsupported = layer.unsupported or reason
    return outputs

  def run(p):
    with nn.intercept_methods(interceptor):
      return fun(p, *args, **kwargs)

  jax.eval_shape(run, params)
  if calls[0] == 0 and jax.tree.leaves(params):
    raise CaptureError(
      'value_and_grad_with_curvature: `fun` applied no Flax linen module '
      'while it was traced. Call the model (model.apply) inside `fun`, and '
      'do not wrap model.apply in a jax.jit created outside `fun`: a cached '
      'compilation skips the interception.'
    )
  return found


def _stack_shape(path, layer: _Layer, params) -> tuple[int, ...]:
  """Leading axes by which the parameters outside exceed those inside."""
  node = _tree.get_node(params, path)
  where = _tree.format_path(path)
  if not isinstance(node, Mapping):
    raise CaptureError(
      f'Layer {where!r} ({layer.module_type.__name__}) has no parameters at '
      f'params[{"][".join(repr(k) for k in path)}]. The first argument of '
      '`fun` must be the model\'s "params" collection, as passed to '
      "model.apply({'params': params}, ...)."
    )
  stacks = set()
  for name, inner in layer.inner_shapes.items():
    value = meta.unbox(node.get(name))
    outer = tuple(getattr(value, 'shape', ()))
    n = len(outer) - len(inner)
    if value is None or n < 0 or outer[n:] != inner:
      raise CaptureError(
        f'Layer {where!r}: parameter {name!r} has shape {outer} in params but '
        f'{inner} inside the module. Lifted transforms (nn.scan, nn.vmap) '
        'must stack parameters along leading axes (variable_axes '
        "{'params': 0})."
      )
    stacks.add(outer[:n])
  if len(stacks) != 1:
    raise CaptureError(f'Layer {where!r}: parameters stacked inconsistently.')
  return stacks.pop()


def _without_gradient(tree: Any) -> Any:
  """Statistics are constants: cut the arrays in ``tree`` from autodiff."""
  return jax.tree.map(
    lambda v: jax.lax.stop_gradient(v) if isinstance(v, jax.Array) else v, tree
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def _tap(output_statistics, outputs, probe, input_sum, rows):
  del probe, input_sum
  return outputs


def _tap_fwd(output_statistics, outputs, probe, input_sum, rows):
  del output_statistics, rows
  return outputs, (input_sum, probe)


def _tap_bwd(output_statistics, rows, residuals, g):
  input_sum, probe = residuals
  cotangent = {
    'input': input_sum,
    'output': output_statistics(g),
    'rows': jnp.asarray(rows),
  }

  def like_probe(value, probe_leaf):
    value = value.astype(probe_leaf.dtype)
    missing = _devices.varying_axes(probe_leaf) - _devices.varying_axes(value)
    return _devices.to_varying(value, missing)

  return g, jax.tree.map(like_probe, cotangent, probe), None


_tap.defvjp(_tap_fwd, _tap_bwd)


def _capturing_interceptor(plan: dict, allowed, numerics):
  def interceptor(next_fun, call_args, call_kwargs, context):
    rule, _method = _classify(context, allowed)
    if rule is None:
      return next_fun(*call_args, **call_kwargs)
    module = context.module
    path = tuple(module.path)
    outputs = next_fun(*call_args, **call_kwargs)
    layer = plan.get(path)
    if layer is None or layer.unsupported is not None:
      if layer is None and any(n is not None for n in rule.param_names(module)):
        raise CaptureError(
          f'Layer {_tree.format_path(path)!r} was applied but not seen when '
          '`fun` was first traced; `fun` must apply the same layers each '
          'time it is traced.'
        )
      return outputs
    probe = module.get_variable('params', PROBE)
    where = _tree.format_path(path)
    if probe is None:
      raise CaptureError(
        f'Layer {where!r}: its statistics probe did not reach the module. '
        '`fun` (or a lifted transform such as nn.map_variables or an '
        'nn.scan without params in variable_axes/variable_broadcast) dropped '
        f'the {PROBE!r} entry that value_and_grad_with_curvature adds to '
        'params; pass params through to model.apply unchanged.'
      )
    application = rule.statistics(
      module, *_without_gradient((call_args, call_kwargs, outputs)), numerics
    )
    if tuple(probe['input'].shape) != tuple(application.input.shape):
      raise CaptureError(
        f'Layer {where!r}: probe of shape {probe["input"].shape} does not '
        f'match statistics of shape {application.input.shape}.'
      )
    if probe['input'].dtype != layers_lib.statistics_dtype():
      warnings.warn(
        f'Layer {where!r}: `fun` casts params to {probe["input"].dtype}; its '
        'curvature statistics travel in that precision.',
        UnsupportedLayerWarning,
        stacklevel=2,
      )
    # Inside shard_map the probe is replicated while the outputs vary: mark
    # it varying, so that JAX sums its cotangent over devices as it sums the
    # gradients of replicated parameters.
    spread = _devices.varying_axes(outputs) - _devices.varying_axes(
      probe['rows']
    )
    layer.summed_over = tuple(sorted(set(layer.summed_over) | spread))
    probe = _devices.to_varying(probe, spread)
    return _tap(
      application.output_statistics,
      outputs,
      probe,
      application.input,
      application.rows,
    )

  return interceptor


def value_and_grad_with_curvature(
  fun: Callable[..., Any],
  *,
  has_aux: bool = False,
  layers: Sequence[type] | None = None,
  numerics: str = 'reference',
) -> Callable[..., tuple[Any, Any, Any]]:
  """Like ``jax.value_and_grad(fun)``, also returning AdaFisher's statistics.

  ``fun(params, *args, **kwargs)`` must apply a Flax linen model to
  ``params``, the model's ``"params"`` collection (for example
  ``model.apply({'params': params}, x)``). The returned function computes
  ``(value, grads, curvature)`` in one forward and one backward pass and is
  meant to be called inside the user's ``jax.jit``.

  Args:
    fun: the loss function; differentiated with respect to its first argument.
    has_aux: whether ``fun`` returns ``(loss, aux)``; ``value`` is then
      ``(loss, aux)``, as with ``jax.value_and_grad``.
    layers: the layer types to capture (subclasses included); default every
      supported type (:data:`adafisher_optax.layers.SUPPORTED_LAYERS`).
      :data:`adafisher_optax.layers.REFERENCE_LAYERS` reproduces the coverage
      of the authors' code. Parameters of other layers get ``F~ = 1``.
    numerics: ``"reference"`` or ``"paper"``; must match the optimizer's (it
      decides the statistics of normalisation layers).

  Returns:
    A function with the signature of ``fun`` returning ``(value, grads,
    curvature)``; ``curvature`` is a nested dict keyed like ``params`` whose
    leaves are :class:`adafisher_optax.LayerStatistics`.
  """
  check_numerics(numerics)
  allowed = _check_layers(layers)

  @functools.wraps(fun)
  def value_grads_curvature(params, *args, **kwargs):
    if not isinstance(params, Mapping):
      raise TypeError(
        'value_and_grad_with_curvature: the first argument of `fun` must be '
        f"the model's params dict, got {type(params).__name__}."
      )
    plan = _discover(fun, params, args, kwargs, allowed, numerics)
    dtype = layers_lib.statistics_dtype()
    augmented = params
    skipped = []
    for path, layer in plan.items():
      if layer.unsupported is not None:
        skipped.append(
          f'{_tree.format_path(path)} ({layer.module_type.__name__}'
          f': {layer.unsupported})'
        )
        continue
      layer.stack = _stack_shape(path, layer, params)
      probe = {
        'input': jnp.zeros(layer.stack + layer.input_shape, dtype),
        'output': jnp.zeros(layer.stack + layer.output_shape, dtype),
        'rows': jnp.zeros(layer.stack, dtype),
      }
      augmented = _tree.set_node(augmented, path + (PROBE,), probe)
    if skipped:
      warnings.warn(
        'AdaFisher cannot capture these layers; their parameters get F~ = 1: '
        + '; '.join(skipped),
        UnsupportedLayerWarning,
        stacklevel=2,
      )

    def loss_and_aux(p, *a, **k):
      with nn.intercept_methods(
        _capturing_interceptor(plan, allowed, numerics)
      ):
        out = fun(p, *a, **k)
      return out if has_aux else (out, None)

    (loss, aux), grads = jax.value_and_grad(loss_and_aux, has_aux=True)(
      augmented, *args, **kwargs
    )
    curvature = {}
    for path, layer in plan.items():
      if layer.unsupported is not None:
        continue
      grads, cotangent = _tree.pop_node(grads, path + (PROBE,))
      curvature[path] = LayerStatistics(
        input=cotangent['input'],
        output=cotangent['output'],
        rows=cotangent['rows'],
        kind=layer.rule.kind,
        variant=numerics if layer.rule.numerics_dependent else None,
        weight_name=layer.weight_name,
        bias_name=layer.bias_name,
        summed_over=layer.summed_over,
      )
    value = (loss, aux) if has_aux else loss
    return value, grads, _tree.nest(curvature)

  return value_grads_curvature


def curvature_layout(
  value_grads_curvature: Callable[..., Any], params: Any, *args, **kwargs
) -> Any:
  """The shapes of the curvature a capture function returns, without FLOPs.

  Pass the result as ``layout=`` to the optimizer when its factor sizes cannot
  be read from parameter names (layers stacked by ``nn.scan``, bias-free
  ``DenseGeneral`` layers with several output axes).
  """
  return jax.eval_shape(
    lambda p: value_grads_curvature(p, *args, **kwargs)[2], params
  )
