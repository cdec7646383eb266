"""The capture driver shared by every front end (Flax linen, NNX, tags).

:func:`drive` runs the user's function twice inside the caller's trace:

1. *discovery* (``jax.eval_shape``, no FLOPs) records every application of a
   registered layer whose parameters come from the first argument: its
   path, rule, configuration and statistics shapes;
2. *capture* (the real ``jax.vjp``) wraps each application in :func:`tap`,
   an identity ``jax.custom_vjp`` whose forward pass keeps only the small
   input reduction and whose backward pass returns, as the cotangent of a
   zero *probe*, that reduction, the output-gradient reduction and the row
   count.

A probe is an input of the ``vjp`` next to the params; the front end hands
it to its layer (Flax's lifted transforms slice it per scan iteration, sum
it over shared uses and recompute it under remat), but the user's function
sees exactly the params it was given. The front ends'
``value_and_grad_with_curvature`` (:mod:`adafisher_optax.grad`,
:mod:`adafisher_optax.nnx`) are thin layers on :func:`drive`.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from adafisher_optax import _devices, _tree, layers, rules
from adafisher_optax.statistics import LayerStatistics

FISHER = ('empirical', 'sampled')
#: Where a front end puts a layer's probe (a params entry, an attribute).
PROBE = '__adafisher_probe__'


class CaptureError(ValueError):
  """The model cannot be captured as written; the message says why and where."""


class UnsupportedLayerWarning(UserWarning):
  """A registered layer was applied in a way the capture cannot follow."""


# ---------------------------------------------------------------------------
# The tap: an identity whose backward pass fills a probe's cotangent.
# ---------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def tap(output_sums, outputs, probe, input_sums, rows):
  """Identity on ``outputs``; its backward pass fills the probe's cotangent."""
  del probe, input_sums
  return outputs


def _tap_fwd(output_sums, outputs, probe, input_sums, rows):
  del output_sums, rows
  return outputs, (input_sums, probe)


def _tap_bwd(output_sums, rows, residuals, g):
  input_sums, probe = residuals
  sums = output_sums(g)
  # The row count as data of the backward pass, so that a jax.vmap over the
  # model batches it like the sums and JAX adds it over the mapped axis.
  rows = jnp.where(jnp.isnan(sums[0].reshape(-1)[0]), rows, rows)
  cotangent = {'inputs': input_sums, 'outputs': sums, 'rows': rows}

  def like_probe(value, probe_leaf):
    value = value.astype(probe_leaf.dtype)
    missing = _devices.varying_axes(probe_leaf) - _devices.varying_axes(value)
    return _devices.to_varying(value, missing)

  return g, jax.tree.map(like_probe, cotangent, probe), None


tap.defvjp(_tap_fwd, _tap_bwd)


def _without_gradient(tree: Any) -> Any:
  """Statistics are constants: cut the arrays in ``tree`` from autodiff."""
  return jax.tree.map(
    lambda v: jax.lax.stop_gradient(v) if isinstance(v, jax.Array) else v, tree
  )


# ---------------------------------------------------------------------------
# What discovery learns, and the session a front end reports to.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class LayerRecord:
  """What discovery learned about one layer (one parameter path)."""

  layer_type: layers.LayerType
  description: str
  weight: str | None = None
  bias: str | None = None
  param_shapes: dict[str, tuple[int, ...]] = dataclasses.field(
    default_factory=dict
  )
  input_shapes: tuple[tuple[int, ...], ...] | None = None
  output_shapes: tuple[tuple[int, ...], ...] | None = None
  unsupported: str | None = None
  stack: tuple[int, ...] = ()

  def probe(self) -> dict[str, Any]:
    """A zero probe for the (stacked) layer."""
    dtype = rules.statistics_dtype()

    def zeros(shape):
      return jnp.zeros(self.stack + shape, dtype)

    return {
      'inputs': tuple(zeros(s) for s in self.input_shapes),
      'outputs': tuple(zeros(s) for s in self.output_shapes),
      'rows': zeros(()),
    }

  def statistics(self, cotangent: dict[str, Any]) -> LayerStatistics:
    return LayerStatistics(
      input_sums=tuple(cotangent['inputs']),
      output_sums=tuple(cotangent['outputs']),
      rows=cotangent['rows'],
      rule=self.layer_type.rule.name,
      weight_name=self.weight,
      bias_name=self.bias,
    )


