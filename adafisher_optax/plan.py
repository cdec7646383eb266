"""What discovery learns about the model: a record per layer path.

A :class:`LayerRecord` holds one :class:`Contribution` per rule that reads
the layer (its parameters' roles and the shapes of its statistics), or the
reason the layer cannot be captured. It makes the layer's zero probe before
the capture and turns the probe's cotangent into
:class:`~adafisher_optax.LayerStatistics` after it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from adafisher_optax import _tree, rules
from adafisher_optax.registry import UnsupportedCall
from adafisher_optax.session import CaptureError, LayerCall
from adafisher_optax.statistics import LayerStatistics


def _without_gradient(tree: Any) -> Any:
  """Statistics are constants: cut the arrays in ``tree`` from autodiff."""
  return jax.tree.map(
    lambda v: jax.lax.stop_gradient(v) if isinstance(v, jax.Array) else v, tree
  )


def missing_parameter(path, description: str, name: str, own) -> CaptureError:
  """The error for a layer registered with a parameter ``name`` it does
  not have (``own``: the names it has)."""
  return CaptureError(
    f'Layer {_tree.format_path(path)!r} ({description}) has no parameter '
    f'{name!r} (its parameters: {", ".join(sorted(own)) or "none"}): '
    'register it with the names it uses, e.g. register_layer(..., '
    "weight='w', bias='b')."
  )


def read_call(
  call: LayerCall,
) -> tuple[rules.Rule, dict[str, str], rules.Application]:
  """``(rule, roles, statistics)`` of one call, read through its adapter
  (``rule``: the registered rule resolved for the call's configuration)."""
  inputs, kwargs, outputs = _without_gradient(
    (call.inputs, dict(call.kwargs), call.outputs)
  )
  layer_type = call.layer_type
  where = f'Layer {_tree.format_path(call.path)!r} ({call.description})'
  try:
    config = layer_type.adapter(call.layer, inputs, kwargs)
  except UnsupportedCall:
    raise
  except Exception as error:
    raise CaptureError(
      f'{where}: its adapter raised {type(error).__name__}: {error}'
    ) from error
  if config is None:
    raise CaptureError(
      f'{where}: its adapter returned None, not the configuration of the '
      "call (the adapter's return?)."
    )
  roles = layer_type.roles(config)
  frozen = {name: role for name, role in roles.items() if name in call.frozen}
  for name, role in frozen.items():
    if role == 'weight':
      raise UnsupportedCall(f'its weight {name!r} is not trained (not a Param)')
  if frozen:  # a frozen bias: a constant, the weight's statistics without it
    roles = {name: role for name, role in roles.items() if name not in frozen}
    if dataclasses.is_dataclass(config) and hasattr(config, 'use_bias'):
      config = dataclasses.replace(config, use_bias=False)
  if not roles:
    raise UnsupportedCall('the layer has no parameters to capture')
  missing = [name for name in roles if name not in call.params]
  if missing:
    raise missing_parameter(
      call.path, call.description, missing[0], call.params
    )
  by_role = {role: _tree.unbox(call.params[n]) for n, role in roles.items()}
  rule = rules.check_rule(layer_type.rule.resolve(config))
  try:
    application = rule.statistics(
      config, inputs, outputs, by_role.get('weight'), by_role.get('bias')
    )
  except UnsupportedCall:
    raise
  except Exception as error:
    raise CaptureError(
      f'{where}: its {rule.name!r} rule raised {type(error).__name__}: '
      f'{error} (is the rule the one for this layer, and the adapter '
      'configuration right?)'
    ) from error
  return rule, roles, application


@dataclasses.dataclass(frozen=True)
class Contribution:
  """What one rule reads from a layer: its parameters and statistics shapes
  (``stack``: the layer's own stack of independent layers, if any)."""

  rule: str
  roles: dict[str, str]
  param_shapes: dict[str, tuple[int, ...]]
  input_shapes: tuple[tuple[int, ...], ...]
  output_shapes: tuple[tuple[int, ...], ...]
  stack: tuple[int, ...] = ()

  def probe(self, stack: tuple[int, ...]) -> dict[str, Any]:
    """A zero probe for the (stacked) layer."""
    dtype = rules.statistics_dtype()

    def zeros(shape):
      return jnp.zeros(stack + shape, dtype)

    return {
      'inputs': tuple(zeros(s) for s in self.input_shapes),
      'outputs': tuple(zeros(s) for s in self.output_shapes),
      'rows': zeros(self.stack),
    }

  def statistics(self, cotangent: dict[str, Any]) -> LayerStatistics:
    names = {role: name for name, role in self.roles.items()}
    return LayerStatistics(
      input_sums=tuple(cotangent['inputs']),
      output_sums=tuple(cotangent['outputs']),
      rows=cotangent['rows'],
      rule=self.rule,
      weight_name=names.get('weight'),
      bias_name=names.get('bias'),
    )


@dataclasses.dataclass
class LayerRecord:
  """What discovery learned about one layer (one parameter path).

  Attributes:
    description: the layer's type, for messages.
    contributions: ``{rule name: Contribution}`` of the rules that read it.
    unsupported: why the layer cannot be captured (then it gets ``F~ = 1``).
    stack: the leading axes by which its params are stacked.
  """

  description: str
  contributions: dict[str, Contribution] = dataclasses.field(
    default_factory=dict
  )
  unsupported: str | None = None
  stack: tuple[int, ...] = ()

  def add(self, call: LayerCall) -> None:
    """Adds one application (raises :class:`UnsupportedCall`)."""
    rule, roles, application = read_call(call)
    output_shapes = jax.eval_shape(application.output_sums, call.outputs)
    contribution = Contribution(
      rule.name,
      roles,
      {n: tuple(jnp.shape(_tree.unbox(call.params[n]))) for n in roles},
      tuple(tuple(a.shape) for a in application.input_sums),
      tuple(tuple(a.shape) for a in output_shapes),
      tuple(application.stack),
    )
    for name, role in roles.items():
      shape = contribution.param_shapes[name]
      why = rule.parameter_mismatch(
        role, shape, contribution.input_shapes, contribution.output_shapes
      )
      if why:
        raise UnsupportedCall(
          f'its {role} {name!r} of shape {shape} does not fit the '
          f'{rule.name!r} rule: {why} (check its registration: weight=, '
          "bias=, the adapter's axes)"
        )
    known = self.contributions.setdefault(contribution.rule, contribution)
    if known != contribution:
      if (known.roles, known.param_shapes) == (
        contribution.roles,
        contribution.param_shapes,
      ):
        shapes = [
          (c.input_shapes, c.output_shapes, c.stack)
          for c in (known, contribution)
        ]
        raise UnsupportedCall(
          f'two applications of its {rule.name!r} rule give statistics of '
          f'different shapes (inputs, outputs, stack: {shapes[0]} and '
          f'{shapes[1]}), which cannot be added: the layer '
          'is applied to inputs whose shapes differ along an axis its '
          "statistics keep (such as the token axis of a norm's reference "
          'statistics)'
        )
      differ = [
        field.name.replace('_', ' ')
        for field in dataclasses.fields(Contribution)
        if getattr(known, field.name) != getattr(contribution, field.name)
      ]
      raise UnsupportedCall(
        f'two applications of its {rule.name!r} rule differ in '
        f'{" and ".join(differ)} (one rule reads one set of parameters of '
        'a layer; two methods reading different parameters need different '
        'rules)'
      )

  def probe(self) -> dict[str, Any]:
    return {r: c.probe(self.stack) for r, c in self.contributions.items()}

  def statistics(self, cotangent: dict[str, Any]) -> Any:
    """One ``LayerStatistics``, or a tuple of them sorted by rule name."""
    found = tuple(
      self.contributions[rule].statistics(cotangent[rule])
      for rule in sorted(self.contributions)
    )
    return found[0] if len(found) == 1 else found

  def stack_shape(self, path: _tree.Path, outer: Any) -> tuple[int, ...]:
    """Leading axes by which ``outer`` (the layer's params as the caller
    holds them, boxed or not) exceed the params inside the model.

    Raises ``UnsupportedCall`` when they differ otherwise (the layer is then
    reported and left at ``F~ = 1``).
    """
    if outer is None:
      raise CaptureError(
        f'Layer {_tree.format_path(path)!r} ({self.description}): the first '
        'argument has no params at this path (a tags op given a name= that '
        'is not its path?).'
      )
    stacks = set()
    for contribution in self.contributions.values():
      for name, inner in contribution.param_shapes.items():
        value = _tree.unbox(_tree.get_node(outer, (name,)))
        shape = tuple(getattr(value, 'shape', ()))
        n = len(shape) - len(inner)
        if value is None or n < 0 or shape[n:] != inner:
          raise UnsupportedCall(
            f'parameter {name!r} has shape {shape} in params but {inner} '
            'inside the model (nn.map_variables reshaped it, or a lifted '
            'transform such as nn.scan or nn.vmap stacked it along an axis '
            "other than the leading ones: variable_axes {'params': 0})"
          )
        stacks.add(shape[:n])
    if len(stacks) != 1:
      raise UnsupportedCall(
        f'its parameters are stacked differently ({sorted(stacks)}): a '
        'lifted transform mapped them over different axes'
      )
    return stacks.pop()


Plan = dict[_tree.Path, LayerRecord]
