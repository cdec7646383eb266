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
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from adafisher_optax import _tree, flax_serialization, registry, rules
from adafisher_optax import capture as capture_lib
from adafisher_optax.arguments import (
  check_call,
  layer_arguments,
  with_capture_arguments,
)
from adafisher_optax.fisher import check_fisher
from adafisher_optax.flax_adapters import (
  attend_config,
  channel_norm_config,
  conv_config,
  conv_transpose_config,
  einsum_config,
  embed_config,
  token_norm_config,
)
from adafisher_optax.plan import missing_parameter
from adafisher_optax.registry import BuiltIn
from adafisher_optax.session import (
  PROBE,
  CaptureError,
  LayerCall,
  Session,
  current,
)

flax_serialization.register()

#: Static attribute naming a tapped layer's path in the model.
_PATH = '__adafisher_path__'


def _linear(layer: nnx.Linear, x, kwargs) -> rules.Dense:
  return rules.Dense(use_bias=layer.use_bias)


def _linear_general(layer: nnx.LinearGeneral, x, kwargs) -> rules.Dense:
  """Its ``batch_axis`` (leading axes of input, kernel, bias and output)
  are a stack of independent layers."""
  return rules.Dense(
    in_axes=tuple(int(a) for a in np.atleast_1d(layer.axis)),
    out_ndim=len(np.atleast_1d(layer.out_features)),
    use_bias=layer.use_bias,
    batch_ndim=len(layer.batch_axis),
  )


def _einsum(layer: nnx.Einsum, x, kwargs) -> rules.Einsum:
  bias_shape = layer.bias_shape
  return einsum_config(
    layer, x, kwargs, layer.kernel_shape, bias_shape is not None, bias_shape
  )


BUILT_IN: tuple[BuiltIn, ...] = (
  BuiltIn(nnx.Linear, rules.DENSE, _linear),
  BuiltIn(nnx.LinearGeneral, rules.DENSE, _linear_general),
  BuiltIn(nnx.Conv, rules.CONV, conv_config),
  BuiltIn(nnx.ConvTranspose, rules.CONV, conv_transpose_config),
  BuiltIn(nnx.Einsum, rules.EINSUM, _einsum),
  BuiltIn(nnx.Embed, rules.EMBED, embed_config, 'embedding', None),
  BuiltIn(nnx.Embed, rules.ATTEND, attend_config, 'embedding', None, 'attend'),
  BuiltIn(nnx.LayerNorm, rules.NORM, token_norm_config, 'scale', 'bias'),
  BuiltIn(nnx.RMSNorm, rules.NORM, token_norm_config, 'scale', None),
  BuiltIn(nnx.BatchNorm, rules.NORM, channel_norm_config, 'scale', 'bias'),
  BuiltIn(nnx.GroupNorm, rules.NORM, channel_norm_config, 'scale', 'bias'),
)


def register_built_in_layers() -> None:
  """Registers the built-in NNX layers (:data:`BUILT_IN`)."""
  registry.register_all(BUILT_IN)


def supported_layers() -> tuple[type, ...]:
  """Every registered NNX layer class."""
  register_built_in_layers()
  return tuple(c for c in registry.registered() if issubclass(c, nnx.Module))


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


def _own_params(layer: nnx.Module) -> dict[str, Any]:
  return {
    name: value[...]
    for name, value in vars(layer).items()
    if isinstance(value, nnx.Param)
  }


def _frozen(layer: nnx.Module) -> frozenset[str]:
  """Names of the layer's variables that are not ``nnx.Param``."""
  return frozenset(
    name
    for name, value in vars(layer).items()
    if isinstance(value, nnx.Variable) and not isinstance(value, nnx.Param)
  )


