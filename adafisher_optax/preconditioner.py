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

import dataclasses
import math
import numbers
import zlib
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from adafisher_optax import _tree, rules
from adafisher_optax.factors import FactorBuffers, LayerFactors
from adafisher_optax.layout import BlockKey

Ablation = Literal['layer_mean', 'permuted'] | None
ABLATIONS = (None, 'layer_mean', 'permuted')


def with_curvature_means(
  buffers: FactorBuffers,
  shapes: Mapping[BlockKey, Mapping[str, tuple[int, ...]]],
  numerics: rules.Numerics,
) -> FactorBuffers:
  """``buffers`` with ``mean(K)`` recomputed for the blocks in ``shapes``.

  Args:
    buffers: the (refreshed) factors.
    shapes: ``{block key: {role: shape}}`` of the parameters present.
    numerics: the optimizer's numerics.

  Returns:
    The factors with ``curvature_mean`` updated. Every block of a layer
    divides its ``sum(K)`` by the entries of all the layer's parameters, so
    that the blocks' means add up to the layer's.
  """
  layout = buffers.layout
  counts: dict[_tree.Path, int] = {}
  for block in layout.blocks:
    if block.key in shapes:
      n_stack = len(block.stack)
      entries = sum(math.prod(s[n_stack:]) for s in shapes[block.key].values())
      counts[block.path] = max(counts.get(block.path, 0), entries)
  parts = []
  for block in layout.blocks:
    view = buffers.block(block)
    if block.key not in shapes:
      parts.append(jnp.reshape(view.curvature_mean, -1))
      continue
    total = sum(
      block.layer_rule.curvature_sum(view.h, view.s, numerics, role, shape)
      for role, shape in shapes[block.key].items()
    )
    mean = total / counts[block.path]
    parts.append(jnp.reshape(mean, -1).astype(view.curvature_mean.dtype))
  return dataclasses.replace(buffers, curvature_mean=jnp.concatenate(parts))


def _permutation(path: _tree.Path, n: int) -> np.ndarray:
  seed = zlib.crc32(repr((path, n)).encode())
  return np.random.default_rng(seed).permutation(n)


def is_infinite(value: Any) -> bool:
  return isinstance(value, numbers.Number) and value == math.inf


def _curvature(
  view: LayerFactors, numerics, role, shape, ablation: Ablation
) -> jax.Array:
  """One block's undamped ``K`` of one parameter, shaped like it."""
  h, s = view.h, view.s
  if ablation == 'permuted':
    h = h[..., _permutation(view.block.path, h.shape[-1])]
    s = s[..., _permutation(view.block.path, s.shape[-1])]
  return view.block.layer_rule.curvature(h, s, numerics, role, shape)


def curvature(
  buffers: FactorBuffers,
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
  blocks = buffers.layout.blocks_of(path)
  if not blocks:
    return None
  k = mean = 0
  refreshed = False
  for block in blocks:
    view = buffers.block(block)
    n_stack = len(block.stack)

    def per_slice(v, n_stack=n_stack):
      return v.reshape(v.shape + (1,) * (len(shape) - n_stack))

    done = per_slice(view.refreshes) > 0
    block_mean = per_slice(view.curvature_mean)
    if ablation == 'layer_mean':
      block_k = jnp.broadcast_to(block_mean, shape)
    else:
      role = block.role_of(path[-1])
      block_k = _curvature(view, numerics, role, shape, ablation)
    if len(blocks) > 1:  # a block not refreshed yet adds nothing
      block_k = jnp.where(done, block_k, 0.0)
      block_mean = jnp.where(done, block_mean, 0.0)
    k = k + block_k
    mean = mean + block_mean
    refreshed = refreshed | done
  return k, mean, refreshed


def preconditioner(
  buffers: FactorBuffers,
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
  found = curvature(buffers, path, shape, numerics=numerics, ablation=ablation)
  if found is None:
    return None
  if relative_damping is not None and is_infinite(relative_damping):
    return jnp.ones(shape, buffers.curvature_mean.dtype)
  k, mean, refreshed = found
  if relative_damping is None:
    f = k + damping
  else:  # a traced a = inf (inject_hyperparams) also gives F~ = 1
    a = relative_damping
    safe = jnp.where(mean > 0, mean, 1.0)
    relative = (k + a * safe) / ((1 + a) * safe)
    f = jnp.where((mean > 0) & ~jnp.isinf(a), relative, 1.0)
  return jnp.where(refreshed, f, 1.0)
