"""Kronecker-factor moving averages and their normalisation (spec section 2).

``reference`` numerics min-max normalise each new statistic with the authors'
absolute epsilon and fold it in as ``0.1*gamma*old + 0.01*gamma*new``: the
factors are used as they are. ``paper`` numerics keep a plain EMA of the raw
statistics and min-max normalise it (scale-free) for ``F~``; the normalised
vectors are computed at refresh time and kept, so a step that does not
refresh reads them as they are.

Every layer (and every slice of a stacked layer) is normalised on its own,
but all of them are processed together: their vectors are concatenated and
each min-max is a segment reduction, so a refresh costs a handful of kernels
whatever the number of layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from adafisher_optax import _tree, rules
from adafisher_optax import statistics as statistics_lib
from adafisher_optax.rules import Numerics

#: Absolute epsilon of the authors' min-max normalisation.
REFERENCE_MINMAX_EPS = 1e-6
#: Relative epsilon of the scale-free min-max of ``paper`` numerics.
PAPER_MINMAX_EPS = 1e-6

Reduce = Callable[[Callable, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Factors:
  """One layer's factor vectors (``[*stack, n]``) and refresh counters.

  Attributes:
    h: ``H``, the input-side factor as ``F~`` uses it (with the bias entry
      last, if any).
    s: ``S``, the output-gradient factor as ``F~`` uses it.
    curvature_mean: the mean of ``K = H (x) S`` over the layer's parameters
      at the latest refresh (``[*stack]``; relative damping divides by it).
    refreshes: refreshes that folded statistics in (int32, ``[*stack]``).
    skipped: refreshes skipped because the statistics were not finite.
    rule: the layer's rule (:data:`adafisher_optax.rules.RULES`; static).
    weight: the name of the layer's weight parameter, or ``None`` (static).
    bias: the name of the layer's bias parameter, or ``None`` (static).
  """

  h: jax.Array
  s: jax.Array
  curvature_mean: jax.Array
  refreshes: jax.Array
  skipped: jax.Array
  rule: str = dataclasses.field(metadata=dict(static=True))
  weight: str | None = dataclasses.field(metadata=dict(static=True))
  bias: str | None = dataclasses.field(metadata=dict(static=True))

  def roles(self) -> dict[str, str]:
    """``{parameter name: 'weight' | 'bias'}``."""
    names = {self.weight: 'weight', self.bias: 'bias'}
    return {name: role for name, role in names.items() if name is not None}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ReferenceFactors(Factors):
  """:class:`Factors` of ``reference`` numerics: ``h`` and ``s`` are the EMAs
  of the min-max normalised statistics."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PaperFactors(Factors):
  """:class:`Factors` of ``paper`` numerics: ``h = minmax(h_ema)`` and
  ``s = minmax(s_ema)``, computed at refresh time.

  Attributes:
    h_ema: the EMA of ``H_hat``.
    s_ema: the EMA of ``S_hat``.
  """

  h_ema: jax.Array = dataclasses.field(kw_only=True)
  s_ema: jax.Array = dataclasses.field(kw_only=True)


FACTOR_TYPES: dict[Numerics, type] = {
  'reference': ReferenceFactors,
  'paper': PaperFactors,
}


def is_factors(node: Any) -> bool:
  return isinstance(node, Factors)


def numerics_of(factors: Factors) -> Numerics:
  return 'paper' if isinstance(factors, PaperFactors) else 'reference'


def _last_axis(op, x):
  return op(x, axis=-1, keepdims=True)


def minmax_reference(x: jax.Array, reduce: Reduce = _last_axis) -> jax.Array:
  """``(x - min) / (max - min + 1e-6)``, ``+-inf`` first mapped to 1 and 0.

  As the authors' code does; over the last axis, or over the segments of
  ``reduce``.
  """
  x = jnp.where(jnp.isposinf(x), 1.0, jnp.where(jnp.isneginf(x), 0.0, x))
  lo, hi = reduce(jnp.min, x), reduce(jnp.max, x)
  return (x - lo) / (hi - lo + REFERENCE_MINMAX_EPS)