def _tapped_method(base: type, name: str) -> Callable[..., Any]:
  """``base.name`` followed by a report to the current session.

  The adapter sees the first argument as the input and the others by name
  (``RMSNorm(x, mask)`` takes its mask positionally).
  """
  original = getattr(base, name)

  @functools.wraps(original)
  def method(self, *args, **kwargs):
    outputs = original(self, *args, **kwargs)
    session = current()
    path = getattr(self, _PATH, None)
    if session is None or path is None:
      return outputs
    session.saw_call()
    called = layer_arguments(original, args, kwargs)
    if called is None:
      why = f'method {name!r} called without its input'
      session.not_captured(path, type(self).__name__, why)
      return outputs
    return session.apply(
      LayerCall(
        path=path,
        layer_type=registry.lookup_class(base)[1][name],
        layer=self,
        inputs=called[0],
        kwargs=called[1],
        outputs=outputs,
        params=_own_params(self),
        description=type(self).__name__,
        probe=lambda: _probe(self, path, session),
        frozen=_frozen(self),
      )
    )

  return method


def _checked_override(cls: type, base: type, name: str) -> Callable[..., Any]:
  """A subclass's own ``name``, reported when it never calls ``base``'s."""
  override = getattr(cls, name)

  @functools.wraps(override)
  def method(self, *args, **kwargs):
    session = current()
    path = getattr(self, _PATH, None)
    if session is None or path is None:
      return override(self, *args, **kwargs)
    before = session.applied(path)
    outputs = override(self, *args, **kwargs)
    if session.applied(path) == before:
      why = f'its {name} does not call {base.__name__}.{name}'
      session.not_captured(path, cls.__name__, why)
    return outputs

  return method


_TAPPED: dict[type, type] = {}


def _tapped_class(cls: type) -> type:
  """The cached reporting subclass of a registered layer class.

  For a user subclass the reporting class of its registered base comes right
  after it in the MRO: the base methods report, also when the subclass wraps
  them, so the statistics belong to the layer's true inputs and outputs (as
  for linen); a registered method the subclass overrides without calling the
  base's is reported as not captured.
  """
  tapped = _TAPPED.get(cls)
  if tapped is None:
    base, entries = registry.lookup_class(cls)
    if cls is base:
      namespace = {name: _tapped_method(base, name) for name in entries}
      bases = (cls,)
    else:
      namespace = {
        name: _checked_override(cls, base, name)
        for name in entries
        if getattr(cls, name) is not getattr(base, name)
      }
      bases = (cls, _tapped_class(base))
    namespace['__module__'] = cls.__module__
    namespace['__qualname__'] = cls.__qualname__
    tapped = _TAPPED[cls] = type(cls)(cls.__name__, bases, namespace)
  return tapped


def _probe(layer: nnx.Module, path: tuple, session: Session) -> Any:
  """The value of ``layer``'s probe, checked against what the capture added."""
  probe = getattr(layer, PROBE, None)
  if probe is None:
    return None
  value = probe.get_value()
  got = {rule: tuple(v['rows'].shape) for rule, v in value.items()}
  want = session.probe_stacks(path)
  wrong = sorted(
    rule for rule in got if rule in want and got[rule] != want[rule]
  )
  if wrong:
    raise CaptureError(
      f'Layer {_tree.format_path(path)!r}: its probe has stack shape '
      f'{got[wrong[0]]} where the layer needs {want[wrong[0]]}: a transform inside '
      "`loss_fn` did not slice it like the layer's parameters. Give "
      'adafisher_optax.nnx.Probe the axes of nnx.Param, e.g. '
      'nnx.StateAxes({(nnx.Param, afo.nnx.Probe): 0, ...: None}).'
    )
  return value


def _registered_layers(
  model: Any, selection: registry.Selection
) -> dict[tuple, nnx.Module]:
  """``{path: layer}`` of the selected registered layers whose weight or
  bias is an ``nnx.Param``."""
  found = {}
  for path, node in nnx.iter_graph(model):
    entry = registry.lookup(node)
    if entry is None or not selection.takes(type(node)):
      continue
    names = {n for t in entry[1].values() for n in (t.weight, t.bias) if n}
    if any(isinstance(getattr(node, n, None), nnx.Param) for n in names):
      found[tuple(path)] = node
    elif not any(hasattr(node, n) for n in names):
      _check_registered_names(tuple(path), node, sorted(names))
  return found


