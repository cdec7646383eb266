"""Curvature capture for Flax NNX models (``adafisher_optax.nnx``).

    model = MyModel(rngs=nnx.Rngs(0))  # unchanged model code
    optimizer = nnx.Optimizer(model, afo.adafisher(1e-3), wrt=nnx.Param)
    grad_fn = afo.nnx.value_and_grad_with_curvature(loss_fn)


    @nnx.jit
    def train_step(model, optimizer, x, y):
      loss, grads, curvature = grad_fn(model, x, y)
      optimizer.update(model, grads, curvature=curvature)
      return loss

There is no attach step and the model is never modified beyond what
``nnx.value_and_grad`` does (its variables updated: batch statistics, RNG
counts). Like ``nnx.value_and_grad``, the capture splits the model and the
other arguments into states and runs ``loss_fn`` on a copy merged inside its
own traces. In that copy every supported layer (:data:`LAYERS`, subclasses
included) gets a cached subclass whose layer methods tap their outputs through
the current :class:`adafisher_optax.taps.Session`, a static attribute naming
its path in the model, and a :class:`Probe` variable holding the zero probe
of :mod:`adafisher_optax.taps`, stacked like the layer's parameters. NNX's
lifted transforms therefore slice probes like parameters (``nnx.scan`` over
layers stacked with ``nnx.vmap``), recompute them (``nnx.remat``) and sum the
statistics of shared layers.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from adafisher_optax import _tree, taps
from adafisher_optax import layers as layers_lib
from adafisher_optax.capture import FISHER, _sampled_cotangent
from adafisher_optax.taps import PROBE, CaptureError, check_numerics

#: The NNX layer types AdaFisher captures (subclasses included): the rule of
#: :data:`adafisher_optax.layers.REGISTRY` each follows, and the methods that
#: apply it. An application by a method the rule does not capture
#: (``Embed.attend``) is reported, and the layer left unpreconditioned.
LAYERS: dict[type, tuple[str, tuple[str, ...]]] = {
  nnx.Linear: ('dense', ('__call__',)),
  nnx.LinearGeneral: ('dense', ('__call__',)),
  nnx.Conv: ('conv', ('__call__',)),
  nnx.Embed: ('embed', ('__call__', 'attend')),
  nnx.LayerNorm: ('layer_norm', ('__call__',)),
  nnx.RMSNorm: ('layer_norm', ('__call__',)),
  nnx.BatchNorm: ('channel_norm', ('__call__',)),
  nnx.GroupNorm: ('channel_norm', ('__call__',)),
}

#: Every NNX layer type with a rule.
SUPPORTED_LAYERS: tuple[type, ...] = tuple(LAYERS)

#: Static attribute naming a tapped layer's path in the model.
_PATH = '__adafisher_path__'


class Probe(nnx.Variable):
  """The statistics probe of one layer, added to the capture's model copy.

  Not an ``nnx.Param``: optimizers built with ``wrt=nnx.Param`` ignore it.
  Lifted transforms inside ``loss_fn`` that split state by type
  (``nnx.StateAxes``) must treat it like ``nnx.Param``.
  """


def _model_params(path: tuple, value: Any) -> bool:
  """The ``nnx.Param`` variables of the model (argument 0 of ``loss_fn``)."""
  return path[0] == 0 and isinstance(value, nnx.Param)


#: Variables whose updates inside ``loss_fn`` reach the caller's objects.
_UPDATED = nnx.All(nnx.Variable, nnx.Not(Probe), nnx.Not(_model_params))


def _tapped_method(base: type, name: str, kind: str) -> Callable[..., Any]:
  """``base.name`` followed by the current session's tap.

  The rule sees the first argument positionally and the others by name
  (``RMSNorm(x, mask)`` takes its mask positionally).
  """
  original = getattr(base, name)
  rule = layers_lib.REGISTRY[kind]
  names = list(inspect.signature(original).parameters)[2:]

  @functools.wraps(original)
  def method(self, *args, **kwargs):
    outputs = original(self, *args, **kwargs)
    session = taps.current()
    path = getattr(self, _PATH, None)
    if session is None or path is None:
      return outputs
    session.calls += 1
    by_name = {**dict(zip(names, args[1:])), **kwargs}
    return session.apply(
      path,
      rule,
      name,
      self,
      args[:1],
      by_name,
      outputs,
      get_param=lambda n: getattr(self, n)[...],
      get_probe=lambda: _probe(self, session.plan[path], path),
      description=type(self).__name__,
    )

  return method


_TAPPED: dict[type, type] = {}


def _tapped_class(cls: type) -> type:
  """The cached tapping subclass of a supported layer class.

  For a user subclass the tapping class of its supported base comes right
  after it in the MRO: the base methods are tapped, also when the subclass
  wraps them, so the statistics belong to the layer's true inputs and
  outputs (as for linen).
  """
  tapped = _TAPPED.get(cls)
  if tapped is None:
    base = next(c for c in cls.__mro__ if c in LAYERS)
    kind, methods = LAYERS[base]
    if cls is base:
      namespace = {name: _tapped_method(base, name, kind) for name in methods}
      bases = (cls,)
    else:
      namespace, bases = {}, (cls, _tapped_class(base))
    namespace['__module__'] = cls.__module__
    namespace['__qualname__'] = cls.__qualname__
    tapped = _TAPPED[cls] = type(cls)(cls.__name__, bases, namespace)
  return tapped


def _probe(layer: nnx.Module, plan_layer: taps.Layer, path: tuple) -> Any:
  """The value of ``layer``'s probe, checked against what the capture added."""
  where = _tree.format_path(path)
  probe = getattr(layer, PROBE, None)
  if probe is None:
    raise CaptureError(
      f'Layer {where!r}: its adafisher_optax.nnx.Probe variable did not '
      'reach the layer; a transform inside `loss_fn` dropped it.'
    )
  value = probe.get_value()
  if tuple(value['input'].shape) != plan_layer.input_shape:
    raise CaptureError(
      f'Layer {where!r}: its probe has shape {value["input"].shape} where the '
      f'layer needs {plan_layer.input_shape}: a transform inside `loss_fn` '
      "did not slice it like the layer's parameters. Give "
      'adafisher_optax.nnx.Probe the axes of nnx.Param, e.g. '
      'nnx.StateAxes({(nnx.Param, afo.nnx.Probe): 0, ...: None}).'
    )
  return value