def minmax_paper(x: jax.Array, reduce: Reduce = _last_axis) -> jax.Array:
  """Scale-free min-max over the last axis (or the segments of ``reduce``).

  The denominator ``max - min + eps * max|x| + tiny`` makes the result
  invariant to rescaling ``x``, so every float precision agrees.
  """
  lo, hi = reduce(jnp.min, x), reduce(jnp.max, x)
  magnitude = reduce(jnp.max, jnp.abs(x))
  tiny = jnp.finfo(x.dtype).tiny
  return (x - lo) / (hi - lo + PAPER_MINMAX_EPS * magnitude + tiny)


def initial(
  h_shape: tuple[int, ...],
  s_shape: tuple[int, ...],
  numerics: Numerics,
  dtype: Any,
  *,
  rule: str,
  weight: str | None,
  bias: str | None,
) -> Factors:
  """Factors before any refresh: ones (the authors' initialisation)."""
  stack = h_shape[:-1]
  common = dict(
    h=jnp.ones(h_shape, dtype),
    s=jnp.ones(s_shape, dtype),
    curvature_mean=jnp.ones(stack, dtype),
    refreshes=jnp.zeros(stack, jnp.int32),
    skipped=jnp.zeros(stack, jnp.int32),
    rule=rule,
    weight=weight,
    bias=bias,
  )
  if numerics == 'reference':
    return ReferenceFactors(**common)
  return PaperFactors(
    h_ema=jnp.ones(h_shape, dtype), s_ema=jnp.ones(s_shape, dtype), **common
  )


# ---------------------------------------------------------------------------
# Sizing the factors of a new state.
# ---------------------------------------------------------------------------


def _kronecker_shapes(params: Mapping[str, Any]):
  """Factor shapes and parameter names of a ``kernel`` (+ ``bias``) layer.

  Leading axes shared by kernel and bias beyond the bias's own are a stack
  (``nn.scan`` over layers); without a bias the kernel's last axis is the
  output, as it is for a bias masked out by ``optax.masked``.
  """
  kernel = tuple(params['kernel'].shape)
  bias = params.get('bias')
  if bias is not None:
    bias = tuple(getattr(bias, 'shape', kernel[-1:]))
  if bias is not None:
    for n_stack in range(len(bias)):
      out = bias[n_stack:]
      fits = (
        bias[:n_stack] == kernel[:n_stack]
        and len(kernel) - n_stack - len(out) >= 1
        and kernel[len(kernel) - len(out) :] == out
      )
      if fits:
        d_in = math.prod(kernel[n_stack : len(kernel) - len(out)])
        stack = kernel[:n_stack]
        return (stack + (d_in + 1,), stack + (math.prod(out),)), 'bias'
  return ((math.prod(kernel[:-1]),), (kernel[-1],)), None


def _conventional_factors(
  layer_params: Mapping[str, Any], numerics: rules.Numerics, dtype: Any
) -> Factors | None:
  """Factors sized from Flax parameter names and shapes, or ``None``.

  ``kernel`` (+ ``bias``): a Dense-like layer (stacked when kernel and bias
  share leading axes); ``embedding`` ``[V, D]``: an embedding; ``scale``
  and/or ``bias`` alone: a normalisation layer. Layers stacked without a
  bias, bias-free ``DenseGeneral`` layers with several output axes and
  stacked normalisation layers cannot be read from shapes: pass a ``layout``.
  """
  shapes = {
    name: getattr(value, 'shape', None) for name, value in layer_params.items()
  }
  kernel = shapes.get('kernel')
  if kernel is not None and len(kernel) >= 2:
    (h, s), bias = _kronecker_shapes(layer_params)
    rule, weight = 'dense', 'kernel'
  elif shapes.get('embedding') is not None and len(shapes['embedding']) == 2:
    (h, s), rule, weight, bias = (
      (shapes['embedding'][:1], shapes['embedding'][1:]),
      'embed',
      'embedding',
      None,
    )
  elif 'kernel' not in shapes and 'embedding' not in shapes:
    per_feature = shapes.get('scale') or shapes.get('bias')
    if per_feature is None:
      return None
    n = math.prod(per_feature)
    h, s = ((2,) if numerics == 'reference' else (n,)), (n,)
    rule = 'norm'
    weight = 'scale' if 'scale' in shapes else None
    bias = 'bias' if 'bias' in shapes else None
  else:
    return None
  return initial(h, s, numerics, dtype, rule=rule, weight=weight, bias=bias)


