"""``F~``, the diagonal preconditioner of one parameter (spec sections 3, 3a).

Built on the fly from the factor vectors of the blocks covering the
parameter, as a broadcast product that XLA fuses into the update's
elementwise pass: nothing parameter-sized is stored. With ``K`` the sum of
the blocks' undamped curvatures (one block but for tied embeddings),
absolute damping gives ``F~ = K + damping``; relative damping ``a`` gives
``F~ = (K + a * mean(K)) / ((1 + a) * mean(K))`` with ``mean(K)`` kept per
layer at refresh time. A parameter whose blocks were never refreshed gets
``F~ = 1``.

Two ablations serve the benchmarks as controls (they are not the method;
:mod:`adafisher_optax.controls` builds them): ``'layer_mean'`` replaces
``K`` by its layer mean (a per-layer step size only), ``'permuted'``
shuffles ``H`` and ``S`` within the layer with a fixed permutation (the
same values of ``F~``, at scrambled coordinates).
"""

from __future__ import annotations

import math
import numbers
import zlib
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from adafisher_optax import _tree, rules
from adafisher_optax.factors import Factors
from adafisher_optax.layout import BlockKey, FactorLayout

Ablation = Literal['layer_mean', 'permuted'] | None
ABLATIONS = (None, 'layer_mean', 'permuted')


def parameter_entries(
  layout: FactorLayout, shapes: Mapping[BlockKey, Mapping[str, tuple]]
) -> dict[_tree.Path, int]:
  """``{layer path: entries of its parameters present}`` (every block's)."""
  entries: dict[_tree.Path, dict[str, int]] = {}
  for block in layout.blocks:
    present = shapes.get(block.key, {})
    for name, role in block.roles:
      if role in present:
        size = math.prod(present[role][len(block.stack) :])
        entries.setdefault(block.path, {})[name] = size
  return {path: sum(sizes.values()) for path, sizes in entries.items()}


def curvature_mean(
  rule: rules.Rule,
  h: jax.Array,
  s: jax.Array,
  numerics: rules.Numerics,
  shapes: Mapping[str, tuple[int, ...]],
  entries: int,
) -> jax.Array:
  """``sum(K)`` over a block's parameters ``{role: shape}``, per slice,
  divided by ``entries`` (those of all the layer's parameters, so that the
  blocks of a layer add up to its mean)."""
  stack = h.shape[:-1]
  form = rule.curvature_sum_form(
    numerics, dict(shapes), stack, (h.shape[-1], s.shape[-1])
  )
  if form is None:
    total = sum(
      rule.curvature_sum(h, s, numerics, role, shape)
      for role, shape in shapes.items()
    )
  elif form.outer:
    total = _weighted_sum(h, form.weights) * jnp.sum(s, -1)
  else:
    total = jnp.sum(
      (_scaled(h, form.weights) + _constant(form.offsets)) * s, -1
    )
  return total / entries


def _constant(values: np.ndarray) -> Any:
  """``values`` as one number when they are all equal: a large constant
  array costs XLA far more compile time than a scalar."""
  return values[0] if np.all(values == values[0]) else jnp.asarray(values)


def _scaled(x: jax.Array, weights: np.ndarray) -> jax.Array:
  return (
    x * _constant(weights).astype(x.dtype) if not np.all(weights == 1) else x
  )


def _weighted_sum(x: jax.Array, weights: np.ndarray) -> jax.Array:
  """``sum(x * weights, -1)``; a run of ones and a last entry (Dense layers)
  as slices, not as a constant array."""
  if np.all(weights == weights[0]):
    return weights[0] * jnp.sum(x, -1)
  head = weights[:-1]
  if np.all(head == head[0]):
    return head[0] * jnp.sum(x[..., :-1], -1) + weights[-1] * x[..., -1]
  return jnp.sum(x * jnp.asarray(weights, x.dtype), -1)


def _permutation(path: _tree.Path, n: int) -> np.ndarray:
  seed = zlib.crc32(repr((path, n)).encode())
  return np.random.default_rng(seed).permutation(n)


def is_infinite(value: Any) -> bool:
  return isinstance(value, numbers.Number) and value == math.inf


def _block_curvature(factors: Factors, numerics, role, shape, ablation):
  """One block's undamped ``K`` of one parameter, shaped like it."""
  h, s = factors.h, factors.s
  if ablation == 'permuted':
    h = h[..., _permutation(factors.block.path, h.shape[-1])]
    s = s[..., _permutation(factors.block.path, s.shape[-1])]
  return factors.block.layer_rule.curvature(h, s, numerics, role, shape)


def curvature(
  factors: Mapping[BlockKey, Factors],
  layout: FactorLayout,
  path: _tree.Path,
  shape: tuple[int, ...],
  *,
  numerics: rules.Numerics,
  ablation: Ablation = None,
) -> tuple[jax.Array, jax.Array, jax.Array] | None:
  """``(K, mean(K), refreshed)`` of the parameter at ``path``, or ``None``.

  ``K`` (shaped like the parameter) and the layer's ``mean(K)`` (per
  slice, broadcastable to it) sum the blocks that were refreshed;
  ``refreshed`` says where any was. ``None`` when no block covers it.
  """
  blocks = layout.blocks_of(path)
  if not blocks:
    return None
  k = mean = 0
  refreshed = False
  for block in blocks:
    block_factors = factors[block.key]
    n_stack = len(block.stack)

    def per_slice(v, n_stack=n_stack):
      return v.reshape(v.shape + (1,) * (len(shape) - n_stack))

    done = per_slice(block_factors.refreshes) > 0
    block_mean = per_slice(block_factors.curvature_mean)
    if ablation == 'layer_mean':
      block_k = jnp.broadcast_to(block_mean, shape)
    else:
      role = block.role_of(path[-1])
      block_k = _block_curvature(block_factors, numerics, role, shape, ablation)
    if len(blocks) > 1:  # a block not refreshed yet adds nothing
      block_k = jnp.where(done, block_k, 0.0)
      block_mean = jnp.where(done, block_mean, 0.0)
    k = k + block_k
    mean = mean + block_mean
    refreshed = refreshed | done
  return k, mean, refreshed


def preconditioner(
  factors: Mapping[BlockKey, Factors],
  layout: FactorLayout,
  path: _tree.Path,
  shape: tuple[int, ...],
  *,
  numerics: rules.Numerics,
  damping: Any,
  relative_damping: Any,
  ablation: Ablation = None,
) -> jax.Array | None:
  """``F~`` of the parameter at ``path`` (shaped like it), or ``None``
  when no block covers it (the caller uses ``F~ = 1``)."""
  found = curvature(
    factors, layout, path, shape, numerics=numerics, ablation=ablation
  )
  if found is None:
    return None
  k, mean, refreshed = found
  if relative_damping is not None and is_infinite(relative_damping):
    return jnp.ones(shape, k.dtype)
  if relative_damping is None:
    f = k + damping
  else:  # a traced a = inf (inject_hyperparams) also gives F~ = 1
    a = relative_damping
    safe = jnp.where(mean > 0, mean, 1.0)
    relative = (k + a * safe) / ((1 + a) * safe)
    f = jnp.where((mean > 0) & ~jnp.isinf(a), relative, 1.0)
  return jnp.where(refreshed, f, 1.0)
