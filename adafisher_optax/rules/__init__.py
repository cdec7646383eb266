"""The per-layer maths of AdaFisher, in pure JAX (``ADAFISHER_SPEC.md`` 1-3).

A layer's computation is described by a small typed configuration
(:class:`Dense`, :class:`Conv`, :class:`Einsum`, :class:`Embed`,
:class:`Attend`, :class:`Norm`); a
:class:`Rule` turns one application of such a layer into statistics (sums
over rows, so applications and devices add up), those sums into the
instantaneous ``(H_hat, S_hat)`` of either numerics, and the layer's factor
vectors into the undamped curvature ``K`` of each of its parameters, whose
damped form is ``F~``. Nothing here knows about Flax: front ends
(:mod:`adafisher_optax.linen`, :mod:`adafisher_optax.nnx`,
:mod:`adafisher_optax.tags`) turn their layers into configurations.

One module per family (``dense``, ``conv``, ``einsum``, ``embed``,
``norm``), the interface they share in ``base``, and one registry,
:data:`RULES`, below: a new family is a :class:`Rule` subclass added to
:data:`BUILT_IN` (or registered by :func:`check_rule`, as
``register_layer`` does). A rule parametrised by its layer's configuration
(:data:`EINSUM`: one member per kernel axis pattern) resolves each
application to a member named ``'family:parameters'``, which :data:`RULES`
rebuilds from the name alone (a restored state names its rules).

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
  RuleTable,
  Shape,
  per_dim,
  statistics_dtype,
)
from adafisher_optax.rules.conv import (
  CONV_TRANSPOSE_KERNEL,
  Conv,
  ConvRule,
  TransposedKernelConvRule,
  conv_input_padding,
)
from adafisher_optax.rules.dense import Dense, DenseRule
from adafisher_optax.rules.einsum import (
  EINSUM,
  Einsum,
  EinsumRule,
  einsum_config,
)
from adafisher_optax.rules.embed import Attend, AttendRule, Embed, EmbedRule
from adafisher_optax.rules.norm import Norm, NormRule, Standardisation

Config = Dense | Conv | Einsum | Embed | Attend | Norm

DENSE = DenseRule()
CONV = ConvRule()
EMBED = EmbedRule()
ATTEND = AttendRule()
NORM = NormRule()

#: The rules that come with the library.
BUILT_IN: tuple[Rule, ...] = (
  DENSE,
  CONV,
  CONV_TRANSPOSE_KERNEL,
  EINSUM,
  EMBED,
  ATTEND,
  NORM,
)

#: Every rule by name (the ``rule`` of :class:`adafisher_optax.LayerStatistics`).
RULES = RuleTable(BUILT_IN)
RULES.families[EINSUM.name] = EinsumRule.from_name


def check_rule(rule: Any) -> Rule:
  """Registers ``rule`` in :data:`RULES` by its name (once per name)."""
  return RULES.check(rule)


__all__ = [
  'ATTEND',
  'BUILT_IN',
  'CONV',
  'CONV_TRANSPOSE_KERNEL',
  'DENSE',
  'EINSUM',
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
  'Einsum',
  'EinsumRule',
  'Embed',
  'EmbedRule',
  'KroneckerRule',
  'Norm',
  'NormRule',
  'Numerics',
  'Rule',
  'RuleTable',
  'Shape',
  'Standardisation',
  'TransposedKernelConvRule',
  'check_rule',
  'conv_input_padding',
  'einsum_config',
  'per_dim',
  'statistics_dtype',
]