_LOCAL = threading.local()


def current() -> Session | None:
  """The session whose function is being traced in this thread, if any."""
  stack = getattr(_LOCAL, 'sessions', ())
  return stack[-1] if stack else None


class Session:
  """One discovery or capture pass over the user's function.

  Attributes:
    discovering: whether this is the discovery pass.
    mode: how a front end tells the model's layers: ``'identity'`` (their
      params are arrays of the first argument) or ``'structural'`` (their
      params sit at the same paths; the fallback of the linen front end).
    plan: ``{layer path: LayerRecord}`` (filled by discovery).
    probes: ``{layer path: probe}`` of the capture pass.
    leaf_paths: ``{id(array): path}`` of the first argument's arrays, by
      which front ends tell the model's params from other arrays.
    registered_losses: logits recorded by :func:`softmax_cross_entropy`.
    calls: layer-method calls seen (to report a function that applied none).
    applications: ``{layer path: applications that reached`` :meth:`apply`
      ``}``.
    unmatched: layers that ran with params that are not arrays of the first
      argument (reported when no layer at all was captured).
  """

  def __init__(
    self, first_argument: Any, plan=None, probes=None, mode='identity'
  ):
    self.discovering = plan is None
    self.mode = mode
    self.plan: dict[_tree.Path, LayerRecord] = {} if plan is None else plan
    self.probes: dict[_tree.Path, Any] = probes or {}
    self.leaf_paths = {
      id(leaf): path for path, leaf in _tree.leaves_with_paths(first_argument)
    }
    self.first_paths = set(self.leaf_paths.values())
    self.registered_losses: list[jax.Array] = []
    self.calls = 0
    self.applications: dict[_tree.Path, int] = {}
    self.unmatched: list[str] = []

  def __enter__(self) -> Session:
    _LOCAL.sessions = (*getattr(_LOCAL, 'sessions', ()), self)
    return self

  def __exit__(self, *exc) -> None:
    _LOCAL.sessions = tuple(s for s in _LOCAL.sessions if s is not self)

  def apply(
    self,
    path: _tree.Path,
    layer_type: layers.LayerType,
    method: str,
    layer: Any,
    args: tuple,
    kwargs: dict,
    outputs: Any,
    get_param: Callable[[str], Any],
    get_probe: Callable[[], Any],
    description: str,
  ) -> Any:
    """Records (discovery) or taps (capture) one application of a layer.

    Args:
      path: the layer's path in the first argument (its params' parent).
      layer_type: the registry entry.
      method: the name of the applied method.
      layer: the layer object (handed to the adapter).
      args: the call's positional arguments.
      kwargs: the call's keyword arguments.
      outputs: the call's outputs.
      get_param: the layer's parameter of a given name, as the layer sees it.
      get_probe: the probe handed to this layer (``None`` if it got none).
      description: the layer's type, for messages.

    Returns:
      ``outputs``, tapped in the capture pass.
    """
    self.applications[path] = self.applications.get(path, 0) + 1
    inputs_and_kwargs = _without_gradient((args, kwargs))
    stats_outputs = _without_gradient(outputs)
    if self.discovering:
      self._record(
        path,
        layer_type,
        method,
        layer,
        *inputs_and_kwargs,
        stats_outputs,
        get_param,
        description,
      )
      return outputs
    where = _tree.format_path(path)
    record = self.plan.get(path)
    if record is None:
      raise CaptureError(
        f'Layer {where!r} was applied but not seen when the function was '
        'first traced; it must apply the same layers each time it is traced.'
      )
    if record.unsupported is not None:
      return outputs
    probe = get_probe()
    if probe is None and self.mode == 'structural':
      return outputs  # the probes follow the first argument's data
    if probe is None:
      raise CaptureError(
        f'Layer {where!r}: its statistics probe did not reach the layer. A '
        'lifted transform (nn.map_variables, or an nn.scan/nn.vmap without '
        "params in variable_axes/variable_broadcast) filtered the layer's "
        'params: pass them through unchanged.'
      )
    config = record.layer_type.adapter(layer, inputs_and_kwargs[0][0], kwargs)
    application = record.layer_type.rule.statistics(
      config,
      inputs_and_kwargs[0][0],
      stats_outputs,
      *(
        None if n is None else get_param(n)
        for n in (record.weight, record.bias)
      ),
    )
    got = tuple(tuple(a.shape) for a in application.input_sums)
    want = tuple(tuple(a.shape) for a in probe['inputs'])
    if got != want:
      raise CaptureError(
        f'Layer {where!r}: its probe has shapes {want} where the layer needs '
        f"{got}: a transform did not slice it like the layer's parameters."
      )
    # Inside shard_map the probe is replicated while the outputs vary: mark
    # it varying, so that JAX sums its cotangent over devices as it sums the
    # gradients of replicated parameters.
    spread = _devices.varying_axes(outputs) - _devices.varying_axes(
      probe['rows']
    )
    probe = _devices.to_varying(probe, spread)
    return tap(
      application.output_sums,
      outputs,
      probe,
      application.input_sums,
      application.rows,
    )

  def _record(
    self,
    path,
    layer_type,
    method,
    layer,
    args,
    kwargs,
    outputs,
    get_param,
    description,
  ) -> None:
    record = self.plan.setdefault(path, LayerRecord(layer_type, description))
    if record.unsupported is not None:
      return
    try:
      if method not in layer_type.methods:
        raise layers.UnsupportedCall(f'method {method!r} is not captured')
      if not args:
        raise layers.UnsupportedCall('called without a positional input')
      try:
        config = layer_type.adapter(layer, args[0], kwargs)
      except layers.UnsupportedCall:
        raise
      except Exception as error:
        raise CaptureError(
          f'Layer {_tree.format_path(path)!r} ({description}): its adapter '
          f'raised {type(error).__name__}: {error}'
        ) from error
      weight, bias = layer_type.parameter_names(config)
      if weight is None and bias is None:
        raise layers.UnsupportedCall('the layer has no parameters to capture')
      params = {n: get_param(n) for n in (weight, bias) if n is not None}
      application = layer_type.rule.statistics(
        config, args[0], outputs, params.get(weight), params.get(bias)
      )
      output_shapes = jax.eval_shape(application.output_sums, outputs)
      shapes = (
        tuple(tuple(a.shape) for a in application.input_sums),
        tuple(tuple(a.shape) for a in output_shapes),
      )
      param_shapes = {n: tuple(jnp.shape(v)) for n, v in params.items()}
      if record.input_shapes is None:
        record.weight, record.bias = weight, bias
        record.input_shapes, record.output_shapes = shapes
        record.param_shapes = param_shapes
      elif shapes != (record.input_shapes, record.output_shapes):
        raise layers.UnsupportedCall(
          'applications with different statistics shapes'
        )
    except layers.UnsupportedCall as reason:
      record.unsupported = str(reason) or type(reason).__name__

  def register_loss(self, logits: jax.Array) -> None:
    self.registered_losses.append(logits)


