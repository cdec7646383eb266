"""Embedding lookups: a Dense layer on one-hot inputs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from adafisher_optax.rules.base import (
  Application,
  KroneckerRule,
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
