"""AdaFisher for optax and Flax: a diagonal block-Kronecker Fisher preconditioner.

Capture -> statistics -> factor EMA -> preconditioner -> update:

* :func:`value_and_grad_with_curvature` (``capture``) returns the loss, the
  gradients and per-layer :class:`LayerStatistics` (``statistics``);
* :func:`scale_by_adafisher` (``transform``) folds them into
  :class:`KroneckerFactors` (``factors``) and preconditions the momentum with
  the per-layer formulas of the registry (``layers``);
* :func:`adafisher` and :func:`adafisherw` (``alias``) are the optimizers.

``adafisher_optax.nnx`` captures Flax NNX models; it is imported on first
use, so that ``import adafisher_optax`` does not import ``flax.nnx``.
"""

import importlib

from adafisher_optax import checkpoint, tags
from adafisher_optax.accumulation import MultiStepsState, multi_steps
from adafisher_optax.alias import adafisher, adafisherw
from adafisher_optax.capture import (
  curvature_layout,
  softmax_cross_entropy,
  value_and_grad_with_curvature,
)
from adafisher_optax.diagnostics import (
  Diagnostics,
  LayerDiagnostics,
  diagnostics,
)
from adafisher_optax.factors import KroneckerFactors
from adafisher_optax.layers import REFERENCE_LAYERS, SUPPORTED_LAYERS
from adafisher_optax.sharding import state_shardings
from adafisher_optax.statistics import (
  LayerStatistics,
  unpreconditioned_parameters,
)
from adafisher_optax.taps import CaptureError, UnsupportedLayerWarning
from adafisher_optax.train_state import TrainState
from adafisher_optax.transform import (
  AdaFisherState,
  UnpreconditionedParametersWarning,
  scale_by_adafisher,
)

__version__ = '0.1.0'


def __getattr__(name: str):
  if name == 'nnx':  # a submodule, imported lazily (see above)
    return importlib.import_module('adafisher_optax.nnx')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
  'REFERENCE_LAYERS',
  'SUPPORTED_LAYERS',
  'AdaFisherState',
  'CaptureError',
  'Diagnostics',
  'KroneckerFactors',
  'LayerDiagnostics',
  'LayerStatistics',
  'MultiStepsState',
  'TrainState',
  'UnpreconditionedParametersWarning',
  'UnsupportedLayerWarning',
  'adafisher',
  'adafisherw',
  'checkpoint',
  'curvature_layout',
  'diagnostics',
  'multi_steps',
  'nnx',
  'scale_by_adafisher',
  'softmax_cross_entropy',
  'state_shardings',
  'tags',
  'unpreconditioned_parameters',
  'value_and_grad_with_curvature',
]
