"""The capture mechanism shared by every front end (Flax linen, NNX, tags).

A capture runs the loss function twice inside the caller's trace:

1. *discovery* (``jax.eval_shape``, no FLOPs) records every application of a
   supported layer: its parameter path, rule and statistics shapes;
2. *capture* (the real ``jax.vjp``) wraps each application in :func:`tap`, an
   identity ``jax.custom_vjp`` whose forward pass keeps only the small input
   reduction and whose backward pass returns, as the cotangent of a zero
   *probe*, that reduction, the output-gradient reduction and the row count.

Probes travel with the layer's own parameters (next to them in the params
tree, or as a variable of the module), so lifted transforms treat them like
the parameters: scans over stacked layers slice them per layer, shared
modules sum their applications, rematerialisation recomputes them.
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def tap(output_statistics, outputs, probe, input_sum, rows):
  """Identity on ``outputs``; its backward pass fills the probe's cotangent."""
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


tap.defvjp(_tap_fwd, _tap_bwd)


def _without_gradient(tree: Any) -> Any:
  """Statistics are constants: cut the arrays in ``tree`` from autodiff."""
  return jax.tree.map(
    lambda v: jax.lax.stop_gradient(v) if isinstance(v, jax.Array) else v, tree
  )


@dataclasses.dataclass
class Layer:
  """What discovery learned about one layer (one parameter path)."""

  rule: layers_lib.LayerRule
  description: str
  weight_name: str | None
  bias_name: str | None
  inner_shapes: dict[str, tuple[int, ...]]
  input_shape: tuple[int, ...] | None = None
  output_shape: tuple[int, ...] | None = None
  unsupported: str | None = None
  stack: tuple[int, ...] = ()
  summed_over: tuple[str, ...] = ()

  def probe(self) -> dict[str, jax.Array]:
    """A zero probe for the stacked layer."""
    dtype = layers_lib.statistics_dtype()
    return {
      'input': jnp.zeros(self.stack + self.input_shape, dtype),
      'output': jnp.zeros(self.stack + self.output_shape, dtype),
      'rows': jnp.zeros(self.stack, dtype),
    }

  def statistics(self, cotangent: dict, numerics: str) -> LayerStatistics:
    return LayerStatistics(
      input=cotangent['input'],
      output=cotangent['output'],
      rows=cotangent['rows'],
      kind=self.rule.kind,
      variant=numerics if self.rule.numerics_dependent else None,
      weight_name=self.weight_name,
      bias_name=self.bias_name,
      summed_over=self.summed_over,
    )


_SESSIONS: list[Session] = []


def current() -> Session | None:
  """The capture session whose ``fun`` is being traced, if any."""
  return _SESSIONS[-1] if _SESSIONS else None