def stack_shape(
  path: _tree.Path, record: LayerRecord, outer: Any
) -> tuple[int, ...]:
  """Leading axes by which the parameters outside exceed those inside.

  Args:
    path: the layer's path (for messages).
    record: the discovery record.
    outer: the layer's parameters as the caller holds them (a mapping by
      name, boxed or not).
  """
  where = _tree.format_path(path)
  if outer is None:
    raise CaptureError(
      f'Layer {where!r} ({record.description}): the first argument has no '
      'params at this path (a tags op given a name= that is not its path?).'
    )
  stacks = set()
  for name, inner in record.param_shapes.items():
    value = _tree.unbox(_tree.get_node(outer, (name,)))
    shape = tuple(getattr(value, 'shape', ()))
    n = len(shape) - len(inner)
    if value is None or n < 0 or shape[n:] != inner:
      raise CaptureError(
        f'Layer {where!r}: parameter {name!r} has shape {shape} in params but '
        f'{inner} inside the model. Lifted transforms (nn.scan, nn.vmap, '
        'jax.lax.scan over stacked params) must stack parameters along '
        "leading axes (variable_axes {'params': 0})."
      )
    stacks.add(shape[:n])
  if len(stacks) != 1:
    raise CaptureError(
      f'Layer {where!r}: its parameters are stacked differently '
      f'({sorted(stacks)}): a lifted transform mapped them over different '
      'axes.'
    )
  return stacks.pop()


