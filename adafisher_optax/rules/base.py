"""What every rule shares: the :class:`Rule` interface, the Kronecker-factored
family, the statistics dtype and the reductions of one application."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adafisher_optax import _devices

Numerics = Literal['reference', 'paper']
NUMERICS: tuple[Numerics, ...] = ('reference', 'paper')
Shape = tuple[int, ...]


def statistics_dtype() -> jnp.dtype:
  """float32, or float64 when ``jax_enable_x64`` is on."""
  return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


class Application(NamedTuple):
  """The statistics of one application of a layer.

  Attributes:
    input_sums: forward-pass sums over rows (the ``H`` side), each
      ``[*stack, n]``.
    rows: the number of rows behind them, per slice (static).
    output_sums: maps the gradient ``g`` of the layer's output to the
      backward-pass sums (the ``S`` side).
    stack: the leading axes of a layer that is itself a stack of
      independent layers (a ``DenseGeneral`` with ``batch_dims``, an einsum
      whose kernel shares axes with its input and output); ``()`` otherwise.
  """

  input_sums: tuple[jax.Array, ...]
  rows: int
  output_sums: Callable[[jax.Array], tuple[jax.Array, ...]]
  stack: Shape = ()


def reduced(x: jax.Array, axes: Sequence[int]) -> jax.Array:
  """The sum of ``x`` over ``axes``, replicated (a statistic of a tensor
  sharded by feature under explicit sharding is padded and reshaped next)."""
  return _devices.unsharded(jnp.sum(x, axis=tuple(axes)))


def sum_over_all_but(x: jax.Array, keep: Sequence[int]) -> jax.Array:
  return reduced(x, [i for i in range(x.ndim) if i not in keep])


def sum_of_squares_over_leading(n_trailing: int):
  def reduce(g: jax.Array) -> tuple[jax.Array]:
    g = g.astype(statistics_dtype())
    return (reduced(g * g, range(g.ndim - n_trailing)).reshape(-1),)

  return reduce


def append_entry(h: jax.Array, value: Any) -> jax.Array:
  """``h`` with ``value`` appended on its last axis (such as the bias's
  entry of ``H``), written as a pad and a select: XLA fuses those into every
  reader, whereas a concatenation is a kernel of its own per layer."""
  padded = jnp.pad(h, [(0, 0)] * (h.ndim - 1) + [(0, 1)])
  last = jnp.arange(padded.shape[-1]) == padded.shape[-1] - 1
  return jnp.where(last, jnp.asarray(value, h.dtype), padded)


def count(shape: Shape) -> int:
  return math.prod(shape) if shape else 1


def per_dim(value: Any, n: int, name: str) -> tuple[int, ...]:
  """``value`` (an int, ``None`` or a sequence) as ``n`` ints, for configs."""
  if value is None:
    return (1,) * n
  if isinstance(value, (int, np.integer)):
    return (int(value),) * n
  value = tuple(int(v) for v in value)
  if len(value) != n:
    raise ValueError(f'{name} must have {n} entries, got {value}.')
  return value


class CurvatureSum(NamedTuple):
  """``sum(K)`` of a layer as a static form of its factor vectors.

  ``outer``: ``sum(K) = (weights . h) * sum(s)``; otherwise ``h`` and ``s``
  have one length and ``sum(K) = sum_c s_c * (weights_c * h_c + offsets_c)``.
  A refresh computes the forms of all layers at once, with a few large ops.
  """

  outer: bool
  weights: np.ndarray
  offsets: np.ndarray | None = None


class Rule:
  """The maths of one family of layers.

  Subclasses define :meth:`statistics` (one application), :meth:`means`,
  :meth:`factor_shapes` and :meth:`curvature`; ``output_degrees`` gives the
  power of ``g`` in each backward sum (to rescale sums to an averaged loss).
  """

  name: str
  output_degrees: tuple[int, ...] = (2,)

  def resolve(self, config: Any) -> Rule:
    """The rule doing the maths of one application (``self``; a family of
    rules parametrised by the configuration returns its member)."""
    del config
    return self

  def has_parameters(self, config: Any) -> tuple[bool, bool]:
    """Whether the layer has a weight and a bias (shift)."""
    raise NotImplementedError

  def statistics(
    self,
    config: Any,
    inputs: jax.Array,
    outputs: jax.Array,
    weight: jax.Array | None,
    bias: jax.Array | None,
  ) -> Application:
    """Statistics of one application, from its inputs, outputs and params."""
    raise NotImplementedError

  def means(
    self,
    input_sums: tuple[jax.Array, ...],
    output_sums: tuple[jax.Array, ...],
    rows: jax.Array,
    numerics: Numerics,
  ) -> tuple[jax.Array, jax.Array]:
    """The instantaneous ``(H_hat, S_hat)`` from (combined) sums."""
    raise NotImplementedError

  def factor_shapes(
    self,
    input_shapes: Sequence[Shape],
    output_shapes: Sequence[Shape],
    numerics: Numerics,
  ) -> tuple[Shape, Shape]:
    """Shapes ``[*stack, n]`` of the factors ``H`` and ``S``."""
    raise NotImplementedError

  def parameter_mismatch(
    self,
    role: Literal['weight', 'bias'],
    shape: Shape,
    input_shapes: Sequence[Shape],
    output_shapes: Sequence[Shape],
  ) -> str | None:
    """Why a parameter of ``shape`` (as the layer reads it) cannot take the
    curvature of statistics of these shapes, or ``None`` (the default:
    :meth:`curvature` needs nothing more). Checked at capture, so that a
    registration that does not fit its layer is reported there."""
    del role, shape, input_shapes, output_shapes
    return None

  def curvature(
    self,
    h: jax.Array,
    s: jax.Array,
    numerics: Numerics,
    role: Literal['weight', 'bias'],
    shape: Shape,
  ) -> jax.Array:
    """The undamped ``K`` of one parameter, shaped like it.

    ``h`` and ``s`` are the factors as ``F~`` uses them (min-max normalised
    in ``paper`` numerics).
    """
    raise NotImplementedError

  def curvature_sum(
    self,
    h: jax.Array,
    s: jax.Array,
    numerics: Numerics,
    role: Literal['weight', 'bias'],
    shape: Shape,
  ) -> jax.Array:
    """``sum(K)`` over one parameter per stacked slice, without building it."""
    k = self.curvature(h, s, numerics, role, shape)
    n_stack = h.ndim - 1
    return jnp.sum(k, axis=tuple(range(n_stack, k.ndim)))

  def curvature_sum_form(
    self,
    numerics: Numerics,
    shapes: dict[str, Shape],
    stack: Shape,
    lengths: tuple[int, int],
  ) -> CurvatureSum | None:
    """``sum(K)`` over the parameters ``{role: shape}`` as a static form.

    ``lengths`` are those of ``h`` and ``s``. ``None`` (the default): the
    refresh calls :meth:`curvature_sum` for this layer instead.
    """
    return None


class KroneckerRule(Rule):
  """Dense-like layers: ``K[i, o] = H[i] * S[o]``, the bias uses ``H[-1]``.

  ``H`` holds one entry per (flattened) kernel input, plus the ones-column
  entry last when the layer has a bias; ``S`` one entry per output.
  """

  #: Whether the kernel's trailing axes are its outputs (``[*inputs,
  #: *outputs]``, as :meth:`curvature` reshapes ``H (x) S``); ``False``:
  #: its leading ones (``[*outputs, *inputs]``).
  outputs_last = True

  def has_parameters(self, config):
    return True, bool(getattr(config, 'use_bias', False))

  def means(self, input_sums, output_sums, rows, numerics):
    del numerics
    rows = jnp.maximum(rows, 1)[..., None].astype(input_sums[0].dtype)
    return input_sums[0] / rows, output_sums[0] / rows

  def parameter_mismatch(self, role, shape, input_shapes, output_shapes):
    own = tuple(shape[len(input_shapes[0]) - 1 :])
    n_h, n_s = input_shapes[0][-1], output_shapes[0][-1]
    if role == 'bias':
      if count(own) == n_s:
        return None
      return f'{count(own)} entries for the {n_s} outputs of the statistics'
    splits = [(own[:k], own[k:]) for k in range(len(own) + 1)]
    if not self.outputs_last:
      splits = [(after, before) for before, after in splits]
    if any(
      count(out) == n_s and count(inp) in (n_h, n_h - 1) for inp, out in splits
    ):
      return None
    order = (
      'inputs..., outputs...' if self.outputs_last else 'outputs..., inputs...'
    )
    return (
      f"the statistics have {n_h} input entries (with the bias's, if any) and "
      f'{n_s} outputs, so the rule reads the weight as [{order}] axes'
    )

  def factor_shapes(self, input_shapes, output_shapes, numerics):
    del numerics
    return tuple(input_shapes[0]), tuple(output_shapes[0])

  def curvature(self, h, s, numerics, role, shape):
    del numerics
    if role == 'bias':
      return (h[..., -1:] * s).reshape(shape)
    n_stack = h.ndim - 1
    d_in = count(shape[n_stack:]) // s.shape[-1]
    return (h[..., :d_in, None] * s[..., None, :]).reshape(shape)

  def curvature_sum(self, h, s, numerics, role, shape):
    del numerics
    if role == 'bias':
      return h[..., -1] * jnp.sum(s, axis=-1)
    n_stack = h.ndim - 1
    d_in = count(shape[n_stack:]) // s.shape[-1]
    return jnp.sum(h[..., :d_in], axis=-1) * jnp.sum(s, axis=-1)

  def curvature_sum_form(self, numerics, shapes, stack, lengths):
    del numerics
    weights = np.zeros(lengths[0])
    if 'weight' in shapes:
      weights[: count(shapes['weight'][len(stack) :]) // lengths[1]] += 1
    if 'bias' in shapes:
      weights[-1] += 1
    return CurvatureSum(outer=True, weights=weights)


class RuleTable(dict):
  """Rules by name; a name ``'family:parameters'`` of a registered family
  builds its rule on first use, so that the rule names a state, a layout or
  a checkpoint holds resolve in any process."""

  def __init__(self, rules: Sequence[Rule] = ()):
    super().__init__((rule.name, rule) for rule in rules)
    self.families: dict[str, Callable[[str], Rule]] = {}

  def __missing__(self, name: str) -> Rule:
    family, colon, parameters = name.partition(':')
    if not colon or family not in self.families:
      raise KeyError(name)
    try:
      rule = self.families[family](parameters)
    except ValueError as error:
      raise KeyError(f'{name}: {error}') from None
    return self.check(rule)

  def check(self, rule: Any) -> Rule:
    """Registers ``rule`` by its name (once per name); returns the rule
    registered under it."""
    if not isinstance(rule, Rule):
      raise TypeError(
        f'rule must be an adafisher_optax.rules.Rule (e.g. rules.DENSE), '
        f'got {rule!r}.'
      )
    if not isinstance(getattr(rule, 'name', None), str) or not rule.name:
      raise TypeError(
        f'{type(rule).__name__} has no name: a Rule subclass sets a class '
        "attribute name = '...' (states and checkpoints hold rules by name)."
      )
    known = self.setdefault(rule.name, rule)
    if known is not rule and known != rule:
      raise ValueError(
        f'a different rule named {rule.name!r} is already registered.'
      )
    return known
