"""``value_and_grad_with_curvature``: gradients plus AdaFisher's statistics.

Flax linen models are captured without changing their code, through
``flax.linen.intercept_methods``; pure-JAX models mark their layers with the
ops of :mod:`adafisher_optax.tags`. Both go through the mechanism of
:mod:`adafisher_optax.taps`: one forward and one backward pass inside the
caller's ``jit``, statistics returned as the cotangents of small probes that
travel in ``params`` next to each layer's weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.core import meta

from adafisher_optax import _tree, taps
from adafisher_optax import layers as layers_lib
from adafisher_optax.taps import PROBE, CaptureError, check_numerics

FISHER = ('empirical', 'sampled')


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


def _linen_interceptor(session: taps.Session, allowed: tuple[type, ...]):
  """Routes base-class calls of captured linen layers to ``session``.

  Subclass methods that wrap the base method are passed through: the base
  method's own call is the one captured, so the statistics belong to the
  layer's true inputs and outputs.
  """

  def interceptor(next_fun, args, kwargs, context):
    session.calls += 1
    module = context.module
    rule = layers_lib.rule_for(module)
    if rule is None or not isinstance(module, allowed):
      return next_fun(*args, **kwargs)
    method = _BASE_METHODS[rule.kind].get(
      getattr(context.orig_method, 'func', None)
    )
    if method is None:
      return next_fun(*args, **kwargs)
    outputs = next_fun(*args, **kwargs)
    return session.apply(
      tuple(module.path),
      rule,
      method,
      module,
      args,
      kwargs,
      outputs,
      get_param=lambda name: module.get_variable('params', name),
      get_probe=lambda: module.get_variable('params', PROBE),
      description=type(module).__name__,
    )

  return interceptor


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels, registered for capture.

  The same value as ``optax.softmax_cross_entropy_with_integer_labels(logits,
  labels).mean()``. Inside a capture with ``fisher="sampled"`` the logits are
  recorded, so that the statistics use labels sampled from the model.
  """
  session = taps.current()
  if session is not None:
    session.outputs.append(logits)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _sampled_cotangent(logits: jax.Array, key: jax.Array) -> jax.Array:
  """Gradient of the mean cross-entropy of labels drawn from the model."""
  logits = jax.lax.stop_gradient(logits)
  labels = jax.random.categorical(key, logits)
  probs = jax.nn.softmax(logits)
  one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=probs.dtype)
  return (probs - one_hot) / (logits.size // logits.shape[-1])


def value_and_grad_with_curvature(
  fun: Callable[..., Any],
  *,
  has_aux: bool = False,
  layers: Sequence[type] | None = None,
  numerics: str = 'reference',
  fisher: str = 'empirical',
) -> Callable[..., tuple[Any, Any, Any]]:
  """Like ``jax.value_and_grad(fun)``, also returning AdaFisher's statistics.

  ``fun(params, *args, **kwargs)`` must apply a Flax linen model to
  ``params``, the model's ``"params"`` collection (for example
  ``model.apply({'params': params}, x)``), or a pure-JAX model built with
  :mod:`adafisher_optax.tags`. The returned function computes ``(value,
  grads, curvature)`` in one forward and one backward pass and is meant to be
  called inside the user's ``jax.jit``.

  Args:
    fun: the loss function; differentiated with respect to its first argument.
    has_aux: whether ``fun`` returns ``(loss, aux)``; ``value`` is then
      ``(loss, aux)``, as with ``jax.value_and_grad``.
    layers: the linen layer types to capture (subclasses included); default
      every supported type (:data:`adafisher_optax.SUPPORTED_LAYERS`).
      :data:`adafisher_optax.REFERENCE_LAYERS` reproduces the coverage of the
      authors' code. Parameters of other layers get ``F~ = 1``.
    numerics: ``"reference"`` or ``"paper"``; must match the optimizer's (it
      decides the statistics of normalisation layers).
    fisher: ``"empirical"`` (the gradients of your loss, as the authors do) or
      ``"sampled"``: output-gradient statistics from labels drawn from the
      model's own softmax (a Monte-Carlo estimate of the true Fisher). Then
      ``fun`` computes its loss with
      :func:`adafisher_optax.softmax_cross_entropy` and the returned function
      takes a keyword argument ``fisher_key`` (a ``jax.random`` key). It
      costs one more backward pass per step.

  Returns:
    A function with the signature of ``fun`` returning ``(value, grads,
    curvature)``; ``curvature`` is a nested dict keyed like ``params`` whose
    leaves are :class:`adafisher_optax.LayerStatistics`.
  """
  check_numerics(numerics)
  allowed = _check_layers(layers)
  if fisher not in FISHER:
    raise ValueError(f'fisher must be one of {FISHER}, got {fisher!r}.')

  def traced(session, p, args, kwargs):
    session.index_params(p)
    with session, nn.intercept_methods(_linen_interceptor(session, allowed)):
      out = fun(p, *args, **kwargs)
    return out if has_aux else (out, None)

  @functools.wraps(fun)
  def value_grads_curvature(params, *args, fisher_key=None, **kwargs):
    if not isinstance(params, Mapping):
      raise TypeError(
        'value_and_grad_with_curvature: the first argument of `fun` must be '
        f"the model's params dict, got {type(params).__name__}."
      )
    if (fisher == 'sampled') != (fisher_key is not None):
      raise TypeError(
        'fisher_key: pass a jax.random key exactly when fisher="sampled" '
        f'(fisher={fisher!r}).'
      )
    plan = _discover(traced, params, args, kwargs, numerics, fisher)
    augmented = params
    for path, layer in plan.items():
      if layer.unsupported is None:
        outer = meta.unbox(_tree.get_node(params, path))
        layer.stack = taps.stack_shape(path, layer, outer)
        augmented = _tree.set_node(augmented, path + (PROBE,), layer.probe())
    taps.warn_unsupported(plan)

    def outputs(p):
      session = taps.Session(numerics, plan)
      loss, aux = traced(session, p, args, kwargs)
      return (loss, session.outputs[:1]), aux

    (loss, logits), backward, aux = jax.vjp(outputs, augmented, has_aux=True)
    zeros = jax.tree.map(jnp.zeros_like, logits)
    (grads,) = backward((jnp.ones_like(loss), zeros))
    statistics_source = grads
    if fisher == 'sampled':
      (statistics_source,) = backward(
        (jnp.zeros_like(loss), [_sampled_cotangent(logits[0], fisher_key)])
      )
    curvature = {}
    for path, layer in plan.items():
      if layer.unsupported is None:
        grads, _ = _tree.pop_node(grads, path + (PROBE,))
        cotangent = _tree.get_node(statistics_source, path + (PROBE,))
        curvature[path] = layer.statistics(cotangent, numerics)
    value = (loss, aux) if has_aux else loss
    return value, grads, _tree.nest(curvature)

  return value_grads_curvature


def _discover(traced, params, args, kwargs, numerics, fisher):
  """Traces ``fun`` abstractly once; returns ``{path: taps.Layer}``."""
  session = taps.Session(numerics)
  jax.eval_shape(lambda p: traced(session, p, args, kwargs), params)
  if session.calls == 0 and jax.tree.leaves(params):
    raise CaptureError(
      'value_and_grad_with_curvature: `fun` applied no Flax linen module and '
      'no adafisher_optax.tags op while it was traced. Call the model inside '
      '`fun`, and do not wrap model.apply in a jax.jit created outside `fun`: '
      'a cached compilation skips the interception.'
    )
  session.check_sampled_loss(fisher, 'fun')
  for path, layer in session.plan.items():
    if layer.unsupported is None and not isinstance(
      _tree.get_node(params, path), Mapping
    ):
      raise CaptureError(
        f'Layer {_tree.format_path(path)!r} ({layer.description}) has no '
        f'parameters at params[{"][".join(repr(k) for k in path)}]. The first '
        'argument of `fun` must be the model\'s "params" collection, as '
        "passed to model.apply({'params': params}, ...)."
      )
  return session.plan


def curvature_layout(
  value_grads_curvature: Callable[..., Any], params: Any, *args, **kwargs
) -> Any:
  """The shapes of the curvature a capture function returns, without FLOPs.

  Pass the result as ``layout=`` to the optimizer when its factor sizes cannot
  be read from parameter names (layers stacked by ``nn.scan``, bias-free
  ``DenseGeneral`` layers with several output axes), and to
  :func:`adafisher_optax.accumulate_curvature`.
  """
  return jax.eval_shape(
    lambda p: value_grads_curvature(p, *args, **kwargs)[2], params
  )
