"""The per-layer maths of AdaFisher, in pure JAX (``ADAFISHER_SPEC.md`` 1-3).

A layer's computation is described by a small typed configuration
(:class:`Dense`, :class:`Conv`, :class:`Embed`, :class:`Attend`,
:class:`Norm`); a
:class:`Rule` turns one application of such a layer into statistics (sums
over rows, so applications and devices add up), those sums into the
instantaneous ``(H_hat, S_hat)`` of either numerics, and the layer's factor
vectors into the undamped curvature ``K`` of each of its parameters, whose
damped form is ``F~``. Nothing here knows about Flax: front ends
(:mod:`adafisher_optax.linen`, :mod:`adafisher_optax.nnx`,
:mod:`adafisher_optax.tags`) turn their layers into configurations.

One module per family (``dense``, ``conv``, ``embed``, ``norm``), the
interface they share in ``base``, and one registry, :data:`RULES`, below: a
new family is a :class:`Rule` subclass added to :data:`BUILT_IN` (or
registered by :func:`check_rule`, as ``register_layer`` does).

The statistics serve both numerics at once, so a capture never needs to know
which numerics the optimizer uses.
"""

from __future__ import annotations

from typing import Any

from adafisher_optax.rules.base import (
  NUMERICS,
  Application,
  CurvatureSum,
  KroneckerRule,
  Numerics,
  Rule,
  Shape,
  per_dim,
  statistics_dtype,
)
from adafisher_optax.rules.conv import Conv, ConvRule, conv_input_padding
from adafisher_optax.rules.dense import Dense, DenseRule
from adafisher_optax.rules.embed import Attend, AttendRule, Embed, EmbedRule
from adafisher_optax.rules.norm import Norm, NormRule

Config = Dense | Conv | Embed | Attend | Norm

DENSE = DenseRule()
CONV = ConvRule()
EMBED = EmbedRule()
ATTEND = AttendRule()
NORM = NormRule()

#: The rules that come with the library.
BUILT_IN: tuple[Rule, ...] = (DENSE, CONV, EMBED, ATTEND, NORM)

#: Every rule by name (the ``rule`` of :class:`adafisher_optax.LayerStatistics`).
RULES: dict[str, Rule] = {r.name: r for r in BUILT_IN}


def check_rule(rule: Any) -> Rule:
  """Registers ``rule`` in :data:`RULES` by its name (once per name)."""
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


__all__ = [
  'ATTEND',
  'BUILT_IN',
  'CONV',
  'DENSE',
  'EMBED',
  'NORM',
  'NUMERICS',
  'RULES',
  'Application',
  'Attend',
  'AttendRule',
  'Config',
  'Conv',
  'ConvRule',
  'CurvatureSum',
  'Dense',
  'DenseRule',
  'Embed',
  'EmbedRule',
  'KroneckerRule',
  'Norm',
  'NormRule',
  'Numerics',
  'Rule',
  'Shape',
  'check_rule',
  'conv_input_padding',
  'per_dim',
  'statistics_dtype',
]
