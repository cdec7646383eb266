"""The Flax NNX front end (``adafisher_optax.nnx``).

    model = MyModel(rngs=nnx.Rngs(0))  # unchanged model code
    optimizer = nnx.Optimizer(model, afo.adafisher(1e-5), wrt=nnx.Param)
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
own traces. In that copy every registered layer whose weight is an
``nnx.Param`` gets a cached subclass whose methods report to the current
capture session, a static attribute naming its path in the model, and a
:class:`Probe` variable holding its probe, stacked like the layer's
parameters. NNX's lifted transforms therefore slice probes like parameters
(``nnx.scan`` over layers stacked with ``nnx.vmap``), recompute them
(``nnx.remat``) and sum the statistics of shared layers.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from adafisher_optax import _tree, layers, rules
from adafisher_optax import capture as capture_lib
from adafisher_optax.linen import (
  channel_norm_config,
  conv_config,
  embed_config,
  token_norm_config,
)

#: Static attribute naming a tapped layer's path in the model.
_PATH = '__adafisher_path__'


# ---------------------------------------------------------------------------
# Adapters: NNX layers as rule configurations.
# ---------------------------------------------------------------------------


def _linear(layer: nnx.Linear, x, kwargs) -> rules.Dense:
  return rules.Dense(use_bias=layer.use_bias)


def _linear_general(layer: nnx.LinearGeneral, x, kwargs) -> rules.Dense:
  if layer.batch_axis:
    raise layers.UnsupportedCall('LinearGeneral with batch_axis')
  return rules.Dense(
    in_axes=tuple(int(a) for a in np.atleast_1d(layer.axis)),
    out_ndim=len(np.atleast_1d(layer.out_features)),
    use_bias=layer.use_bias,
  )


for _cls, _rule, _adapter, _names in (
  (nnx.Linear, rules.DENSE, _linear, ('kernel', 'bias')),
  (nnx.LinearGeneral, rules.DENSE, _linear_general, ('kernel', 'bias')),
  (nnx.Conv, rules.CONV, conv_config, ('kernel', 'bias')),
  (nnx.Embed, rules.EMBED, embed_config, ('embedding', None)),
  (nnx.LayerNorm, rules.NORM, token_norm_config, ('scale', 'bias')),
  (nnx.RMSNorm, rules.NORM, token_norm_config, ('scale', None)),
  (nnx.BatchNorm, rules.NORM, channel_norm_config, ('scale', 'bias')),
  (nnx.GroupNorm, rules.NORM, channel_norm_config, ('scale', 'bias')),
):
  layers.register_layer(_cls, _rule, _adapter, weight=_names[0], bias=_names[1])


def supported_layers() -> tuple[type, ...]:
  """Every registered NNX layer class."""
  return tuple(c for c in layers.registered() if issubclass(c, nnx.Module))


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


def _tapped_method(base: type, name: str) -> Callable[..., Any]:
  """``base.name`` followed by a report to the current session.

  The adapter sees the first argument as the input and the others by name
  (``RMSNorm(x, mask)`` takes its mask positionally).
  """
  original = getattr(base, name)
  names = list(inspect.signature(original).parameters)[2:]

  @functools.wraps(original)
  def method(self, *args, **kwargs):
    outputs = original(self, *args, **kwargs)
    session = capture_lib.current()
    path = getattr(self, _PATH, None)
    if session is None or path is None:
      return outputs
    session.calls += 1
    by_name = {**dict(zip(names, args[1:])), **kwargs}
    return session.apply(
      path,
      layers.lookup_class(base)[1],
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
  """The cached reporting subclass of a registered layer class.

  For a user subclass the reporting class of its registered base comes right
  after it in the MRO: the base methods report, also when the subclass wraps
  them, so the statistics belong to the layer's true inputs and outputs (as
  for linen).
  """
  tapped = _TAPPED.get(cls)
  if tapped is None:
    base, layer_type = layers.lookup_class(cls)
    if cls is base:
      # Also report the other layer-applying methods (Embed.attend).
      names = layer_type.methods + tuple(
        m for m in ('attend',) if hasattr(base, m)
      )
      namespace = {name: _tapped_method(base, name) for name in names}
      bases = (cls,)
    else:
      namespace, bases = {}, (cls, _tapped_class(base))
    namespace['__module__'] = cls.__module__
    namespace['__qualname__'] = cls.__qualname__
    tapped = _TAPPED[cls] = type(cls)(cls.__name__, bases, namespace)
  return tapped


def _probe(
  layer: nnx.Module, record: capture_lib.LayerRecord, path: tuple
) -> Any:
  """The value of ``layer``'s probe, checked against what the capture added."""
  where = _tree.format_path(path)
  probe = getattr(layer, capture_lib.PROBE, None)
  if probe is None:
    return None
  value = probe.get_value()
  if tuple(value['rows'].shape) != ():
    raise capture_lib.CaptureError(
      f'Layer {where!r}: its probe has stack shape {value["rows"].shape} '
      'where the layer needs (): a transform inside `loss_fn` did not slice it '
      "like the layer's parameters. Give adafisher_optax.nnx.Probe the axes "
      'of nnx.Param, e.g. nnx.StateAxes({(nnx.Param, afo.nnx.Probe): 0, '
      '...: None}).'
    )
  return value


def _registered_layers(model: Any) -> dict[tuple, nnx.Module]:
  """``{path: layer}`` of the registered layers whose weight is a Param."""
  found = {}
  for path, node in nnx.iter_graph(model):
    entry = layers.lookup(node)
    if entry is None:
      continue
    weight = getattr(node, entry[1].weight or '', None)
    bias = getattr(node, entry[1].bias or '', None)
    if isinstance(weight, nnx.Param) or isinstance(bias, nnx.Param):
      found[tuple(path)] = node
  return found


