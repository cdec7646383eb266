"""K-FAC (``kfac_jax.Optimizer``) behind the benchmarks' train-step interface.

``make_kfac_train_step(model, learning_rate)`` returns ``(step, init)`` with
``init(params, model_state, x, y) -> opt_state`` and
``step(params, model_state, opt_state, x, y) -> (params, model_state,
opt_state, loss)``, like :func:`benchmarks.training.make_train_step`.
``init(..., learning_rate=lr, rng_seed=s)`` starts a run with another
learning rate (and estimator seed) without recompiling (it is an argument of kfac-jax's compiled step), and
later calls of ``init`` reuse the same ``kfac_jax.Optimizer`` and so its
compiled step (a new seed or learning rate costs no compilation). The loss
is the same cross-entropy, registered with
``kfac_jax.register_softmax_cross_entropy_loss``; kfac-jax finds the layers
(dense, conv, scale-and-shift) by matching the traced graph and compiles its
own step: ``step`` is a Python function that must not be wrapped in
``jax.jit``.

Settings are kfac-jax's defaults (curvature EMA 0.95, inverses refreshed every
5 steps, the default estimator) with a fixed learning rate, fixed momentum and
fixed damping (no adaptive learning rate, momentum or damping, which would
cost extra forward passes), no burn-in steps (they need a data iterator) and
``multi_device=False``.

kfac-jax is optional: :data:`AVAILABLE` is ``False`` and :data:`IMPORT_ERROR`
says why when it cannot be imported.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from benchmarks.training import cross_entropy_loss

try:
  import kfac_jax
  from kfac_jax._src import tag_graph_matcher
except Exception as error:  # pragma: no cover - depends on the environment
  kfac_jax = tag_graph_matcher = None
  AVAILABLE = False
  IMPORT_ERROR = f'{type(error).__name__}: {error}'
else:
  AVAILABLE = True
  IMPORT_ERROR = None


def _eval_jaxpr_eqn(eqn, in_values):
  """``tag_graph_matcher.eval_jaxpr_eqn`` for the newer JAX API.

  kfac-jax 0.0.8 (the latest release) unpacks ``subfuns, params =
  primitive.get_bind_params(params)``; in JAX 0.10.2 ``get_bind_params``
  returns the params alone (call primitives keep their ``subfuns`` inside),
  and kfac-jax fails with ``ValueError: too many values to unpack (expected
  2)`` on its first curvature update. Installed over kfac-jax's own function
  when importing this module, only where JAX has the new API.
  """
  params = eqn.primitive.get_bind_params(eqn.params)
  with jax.extend.source_info_util.user_context(eqn.source_info.traceback):
    output = eqn.primitive.bind(*in_values, **params)
  return output if isinstance(output, list) else [output]


def _bind_params_api_changed() -> bool:
  return not isinstance(
    jax.extend.core.Primitive('probe').get_bind_params({}), tuple
  )


PATCHED = False
if AVAILABLE and _bind_params_api_changed():
  tag_graph_matcher.eval_jaxpr_eqn = _eval_jaxpr_eqn
  PATCHED = True


def _multi_axis_dense_block():
  """A ``repeated_dense`` K-FAC block for weights with several feature axes.

  kfac-jax 0.0.8's dense blocks assume one input and one output feature
  axis: for ``nn.DenseGeneral`` with ``features=(heads, head_dim)`` (kernel
  ``[D, H, d]``, bias ``[H, d]``) or ``axis=(-2, -1)`` (kernel ``[H, d, D]``)
  the default blocks lay the kernel out as ``[D*H, d]`` and reshape the
  layer's inputs and output gradients over their last axis only, which fails
  with ``Incompatible shapes for broadcasting: shapes=[(B, T, D), (B, T, H,
  1)]``. This block is kfac-jax's own ``RepeatedDenseKroneckerFactored`` with
  the kernel seen as ``[prod(in axes), prod(out axes)]`` and the inputs and
  output gradients flattened over those axes: the usual K-FAC factors of the
  equivalent 2-D dense layer. For 2-D kernels it is the default block.
  """
  base = kfac_jax.RepeatedDenseKroneckerFactored
  letters = 'abcdefghij'

  class MultiAxisRepeatedDense(base):
    def __init__(self, layer_tag_eq, **kwargs):
      (_, rhs_contracting), _ = layer_tag_eq.params['dimension_numbers']
      self.in_axes = len(rhs_contracting)
      kernel, *bias = [v.aval.shape for v in layer_tag_eq.invars[2:]]
      self.out_axes = len(kernel) - self.in_axes
      ins = letters[: self.in_axes]
      outs = letters[self.in_axes : len(kernel)]
      specs = [f'{ins}{outs} -> ({ins})({outs})']
      if bias:
        specs.append(f'{outs} -> 1({outs})')
      super().__init__(layer_tag_eq, parameters_specs=specs, **kwargs)

    def update_curvature_matrix_estimate(
      self, state, estimation_data, *args, **kwargs
    ):
      [x] = estimation_data.primals.inputs
      [dy] = estimation_data.tangents.outputs
      x = x.reshape(x.shape[: x.ndim - self.in_axes] + (-1,))
      dy = dy.reshape(dy.shape[: dy.ndim - self.out_axes] + (-1,))
      estimation_data = dataclasses.replace(
        estimation_data,
        primals=dataclasses.replace(estimation_data.primals, inputs=(x,)),
        tangents=dataclasses.replace(estimation_data.tangents, outputs=(dy,)),
      )
      return super().update_curvature_matrix_estimate(
        state, estimation_data, *args, **kwargs
      )

  return MultiAxisRepeatedDense


class KfacState(NamedTuple):
  """kfac-jax's state, the rng for its estimator, the host step count and
  the (fixed) learning rate of this run."""

  kfac: Any
  rng: jax.Array
  step: int
  learning_rate: jax.Array


def register_cross_entropy(logits, labels):
  """Tells kfac-jax the loss is ``mean(cross_entropy(logits, labels))``.

  kfac-jax's convention is ``weight * sum(losses) / batch_size`` with the
  batch size read from the leading axis of the batch; for sequence models
  (logits ``[B, T, V]``) the mean over tokens is a ``weight`` of ``1 / T``.
  """
  per_example = logits[..., 0].size // logits.shape[0]
  kfac_jax.register_softmax_cross_entropy_loss(
    logits, labels, weight=1.0 / per_example
  )


def register_sigmoid_cross_entropy(logits, targets):
  """Tells kfac-jax the loss is the sigmoid cross-entropy summed over the
  outputs and averaged over the batch (the autoencoder's)."""
  kfac_jax.register_sigmoid_cross_entropy_loss(logits, targets, weight=1.0)


REGISTER = {
  'softmax': lambda out, y: register_cross_entropy(out, y),
  'sigmoid': lambda out, y: register_sigmoid_cross_entropy(out, y),
}


def make_kfac_train_step(
  model,
  learning_rate: float,
  *,
  loss=None,
  output: str = 'softmax',
  momentum: float = 0.9,
  damping: float = 1e-3,
  l2_reg: float = 0.0,
  inverse_update_period: int = 5,
  curvature_ema: float = 0.95,
  seed: int = 0,
  has_state: bool | None = None,
  adaptive: bool = False,
  initial_damping: float = 1.0,
):
  """Returns ``(step, init)`` for a Flax classifier trained with K-FAC.

  Args:
    model: a Flax module ``model.apply(variables, x, train=...)`` returning
      logits whose leading axes match the integer labels.
    learning_rate: fixed learning rate (``-learning_rate * F^-1 g`` plus
      momentum).
    momentum: fixed momentum on the update.
    damping: fixed Tikhonov damping added to the curvature blocks.
    l2_reg: the L2 coefficient already inside the loss (0: there is none).
    inverse_update_period: steps between refreshes of the inverse factors.
    curvature_ema: decay of the curvature EMA.
    seed: seed of the rng used by the curvature estimator.
    has_state: whether the model has non-parameter collections (e.g.
      ``batch_stats``); ``None``: decided by ``init`` from ``model_state``.
    adaptive: kfac-jax's recommended configuration (its README): adaptive
      learning rate, momentum and damping (``use_adaptive_*=True``) starting
      from ``initial_damping``; ``learning_rate``, ``momentum`` and
      ``damping`` are then unused. Costs extra forward passes per step.
    initial_damping: the starting damping of the adaptive configuration
      (kfac-jax's README uses 1.0).
    loss: ``loss(on_output) -> fn(params, model_state, x, y) -> (loss,
      new_model_state)`` calling ``on_output(output, target)``
      (:meth:`benchmarks.tasks.Task.make_loss`); ``None``: the mean
      cross-entropy of ``model``'s logits.
    output: ``'softmax'`` (cross-entropy of integer labels) or
      ``'sigmoid'`` (cross-entropy of targets in [0, 1], summed over the
      outputs): how the loss is registered with kfac-jax.

  Raises:
    RuntimeError: kfac-jax cannot be imported (see :data:`IMPORT_ERROR`).
  """
  if not AVAILABLE:
    raise RuntimeError(f'kfac-jax is not available: {IMPORT_ERROR}')
  if loss is None:
    loss = cross_entropy_loss(model, on_logits=register_cross_entropy)
  else:
    loss = loss(REGISTER[output])
  settings = dict(
    l2_reg=l2_reg,
    adaptive=adaptive,
    initial_damping=initial_damping,
    curvature_ema=curvature_ema,
    inverse_update_period=inverse_update_period,
  )
  built = {}
  constants = {
    'learning_rate': jnp.asarray(learning_rate, jnp.float32),
    'momentum': jnp.asarray(momentum, jnp.float32),
    'damping': jnp.asarray(damping, jnp.float32),
  }

  def init(
    params, model_state, x, y, learning_rate=None, rng_seed=None
  ) -> KfacState:
    with_state = bool(model_state) if has_state is None else has_state
    if built.get('with_state') != with_state:
      built['optimizer'] = _optimizer(loss, with_state, **settings)
      built['with_state'] = with_state
    rng_seed = seed if rng_seed is None else rng_seed
    rng, init_rng = jax.random.split(jax.random.PRNGKey(rng_seed))
    state = built['optimizer'].init(
      params, init_rng, (x, y), model_state if with_state else None
    )
    if learning_rate is None:
      learning_rate = constants['learning_rate']
    return KfacState(state, rng, 0, jnp.asarray(learning_rate, jnp.float32))

  def step(params, model_state, opt_state: KfacState, x, y):
    if 'optimizer' not in built:
      raise RuntimeError('call init before step')
    fixed = None if adaptive else constants
    return _step(built, fixed, params, model_state, opt_state, x, y)

  step.built = built
  return step, init


def _optimizer(
  loss,
  with_state: bool,
  *,
  l2_reg,
  adaptive,
  initial_damping,
  curvature_ema,
  inverse_update_period,
):
  """The ``kfac_jax.Optimizer`` of ``loss`` (with or without model state)."""
  if with_state:

    def value(params, model_state, batch):
      return loss(params, model_state, *batch)

  else:

    def value(params, batch):
      return loss(params, {}, *batch)[0]

  return kfac_jax.Optimizer(
    value_and_grad_func=jax.value_and_grad(value, has_aux=with_state),
    l2_reg=l2_reg,
    value_func_has_aux=False,
    value_func_has_state=with_state,
    value_func_has_rng=False,
    use_adaptive_learning_rate=adaptive,
    use_adaptive_momentum=adaptive,
    use_adaptive_damping=adaptive,
    initial_damping=initial_damping if adaptive else None,
    num_burnin_steps=0,
    curvature_ema=curvature_ema,
    inverse_update_period=inverse_update_period,
    multi_device=False,
    layer_tag_to_block_ctor={'repeated_dense': _multi_axis_dense_block()},
  )


def _step(built, fixed, params, model_state, opt_state: KfacState, x, y):
  """One kfac-jax step; ``fixed``: the constant learning rate (the state's),
  momentum and damping, or ``None`` (adaptive)."""
  optimizer = built['optimizer']
  rng, step_rng = jax.random.split(opt_state.rng)
  kwargs = dict(batch=(x, y), global_step_int=opt_state.step)
  if fixed is not None:
    kwargs.update(
      momentum=fixed['momentum'],
      damping=fixed['damping'],
      learning_rate=opt_state.learning_rate,
    )
  if built['with_state']:
    params, state, model_state, stats = optimizer.step(
      params, opt_state.kfac, step_rng, func_state=model_state, **kwargs
    )
  else:
    params, state, stats = optimizer.step(
      params, opt_state.kfac, step_rng, **kwargs
    )
  new_state = KfacState(state, rng, opt_state.step + 1, opt_state.learning_rate)
  return params, model_state, new_state, stats['loss']


def state_bytes(opt_state: KfacState) -> int:
  """Bytes of kfac-jax's own state (factors, inverses, velocities, scalars)."""
  return sum(
    x.size * x.dtype.itemsize
    for x in jax.tree.leaves(opt_state.kfac)
    if hasattr(x, 'dtype')
  )
