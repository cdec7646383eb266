"""The layer registry: every per-layer formula of AdaFisher lives here.

Each supported Flax layer type has one :class:`LayerRule` that says

* which module methods it captures and which parameters it preconditions,
* the statistics of one application (``ADAFISHER_SPEC.md`` section 1): the
  forward-pass reduction of the inputs (``H`` numerator), the number of rows,
  and the backward-pass reduction of the output gradient (``S`` numerator),
* how the layer's factor vectors become the diagonal preconditioner ``F~`` of
  each of its parameters (section 3), through its family base class,
* the factor sizes :func:`conventional_factor_shapes` infers from parameter
  names when no layout is given.

To support a new layer type, add a rule class below (usually a subclass of
:class:`KroneckerRule` or :class:`NormRule`) and list it in ``REGISTRY``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adafisher_optax.linen_padding import conv_input_pads

NUMERICS = ('reference', 'paper')


def statistics_dtype() -> jnp.dtype:
  """float32, or float64 when ``jax_enable_x64`` is on."""
  return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


class Application(NamedTuple):
  """Statistics of one application of a layer.

  All three add up over applications and devices; the rule's
  :meth:`LayerRule.normalize` turns the totals into ``(H_hat, S_hat)``.

  Attributes:
    input: forward-pass sum for ``H`` (a sum over rows), shape ``[len]``.
    rows: number of rows (a Python int: shapes are static).
    output_statistics: maps the gradient of the layer's output to the sum
      for ``S``, shape ``[len_S]``; it runs in the backward pass.
  """

  input: jax.Array
  rows: int
  output_statistics: Callable[[jax.Array], jax.Array]


def _sum_over_all_but(x: jax.Array, keep: Sequence[int]) -> jax.Array:
  axes = tuple(i for i in range(x.ndim) if i not in keep)
  return jnp.sum(x, axis=axes)


def _sum_squares_leading(n_trailing: int) -> Callable[[jax.Array], jax.Array]:
  """Output reduction ``sum(g**2)`` over all but the last ``n_trailing`` axes."""

  def reduce(g: jax.Array) -> jax.Array:
    g = g.astype(statistics_dtype())
    return jnp.sum(g * g, axis=tuple(range(g.ndim - n_trailing))).reshape(-1)

  return reduce


def _first_arg(args: tuple, kwargs: Mapping[str, Any], name: str) -> Any:
  return args[0] if args else kwargs[name]


class LayerRule:
  """Base class of a registry entry; see the module docstring."""

  kind: ClassVar[str]
  family: ClassVar[str]
  module_types: ClassVar[tuple[type, ...]]
  methods: ClassVar[tuple[str, ...]] = ('__call__',)
  numerics_dependent: ClassVar[bool] = False

  def param_names(self, module: nn.Module) -> tuple[str | None, str | None]:
    """Returns ``(weight name, bias name)``; ``None`` for an absent one."""
    raise NotImplementedError

  def unsupported_reason(
    self, module: nn.Module, method: str, args: tuple, kwargs: dict
  ) -> str | None:
    """Why this application cannot be captured, or ``None`` when it can."""
    del module, args, kwargs
    if method not in self.methods:
      return f'method {method!r} is not captured'
    return None

  def statistics(
    self,
    module: Any,
    args: tuple,
    kwargs: dict,
    outputs: jax.Array,
    numerics: str,
    get_param: Callable[[str], jax.Array],
  ) -> Application:
    """The statistics of one application.

    Args:
      module: the layer (a Flax module, or any object with the same
        configuration attributes).
      args: its call's positional arguments.
      kwargs: its call's keyword arguments.
      outputs: its outputs.
      numerics: ``"reference"`` or ``"paper"``.
      get_param: the layer's parameter of a given name, as the layer sees it.
    """
    raise NotImplementedError

  def normalize(
    self,
    input_sum: jax.Array,
    output_sum: jax.Array,
    rows: jax.Array,
    variant: str | None,
  ) -> tuple[jax.Array, jax.Array]:
    """``(H_hat, S_hat)`` from the (combined) sums: divide by the rows."""
    del variant
    rows = jnp.maximum(rows, 1)[..., None].astype(input_sum.dtype)
    return input_sum / rows, output_sum / rows

  def output_degree(self, variant: str | None) -> int:
    """The power of the output gradient ``g`` in the captured output sum."""
    del variant
    return 2

  def factor_shapes(
    self,
    input_shape: tuple[int, ...],
    output_shape: tuple[int, ...],
    variant: str | None,
  ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the factors ``(H, S)`` kept for statistics of these shapes."""
    del variant
    return input_shape, output_shape

  @staticmethod
  def preconditioner(
    h: jax.Array,
    s: jax.Array,
    damping: Any,
    numerics: str,
    weight_shape: tuple[int, ...] | None,
    bias_shape: tuple[int, ...] | None,
  ) -> tuple[jax.Array | None, jax.Array | None]:
    """Returns ``F~`` for the weight and the bias (``None`` where absent).

    ``h`` and ``s`` are the factors as the numerics uses them (already
    min-max normalised in ``paper`` numerics).
    """
    raise NotImplementedError