def _supported_layers(model: Any) -> dict[tuple, nnx.Module]:
  """``{path: layer}`` for every supported layer of ``model``'s graph."""
  return {
    tuple(path): node
    for path, node in nnx.iter_graph(model)
    if isinstance(node, SUPPORTED_LAYERS)
  }


def _tap(model: nnx.Module, probes: dict[tuple, Any] | None) -> None:
  """Makes the supported layers of a model copy tap through the session."""
  for path, layer in _supported_layers(model).items():
    object.__setattr__(layer, '__class__', _tapped_class(type(layer)))
    setattr(layer, _PATH, path)
    if probes is not None and path in probes:
      setattr(layer, PROBE, Probe(probes[path]))


def value_and_grad_with_curvature(
  loss_fn: Callable[..., Any],
  *,
  has_aux: bool = False,
  numerics: str = 'reference',
  fisher: str = 'empirical',
) -> Callable[..., tuple[Any, Any, Any]]:
  """Like ``nnx.value_and_grad(loss_fn)``, also returning AdaFisher's statistics.

  ``loss_fn(model, *args, **kwargs)`` applies an NNX model; the returned
  function differentiates it with respect to the model's ``nnx.Param``
  variables in one forward and one backward pass, inside the caller's
  ``nnx.jit`` (``loss_fn`` is traced twice: once abstractly, to find the
  layers). Variables that ``loss_fn`` updates (batch statistics, RNG counts,
  in the model or in other arguments) are updated as by
  ``nnx.value_and_grad``. Layers of :data:`LAYERS` (and subclasses) are
  captured; other parameters get ``F~ = 1``.

  Args:
    loss_fn: the loss; its first argument is the model.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``value`` is then
      ``(loss, aux)``.
    numerics: ``"reference"`` or ``"paper"``, as for the optimizer.
    fisher: ``"empirical"`` or ``"sampled"`` (then ``loss_fn`` computes its
      loss with :func:`adafisher_optax.softmax_cross_entropy` and the returned
      function takes a keyword argument ``fisher_key``), as in
      :func:`adafisher_optax.value_and_grad_with_curvature`.

  Returns:
    A function with the signature of ``loss_fn`` returning ``(value, grads,
    curvature)``: ``grads`` is the ``nnx.State`` of the ``nnx.Param``
    gradients (as ``nnx.value_and_grad`` returns it) and ``curvature`` nested
    dicts keyed like its paths (list items by integers) whose leaves are
    :class:`adafisher_optax.LayerStatistics`, for
    ``optimizer.update(model, grads, curvature=curvature)``.
  """
  check_numerics(numerics)
  if fisher not in FISHER:
    raise ValueError(f'fisher must be one of {FISHER}, got {fisher!r}.')

  @functools.wraps(loss_fn)
  def value_grads_curvature(model, *args, fisher_key=None, **kwargs):
    if not isinstance(model, nnx.Module):
      raise TypeError(
        'adafisher_optax.nnx.value_and_grad_with_curvature: the first '
        f'argument of `loss_fn` must be an nnx.Module, got '
        f'{type(model).__name__}.'
      )
    if (fisher == 'sampled') != (fisher_key is not None):
      raise TypeError(
        'fisher_key: pass a jax.random key exactly when fisher="sampled" '
        f'(fisher={fisher!r}).'
      )
    layers = _supported_layers(model)
    if not layers:
      names = ', '.join(f'nnx.{t.__name__}' for t in SUPPORTED_LAYERS)
      raise CaptureError(
        f'{type(model).__name__} contains no layer AdaFisher can capture '
        f'(supported: {names} and their subclasses).'
      )
    graphdef, params, rest = nnx.split(
      (model, args, kwargs), _model_params, ...
    )

    def run(session, params, probes):
      # New Variable objects, which loss_fn may update inside this trace.
      copy = nnx.merge(graphdef, params, jax.tree.map(lambda v: v, rest))
      _tap(copy[0], probes)
      with session:
        out = loss_fn(copy[0], *copy[1], **copy[2])
      loss, aux = out if has_aux else (out, None)
      return (loss, session.outputs[:1]), (aux, nnx.state(copy, _UPDATED))

    plan = _discover(run, params, layers, numerics, fisher)
    paths = [path for path, layer in plan.items() if layer.unsupported is None]
    for path in paths:
      layer = plan[path]
      outer = {name: getattr(layers[path], name) for name in layer.inner_shapes}
      layer.stack = taps.stack_shape(path, layer, outer)
    taps.warn_unsupported(plan)

    def forward(params, probes):
      return run(taps.Session(numerics, plan), params, dict(zip(paths, probes)))

    (loss, logits), backward, (aux, updates) = jax.vjp(
      forward, params, [plan[path].probe() for path in paths], has_aux=True
    )
    zeros = jax.tree.map(jnp.zeros_like, logits)
    grads, probes = backward((jnp.ones_like(loss), zeros))
    if fisher == 'sampled':
      _, probes = backward(
        (jnp.zeros_like(loss), [_sampled_cotangent(logits[0], fisher_key)])
      )
    nnx.update((model, args, kwargs), updates)
    curvature = {
      path: plan[path].statistics(cotangent, numerics)
      for path, cotangent in zip(paths, probes)
    }
    grads = grads[0] if 0 in grads else nnx.State({})
    value = (loss, aux) if has_aux else loss
    return value, grads, _tree.nest(curvature)

  return value_grads_curvature


