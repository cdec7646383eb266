"""The capture driver shared by every front end (Flax linen, NNX, tags).

:func:`drive` runs the user's function twice inside the caller's trace, each
time with a session the front ends report their layer calls to
(:mod:`adafisher_optax.session`):

1. :class:`Discovery` (under ``jax.eval_shape``, no FLOPs) records every
   application of a registered layer whose parameters come from the first
   argument into a :class:`LayerRecord` per layer path: one
   :class:`Contribution` per rule that reads the layer (an ``nn.Embed`` used
   for lookups and ``attend`` has two), with its statistics shapes;
2. :class:`Capture` (the real ``jax.vjp``) wraps each application in
   :func:`tap`, an identity ``jax.custom_vjp`` whose forward pass keeps only
   the small input reduction and whose backward pass returns, as the
   cotangent of a zero *probe*, that reduction, the output-gradient
   reduction and the row count.

A probe is an input of the ``vjp`` next to the params, one per layer (a dict
by rule name); the front end hands it to its layer (Flax's lifted transforms
slice it per scan iteration, sum it over shared uses and recompute it under
remat), but the user's function sees exactly the params it was given.
Applications of one rule at one path add up (shared weights, scan, repeated
calls); different rules at one path are separate statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from adafisher_optax import _devices, _tree
from adafisher_optax.arguments import split_output
from adafisher_optax.fisher import loss_weight_tap, sampled_cotangent
from adafisher_optax.plan import LayerRecord, Plan, read_call
from adafisher_optax.registry import Selection, UnsupportedCall
from adafisher_optax.session import (
  CaptureError,
  LayerCall,
  Mode,
  Session,
  UnsupportedLayerWarning,
)

# ---------------------------------------------------------------------------
# The tap: an identity whose backward pass fills a probe's cotangent.
# ---------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4, 5))
def tap(output_sums, outputs, probe, input_sums, rows, stack):
  """Identity on ``outputs``; its backward pass fills the probe's cotangent
  (``rows`` per slice of the layer's own ``stack``)."""
  del probe, input_sums
  return outputs


def _tap_fwd(output_sums, outputs, probe, input_sums, rows, stack):
  del output_sums, rows, stack
  return outputs, (input_sums, probe)


def _tap_bwd(output_sums, rows, stack, residuals, g):
  input_sums, probe = residuals
  sums = output_sums(g)
  # The row count as data of the backward pass, so that a jax.vmap over the
  # model batches it like the sums and JAX adds it over the mapped axis.
  rows = jnp.full(stack, rows, sums[0].dtype)
  rows = jnp.where(jnp.isnan(sums[0].reshape(-1)[0]), rows, rows)
  cotangent = {'inputs': input_sums, 'outputs': sums, 'rows': rows}

  def like_probe(value, probe_leaf):
    value = _devices.like_sharding(value.astype(probe_leaf.dtype), probe_leaf)
    missing = _devices.varying_axes(probe_leaf) - _devices.varying_axes(value)
    return _devices.to_varying(value, missing)

  return g, jax.tree.map(like_probe, cotangent, probe), None


tap.defvjp(_tap_fwd, _tap_bwd)


class Discovery(Session):
  """The first trace: records the layers into a plan."""

  def __init__(self, first_argument: Any, mode: Mode, selection: Selection):
    super().__init__(first_argument, mode, selection)
    self.plan: Plan = {}
    self.unmatched: list[str] = []
    self.loss_types: list[tuple[Any, frozenset]] = []

  def register_loss(self, logits, value):
    self.loss_types.append((value.dtype, _devices.varying_axes(value)))
    return super().register_loss(logits, value)

  def loss_weight_probe(self) -> jax.Array:
    """A zero scalar typed like the first cross-entropy's value, whose
    cotangent will be the loss's weight on it."""
    dtype, axes = self.loss_types[0]
    return _devices.to_varying(jnp.zeros((), dtype), axes)

  def _apply(self, call: LayerCall) -> Any:
    record = self.plan.setdefault(call.path, LayerRecord(call.description))
    if record.unsupported is None:
      try:
        record.add(call)
      except UnsupportedCall as reason:
        record.unsupported = str(reason) or type(reason).__name__
    return call.outputs

  def probe(self, path):
    return None

  def stack(self, path):
    return ()

  def not_captured(self, path, description, why):
    record = self.plan.setdefault(path, LayerRecord(description))
    record.unsupported = record.unsupported or why

  def params_elsewhere(self, description):
    self.unmatched.append(description)


class Capture(Session):
  """The second trace: taps the planned layers' applications."""

  def __init__(
    self, first_argument, mode, selection, plan: Plan, probes, loss_probe
  ):
    super().__init__(first_argument, mode, selection)
    self.plan = plan
    self.probes = probes
    self.loss_probe = loss_probe
    self.tapped: set[_tree.Path] = set()

  def register_loss(self, logits, value):
    value = super().register_loss(logits, value)
    if self.loss_probe is None or len(self.losses) > 1:
      return value
    return loss_weight_tap(value, self.loss_probe)

  def probe(self, path):
    return self.probes.get(path)

  def stack(self, path):
    return self.plan[path].stack

  def probe_stacks(self, path):
    record = self.plan.get(path)
    if record is None:
      return {}
    return {rule: c.stack for rule, c in record.contributions.items()}

  def not_captured(self, path, description, why):
    del path, description, why  # discovery has reported it

  def params_elsewhere(self, description):
    del description

  def _apply(self, call: LayerCall) -> Any:
    where = _tree.format_path(call.path)
    record = self.plan.get(call.path)
    if record is None:
      raise CaptureError(
        f'Layer {where!r} was applied but not seen when the function was '
        'first traced; it must apply the same layers each time it is traced.'
      )
    if record.unsupported is not None:
      return call.outputs
    probe = call.probe()
    if probe is None and self.mode == 'structural':
      return call.outputs  # another tree's layer at the same path
    if probe is None:
      raise CaptureError(
        f'Layer {where!r}: its statistics probe did not reach the layer. A '
        'lifted transform (nn.map_variables, or an nn.scan/nn.vmap without '
        "params in variable_axes/variable_broadcast) filtered the layer's "
        'params: pass them through unchanged.'
      )
    rule, _, application = read_call(call)
    probe = probe[rule.name]
    got = (tuple(application.stack),) + tuple(
      tuple(a.shape) for a in application.input_sums
    )
    want = (tuple(probe['rows'].shape),) + tuple(
      tuple(a.shape) for a in probe['inputs']
    )
    if got != want:
      raise CaptureError(
        f'Layer {where!r}: its probe has shapes {want} where the layer needs '
        f"{got}: a transform did not slice it like the layer's parameters."
      )
    # Inside shard_map the probe is replicated while the outputs vary: mark
    # it varying, so that JAX sums its cotangent over devices as it sums the
    # gradients of replicated parameters.
    spread = _devices.varying_axes(call.outputs) - _devices.varying_axes(
      probe['rows']
    )
    self.tapped.add(call.path)
    return tap(
      application.output_sums,
      call.outputs,
      _devices.to_varying(probe, spread),
      application.input_sums,
      application.rows,
      tuple(application.stack),
    )


def _warn_unsupported(plan: Plan) -> None:
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
      stacklevel=5,
    )