# ---------------------------------------------------------------------------
# Kronecker family: weight [*stack, *in, *out], optional bias [*stack, *out].
# ---------------------------------------------------------------------------


class KroneckerRule(LayerRule):
  """Layers whose weight gradient is an outer product of input and ``g``.

  ``F~[i, o] = H[i] * S[o] + damping``; the bias uses the ones-column entry
  ``H[d_in]``.
  """

  family = 'kronecker'

  def param_names(self, module):
    return 'kernel', ('bias' if module.use_bias else None)

  @staticmethod
  def preconditioner(h, s, damping, numerics, weight_shape, bias_shape):
    del numerics
    n_stack = h.ndim - 1
    d_out = s.shape[-1]
    stack = h.shape[:-1]
    f_weight = f_bias = None
    if weight_shape is not None:
      d_in = math.prod(weight_shape[n_stack:]) // d_out
      outer = h[..., :d_in, None] * s[..., None, :] + damping
      f_weight = outer.reshape(weight_shape)
    if bias_shape is not None:
      f_bias = (h[..., -1:] * s + damping).reshape(stack + bias_shape[n_stack:])
    return f_weight, f_bias


def _general_axes(module: Any) -> tuple[Any, Any] | None:
  """``(axis, features)`` of a DenseGeneral-like layer, else ``None``.

  Linen ``DenseGeneral`` is known by its type; an object that is not a linen
  module and has an ``axis`` is NNX ``LinearGeneral``, which names its output
  features ``out_features`` (NNX ``Linear`` has no ``axis``).
  """
  if isinstance(module, nn.DenseGeneral):
    return module.axis, module.features
  if not isinstance(module, nn.Module) and hasattr(module, 'axis'):
    return module.axis, module.out_features
  return None


class DenseRule(KroneckerRule):
  """``nn.Dense`` and ``nn.DenseGeneral``: rows are all non-contracted axes.

  NNX ``Linear`` and ``LinearGeneral`` use this rule too (see
  :mod:`adafisher_optax.nnx`).
  """

  kind = 'dense'
  module_types = (nn.Dense, nn.DenseGeneral)

  def unsupported_reason(self, module, method, args, kwargs):
    reason = super().unsupported_reason(module, method, args, kwargs)
    if reason is None and tuple(
      np.atleast_1d(getattr(module, 'batch_dims', ()))
    ):
      reason = 'DenseGeneral with batch_dims is not supported'
    if reason is None and getattr(module, 'batch_axis', None):  # NNX
      reason = 'LinearGeneral with batch_axis is not supported'
    return reason

  def statistics(self, module, args, kwargs, outputs, numerics, get_param):
    x = _first_arg(args, kwargs, 'inputs')
    general = _general_axes(module)
    if general is not None:
      contracted = sorted(a % x.ndim for a in np.atleast_1d(general[0]))
      n_out = len(np.atleast_1d(general[1]))
    else:
      contracted, n_out = [x.ndim - 1], 1
    x = x.astype(statistics_dtype())
    h = _sum_over_all_but(x * x, contracted).reshape(-1)
    rows = math.prod(d for i, d in enumerate(x.shape) if i not in contracted)
    if module.use_bias:
      h = jnp.append(h, jnp.asarray(rows, h.dtype))
    return Application(h, rows, _sum_squares_leading(n_out))