def _discover(run, params, layers, numerics, fisher) -> dict[tuple, taps.Layer]:
  """Traces ``loss_fn`` abstractly once; returns ``{path: taps.Layer}``."""
  session = taps.Session(numerics)
  jax.eval_shape(lambda p: run(session, p, None), params)
  if session.calls == 0:
    found = ', '.join(_tree.format_path(path) for path in layers)
    raise CaptureError(
      'adafisher_optax.nnx.value_and_grad_with_curvature: `loss_fn` applied '
      f"none of the model's supported layers ({found}) while it was traced. "
      'Apply the model `loss_fn` receives as its first argument (not one it '
      'closes over), and do not call it through an nnx.jit or jax.jit created '
      'outside `loss_fn`: a cached compilation skips the capture.'
    )
  session.check_sampled_loss(fisher, 'loss_fn')
  return session.plan


def curvature_layout(
  value_grads_curvature: Callable[..., Any], model: nnx.Module, *args, **kwargs
) -> Any:
  """The shapes of the curvature a capture function returns, without FLOPs.

  Pass the result as ``layout=`` to the optimizer when its factor sizes cannot
  be read from parameter names (layers stacked with ``nnx.vmap``, bias-free
  ``LinearGeneral`` layers with several output axes). ``model`` and the other
  arguments are not changed.

  Args:
    value_grads_curvature: a function from :func:`value_and_grad_with_curvature`.
    model: the model, as passed to it.
    *args: its other arguments (a batch).
    **kwargs: its keyword arguments.

  Returns:
    The curvature tree, with ``jax.ShapeDtypeStruct`` leaves.
  """
  graphdef, state = nnx.split((model, args, kwargs))

  def curvature(state):
    copy = nnx.merge(graphdef, state)
    return value_grads_curvature(copy[0], *copy[1], **copy[2])[2]

  return jax.eval_shape(curvature, state)


__all__ = [
  'LAYERS',
  'SUPPORTED_LAYERS',
  'Probe',
  'curvature_layout',
  'value_and_grad_with_curvature',
]