def _layer_dicts(params: Any):
  """Yields ``(path, mapping)`` for every mapping of array leaves only.

  A mapping that also holds sub-mappings is a module with layers and free
  parameters (e.g. a top-level ``scale``), not a layer.
  """

  def visit(node, path):
    if not isinstance(node, Mapping):
      return
    if node and all(not isinstance(v, Mapping) for v in node.values()):
      yield path, node
    for key, value in node.items():
      yield from visit(value, path + (str(key),))

  yield from visit(_tree.unbox_tree(params), ())


def initial_factors(params: Any, layout: Any, numerics: rules.Numerics) -> Any:
  """The ``factors`` tree of a new state (see :func:`scale_by_adafisher`)."""
  dtype = rules.statistics_dtype()
  found = {}
  if layout is not None:
    for path, stats in statistics_lib.flatten(layout).items():
      h, s = stats.layer_rule.factor_shapes(
        [tuple(a.shape) for a in stats.input_sums],
        [tuple(a.shape) for a in stats.output_sums],
        numerics,
      )
      found[path] = initial(
        h,
        s,
        numerics,
        dtype,
        rule=stats.rule,
        weight=stats.weight_name,
        bias=stats.bias_name,
      )
  else:
    for path, node in _layer_dicts(params):
      factors = _conventional_factors(node, numerics, dtype)
      if factors is not None:
        found[path] = factors
  return _tree.nest(found)


# ---------------------------------------------------------------------------
# The refresh.
# ---------------------------------------------------------------------------


class Segments:
  """Per-layer ``[*stack, n]`` arrays laid end to end in one flat vector.

  Segment ``k`` is one layer's (or one stacked slice's) vector; the same
  paths and stacks in the same order give matching segments for ``H`` and
  ``S``.
  """

  def __init__(self, shapes: Mapping[Any, tuple[int, ...]]):
    self.shapes = dict(shapes)
    slices = [int(np.prod(s[:-1])) for s in self.shapes.values()]
    sizes = np.repeat([s[-1] for s in self.shapes.values()], slices)
    self.count = len(sizes)
    self.ids = jnp.asarray(np.repeat(np.arange(self.count), sizes))
    self.splits = np.cumsum(
      [n * s[-1] for n, s in zip(slices, self.shapes.values())]
    )[:-1]
    self.segment_splits = np.cumsum(slices)[:-1]

  def flatten(self, arrays: Mapping[Any, jax.Array]) -> jax.Array:
    return jnp.concatenate([arrays[p].reshape(-1) for p in self.shapes])

  def per_segment(self, arrays: Mapping[Any, jax.Array]) -> jax.Array:
    """Concatenates per-slice values (shape ``[*stack]``) in segment order."""
    return jnp.concatenate([jnp.reshape(arrays[p], -1) for p in self.shapes])

  def unflatten(self, flat: jax.Array) -> dict[Any, jax.Array]:
    parts = jnp.split(flat, self.splits)
    return {p: v.reshape(s) for (p, s), v in zip(self.shapes.items(), parts)}

  def unflatten_per_segment(self, values: jax.Array) -> dict[Any, jax.Array]:
    """Inverse of :meth:`per_segment`."""
    parts = jnp.split(values, self.segment_splits)
    return {
      p: v.reshape(s[:-1]) for (p, s), v in zip(self.shapes.items(), parts)
    }

  def reduce(self, op, x: jax.Array) -> jax.Array:
    """``op`` (``jnp.min``/``jnp.max``) within each segment, broadcast back."""
    segment_op = {jnp.min: jax.ops.segment_min, jnp.max: jax.ops.segment_max}
    per_segment = segment_op[op](
      x, self.ids, self.count, indices_are_sorted=True
    )
    return per_segment[self.ids]

  def all(self, x: jax.Array) -> jax.Array:
    """Whether each segment is all true (``[count]``)."""
    return jax.ops.segment_min(
      x.astype(jnp.int32), self.ids, self.count, indices_are_sorted=True
    ).astype(bool)


