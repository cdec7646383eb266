"""Embedding tables: lookups (a Dense layer on one-hot inputs) and output
projections onto the table (``attend``, tied embeddings)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from adafisher_optax.rules.base import (
  Application,
  CurvatureSum,
  KroneckerRule,
  count,
  reduced,
  statistics_dtype,
  sum_of_squares_over_leading,
)


@dataclasses.dataclass(frozen=True)
class Embed:
  """A lookup ``table[ids]`` in a table ``[num_embeddings, features]``."""

  num_embeddings: int


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
    return Application((counts,), ids.size, sum_of_squares_over_leading(1))


@dataclasses.dataclass(frozen=True)
class Attend:
  """``y = x @ table.T``: queries ``x[..., D]`` against a table ``[V, D]``."""


class AttendRule(KroneckerRule):
  """:class:`Attend`: the transpose of a bias-free Dense kernel.

  ``H = sum_rows(x**2)`` (length ``D``), ``S = sum_rows(g**2)`` (length
  ``V``), rows every axis of ``x`` but the last; the table's curvature is
  ``K[v, d] = S[v] * H[d]``. A table also used for lookups gets both
  contributions (one :class:`~adafisher_optax.LayerStatistics` per rule).
  """

  name = 'attend'
  outputs_last = False

  def has_parameters(self, config):
    return True, False

  def statistics(self, config: Attend, inputs, outputs, weight, bias):
    x = inputs.astype(statistics_dtype())
    h = reduced(x * x, range(x.ndim - 1))
    rows = count(x.shape[:-1])
    return Application((h,), rows, sum_of_squares_over_leading(1))

  def curvature(self, h, s, numerics, role, shape):
    del numerics, role
    return (s[..., :, None] * h[..., None, :]).reshape(shape)

  def curvature_sum(self, h, s, numerics, role, shape):
    del numerics, role, shape
    return jnp.sum(h, axis=-1) * jnp.sum(s, axis=-1)

  def curvature_sum_form(self, numerics, shapes, stack, lengths):
    del numerics, shapes, stack
    return CurvatureSum(outer=True, weights=np.ones(lengths[0]))
