"""The ``adafisher`` and ``adafisherw`` optimizers, optax style."""

from __future__ import annotations

from typing import Any

import optax

from adafisher_optax.transform import check_hyperparameters, scale_by_adafisher


def _is_zero(value: Any) -> bool:
  return isinstance(value, (int, float)) and value == 0


def adafisher(
  learning_rate: optax.ScalarOrSchedule,
  *,
  b1: Any = 0.9,
  damping: Any = 1e-3,
  gamma: Any = 0.8,
  weight_decay: Any = 0.0,
  t_cov: Any = None,
  numerics: str = 'reference',
  fisher_power: Any = 1.0,
  axis_name: Any = None,
  mu_dtype: Any = None,
  mask: Any = None,
  layout: Any = None,
  relative_damping: Any = None,
  ablation: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaFisher with coupled L2 weight decay.

  ``g <- g + weight_decay * params``, then :func:`scale_by_adafisher`, then
  ``-learning_rate``. Every float hyperparameter works under
  ``optax.inject_hyperparams``. ``update`` needs ``params`` (for the decay)
  and the keyword argument ``curvature`` from
  :func:`adafisher_optax.value_and_grad_with_curvature`.

  Example::

    tx = adafisher_optax.adafisher(1e-3, weight_decay=5e-4)
    grad_fn = adafisher_optax.value_and_grad_with_curvature(loss_fn)
    loss, grads, curvature = grad_fn(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   curvature=curvature)

  Args:
    learning_rate: a float or an optax schedule.
    b1: momentum decay.
    damping: ``lambda`` added to ``H (x) S``.
    gamma: factor EMA decay.
    weight_decay: coupled L2 coefficient (the paper's CNN recipe uses 5e-4).
    t_cov: steps between factor refreshes; ``None`` is 100 for ``reference``
      numerics and 1 for ``paper``.
    numerics: ``"reference"`` (the authors' code) or ``"paper"`` (the paper's
      equations); see ``ADAFISHER_SPEC.md``.
    fisher_power: exponent ``p`` of ``F~``.
    axis_name: mapped axis over which statistics are summed (``pmap``).
    mu_dtype: optional momentum dtype.
    mask: optional mask (tree or callable) of the parameters to decay.
    layout: exact factor shapes, see :func:`scale_by_adafisher`.
    relative_damping: ``a``, see :func:`scale_by_adafisher`.
    ablation: a benchmark control, see :func:`scale_by_adafisher`.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  References:
    Gomes et al., `AdaFisher: Adaptive Second Order Optimization via Fisher
    Information <https://arxiv.org/abs/2405.16397>`_, ICLR 2025.
  """
  check_hyperparameters(learning_rate=learning_rate, weight_decay=weight_decay)
  steps = (
    []
    if _is_zero(weight_decay)
    else [optax.add_decayed_weights(weight_decay, mask)]
  )
  steps += [
    scale_by_adafisher(
      b1=b1,
      damping=damping,
      gamma=gamma,
      t_cov=t_cov,
      numerics=numerics,
      fisher_power=fisher_power,
      axis_name=axis_name,
      mu_dtype=mu_dtype,
      layout=layout,
      relative_damping=relative_damping,
      ablation=ablation,
    ),
    optax.scale_by_learning_rate(learning_rate),
  ]
  return optax.chain(*steps)


def adafisherw(
  learning_rate: optax.ScalarOrSchedule,
  *,
  b1: Any = 0.9,
  damping: Any = 1e-3,
  gamma: Any = 0.8,
  weight_decay: Any = 1e-2,
  t_cov: Any = None,
  numerics: str = 'reference',
  fisher_power: Any = 1.0,
  axis_name: Any = None,
  mu_dtype: Any = None,
  mask: Any = None,
  layout: Any = None,
  relative_damping: Any = None,
  ablation: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdaFisherW: AdaFisher with decoupled weight decay.

  :func:`scale_by_adafisher`, then ``u <- u + weight_decay * params``, then
  ``-learning_rate`` (as :func:`optax.adamw` decouples Adam's decay). The
  paper's ViT and language-model recipes use ``weight_decay`` 0.01 to 0.1.

  Args:
    learning_rate: a float or an optax schedule.
    b1: momentum decay.
    damping: ``lambda`` added to ``H (x) S``.
    gamma: factor EMA decay.
    weight_decay: decoupled decay ``kappa``.
    t_cov: steps between factor refreshes (``None``: numerics default).
    numerics: ``"reference"`` or ``"paper"``.
    fisher_power: exponent ``p`` of ``F~``.
    axis_name: mapped axis over which statistics are summed (``pmap``).
    mu_dtype: optional momentum dtype.
    mask: optional mask (tree or callable) of the parameters to decay.
    layout: exact factor shapes, see :func:`scale_by_adafisher`.
    relative_damping: ``a``, see :func:`scale_by_adafisher`.
    ablation: a benchmark control, see :func:`scale_by_adafisher`.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  References:
    Gomes et al., `AdaFisher: Adaptive Second Order Optimization via Fisher
    Information <https://arxiv.org/abs/2405.16397>`_, ICLR 2025.
  """
  check_hyperparameters(learning_rate=learning_rate, weight_decay=weight_decay)
  steps = [
    scale_by_adafisher(
      b1=b1,
      damping=damping,
      gamma=gamma,
      t_cov=t_cov,
      numerics=numerics,
      fisher_power=fisher_power,
      axis_name=axis_name,
      mu_dtype=mu_dtype,
      layout=layout,
      relative_damping=relative_damping,
      ablation=ablation,
    ),
  ]
  if not _is_zero(weight_decay):
    steps.append(optax.add_decayed_weights(weight_decay, mask))
  steps.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*steps)
