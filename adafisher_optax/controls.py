"""Experimental controls: AdaFisher with ``F~`` deliberately altered.

Not the method: baselines for experiments that ask whether the curvature's
shape matters (``benchmarks.evidence`` uses them). ``'permuted'`` shuffles
each layer's ``H`` and ``S`` with a fixed permutation (the same values of
``F~`` at scrambled coordinates); ``'layer_mean'`` replaces ``K`` by its
layer mean (a per-layer step size only). See spec section 3a.
"""

from __future__ import annotations

import inspect
from typing import Any

import optax

from adafisher_optax import hyperparameters as hp
from adafisher_optax.preconditioner import Ablation
from adafisher_optax.transform import _scale_by_adafisher, scale_by_adafisher


def scale_by_adafisher_control(
  ablation: Ablation, **kwargs: Any
) -> optax.GradientTransformationExtraArgs:
  """:func:`adafisher_optax.scale_by_adafisher` (same keyword arguments)
  with ``F~`` altered as ``ablation`` says."""
  bound = inspect.signature(scale_by_adafisher).bind(**kwargs)
  bound.apply_defaults()
  return _scale_by_adafisher(**bound.arguments, ablation=ablation)


def adafisher_control(
  ablation: Ablation,
  learning_rate: optax.ScalarOrSchedule,
  *,
  weight_decay: Any = 0.0,
  mask: Any = None,
  **kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """:func:`adafisher_optax.adafisher`'s chain around
  :func:`scale_by_adafisher_control`."""
  hp.check_all(learning_rate=learning_rate, weight_decay=weight_decay)
  return optax.chain(
    optax.add_decayed_weights(weight_decay, mask),
    scale_by_adafisher_control(ablation, **kwargs),
    optax.scale_by_learning_rate(learning_rate),
  )