class ConvRule(KroneckerRule):
  """``nn.Conv`` (any spatial rank, strides, padding, dilations, groups).

  ``H`` sums squared im2col patch entries without building patches: the sum at
  kernel offset ``k`` is a strided window sum of ``x**2``, per example, then
  summed over the batch.
  Groups fold into rows; the divisor ``D = prod(kernel) * c_in / G`` is the
  authors' (spec section 1).
  """

  kind = 'conv'
  module_types = (nn.Conv,)

  def statistics(self, module, args, kwargs, outputs, numerics, get_param):
    x = _first_arg(args, kwargs, 'inputs')
    kernel_size = tuple(np.atleast_1d(module.kernel_size))
    n_spatial = len(kernel_size)
    n_batch = x.ndim - n_spatial - 1
    batch = math.prod(x.shape[:n_batch])
    out_spatial = outputs.shape[n_batch : n_batch + n_spatial]

    def window_sums(squares):  # [*spatial, c_in] -> [*kernel_size, c_in]
      squares, pads, lhs_dilation, strides, dilation = conv_input_pads(
        module, squares
      )
      windows = jax.lax.reduce_window(
        squares,
        jnp.zeros((), squares.dtype),
        jax.lax.add,
        window_dimensions=tuple(out_spatial) + (1,),
        window_strides=tuple(dilation) + (1,),
        padding=tuple(pads) + ((0, 0),),
        base_dilation=tuple(lhs_dilation) + (1,),
        window_dilation=tuple(strides) + (1,),
      )
      return windows[tuple(slice(0, k) for k in kernel_size)]

    # Window sums per example, then the batch sum: with a sharded batch the
    # sum across devices is of a [*kernel_size, c_in] array, never of
    # (slices of) the input map.
    x = x.astype(statistics_dtype()).reshape((-1,) + x.shape[n_batch:])
    windows = jnp.sum(jax.vmap(window_sums)(x * x), axis=0)
    groups = module.feature_group_count
    c_in = x.shape[-1]
    windows = windows.reshape(kernel_size + (groups, c_in // groups)).sum(-2)
    patch_len = windows.size
    h = windows.reshape(-1) / patch_len
    positions = math.prod(out_spatial)
    rows = batch * positions
    if module.use_bias:
      h = jnp.append(h, jnp.asarray(rows * groups / patch_len, h.dtype))
    return Application(h, rows, _sum_squares_leading(1))


class EmbedRule(KroneckerRule):
  """``nn.Embed``: a Dense layer on one-hot inputs, ``H[v] = count(v)``.

  ``attend`` (a tied output projection) is reported as unsupported, which
  leaves the whole table unpreconditioned.
  """

  kind = 'embed'
  module_types = (nn.Embed,)
  methods = ('__call__',)

  def param_names(self, module):
    return 'embedding', None

  def statistics(self, module, args, kwargs, outputs, numerics, get_param):
    ids = _first_arg(args, kwargs, 'inputs').reshape(-1)
    counts = jax.ops.segment_sum(
      jnp.ones(ids.shape, statistics_dtype()),
      ids,
      num_segments=module.num_embeddings,
    )
    return Application(counts, ids.size, _sum_squares_leading(1))


# ---------------------------------------------------------------------------
# Normalisation family: scale and shift per feature.
# ---------------------------------------------------------------------------


class NormRule(LayerRule):
  """Normalisation layers (spec section 1, last bullet).

  ``paper``: ``H_c = mean(x_hat_c**2)``, ``S_c = mean(g_c**2)``,
  ``F~_scale = H' * S' + damping``, ``F~_shift = S' + damping``.

  ``reference`` (the authors' surrogate): lay the input out batch-first as
  PyTorch does and call its axis 1 ``k`` (:meth:`surrogate_axis`);
  ``z_k = sum(x over every axis but k) / M**2``, ``H = [sum z_k**2, K] / B**2``,
  ``S_c = (sum of g_c over rows)**2 / B``, ``F~_scale = H[0] * S + damping``,
  ``F~_shift = H[1] * S + damping``. The captured sums are ``z``, ``sum g``
  and ``B`` (the "rows" of this rule are examples), squared only in
  :meth:`normalize`: several applications or devices give the surrogate of
  their concatenated batch.
  """

  family = 'norm'
  numerics_dependent = True

  def param_names(self, module):
    return (
      'scale' if getattr(module, 'use_scale', False) else None,
      'bias' if getattr(module, 'use_bias', False) else None,
    )

  def feature_axes(self, module: nn.Module, ndim: int) -> tuple[int, ...]:
    axes = module.feature_axes
    return tuple(sorted({a % ndim for a in np.atleast_1d(axes)}))

  def surrogate_axis(self, module: nn.Module, ndim: int) -> int | None:
    """Axis ``k`` of the reference surrogate, or ``None`` if undefined."""
    raise NotImplementedError

  def unsupported_reason(self, module, method, args, kwargs):
    reason = super().unsupported_reason(module, method, args, kwargs)
    if reason is None and kwargs.get('mask') is not None:
      reason = f'{type(module).__name__} called with a mask'
    return reason

  def statistics(self, module, args, kwargs, outputs, numerics, get_param):
    x = _first_arg(args, kwargs, 'x')
    dtype = statistics_dtype()
    features = self.feature_axes(module, x.ndim)
    n_features = math.prod(x.shape[a] for a in features)
    rows = x.size // n_features

    def per_feature(v: jax.Array) -> jax.Array:
      return _sum_over_all_but(v, features).reshape(-1)

    if numerics == 'paper':
      x_hat = _normalised_input(
        get_param, outputs, features, *self.param_names(module)
      )
      return Application(
        per_feature(x_hat * x_hat),
        rows,
        lambda g: per_feature(jnp.square(g.astype(dtype))),
      )
    k = self.surrogate_axis(module, x.ndim)
    batch = x.shape[0]
    m = x.size // (batch * x.shape[k])
    z = _sum_over_all_but(x.astype(dtype), (k,)) / m**2
    return Application(z, batch, lambda g: per_feature(g.astype(dtype)))

  def normalize(self, input_sum, output_sum, rows, variant):
    """``reference``: ``H = [sum z**2, K] / B**2``, ``S = (sum g)**2 / B``.

    The sums ``z`` and ``sum g`` (and ``B``) add over applications and
    devices before squaring, so combined statistics are the surrogate of the
    concatenated batch.
    """
    if variant == 'paper':
      return super().normalize(input_sum, output_sum, rows, variant)
    batch = jnp.maximum(rows, 1)[..., None].astype(input_sum.dtype)
    size_k = jnp.full_like(batch, input_sum.shape[-1])
    h = jnp.concatenate(
      [jnp.sum(input_sum**2, axis=-1, keepdims=True), size_k], axis=-1
    )
    return h / batch**2, output_sum**2 / batch

  def output_degree(self, variant):
    return 2 if variant == 'paper' else 1

  def factor_shapes(self, input_shape, output_shape, variant):
    if variant == 'paper':
      return input_shape, output_shape
    return input_shape[:-1] + (2,), output_shape

  @staticmethod
  def preconditioner(h, s, damping, numerics, weight_shape, bias_shape):
    if numerics == 'paper':
      scale, shift = h * s, s
    else:
      scale, shift = h[..., :1] * s, h[..., 1:2] * s
    f_weight = (
      None
      if weight_shape is None
      else ((scale + damping).reshape(weight_shape))
    )
    f_bias = (
      None if bias_shape is None else ((shift + damping).reshape(bias_shape))
    )
    return f_weight, f_bias


def _normalised_input(
  get_param: Callable[[str], jax.Array],
  outputs: jax.Array,
  features: tuple[int, ...],
  weight_name: str | None,
  bias_name: str | None,
) -> jax.Array:
  """``x_hat = (y - shift) / scale`` per feature (0 where the scale is 0)."""
  dtype = statistics_dtype()
  shape = [
    outputs.shape[a] if a in features else 1 for a in range(outputs.ndim)
  ]
  y = outputs.astype(dtype)

  def param(name: str) -> jax.Array:
    value = jax.lax.stop_gradient(get_param(name))
    return value.astype(dtype).reshape(shape)

  if bias_name is not None:
    y = y - param(bias_name)
  if weight_name is not None:
    scale = param(weight_name)
    y = jnp.where(scale == 0, 0.0, y / jnp.where(scale == 0, 1.0, scale))
  return y


class TokenNormRule(NormRule):
  """``nn.LayerNorm`` and ``nn.RMSNorm``.

  In ``reference`` numerics the surrogate axis is axis 1 of the input as
  given, as the authors' hooks see a batch-first tensor: on a ``[B, T, D]``
  input that is the token axis, not the feature axis.
  """

  kind = 'layer_norm'
  module_types = (nn.LayerNorm, nn.RMSNorm)

  def surrogate_axis(self, module, ndim):
    return 1

  def unsupported_reason(self, module, method, args, kwargs):
    reason = super().unsupported_reason(module, method, args, kwargs)
    if reason is None and _first_arg(args, kwargs, 'x').ndim < 2:
      reason = 'input without a batch axis'
    return reason


class ChannelNormRule(NormRule):
  """``nn.BatchNorm`` (train and eval mode) and ``nn.GroupNorm`` (and NNX's).

  In ``reference`` numerics the surrogate axis is the channel (feature) axis,
  which PyTorch's NCHW layout puts at axis 1.
  """

  kind = 'channel_norm'
  module_types = (nn.BatchNorm, nn.GroupNorm)

  def feature_axes(self, module, ndim):
    if isinstance(module, nn.GroupNorm):
      return (ndim - 1,)
    # NNX GroupNorm names its (last) feature axis `feature_axis`.
    axes = getattr(module, 'feature_axis', None)
    axes = module.axis if axes is None else axes
    return tuple(sorted({a % ndim for a in np.atleast_1d(axes)}))

  def surrogate_axis(self, module, ndim):
    return self.feature_axes(module, ndim)[0]

  def unsupported_reason(self, module, method, args, kwargs):
    reason = super().unsupported_reason(module, method, args, kwargs)
    x = _first_arg(args, kwargs, 'x') if reason is None else None
    if x is not None and (x.ndim < 2 or 0 in self.feature_axes(module, x.ndim)):
      reason = 'input without a batch axis'
    elif x is not None and len(self.feature_axes(module, x.ndim)) != 1:
      reason = 'more than one feature axis'
    return reason


REGISTRY: dict[str, LayerRule] = {
  rule.kind: rule
  for rule in (
    DenseRule(),
    ConvRule(),
    EmbedRule(),
    TokenNormRule(),
    ChannelNormRule(),
  )
}

#: Every layer type with a rule.
SUPPORTED_LAYERS: tuple[type, ...] = tuple(
  t for rule in REGISTRY.values() for t in rule.module_types
)

#: The layer types the authors' PyTorch code preconditions (Linear, Conv2d,
#: BatchNorm2d, LayerNorm). ``layers=REFERENCE_LAYERS`` reproduces their
#: coverage: everything else gets ``F~ = 1``.
REFERENCE_LAYERS: tuple[type, ...] = (
  nn.Dense,
  nn.DenseGeneral,
  nn.Conv,
  nn.BatchNorm,
  nn.LayerNorm,
)


def rule_for(module: nn.Module) -> LayerRule | None:
  """Returns the rule of a module (subclasses included), or ``None``."""
  for rule in REGISTRY.values():
    if isinstance(module, rule.module_types):
      return rule
  return None


def conventional_factor_shapes(
  layer_params: Mapping[str, Any], numerics: str
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
  """Factor shapes ``(H, S)`` inferred from Flax parameter names.

  * ``kernel`` (+ ``bias``): inputs are the kernel axes before the bias shape
    (before the last axis without a bias); ``H`` gains the ones-column entry.
  * ``embedding`` ``[V, D]``: ``H`` has ``V`` entries, ``S`` has ``D``.
  * ``scale`` and/or ``bias`` alone: a normalisation layer with ``C`` features;
    ``H`` has 2 entries in ``reference`` numerics and ``C`` in ``paper``.

  A parameter masked out by ``optax.masked`` counts as present with unknown
  shape. Stacked layers (``nn.scan``), bias-free ``DenseGeneral`` layers with
  several output axes and layers whose weight is masked out are ambiguous:
  give the optimizer a ``layout`` (see
  :func:`adafisher_optax.curvature_layout`).
  """
  shapes = {
    name: tuple(np.shape(value)) if hasattr(value, 'shape') else None
    for name, value in layer_params.items()
  }  # None: a parameter masked out by optax.masked, shape unknown
  if shapes.get('kernel') is not None and len(shapes['kernel']) >= 2:
    kernel = shapes['kernel']
    has_bias = 'bias' in shapes
    bias = shapes['bias'] or kernel[-1:] if has_bias else None
    if has_bias and not (
      len(bias) < len(kernel) and kernel[-len(bias) :] == bias
    ):
      has_bias = False
    out = bias if has_bias else kernel[-1:]
    d_out = math.prod(out)
    return (math.prod(kernel) // d_out + int(has_bias),), (d_out,)
  if shapes.get('embedding') is not None and len(shapes['embedding']) == 2:
    vocab, dim = shapes['embedding']
    return (vocab,), (dim,)
  per_feature = shapes.get('scale') or shapes.get('bias')
  if (
    per_feature is not None
    and 'kernel' not in shapes
    and ('embedding' not in shapes)
  ):
    n = math.prod(per_feature)
    return ((2,) if numerics == 'reference' else (n,)), (n,)
  return None
