"""AdaFisher for optax and Flax: a diagonal block-Kronecker Fisher preconditioner.

Capture -> statistics -> factor EMA -> preconditioner -> update:

* :func:`value_and_grad_with_curvature` (``grad``; the driver ``capture``
  with the front ends ``linen``, ``nnx`` and ``tags`` reporting to a
  ``session``) returns the loss, the gradients and per-layer
  :class:`LayerStatistics` (``statistics``), for the layer types of the
  ``registry`` (maths in ``rules``);
* :func:`scale_by_adafisher` (``transform``) folds them into the factor EMAs
  (``factors``) and divides the momentum by ``F~`` (``preconditioner``);
* :func:`adafisher_like_adam`, :func:`adafisher` and :func:`adafisherw`
  (``alias``) are the optimizers; ``grafting`` gives them Adam's step size.

The optimizer core imports neither Flax nor orbax; the Flax front ends,
``TrainState`` and ``checkpoint`` are imported on first use.
"""

import importlib

from adafisher_optax import controls, flax_serialization, grafting, rules, tags
from adafisher_optax.accumulation import MultiStepsState, multi_steps
from adafisher_optax.alias import adafisher, adafisher_like_adam, adafisherw
from adafisher_optax.diagnostics import (
  Diagnostics,
  LayerDiagnostics,
  diagnostics,
)
from adafisher_optax.factors import Factors
from adafisher_optax.fisher import softmax_cross_entropy
from adafisher_optax.grad import curvature_layout, value_and_grad_with_curvature
from adafisher_optax.registry import LayerType, UnsupportedCall, register_layer
from adafisher_optax.schedule import refresh_schedule
from adafisher_optax.session import CaptureError, UnsupportedLayerWarning
from adafisher_optax.sharding import state_shardings
from adafisher_optax.state import (
  AdaFisherState,
  Settings,
  StaleFactorsWarning,
  adafisher_state,
)
from adafisher_optax.statistics import (
  LayerStatistics,
  unpreconditioned_parameters,
)
from adafisher_optax.transform import (
  UnpreconditionedParametersWarning,
  scale_by_adafisher,
)

__version__ = '0.2.0'

#: Names imported on first use, with the module that defines them.
_LAZY = {
  'nnx': ('adafisher_optax.nnx', None),
  'linen': ('adafisher_optax.linen', None),
  'checkpoint': ('adafisher_optax.checkpoint', None),
  'TrainState': ('adafisher_optax.train_state', 'TrainState'),
  'REFERENCE_LAYERS': ('adafisher_optax.linen', 'REFERENCE_LAYERS'),
}


flax_serialization.register_if_flax_loaded()


def __getattr__(name: str):
  if name in _LAZY:
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    return module if attribute is None else getattr(module, attribute)
  if name == 'SUPPORTED_LAYERS':  # every registered linen layer class
    return importlib.import_module('adafisher_optax.linen').supported_layers()
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
  'REFERENCE_LAYERS',
  'SUPPORTED_LAYERS',
  'AdaFisherState',
  'CaptureError',
  'Diagnostics',
  'Factors',
  'LayerDiagnostics',
  'LayerStatistics',
  'LayerType',
  'MultiStepsState',
  'Settings',
  'StaleFactorsWarning',
  'TrainState',
  'UnpreconditionedParametersWarning',
  'UnsupportedCall',
  'UnsupportedLayerWarning',
  'adafisher',
  'adafisher_like_adam',
  'adafisher_state',
  'adafisherw',
  'checkpoint',
  'controls',
  'curvature_layout',
  'diagnostics',
  'grafting',
  'linen',
  'multi_steps',
  'nnx',
  'refresh_schedule',
  'register_layer',
  'rules',
  'scale_by_adafisher',
  'softmax_cross_entropy',
  'state_shardings',
  'tags',
  'unpreconditioned_parameters',
  'value_and_grad_with_curvature',
]