def refresh(
  factors: Mapping[Any, Factors],
  means: Mapping[Any, tuple[jax.Array, jax.Array]],
  rows: Mapping[Any, jax.Array],
  *,
  gamma: Any,
) -> dict[Any, Factors]:
  """Folds one refresh step's statistics into the factors of every layer.

  The refresh of a layer (or of one slice of a stacked layer) is skipped, and
  its factors kept, when no rows reached it or when its statistics are not
  finite (counted in ``skipped``): a bad batch never poisons the factors. In
  ``paper`` numerics a layer's first refresh sets the EMAs to the statistics.
  ``curvature_mean`` is left to the caller (it needs the parameter shapes).

  Args:
    factors: the factors per layer (all of one numerics).
    means: ``(H_hat, S_hat)`` per layer.
    rows: the rows behind the statistics per layer (``[*stack]``).
    gamma: the EMA decay.

  Returns:
    The new factors per layer.
  """
  paper = any(isinstance(f, PaperFactors) for f in factors.values())
  h_seg = Segments({p: f.h.shape for p, f in factors.items()})
  s_seg = Segments({p: f.s.shape for p, f in factors.items()})
  h_hat = h_seg.flatten({p: m[0] for p, m in means.items()})
  s_hat = s_seg.flatten({p: m[1] for p, m in means.items()})
  refreshes = h_seg.per_segment({p: f.refreshes for p, f in factors.items()})
  skipped = h_seg.per_segment({p: f.skipped for p, f in factors.items()})
  finite = h_seg.all(jnp.isfinite(h_hat)) & s_seg.all(jnp.isfinite(s_hat))
  reached = h_seg.per_segment(rows) > 0
  ok = reached & finite
  if paper:
    old_h = h_seg.flatten({p: f.h_ema for p, f in factors.items()})
    old_s = s_seg.flatten({p: f.s_ema for p, f in factors.items()})
    first = refreshes == 0
    new_h = jnp.where(
      first[h_seg.ids], h_hat, gamma * old_h + (1 - gamma) * h_hat
    )
    new_s = jnp.where(
      first[s_seg.ids], s_hat, gamma * old_s + (1 - gamma) * s_hat
    )
  else:
    old_h = h_seg.flatten({p: f.h for p, f in factors.items()})
    old_s = s_seg.flatten({p: f.s for p, f in factors.items()})
    new_h = 0.1 * gamma * old_h + 0.01 * gamma * minmax_reference(
      h_hat, h_seg.reduce
    )
    new_s = 0.1 * gamma * old_s + 0.01 * gamma * minmax_reference(
      s_hat, s_seg.reduce
    )
  new_h = jnp.where(ok[h_seg.ids], new_h, old_h).astype(old_h.dtype)
  new_s = jnp.where(ok[s_seg.ids], new_s, old_s).astype(old_s.dtype)
  counts = {
    'refreshes': h_seg.unflatten_per_segment(refreshes + ok),
    'skipped': h_seg.unflatten_per_segment(skipped + (reached & ~finite)),
  }
  h, s = h_seg.unflatten(new_h), s_seg.unflatten(new_s)
  if paper:
    h_used = h_seg.unflatten(minmax_paper(new_h, h_seg.reduce))
    s_used = s_seg.unflatten(minmax_paper(new_s, s_seg.reduce))
    return {
      p: dataclasses.replace(
        f,
        h=h_used[p],
        s=s_used[p],
        h_ema=h[p],
        s_ema=s[p],
        refreshes=counts['refreshes'][p],
        skipped=counts['skipped'][p],
      )
      for p, f in factors.items()
    }
  return {
    p: dataclasses.replace(
      f,
      h=h[p],
      s=s[p],
      refreshes=counts['refreshes'][p],
      skipped=counts['skipped'][p],
    )
    for p, f in factors.items()
  }