def _tap(model: nnx.Module, probes: dict[tuple, Any]) -> None:
  """Makes the registered layers of a model copy report to the session."""
  for path, layer in _registered_layers(model).items():
    object.__setattr__(layer, '__class__', _tapped_class(type(layer)))
    setattr(layer, _PATH, path)
    if path in probes:
      setattr(layer, capture_lib.PROBE, Probe(probes[path]))


def value_and_grad_with_curvature(
  loss_fn: Callable[..., Any],
  *,
  has_aux: bool = False,
  fisher: str = 'empirical',
) -> Callable[..., tuple[Any, Any, Any]]:
  """Like ``nnx.value_and_grad(loss_fn)``, also returning AdaFisher's statistics.

  ``loss_fn(model, *args, **kwargs)`` applies an NNX model; the returned
  function differentiates it with respect to the model's ``nnx.Param``
  variables in one forward and one backward pass, inside the caller's
  ``nnx.jit`` (``loss_fn`` is traced twice: once abstractly, to find the
  layers). Variables that ``loss_fn`` updates (batch statistics, RNG counts,
  in the model or in other arguments) are updated as by
  ``nnx.value_and_grad``. Registered layers (and subclasses) whose weight is
  an ``nnx.Param`` are captured; other parameters get ``F~ = 1``. With
  ``capture=False`` (a static bool) it is ``nnx.value_and_grad(loss_fn)``
  and the curvature is ``None``.

  Args:
    loss_fn: the loss; its first argument is the model.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; ``value`` is then
      ``(loss, aux)``.
    fisher: ``"empirical"`` or ``"sampled"`` (then ``loss_fn`` computes its
      loss with :func:`adafisher_optax.softmax_cross_entropy` and the returned
      function takes a keyword argument ``fisher_key``), as in
      :func:`adafisher_optax.value_and_grad_with_curvature`.

  Returns:
    A function with the signature of ``loss_fn`` (plus ``capture=`` and
    ``fisher_key=``) returning ``(value, grads, curvature)``: ``grads`` is
    the ``nnx.State`` of the ``nnx.Param`` gradients (as
    ``nnx.value_and_grad`` returns it) and ``curvature`` nested dicts keyed
    like its paths (list items by integers) whose leaves are
    :class:`adafisher_optax.LayerStatistics`, for
    ``optimizer.update(model, grads, curvature=curvature)``.
  """
  capture_lib.check_fisher(fisher)

  @functools.wraps(loss_fn)
  def value_grads_curvature(
    model, *args, capture=True, fisher_key=None, **kwargs
  ):
    _check_model(model)
    capture_lib.check_call(capture, fisher, fisher_key)
    if not capture:
      value, grads = nnx.value_and_grad(loss_fn, has_aux=has_aux)(
        model, *args, **kwargs
      )
      return value, grads, None
    registered = _registered_layers(model)
    if not registered:
      names = ', '.join(f'nnx.{t.__name__}' for t in supported_layers())
      raise capture_lib.CaptureError(
        f'{type(model).__name__} contains no layer AdaFisher can capture '
        f'(supported: {names}, their subclasses and layers registered with '
        'adafisher_optax.register_layer).'
      )
    graphdef, params, rest = nnx.split(
      (model, args, kwargs), _model_params, ...
    )

    def run(session, params):
      # New Variable objects, which loss_fn may update inside this trace.
      copy = nnx.merge(graphdef, params, jax.tree.map(lambda v: v, rest))
      _tap(copy[0], session.probes)
      with session:
        out = loss_fn(copy[0], *copy[1], **copy[2])
      return out, nnx.state(copy, _UPDATED)

    found = ', '.join(_tree.format_path(path) for path in registered)
    value, grads, curvature, updates = capture_lib.drive(
      run,
      params,
      has_aux=has_aux,
      fisher=fisher,
      fisher_key=fisher_key,
      name='loss_fn',
      on_nothing_applied=lambda: capture_lib.CaptureError(
        'adafisher_optax.nnx.value_and_grad_with_curvature: `loss_fn` '
        f"applied none of the model's registered layers ({found}) while it "
        'was traced. Apply the model `loss_fn` receives as its first argument '
        '(not one it closes over), and do not call it through an nnx.jit or '
        'jax.jit created outside `loss_fn`: a cached compilation skips the '
        'capture.'
      ),
      layer_params=lambda path: _tree.get_node(params, (0, *path)),
    )
    nnx.update((model, args, kwargs), updates)
    grads = grads[0] if 0 in grads else nnx.State({})
    return value, grads, curvature

  return value_grads_curvature


def _check_model(model: Any) -> None:
  if not isinstance(model, nnx.Module):
    raise TypeError(
      'adafisher_optax.nnx.value_and_grad_with_curvature: the first argument '
      f'of `loss_fn` must be an nnx.Module, got {type(model).__name__}.'
    )


def curvature_layout(
  value_grads_curvature: Callable[..., Any], model: nnx.Module, *args, **kwargs
) -> Any:
  """The shapes of the curvature a capture function returns, without FLOPs.

  Pass the result as ``layout=`` to the optimizer (layers stacked with
  ``nnx.vmap``, bias-free ``LinearGeneral`` layers with several output axes
  need it). ``model`` and the other arguments are not changed.

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
  'Probe',
  'curvature_layout',
  'supported_layers',
  'value_and_grad_with_curvature',
]
