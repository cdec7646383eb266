"""The per-layer maths of AdaFisher, in pure JAX (``ADAFISHER_SPEC.md`` 1-3).

A layer's computation is described by a small typed configuration
(:class:`Dense`, :class:`Conv`, :class:`Embed`, :class:`Norm`); a
:class:`Rule` turns one application of such a layer into statistics (sums
over rows, so applications and devices add up), those sums into the
instantaneous ``(H_hat, S_hat)`` of either numerics, and the layer's factor
vectors into the undamped curvature ``K`` of each of its parameters, whose
damped form is ``F~``. Nothing here knows about Flax: front ends
(:mod:`adafisher_optax.linen`, :mod:`adafisher_optax.nnx`,
:mod:`adafisher_optax.tags`) turn their layers into configurations.

The statistics serve both numerics at once, so a capture never needs to know
which numerics the optimizer uses.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Numerics = Literal['reference', 'paper']
NUMERICS: tuple[Numerics, ...] = ('reference', 'paper')
Shape = tuple[int, ...]


def statistics_dtype() -> jnp.dtype:
  """float32, or float64 when ``jax_enable_x64`` is on."""
  return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


# ---------------------------------------------------------------------------
# Configurations: what a rule needs to know about a layer.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Dense:
  """``y = x . W (+ b)``: the ``in_axes`` of ``x`` contract with the kernel's
  leading axes, whose ``out_ndim`` trailing axes are the output's last axes."""

  in_axes: tuple[int, ...] = (-1,)
  out_ndim: int = 1
  use_bias: bool = True


@dataclasses.dataclass(frozen=True)
class Conv:
  """A channels-last convolution with a kernel ``[*kernel_size, c_in/G, c_out]``.

  ``padding`` is ``'SAME'``, ``'VALID'``, ``'CIRCULAR'``, ``'REFLECT'``,
  ``'CAUSAL'`` or one ``(low, high)`` pair per spatial axis.
  """

  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: str | tuple[tuple[int, int], ...]
  input_dilation: tuple[int, ...]
  kernel_dilation: tuple[int, ...]
  groups: int = 1
  use_bias: bool = True


@dataclasses.dataclass(frozen=True)
class Embed:
  """A lookup ``table[ids]`` in a table ``[num_embeddings, features]``."""

  num_embeddings: int


@dataclasses.dataclass(frozen=True)
class Norm:
  """A normalisation with a per-feature scale and shift.

  Attributes:
    feature_axes: the input axes the scale and shift run over.
    surrogate_axis: the axis ``k`` of the authors' surrogate statistics in
      ``reference`` numerics (axis 1 of their batch-first layout: the channel
      axis for BatchNorm and GroupNorm, the token axis of a ``[B, T, D]``
      LayerNorm input).
    use_scale: whether the layer has a scale.
    use_bias: whether the layer has a shift.
  """

  feature_axes: tuple[int, ...]
  surrogate_axis: int
  use_scale: bool = True
  use_bias: bool = True


Config = Dense | Conv | Embed | Norm


class Application(NamedTuple):
  """The statistics of one application of a layer.

  Attributes:
    input_sums: forward-pass sums over rows (the ``H`` side).
    rows: the number of rows behind them (static).
    output_sums: maps the gradient ``g`` of the layer's output to the
      backward-pass sums (the ``S`` side).
  """

  input_sums: tuple[jax.Array, ...]
  rows: int
  output_sums: Callable[[jax.Array], tuple[jax.Array, ...]]


def _sum_over_all_but(x: jax.Array, keep: Sequence[int]) -> jax.Array:
  return jnp.sum(x, axis=tuple(i for i in range(x.ndim) if i not in keep))


def _sum_of_squares_over_leading(n_trailing: int):
  def reduce(g: jax.Array) -> tuple[jax.Array]:
    g = g.astype(statistics_dtype())
    return (jnp.sum(g * g, axis=tuple(range(g.ndim - n_trailing))).reshape(-1),)

  return reduce


def _count(shape: Shape) -> int:
  return math.prod(shape) if shape else 1


# ---------------------------------------------------------------------------
# Rules.
# ---------------------------------------------------------------------------