def _warn_unsupported(plan: dict[_tree.Path, LayerRecord]) -> None:
  skipped = [
    f'{_tree.format_path(path)} ({record.description}: {record.unsupported})'
    for path, record in plan.items()
    if record.unsupported is not None
  ]
  if skipped:
    warnings.warn(
      'AdaFisher cannot capture these layers; their parameters get F~ = 1: '
      + '; '.join(skipped),
      UnsupportedLayerWarning,
      stacklevel=4,
    )


# ---------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------


def split_output(out: Any, has_aux: bool, name: str) -> tuple[Any, Any]:
  """``(loss, aux)`` of the user's function, checked as ``jax.grad`` does."""
  if has_aux:
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
      raise TypeError(
        f'has_aux=True: `{name}` must return a pair (loss, aux), got '
        f'{type(out).__name__}'
        + (f' of length {len(out)}' if isinstance(out, (tuple, list)) else '')
        + '.'
      )
    loss, aux = out
  else:
    loss, aux = out, None
  shape = getattr(loss, 'shape', None)
  if isinstance(loss, (tuple, list)) or shape is None:
    raise TypeError(
      f'`{name}` must return a scalar loss; it returned {type(loss).__name__}'
      + ('. For (loss, aux), pass has_aux=True.' if not has_aux else '.')
    )
  if shape != ():
    raise TypeError(
      f'Gradient only defined for scalar-output functions: `{name}` returned '
      f'a loss of shape {shape} (reduce it, e.g. with .mean()).'
    )
  if not jnp.issubdtype(loss.dtype, jnp.floating):
    raise TypeError(
      f'`{name}` returned a loss of dtype {loss.dtype}; gradients need a '
      'real floating-point loss.'
    )
  return loss, aux


def check_differentiable(params: Any, name: str) -> None:
  found = _tree.first_leaf_not_of(params, jnp.inexact)
  if found is not None:
    raise TypeError(
      f'The first argument of `{name}` must hold floating-point arrays; '
      f'{_tree.format_path(found[0])!r} has dtype {found[1]} (move integer '
      'state out of the differentiated params).'
    )