class Session:
  """One discovery or capture pass over the user's loss function."""

  def __init__(self, numerics: str, plan: dict | None = None):
    self.numerics = numerics
    self.discovering = plan is None
    self.plan: dict[_tree.Path, Layer] = {} if plan is None else plan
    self.calls = 0
    self.param_paths: dict[int, _tree.Path] = {}
    self.outputs: list[jax.Array] = []

  def __enter__(self) -> Session:
    _SESSIONS.append(self)
    return self

  def __exit__(self, *exc) -> None:
    _SESSIONS.remove(self)

  def check_sampled_loss(self, fisher: str, fun: str) -> None:
    """With ``fisher="sampled"``, ``fun`` must have made exactly one loss."""
    if fisher == 'sampled' and len(self.outputs) != 1:
      raise CaptureError(
        f'fisher="sampled": `{fun}` must compute its loss with '
        'adafisher_optax.softmax_cross_entropy(logits, labels) exactly once '
        f'(it was called {len(self.outputs)} times).'
      )

  def index_params(self, params: Any) -> None:
    """Remembers the path of every params leaf (tags find theirs by it)."""
    self.param_paths = {
      id(leaf): path for path, leaf in _tree.leaves_with_paths(params)
    }

  def apply(
    self,
    path: _tree.Path,
    rule: layers_lib.LayerRule,
    method: str,
    config: Any,
    args: tuple,
    kwargs: dict,
    outputs: jax.Array,
    get_param: Callable[[str], Any],
    get_probe: Callable[[], Any],
    description: str,
  ) -> jax.Array:
    """Records (discovery) or taps (capture) one application of a layer."""
    weight_name, bias_name = rule.param_names(config)
    if weight_name is None and bias_name is None:
      return outputs
    args, kwargs, stats_outputs = _without_gradient((args, kwargs, outputs))
    if self.discovering:
      self._record(
        path,
        rule,
        method,
        config,
        args,
        kwargs,
        stats_outputs,
        get_param,
        description,
      )
      return outputs
    where = _tree.format_path(path)
    layer = self.plan.get(path)
    if layer is None:
      raise CaptureError(
        f'Layer {where!r} was applied but not seen when `fun` was first '
        'traced; `fun` must apply the same layers each time it is traced.'
      )
    if layer.unsupported is not None:
      return outputs
    probe = get_probe()
    if probe is None:
      raise CaptureError(
        f'Layer {where!r}: its statistics probe did not reach the module. '
        '`fun` (or a lifted transform such as nn.map_variables or an '
        'nn.scan without params in variable_axes/variable_broadcast) dropped '
        f'the {PROBE!r} entry that value_and_grad_with_curvature adds to '
        'params; pass params through to the model unchanged.'
      )
    application = rule.statistics(
      config, args, kwargs, stats_outputs, self.numerics, get_param
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
    return tap(
      application.output_statistics,
      outputs,
      probe,
      application.input,
      application.rows,
    )

  def _record(
    self,
    path,
    rule,
    method,
    config,
    args,
    kwargs,
    outputs,
    get_param,
    description,
  ) -> None:
    weight_name, bias_name = rule.param_names(config)
    shapes = {
      name: tuple(jnp.shape(get_param(name)))
      for name in (weight_name, bias_name)
      if name is not None
    }
    layer = self.plan.setdefault(
      path, Layer(rule, description, weight_name, bias_name, shapes)
    )
    reason = rule.unsupported_reason(config, method, args, kwargs)
    if reason is None and layer.unsupported is None:
      application = rule.statistics(
        config, args, kwargs, outputs, self.numerics, get_param
      )
      s_shape = jax.eval_shape(application.output_statistics, outputs).shape
      shapes_now = (tuple(application.input.shape), tuple(s_shape))
      if layer.input_shape is None:
        layer.input_shape, layer.output_shape = shapes_now
      elif shapes_now != (layer.input_shape, layer.output_shape):
        reason = 'applications with different statistics shapes'
    if reason is not None:
      layer.unsupported = layer.unsupported or reason


def stack_shape(
  path: _tree.Path, layer: Layer, outer: dict[str, Any]
) -> tuple[int, ...]:
  """Leading axes by which the parameters outside exceed those inside.

  Args:
    path: the layer's path (for messages).
    layer: the discovery record.
    outer: the layer's parameters as the caller holds them (by name).
  """
  where = _tree.format_path(path)
  stacks = set()
  for name, inner in layer.inner_shapes.items():
    value = outer.get(name)
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
    raise CaptureError(f'Layer {where!r}: parameters stacked inconsistently.')
  return stacks.pop()


def warn_unsupported(plan: dict[_tree.Path, Layer]) -> None:
  skipped = [
    f'{_tree.format_path(path)} ({layer.description}: {layer.unsupported})'
    for path, layer in plan.items()
    if layer.unsupported is not None
  ]
  if skipped:
    warnings.warn(
      'AdaFisher cannot capture these layers; their parameters get F~ = 1: '
      + '; '.join(skipped),
      UnsupportedLayerWarning,
      stacklevel=3,
    )