class Rule:
  """The maths of one family of layers.

  Subclasses define :meth:`statistics` (one application), :meth:`means`,
  :meth:`factor_shapes` and :meth:`curvature`; ``output_degrees`` gives the
  power of ``g`` in each backward sum (to rescale sums to an averaged loss).
  """

  name: str
  output_degrees: tuple[int, ...] = (2,)

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


class KroneckerRule(Rule):
  """Dense-like layers: ``K[i, o] = H[i] * S[o]``, the bias uses ``H[-1]``.

  ``H`` holds one entry per (flattened) kernel input, plus the ones-column
  entry last when the layer has a bias; ``S`` one entry per output.
  """

  def has_parameters(self, config):
    return True, bool(getattr(config, 'use_bias', False))

  def means(self, input_sums, output_sums, rows, numerics):
    del numerics
    rows = jnp.maximum(rows, 1)[..., None].astype(input_sums[0].dtype)
    return input_sums[0] / rows, output_sums[0] / rows

  def factor_shapes(self, input_shapes, output_shapes, numerics):
    del numerics
    return tuple(input_shapes[0]), tuple(output_shapes[0])

  def curvature(self, h, s, numerics, role, shape):
    del numerics
    if role == 'bias':
      return (h[..., -1:] * s).reshape(shape)
    n_stack = h.ndim - 1
    d_in = _count(shape[n_stack:]) // s.shape[-1]
    return (h[..., :d_in, None] * s[..., None, :]).reshape(shape)

  def curvature_sum(self, h, s, numerics, role, shape):
    del numerics
    if role == 'bias':
      return h[..., -1] * jnp.sum(s, axis=-1)
    n_stack = h.ndim - 1
    d_in = _count(shape[n_stack:]) // s.shape[-1]
    return jnp.sum(h[..., :d_in], axis=-1) * jnp.sum(s, axis=-1)


class DenseRule(KroneckerRule):
  """:class:`Dense`: rows are every axis of ``x`` that is not contracted."""

  name = 'dense'

  def statistics(self, config: Dense, inputs, outputs, weight, bias):
    x = inputs.astype(statistics_dtype())
    contracted = sorted({a % x.ndim for a in config.in_axes})
    h = _sum_over_all_but(x * x, contracted).reshape(-1)
    rows = _count(
      tuple(d for i, d in enumerate(x.shape) if i not in contracted)
    )
    if config.use_bias:
      h = jnp.append(h, jnp.asarray(rows, h.dtype))
    return Application(
      (h,), rows, _sum_of_squares_over_leading(config.out_ndim)
    )