def _sampled_cotangent(logits: jax.Array, key: jax.Array) -> jax.Array:
  """Gradient of the mean cross-entropy of labels drawn from the model."""
  logits = jax.lax.stop_gradient(logits)
  labels = jax.random.categorical(key, logits)
  probs = jax.nn.softmax(logits)
  one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=probs.dtype)
  return (probs - one_hot) / (logits.size // logits.shape[-1])


def check_fisher(fisher: str) -> str:
  if fisher not in FISHER:
    raise ValueError(f'fisher must be one of {FISHER}, got {fisher!r}.')
  return fisher


def check_call(capture: Any, fisher: str, fisher_key: Any) -> None:
  """The static ``capture`` flag and ``fisher_key`` of one call."""
  if not isinstance(capture, bool):
    raise TypeError(
      'capture must be a Python bool (mark it static, e.g. '
      "jax.jit(step, static_argnames='refresh')), got "
      f'{type(capture).__name__}.'
    )
  if capture and (fisher == 'sampled') != (fisher_key is not None):
    raise TypeError(
      'fisher_key: pass a jax.random key exactly when fisher="sampled" '
      f'(fisher={fisher!r}).'
    )


Run = Callable[[Session, Any], tuple[Any, Any]]


def drive(
  run: Run,
  params: Any,
  *,
  has_aux: bool,
  fisher: str,
  fisher_key: Any,
  name: str,
  on_nothing_applied: Callable[[], Exception],
  layer_params: Callable[[_tree.Path], Any] | None = None,
) -> tuple[Any, Any, Any, Any]:
  """Discovery, then one ``vjp``: ``(value, grads, curvature, extra)``.

  Args:
    run: ``run(session, params) -> (output of the user's function, extra)``:
      calls the user's function with the front end reporting to ``session``;
      ``extra`` (a front end's own output, such as NNX state updates) is
      returned as it is.
    params: the differentiated argument.
    has_aux: whether the function returns ``(loss, aux)``.
    fisher: ``"empirical"`` or ``"sampled"``.
    fisher_key: the key of the sampled Fisher.
    name: the user's function's name in messages.
    on_nothing_applied: the error to raise when no layer was applied.
    layer_params: a layer's params in ``params`` by its path (default
      ``params[path]``).
  """
  if layer_params is None:
    layer_params = functools.partial(_tree.get_node, params)

  def discovered(mode: str) -> Session:
    sessions = []

    def discover(p):
      sessions.append(Session(p, mode=mode))
      out, extra = run(sessions[0], p)
      return split_output(out, has_aux, name), extra

    jax.eval_shape(discover, params)
    return sessions[0]

  discovery = discovered('identity')
  if discovery.calls == 0 and jax.tree.leaves(params):
    raise on_nothing_applied()
  if not discovery.plan and discovery.unmatched:
    fallback = discovered('structural')
    if fallback.plan:
      discovery = fallback
  if not discovery.plan and discovery.unmatched:
    raise CaptureError(
      'No layer was captured: the params of these layers are not arrays of '
      f'the first argument of `{name}`: {"; ".join(discovery.unmatched)}. '
      'Pass the params to the model as they are (cast inside the layers '
      'with dtype=/param_dtype= rather than in the loss).'
    )
  if fisher == 'sampled' and len(discovery.registered_losses) != 1:
    raise CaptureError(
      f'fisher="sampled": `{name}` must compute its loss with '
      'adafisher_optax.softmax_cross_entropy(logits, labels) exactly once '
      f'(it was called {len(discovery.registered_losses)} times).'
    )
  plan = discovery.plan
  for path, record in plan.items():
    if record.unsupported is None:
      record.stack = stack_shape(path, record, layer_params(path))
  _warn_unsupported(plan)
  captured = [path for path, r in plan.items() if r.unsupported is None]
  probes = [plan[path].probe() for path in captured]

  def forward(p, probes):
    session = Session(p, plan, dict(zip(captured, probes)), discovery.mode)
    out, extra = run(session, p)
    loss, aux = split_output(out, has_aux, name)
    return (loss, session.registered_losses[:1]), (aux, extra)

  (loss, logits), backward, (aux, extra) = jax.vjp(
    forward, params, probes, has_aux=True
  )
  grads, probe_cotangents = backward(
    (jnp.ones_like(loss), jax.tree.map(jnp.zeros_like, logits))
  )
  if fisher == 'sampled':
    _, probe_cotangents = backward(
      (jnp.zeros_like(loss), [_sampled_cotangent(logits[0], fisher_key)])
    )
  curvature = {
    path: plan[path].statistics(cotangent)
    for path, cotangent in zip(captured, probe_cotangents)
  }
  value = (loss, aux) if has_aux else loss
  return value, grads, _tree.nest(curvature), extra


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels, registered for capture.

  The same value as ``optax.softmax_cross_entropy_with_integer_labels(logits,
  labels).mean()``. Inside a capture with ``fisher="sampled"`` the logits are
  recorded, so that the statistics use labels sampled from the model.
  """
  session = current()
  if session is not None:
    session.register_loss(logits)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