# ---------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------

#: ``run(session, params) -> (output of the user's function, extra)``: calls
#: the user's function with the front end reporting to ``session``;
#: ``extra`` (a front end's own output, such as NNX state updates) is
#: returned as it is.
Run = Callable[[Session, Any], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class Options:
  """One call of a front end's ``value_and_grad_with_curvature``.

  Attributes:
    name: the user's function's name in messages.
    has_aux: whether the function returns ``(loss, aux)``.
    fisher: ``"empirical"`` or ``"sampled"``.
    fisher_key: the key of the sampled Fisher.
    selection: which registered layers to capture.
    nothing_applied: the message when the function applied no layer.
  """

  name: str
  has_aux: bool
  fisher: str
  fisher_key: Any
  selection: Selection
  nothing_applied: str


_CACHED_TRACE = (
  '`{name}` applied its layers to new arrays, then applied none when traced '
  'again: a jax.checkpoint (jax.remat) or jax.jit wraps `{name}` or the model '
  'call inside it, and JAX reused its cached trace. A jax.checkpoint around '
  'the whole loss saves no memory under value_and_grad (the backward pass '
  'recomputes every residual at once): drop it, or checkpoint blocks of the '
  'model (nn.remat(Block), nnx.remat, jax.checkpoint inside the model), '
  'which the capture follows; call a jitted model from inside `{name}`.'
)


def discover(run: Run, params: Any, options: Options) -> Discovery:
  """The discovery pass, falling back to matching by path when no layer's
  params are arrays of the first argument."""

  def discovered(mode: Mode) -> Discovery:
    sessions = []

    def trace(p):
      sessions.append(Discovery(p, mode, options.selection))
      out, extra = run(sessions[0], p)
      return split_output(out, options.has_aux, options.name), extra

    jax.eval_shape(trace, params)
    return sessions[0]

  discovery = discovered('identity')
  if discovery.calls == 0 and jax.tree.leaves(params):
    raise CaptureError(options.nothing_applied)
  if not discovery.plan and discovery.unmatched:
    fallback = discovered('structural')
    if fallback.plan:
      return fallback
    if fallback.calls == 0:
      raise CaptureError(_CACHED_TRACE.format(name=options.name))
    raise CaptureError(
      'No layer was captured: the params of these layers are not arrays of '
      f'the first argument of `{options.name}`: '
      f'{"; ".join(discovery.unmatched)}. Pass the params to the model as '
      'they are (cast inside the layers with dtype=/param_dtype= rather than '
      'in the loss).'
    )
  return discovery


def drive(
  run: Run,
  params: Any,
  options: Options,
  layer_params: Callable[[_tree.Path], Any] | None = None,
) -> tuple[Any, Any, Any, Any]:
  """Discovery, then one ``vjp``: ``(value, grads, curvature, extra)``.

  ``layer_params(path)`` is a layer's params in ``params`` (default
  ``params[path]``).
  """
  if layer_params is None:
    layer_params = functools.partial(_tree.get_node, params)
  discovery = discover(run, params, options)
  if options.fisher == 'sampled' and len(discovery.losses) != 1:
    raise CaptureError(
      f'fisher="sampled": `{options.name}` must compute its loss with '
      'adafisher_optax.softmax_cross_entropy(logits, labels) exactly once '
      f'(it was called {len(discovery.losses)} times).'
    )
  plan = discovery.plan
  for path, record in plan.items():
    if record.unsupported is None:
      try:
        record.stack = record.stack_shape(path, layer_params(path))
      except UnsupportedCall as reason:
        record.unsupported = str(reason)
  captured = [path for path, r in plan.items() if r.unsupported is None]
  _warn_unsupported(plan)
  probes = [plan[path].probe() for path in captured]

  sampled = options.fisher == 'sampled'
  loss_probe = discovery.loss_weight_probe() if sampled else None

  def forward(p, probes, loss_probe):
    session = Capture(
      p, discovery.mode, options.selection, plan, dict(zip(captured, probes)),
      loss_probe,
    )  # fmt: skip
    out, extra = run(session, p)
    loss, aux = split_output(out, options.has_aux, options.name)
    if captured and not session.tapped:
      raise CaptureError(
        f'No captured layer read the params of the first argument of '
        f'`{options.name}` (its gradients would be zero): apply the model '
        'to the params `fun` receives, not to params it closes over.'
      )
    return (loss, session.losses[:1]), (aux, extra)

  try:
    (loss, logits), backward, (aux, extra) = jax.vjp(
      forward, params, probes, loss_probe, has_aux=True
    )
    grads, cotangents, weight = backward(
      (jnp.ones_like(loss), jax.tree.map(jnp.zeros_like, logits))
    )
    if sampled:
      if not logits:  # registered in discovery, not here
        raise CaptureError(
          'fisher="sampled": adafisher_optax.softmax_cross_entropy was not '
          f'called when `{options.name}` was traced again: a jax.checkpoint '
          '(jax.remat) or jax.jit around it reused its cached trace; call '
          f'it in `{options.name}` itself.'
        )
      # Weighted as the loss weighs the cross-entropy; one the loss does
      # not use (registered only, in aux) counts as a mean.
      cotangent = sampled_cotangent(logits[0], options.fisher_key)
      weight = jnp.where(weight == 0, 1, weight).astype(cotangent.dtype)
      cotangent = cotangent * weight
      _, cotangents, _ = backward((jnp.zeros_like(loss), [cotangent]))
  except jax.errors.UnexpectedTracerError as error:
    if not sampled:
      raise
    raise CaptureError(
      'fisher="sampled": adafisher_optax.softmax_cross_entropy was called '
      'inside a transformation of the loss (jax.vmap, lax.scan, a nested '
      f'jit), whose logits cannot leave it; call it in `{options.name}` '
      'itself, on the logits of the whole batch.'
    ) from error
  curvature = {
    path: plan[path].statistics(cotangent)
    for path, cotangent in zip(captured, cotangents)
  }
  value = (loss, aux) if options.has_aux else loss
  return value, grads, _tree.nest(curvature), extra