def _check_registered_names(path, layer: nnx.Module, names) -> None:
  """Refuses a registered layer that has parameters, none of them under
  the registered names (a weight frozen as another variable type passes)."""
  own = [n for n, v in vars(layer).items() if isinstance(v, nnx.Param)]
  if own:
    raise missing_parameter(path, type(layer).__name__, names[0], own)


def _tap(model: nnx.Module, session, selection) -> None:
  """Makes the registered layers of a model copy report to the session."""
  for path, layer in _registered_layers(model, selection).items():
    object.__setattr__(layer, '__class__', _tapped_class(type(layer)))
    setattr(layer, _PATH, path)
    probe = session.probe(path)
    if probe is not None:
      setattr(layer, PROBE, Probe(probe))


def _runner(graphdef, rest, loss_fn, selection) -> capture_lib.Run:
  """Runs ``loss_fn`` on a tapped copy of the model merged from ``params``."""

  def run(session, params):
    # New Variable objects, which loss_fn may update inside this trace.
    copy = nnx.merge(graphdef, params, jax.tree.map(lambda v: v, rest))
    _tap(copy[0], session, selection)
    with session:
      out = loss_fn(copy[0], *copy[1], **copy[2])
    return out, nnx.state(copy, _UPDATED)

  return run


def _nothing_applied(registered: dict) -> str:
  found = ', '.join(_tree.format_path(path) for path in registered)
  return (
    'adafisher_optax.nnx.value_and_grad_with_curvature: `loss_fn` applied '
    f"none of the model's registered layers ({found}) while it was traced. "
    'Apply the model `loss_fn` receives as its first argument (not one it '
    'closes over), and do not call it through an nnx.jit or jax.jit created '
    'outside `loss_fn`: a cached compilation skips the capture.'
  )


def value_and_grad_with_curvature(
  loss_fn: Callable[..., Any],
  *,
  has_aux: bool = False,
  layers: Sequence[type] | None = None,
  exclude: Sequence[type] = (),
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
    layers: the layer classes to capture (subclasses included); default
      every registered class.
    exclude: layer classes (subclasses included) not to capture.
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
  register_built_in_layers()
  selection = registry.selection(layers, exclude)
  check_fisher(fisher)

  @functools.wraps(loss_fn)
  def value_grads_curvature(
    model, *args, capture=True, fisher_key=None, **kwargs
  ):
    _check_model(model)
    if not check_call(capture, fisher, fisher_key):
      value, grads = nnx.value_and_grad(loss_fn, has_aux=has_aux)(
        model, *args, **kwargs
      )
      return value, grads, None
    registered = _registered_layers(model, selection)
    if not registered:  # as linen: nothing to capture (the optimizer warns)
      value, grads = nnx.value_and_grad(loss_fn, has_aux=has_aux)(
        model, *args, **kwargs
      )
      return value, grads, {}
    graphdef, params, rest = nnx.split(
      (model, args, kwargs), _model_params, ...
    )
    options = capture_lib.Options(
      'loss_fn',
      has_aux,
      fisher,
      fisher_key,
      selection,
      _nothing_applied(registered),
    )
    value, grads, curvature, updates = capture_lib.drive(
      _runner(graphdef, rest, loss_fn, selection),
      params,
      options,
      layer_params=lambda path: _tree.get_node(params, (0, *path)),
    )
    nnx.update((model, args, kwargs), updates)
    grads = grads[0] if 0 in grads else nnx.State({})
    return value, grads, curvature

  return with_capture_arguments(value_grads_curvature, loss_fn)


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
