"""``value_and_grad_with_curvature`` for functions of a params tree.

The capture of Flax linen models (:mod:`adafisher_optax.linen`, used when
Flax is installed) and of pure-JAX models built with
:mod:`adafisher_optax.tags`, on the driver of :mod:`adafisher_optax.capture`.
Flax NNX models have their own entry point in :mod:`adafisher_optax.nnx`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from adafisher_optax import capture as capture_lib
from adafisher_optax import registry, tags
from adafisher_optax.arguments import (
  check_call,
  check_differentiable,
  with_capture_arguments,
)
from adafisher_optax.fisher import check_fisher


def _linen_front_end():
  """:mod:`adafisher_optax.linen` with its layers registered, or ``None``
  without Flax (then only tags ops are captured)."""
  try:
    from adafisher_optax import linen
  except ImportError:
    return None
  linen.register_built_in_layers()
  return linen


def _runner(fun, args, kwargs) -> capture_lib.Run:
  """Runs ``fun`` with the linen interceptor (if Flax is there) and tags."""
  linen = _linen_front_end()

  def run(session, p):
    with session:
      if linen is None:
        return fun(p, *args, **kwargs), None
      if session.mode == 'structural':
        p = linen.with_probes_in_params(p, session)
      with linen.intercepting(session):
        return fun(p, *args, **kwargs), None

  return run


_NOTHING_APPLIED = (
  'value_and_grad_with_curvature: `fun` applied no registered layer (Flax '
  'linen module or adafisher_optax.tags op) while it was traced. Call the '
  'model inside `fun`, and do not wrap model.apply in a jax.jit created '
  'outside `fun`: a cached compilation skips the interception.'
)


def _check_params(params: Any) -> None:
  if not isinstance(params, Mapping):
    raise TypeError(
      'value_and_grad_with_curvature: the first argument of `fun` must be '
      "the model's params (a dict, as model.init(...)['params'] returns "
      f'it), got {type(params).__name__}.'
    )


def value_and_grad_with_curvature(
  fun: Callable[..., Any],
  *,
  has_aux: bool = False,
  layers: Sequence[Any] | None = None,
  exclude: Sequence[Any] = (),
  fisher: str = 'empirical',
) -> Callable[..., tuple[Any, Any, Any]]:
  """Like ``jax.value_and_grad(fun)``, also returning AdaFisher's statistics.

  ``fun(params, *args, **kwargs)`` applies a Flax linen model to ``params``
  (for example ``model.apply({'params': params}, x)``, or to a sub-tree of
  them), or a pure-JAX model built with :mod:`adafisher_optax.tags`. Layers
  whose parameters are arrays of ``params`` are captured, and ``fun``
  receives ``params`` exactly as given; other layers (a teacher or target
  network) are not. If no layer reads an array of ``params`` (params cast
  inside ``fun``, or a top-level ``nn.scan(Block)``), layers are matched by
  path instead, and ``fun`` then receives ``params`` with one more entry
  per layer, ``'__adafisher_probe__'`` (zeros): sums over the leaves (an L2
  penalty) are unchanged, but a loss that counts leaves or keys sees it.

  The returned function computes ``(value, grads, curvature)`` in one
  forward and one backward pass and is meant to be called inside the user's
  ``jax.jit``. Its keyword argument ``capture`` (a static bool, default
  ``True``) turns the capture off: then it is ``jax.value_and_grad(fun)``
  and ``curvature`` is ``None``, for the steps that do not refresh the
  factors.

  Args:
    fun: the loss function; differentiated with respect to its first argument.
    has_aux: whether ``fun`` returns ``(loss, aux)``; ``value`` is then
      ``(loss, aux)``, as with ``jax.value_and_grad``.
    layers: the layer classes (subclasses included) and
      :mod:`~adafisher_optax.tags` ops to capture; default every registered
      class (:func:`adafisher_optax.register_layer`) and every tags op.
      :data:`adafisher_optax.REFERENCE_LAYERS` reproduces the coverage of the
      authors' code. Parameters of other layers get ``F~ = 1``.
    exclude: layer classes (subclasses included) and tags ops not to
      capture, e.g. one subclass of ``nn.Dense`` while ``nn.Dense`` stays.
    fisher: ``"empirical"`` (the gradients of your loss, as the authors do) or
      ``"sampled"``: output-gradient statistics from labels drawn from the
      model's own softmax (a Monte-Carlo estimate of the true Fisher). Then
      ``fun`` computes its loss with
      :func:`adafisher_optax.softmax_cross_entropy` and the returned function
      takes a keyword argument ``fisher_key`` (a ``jax.random`` key). It
      costs one more backward pass per captured step.

  Returns:
    A function with the signature of ``fun`` (plus ``capture=`` and
    ``fisher_key=``) returning ``(value, grads, curvature)``; ``curvature``
    is a nested dict keyed like ``params`` whose leaves are
    :class:`adafisher_optax.LayerStatistics`.
  """
  if not callable(fun):
    raise TypeError(f'fun must be callable, got {type(fun).__name__}.')
  _linen_front_end()
  selection = registry.selection(layers, exclude, tags.OPS)
  check_fisher(fisher)

  @functools.wraps(fun)
  def value_grads_curvature(
    params, *args, capture=True, fisher_key=None, **kwargs
  ):
    capture = check_call(capture, fisher, fisher_key)
    if not capture:
      value, grads = jax.value_and_grad(fun, has_aux=has_aux)(
        params, *args, **kwargs
      )
      return value, grads, None
    _check_params(params)
    check_differentiable(params, 'fun')
    options = capture_lib.Options(
      'fun', has_aux, fisher, fisher_key, selection, _NOTHING_APPLIED
    )
    value, grads, curvature, _ = capture_lib.drive(
      _runner(fun, args, kwargs), params, options
    )
    return value, grads, curvature

  return with_capture_arguments(value_grads_curvature, fun)


def curvature_layout(
  value_grads_curvature: Callable[..., Any], params: Any, *args, **kwargs
) -> Any:
  """The shapes of the curvature a capture function returns, without FLOPs.

  Pass the result as ``layout=`` to the optimizer: it sizes every captured
  layer's factors exactly (layers stacked by ``nn.scan``, bias-free
  ``DenseGeneral`` layers with several output axes need it), and to
  :func:`adafisher_optax.multi_steps`.

  Args:
    value_grads_curvature: a function from
      :func:`value_and_grad_with_curvature`.
    params: its first argument.
    *args: its other arguments (a sample batch).
    **kwargs: its keyword arguments.

    Params and arguments may be arrays or ``jax.ShapeDtypeStruct``s (e.g.
    from ``jax.eval_shape``); other leaves (flags, names) are passed as
    they are.

  Returns:
    The curvature tree, with ``jax.ShapeDtypeStruct`` leaves.
  """
  leaves, structure = jax.tree.flatten((args, kwargs))
  abstract = [isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves]

  def curvature(p, abstract_leaves):
    given = iter(abstract_leaves)
    full = [next(given) if a else leaf for leaf, a in zip(leaves, abstract)]
    call_args, call_kwargs = jax.tree.unflatten(structure, full)
    out = value_grads_curvature(p, *call_args, **call_kwargs)
    if not isinstance(out, tuple) or len(out) != 3:
      raise TypeError(
        'curvature_layout: value_grads_curvature must be a function from '
        'value_and_grad_with_curvature (it returns value, grads and '
        f'curvature); this one returned {type(out).__name__}'
        + (f' of {len(out)}' if isinstance(out, tuple) else '')
        + '.'
      )
    return out[2]

  return jax.eval_shape(
    curvature, params, [leaf for leaf, a in zip(leaves, abstract) if a]
  )