def conv_input_padding(config: Conv, x: jax.Array):
  """Pads ``x`` (``[batch, *spatial, c_in]``) as the convolution pads it.

  Returns:
    ``(x, pads)``: the input after circular, reflective or causal padding,
    and the remaining explicit ``(low, high)`` zero padding per spatial axis.
  """
  n = len(config.kernel_size)
  dilated_kernel = [
    (k - 1) * d + 1 for k, d in zip(config.kernel_size, config.kernel_dilation)
  ]
  padding = config.padding
  if padding in ('CIRCULAR', 'REFLECT'):
    pads = [((k - 1) // 2, k // 2) for k in dilated_kernel]
    mode = {'CIRCULAR': 'wrap', 'REFLECT': 'reflect'}[padding]
    return jnp.pad(x, [(0, 0), *pads, (0, 0)], mode=mode), [(0, 0)] * n
  if padding == 'CAUSAL':
    x = jnp.pad(x, [(0, 0), (dilated_kernel[0] - 1, 0), (0, 0)])
    return x, [(0, 0)] * n
  if isinstance(padding, str):  # as lax.conv_general_dilated: undilated input
    return x, jax.lax.padtype_to_pads(
      x.shape[1 : n + 1], dilated_kernel, config.strides, padding
    )
  return x, [tuple(p) for p in padding]


def _window_matrix(
  size: int,
  low_pad: int,
  input_dilation: int,
  kernel_size: int,
  kernel_dilation: int,
  stride: int,
  out_size: int,
) -> np.ndarray:
  """``M[j, o] = 1`` when input position ``j`` meets kernel offset ``o``.

  Along one spatial axis, input ``j`` sits at ``low_pad + j *
  input_dilation`` of the padded, dilated input, and kernel offset ``o``
  reads positions ``o * kernel_dilation + p * stride`` for every output
  position ``p``; padding zeros contribute nothing.
  """
  matrix = np.zeros((size, kernel_size))
  for j in range(size):
    for o in range(kernel_size):
      q = low_pad + j * input_dilation - o * kernel_dilation
      if q >= 0 and q % stride == 0 and q // stride < out_size:
        matrix[j, o] = 1.0
  return matrix


class ConvRule(KroneckerRule):
  """:class:`Conv` (any spatial rank, strides, padding, dilations, groups).

  ``H`` sums squared im2col patch entries without building patches: along
  each spatial axis the input positions that meet kernel offset ``k`` form a
  fixed 0/1 matrix, so ``H = einsum(x**2, M_1, ..., M_n)`` contracted over
  the batch and every position (a few small matmuls; a sharded batch
  all-reduces only the kernel-sized result). Groups fold into rows; the
  divisor ``D = prod(kernel) * c_in / G`` is the authors' (spec section 1).
  """

  name = 'conv'

  def statistics(self, config: Conv, inputs, outputs, weight, bias):
    x = inputs
    n_spatial = len(config.kernel_size)
    n_batch = x.ndim - n_spatial - 1
    batch = _count(x.shape[:n_batch])
    out_spatial = tuple(outputs.shape[n_batch : n_batch + n_spatial])
    x = x.astype(statistics_dtype()).reshape((-1,) + x.shape[n_batch:])
    squares, pads = conv_input_padding(config, x * x)
    matrices = [
      jnp.asarray(_window_matrix(*args), squares.dtype)
      for args in zip(
        squares.shape[1:-1],
        [low for low, _ in pads],
        config.input_dilation,
        config.kernel_size,
        config.kernel_dilation,
        config.strides,
        out_spatial,
      )
    ]
    # One spatial axis at a time, batch kept: matmuls, and a sharded batch
    # sums only the kernel-sized result across devices.
    windows, current = squares, 'b' + 'hwd'[:n_spatial] + 'c'
    for axis in reversed(range(n_spatial)):
      position, offset = 'hwd'[axis], 'xyz'[axis]
      result = current.replace(position, offset)
      windows = jnp.einsum(
        f'{current},{position}{offset}->{result}', windows, matrices[axis]
      )
      current = result
    windows = jnp.sum(windows, axis=0)
    c_in = x.shape[-1]
    groups = config.groups
    windows = windows.reshape(
      tuple(config.kernel_size) + (groups, c_in // groups)
    ).sum(-2)
    patch_len = windows.size
    h = windows.reshape(-1) / patch_len
    rows = batch * _count(out_spatial)
    if config.use_bias:
      h = jnp.append(h, jnp.asarray(rows * groups / patch_len, h.dtype))
    return Application((h,), rows, _sum_of_squares_over_leading(1))


class EmbedRule(KroneckerRule):
  """:class:`Embed`: a Dense layer on one-hot inputs, ``H[v] = count(v)``.

  Ids are counted where the lookup sends their gradient: ``-V <= id < 0``
  wraps around (as ``jnp.take`` does), ids out of range reach no row (their
  lookup gives NaN); a one-row table takes every id.
  """

  name = 'embed'

  def has_parameters(self, config):
    return True, False

  def statistics(self, config: Embed, inputs, outputs, weight, bias):
    ids = inputs.reshape(-1)
    vocab = config.num_embeddings
    if vocab == 1:
      ids = jnp.zeros_like(ids)
    ids = jnp.where(ids < 0, ids + vocab, ids)
    counts = jax.ops.segment_sum(
      jnp.ones(ids.shape, statistics_dtype()), ids, num_segments=vocab
    )
    return Application((counts,), ids.size, _sum_of_squares_over_leading(1))


class NormRule(Rule):
  """Normalisation layers (spec section 1, last bullet).

  The capture records what both numerics need: ``z_k = sum(x over every
  axis but k) / M**2`` and the batch size ``B`` for ``reference``, and
  ``sum(x_hat_c**2)`` for ``paper`` on the input side; ``sum(g_c)`` and
  ``sum(g_c**2)`` on the output side. Sums combine over applications and
  devices before :meth:`means` squares them, so combined statistics are the
  surrogate of the concatenated batch.

  ``paper``: ``H_c = mean(x_hat_c**2)``, ``S_c = mean(g_c**2)``,
  ``K_scale = H' * S'``, ``K_shift = S'``.
  ``reference`` (the authors' surrogate): ``H = [sum z**2, K] / B**2``,
  ``S_c = (sum g_c)**2 / B``, ``K_scale = H[0] * S``, ``K_shift = H[1] * S``.
  """

  name = 'norm'
  output_degrees = (1, 2)

  def has_parameters(self, config: Norm):
    return config.use_scale, config.use_bias

  def statistics(self, config: Norm, inputs, outputs, weight, bias):
    dtype = statistics_dtype()
    x = inputs.astype(dtype)
    features = tuple(sorted({a % x.ndim for a in config.feature_axes}))
    k = config.surrogate_axis % x.ndim
    n_features = _count(tuple(x.shape[a] for a in features))

    def per_feature(v: jax.Array) -> jax.Array:
      return _sum_over_all_but(v, features).reshape(-1)

    if x.size == 0:  # an empty batch: nothing to count
      zeros = (jnp.zeros(x.shape[k], dtype), jnp.zeros(n_features, dtype))
      return Application(
        zeros + (jnp.zeros(1, dtype),),
        0,
        lambda g: (jnp.zeros(n_features, dtype),) * 2,
      )
    batch = x.shape[0]
    m = x.size // (batch * x.shape[k])
    z = _sum_over_all_but(x, (k,)) / m**2
    x_hat = _normalised_input(outputs.astype(dtype), features, weight, bias)
    return Application(
      (z, per_feature(x_hat * x_hat), jnp.full((1,), batch, dtype)),
      x.size // n_features,
      lambda g: (
        per_feature(g.astype(dtype)),
        per_feature(jnp.square(g.astype(dtype))),
      ),
    )

  def means(self, input_sums, output_sums, rows, numerics):
    z, x_hat_squares, batch = input_sums
    g_sums, g_squares = output_sums
    if numerics == 'paper':
      rows = jnp.maximum(rows, 1)[..., None].astype(x_hat_squares.dtype)
      return x_hat_squares / rows, g_squares / rows
    batch = jnp.maximum(batch, 1)
    size_k = jnp.full_like(batch, z.shape[-1])
    h = jnp.concatenate(
      [jnp.sum(z * z, axis=-1, keepdims=True), size_k], axis=-1
    )
    return h / batch**2, g_sums**2 / batch

  def factor_shapes(self, input_shapes, output_shapes, numerics):
    features = tuple(output_shapes[0])
    if numerics == 'paper':
      return features, features
    return features[:-1] + (2,), features

  def curvature(self, h, s, numerics, role, shape):
    if numerics == 'paper':
      k = h * s if role == 'weight' else s
    else:
      k = (h[..., :1] if role == 'weight' else h[..., 1:2]) * s
    return k.reshape(shape)


def _normalised_input(
  outputs: jax.Array,
  features: tuple[int, ...],
  scale: jax.Array | None,
  shift: jax.Array | None,
) -> jax.Array:
  """``x_hat = (y - shift) / scale`` per feature (0 where the scale is 0)."""
  shape = [
    outputs.shape[a] if a in features else 1 for a in range(outputs.ndim)
  ]

  def param(value: jax.Array) -> jax.Array:
    return jax.lax.stop_gradient(value).astype(outputs.dtype).reshape(shape)

  y = outputs
  if shift is not None:
    y = y - param(shift)
  if scale is not None:
    scale = param(scale)
    y = jnp.where(scale == 0, 0.0, y / jnp.where(scale == 0, 1.0, scale))
  return y


DENSE = DenseRule()
CONV = ConvRule()
EMBED = EmbedRule()
NORM = NormRule()

#: Every rule by name (the ``kind`` of :class:`adafisher_optax.LayerStatistics`).
RULES: dict[str, Rule] = {r.name: r for r in (DENSE, CONV, EMBED, NORM)}


def check_rule(rule: Any) -> Rule:
  if not isinstance(rule, Rule):
    raise TypeError(
      f'rule must be an adafisher_optax.rules.Rule (e.g. rules.DENSE), '
      f'got {rule!r}.'
    )
  known = RULES.setdefault(rule.name, rule)
  if known is not rule:
    raise ValueError(
      f'a different rule named {rule.name!r} is already registered.'
    )
  return rule


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
