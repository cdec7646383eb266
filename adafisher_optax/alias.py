"""The ``adafisher`` and ``adafisherw`` optimizers, optax style."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from adafisher_optax import hyperparameters as hp
from adafisher_optax.accumulation import MultiStepsState
from adafisher_optax.preconditioner import Ablation
from adafisher_optax.rules import Numerics
from adafisher_optax.transform import AdaFisherState, scale_by_adafisher

_ARGS_DOC = """
  Args:
    learning_rate: a float or an optax schedule. In ``reference`` numerics
      with the default damping the step is about ``learning_rate / damping``
      per coordinate: start near Adam's learning rate divided by 100 (see
      the README).
    b1: momentum decay.
    damping: ``lambda`` added to ``K = H (x) S``.
    gamma: factor EMA decay.
    weight_decay: {decay}
    t_cov: the number of updates between factor refreshes; ``None`` is 100
      for ``reference`` numerics and 1 for ``paper``.
    numerics: ``"reference"`` (the authors' code) or ``"paper"`` (the paper's
      equations); see ``docs/numerics.md``.
    fisher_power: exponent ``p`` of ``F~``.
    relative_damping: ``a`` replacing ``damping`` by ``a * mean(K)`` per
      layer (see :func:`scale_by_adafisher`).
    axis_name: the ``pmap`` axis over which statistics are summed.
    mu_dtype: optional momentum dtype.
    mask: optional mask (tree or callable) of the parameters to decay.
    layout: exact factor shapes, see :func:`scale_by_adafisher`.
    ablation: a benchmark control, see :func:`scale_by_adafisher`.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes
    ``params`` and, on refresh steps, the keyword argument ``curvature``.

  References:
    Gomes et al., `AdaFisher: Adaptive Second Order Optimization via Fisher
    Information <https://arxiv.org/abs/2405.16397>`_, ICLR 2025.
"""


def _build(
  decoupled: bool,
  learning_rate: optax.ScalarOrSchedule,
  weight_decay: Any,
  mask: Any,
  **adafisher_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """The chain of both aliases: the decay before (coupled) or after AdaFisher."""
  hp.check('learning_rate', learning_rate)
  hp.check('weight_decay', weight_decay)
  decay = optax.add_decayed_weights(weight_decay, mask)
  core = scale_by_adafisher(**adafisher_kwargs)
  steps = [core, decay] if decoupled else [decay, core]
  chained = optax.chain(*steps, optax.scale_by_learning_rate(learning_rate))

  core_index = steps.index(core)

  def update_fn(updates, state, params=None, **extra_args):
    if isinstance(state, MultiStepsState):
      raise TypeError(
        'This state belongs to adafisher_optax.multi_steps(tx, ...): pass '
        "it to that optimizer's update, not to the inner tx.update."
      )
    if not (
      isinstance(state, tuple)
      and len(state) == len(steps) + 1
      and isinstance(state[core_index], AdaFisherState)
    ):
      raise TypeError(
        f'The state is a {type(state).__name__}, not the state of this '
        'AdaFisher optimizer (no AdaFisherState where its init puts it): '
        'pass the state that this tx.init returned.'
      )
    return chained.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(chained.init, update_fn)


def adafisher(
  learning_rate: optax.ScalarOrSchedule,
  *,
  b1: jax.typing.ArrayLike = 0.9,
  damping: jax.typing.ArrayLike = 1e-3,
  gamma: jax.typing.ArrayLike = 0.8,
  weight_decay: jax.typing.ArrayLike = 0.0,
  t_cov: int | None = None,
  numerics: Numerics = 'reference',
  fisher_power: jax.typing.ArrayLike = 1.0,
  relative_damping: jax.typing.ArrayLike | None = None,
  axis_name: Any = None,
  mu_dtype: Any = None,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  layout: Any = None,
  ablation: Ablation = None,
) -> optax.GradientTransformationExtraArgs:
  """AdaFisher with coupled L2 weight decay.

  ``g <- g + weight_decay * params``, then :func:`scale_by_adafisher`, then
  ``-learning_rate``. Every float hyperparameter works under
  ``optax.inject_hyperparams``. The state has the same structure whatever
  ``weight_decay`` is (as :func:`optax.adamw`), so checkpoints carry over.

  Example::

    tx = adafisher_optax.adafisher(1e-5, weight_decay=5e-4)
    grad_fn = adafisher_optax.value_and_grad_with_curvature(loss_fn)
    loss, grads, curvature = grad_fn(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   curvature=curvature)
  """
  return _build(False, **locals())


def adafisherw(
  learning_rate: optax.ScalarOrSchedule,
  *,
  b1: jax.typing.ArrayLike = 0.9,
  damping: jax.typing.ArrayLike = 1e-3,
  gamma: jax.typing.ArrayLike = 0.8,
  weight_decay: jax.typing.ArrayLike = 1e-2,
  t_cov: int | None = None,
  numerics: Numerics = 'reference',
  fisher_power: jax.typing.ArrayLike = 1.0,
  relative_damping: jax.typing.ArrayLike | None = None,
  axis_name: Any = None,
  mu_dtype: Any = None,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  layout: Any = None,
  ablation: Ablation = None,
) -> optax.GradientTransformationExtraArgs:
  """AdaFisherW: AdaFisher with decoupled weight decay.

  :func:`scale_by_adafisher`, then ``u <- u + weight_decay * params``, then
  ``-learning_rate`` (as :func:`optax.adamw` decouples Adam's decay). The
  paper's ViT and language-model recipes use ``weight_decay`` 0.01 to 0.1.
  """
  return _build(True, **locals())


adafisher.__doc__ += _ARGS_DOC.format(
  decay="coupled L2 coefficient (the paper's CNN recipe uses 5e-4)."
)
adafisherw.__doc__ += _ARGS_DOC.format(decay='decoupled decay ``kappa``.')
