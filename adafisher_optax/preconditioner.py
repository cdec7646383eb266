"""``F~``, the diagonal preconditioner of one parameter (spec sections 3, 3a).

Built on the fly from the layer's factor vectors, as a broadcast product
that XLA fuses into the update's elementwise pass: nothing parameter-sized
is stored. Absolute damping gives ``F~ = K + damping``; relative damping
``a`` gives ``F~ = (K + a * mean(K)) / ((1 + a) * mean(K))`` with ``mean(K)``
kept per layer at refresh time.

Two ablations serve the benchmarks as controls (they are not the method):
``'layer_mean'`` replaces ``K`` by its layer mean (a per-layer step size
only), ``'permuted'`` shuffles ``H`` and ``S`` within the layer with a fixed
permutation (the same values of ``F~``, at scrambled coordinates).
"""

from __future__ import annotations

import math
import numbers
import zlib
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from adafisher_optax import _tree, rules
from adafisher_optax.factors import Factors
from adafisher_optax.factors import numerics_of as factors_numerics

Ablation = Literal['layer_mean', 'permuted'] | None
ABLATIONS = (None, 'layer_mean', 'permuted')


def curvature_mean(
  rule: rules.Rule,
  h: jax.Array,
  s: jax.Array,
  numerics: rules.Numerics,
  shapes: dict[str, tuple[int, ...]],
) -> jax.Array:
  """``mean(K)`` over the parameters ``{role: shape}`` of a layer, per slice."""
  n_stack = h.ndim - 1
  total = sum(
    rule.curvature_sum(h, s, numerics, role, shape)
    for role, shape in shapes.items()
  )
  count = sum(math.prod(shape[n_stack:]) for shape in shapes.values())
  return total / count


def _permutation(path: _tree.Path, n: int) -> np.ndarray:
  seed = zlib.crc32(repr((path, n)).encode())
  return np.random.default_rng(seed).permutation(n)


def is_infinite(value: Any) -> bool:
  return isinstance(value, numbers.Number) and value == math.inf


def preconditioner(
  factors: Factors,
  rule: rules.Rule,
  role: Literal['weight', 'bias'],
  shape: tuple[int, ...],
  *,
  damping: Any,
  relative_damping: Any,
  ablation: Ablation,
  path: _tree.Path,
) -> jax.Array:
  """``F~`` of one parameter (shaped like it) from its layer's factors.

  A layer (or stacked slice) that no statistics reached yet gets ``F~ = 1``.
  """
  if relative_damping is not None and is_infinite(relative_damping):
    return jnp.ones(shape, factors.h.dtype)
  n_stack = factors.h.ndim - 1

  def per_slice(v):
    return v.reshape(v.shape + (1,) * (len(shape) - n_stack))

  h, s = factors.h, factors.s
  mean = per_slice(factors.curvature_mean)
  if ablation == 'layer_mean':
    k = jnp.broadcast_to(mean, shape)
  else:
    if ablation == 'permuted':
      h = h[..., _permutation(path, h.shape[-1])]
      s = s[..., _permutation(path, s.shape[-1])]
    k = rule.curvature(h, s, factors_numerics(factors), role, shape)
  if relative_damping is None:
    f = k + damping
  else:  # a traced a = inf (inject_hyperparams) also gives F~ = 1
    a = relative_damping
    safe = jnp.where(mean > 0, mean, 1.0)
    relative = (k + a * safe) / ((1 + a) * safe)
    f = jnp.where((mean > 0) & ~jnp.isinf(a), relative, 1.0)
  return jnp.where(per_slice(factors.refreshes) > 0, f, 1.0)
