"""Einsum layers: ``y = einsum('<x>,<kernel>-><y>', x, W) (+ b)``.

Each kernel axis is *contracted* (in the input, not the output), an
*output* axis (in the output, not the input) or a *stack* axis (in input,
kernel and output: the kernel is a stack of independent layers along it,
such as the heads ``N`` of ``'BNTH,NHD->BNTD'``). ``H`` runs over the
contracted axes, ``S`` over the output axes, both per stack slice, and the
curvature ``H (x) S`` is laid out in the kernel's own axis order (Gemma's
``'BTD,NDH->BTNH'`` interleaves output and contracted axes).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import opt_einsum

from adafisher_optax import _devices
from adafisher_optax.rules.base import (
  Application,
  KroneckerRule,
  Shape,
  append_entry,
  count,
  statistics_dtype,
)

#: The family's prefix in :data:`adafisher_optax.rules.RULES`.
FAMILY = 'einsum'


@dataclasses.dataclass(frozen=True)
class Einsum:
  """``y = einsum(f'{inputs},{kernel}->{outputs}', x, W) (+ b)``, one letter
  per axis (no ellipsis: :func:`einsum_config` resolves it).

  The bias, if any, runs over the kernel's axes that reach the output, in
  the output's order (as ``nn.Einsum`` lays it out).
  """

  inputs: str
  kernel: str
  outputs: str
  use_bias: bool = True

  @property
  def stack(self) -> str:
    return ''.join(
      a for a in self.kernel if a in self.inputs and a in self.outputs
    )

  @property
  def contracted(self) -> str:
    return ''.join(
      a for a in self.kernel if a in self.inputs and a not in self.outputs
    )

  @property
  def features(self) -> str:
    return ''.join(
      a for a in self.outputs if a in self.kernel and a not in self.inputs
    )


def einsum_config(
  equation: str, input_shape: Shape, kernel_shape: Shape, use_bias: bool
) -> Einsum:
  """The :class:`Einsum` of an equation applied to arrays of these shapes.

  Raises:
    ValueError: (with the reason) for an equation the rule cannot follow.
  """
  equation = equation.replace(' ', '')
  if '->' not in equation or equation.count(',') != 1:
    raise ValueError(
      f'{equation!r} is not an explicit einsum of two operands (x, kernel)'
    )
  try:
    operands, outputs, _ = opt_einsum.parser.parse_einsum_input(
      (
        equation,
        jax.ShapeDtypeStruct(input_shape, jnp.float32),
        jax.ShapeDtypeStruct(kernel_shape, jnp.float32),
      )
    )
  except Exception as error:  # opt_einsum raises several types
    raise ValueError(f'cannot resolve {equation!r}: {error}') from error
  inputs, kernel = operands.split(',')
  config = Einsum(inputs, kernel, outputs, use_bias)
  check_einsum(config)
  return config


def check_einsum(config: Einsum) -> None:
  """Raises ``ValueError`` for an einsum the rule cannot follow."""
  for name in ('inputs', 'kernel', 'outputs'):
    axes = getattr(config, name)
    repeated = sorted({a for a in axes if axes.count(a) > 1})
    if repeated:
      raise ValueError(f'index {repeated[0]!r} repeated in the {name}')
  summed = [a for a in config.kernel if a not in config.inputs + config.outputs]
  if summed:
    raise ValueError(
      f'kernel axis {summed[0]!r} is in neither the input nor the output'
    )
  stack = config.stack
  if not config.kernel.startswith(stack):
    raise ValueError(
      f'the axes {stack!r} shared by the input, kernel and output do not '
      'lead the kernel'
    )
  in_output = ''.join(a for a in config.outputs if a in config.kernel)
  if config.use_bias and not in_output.startswith(stack):
    raise ValueError(
      f'the bias runs over {in_output!r}, not led by the axes {stack!r} '
      'shared by the input, kernel and output'
    )


class EinsumRule(KroneckerRule):
  """:class:`Einsum` layers whose kernel axes follow one pattern.

  The family member for a kernel ``'NDH'`` with ``D`` contracted and the
  output axes ``NH`` (in output order) is named ``'einsum:NDH|D>NH'``;
  stack axes are the kernel's other (leading) axes. ``H`` is over the
  contracted axes in kernel order (plus the bias entry), ``S`` over the
  output axes in output order, both ``[*stack, n]``.
  The family itself (``pattern`` ``None``, :data:`EINSUM`) resolves each
  application's configuration to its member.
  """

  def __init__(self, pattern: tuple[str, str, str] | None = None):
    self.pattern = pattern
    if pattern is None:
      self.name = FAMILY
    else:
      kernel, contracted, features = pattern
      self.name = f'{FAMILY}:{kernel}|{contracted}>{features}'

  def __eq__(self, other):
    return isinstance(other, EinsumRule) and other.pattern == self.pattern

  def __hash__(self):
    return hash(self.pattern)

  def __repr__(self):
    return f'EinsumRule({self.name!r})'

  @classmethod
  def from_name(cls, parameters: str) -> EinsumRule:
    """The member named ``'einsum:' + parameters`` (``ValueError`` for a
    name no einsum gives)."""
    kernel, _, rest = parameters.partition('|')
    contracted, _, features = rest.partition('>')
    stack = kernel[: len(kernel) - len(contracted) - len(features)]
    config = Einsum(stack + contracted, kernel, stack + features, False)
    check_einsum(config)
    rule = cls.resolve(cls(), config)
    if rule.name != f'{FAMILY}:{parameters}':
      raise ValueError(f'no einsum has the rule {FAMILY}:{parameters}')
    return rule

  def resolve(self, config: Einsum) -> EinsumRule:
    return EinsumRule((config.kernel, config.contracted, config.features))

  def statistics(self, config: Einsum, inputs, outputs, weight, bias):
    x = inputs.astype(statistics_dtype())
    summed = tuple(
      i
      for i, a in enumerate(config.inputs)
      if a not in config.kernel + config.outputs
    )
    kept = ''.join(
      a for a in config.inputs if a in config.kernel + config.outputs
    )
    x = jnp.sum(x, axis=summed) if summed else x
    stack = config.stack
    sizes = dict(zip(kept, x.shape))
    stack_shape = tuple(sizes[a] for a in stack)
    h = jnp.einsum(f'{kept}->{stack}{config.contracted}', x * x)
    h = _devices.unsharded(h).reshape(stack_shape + (-1,))
    rows = math.prod(sizes[a] for a in kept if a not in config.kernel)
    if config.use_bias:
      h = append_entry(h, rows)

    def output_sums(g):
      g = g.astype(statistics_dtype())
      s = jnp.einsum(f'{config.outputs}->{stack}{config.features}', g * g)
      return (_devices.unsharded(s).reshape(stack_shape + (-1,)),)

    return Application((h,), rows, output_sums, stack_shape)

  def parameter_mismatch(self, role, shape, input_shapes, output_shapes):
    if role == 'bias' or self.pattern is None:
      return super().parameter_mismatch(
        role, shape, input_shapes, output_shapes
      )
    return None  # the pattern places each kernel axis

  def curvature(self, h, s, numerics, role, shape):
    if role == 'bias' or self.pattern is None:
      return super().curvature(h, s, numerics, role, shape)
    kernel, contracted, features = self.pattern
    own = kernel[len(kernel) - len(contracted) - len(features) :]
    n_stack = h.ndim - 1
    sizes = dict(zip(own, shape[n_stack:]))
    d_in = count(tuple(sizes[a] for a in contracted))
    k = h[..., :d_in, None] * s[..., None, :]
    k = k.reshape(
      shape[:n_stack] + tuple(sizes[a] for a in contracted + features)
    )
    order = contracted + features
    if order == own:
      return k.reshape(shape)
    return jnp.transpose(
      k, tuple(range(n_stack)) + tuple(n_stack + order.index(a) for a in own)
    )


#: The family of einsum rules (``nn.Einsum``, ``nnx.Einsum``).
EINSUM = EinsumRule()
