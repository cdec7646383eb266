"""The refresh: one step's curvature statistics folded into the factors.

On an update that brings ``curvature``: match each layer's statistics to its
block in the state (checking that they belong to this model and state),
combine them over devices (:func:`adafisher_optax.statistics.over_devices`),
and, when a refresh is due (:func:`adafisher_optax.state.refresh_due`),
fold them into the factor EMAs (:func:`adafisher_optax.factors.refresh`)
and recompute each layer's ``mean(K)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from adafisher_optax import _tree, rules
from adafisher_optax import factors as factors_lib
from adafisher_optax import statistics as statistics_lib
from adafisher_optax.layout import Block, BlockKey, FactorLayout, same_maths
from adafisher_optax.preconditioner import curvature_mean, parameter_entries
from adafisher_optax.state import AdaFisherState, refresh_due

_WITH_LAYOUT = (
  'build the optimizer with '
  'layout=adafisher_optax.curvature_layout(grad_fn, params, *batch), '
  'the model in place of params for NNX'
)


def _present_shapes(updates, path, roles: Mapping[str, str]):
  """``{role: shape}`` of a layer's parameters present in ``updates``."""
  shapes = {}
  for name, role in roles.items():
    leaf = _tree.unbox(_tree.get_node(updates, path + (name,)))
    if leaf is not None and hasattr(leaf, 'shape'):
      shapes[role] = tuple(leaf.shape)
  return shapes


def _find_block(layout: FactorLayout, path, stats) -> Block:
  where = _tree.format_path(path)
  block = layout.by_key.get((path, stats.rule)) or next(
    (
      b
      for b in layout.layers.get(path, ())
      if same_maths(b.rule, stats.rule)
      and b.roles == tuple(sorted(stats.roles().items()))
    ),
    None,
  )
  if block is not None:
    return block
  held = layout.layers.get(path)
  if not held:
    raise ValueError(
      f'curvature has statistics for layer {where!r} but the optimizer state '
      'has no factors for it: the curvature comes from another model, the '
      "state was initialised for other params, the layer's weight is "
      "masked out, or the layer holds another module's parameters "
      "(nnx.LoRALinear's lora), so its factors could not be sized from "
      f'parameter names (then {_WITH_LAYOUT}).'
    )
  raise ValueError(
    f'Layer {where!r}: the state holds factors of '
    + ', '.join(f'a {b.rule!r} block over {dict(b.roles)}' for b in held)
    + f', the curvature is of a {stats.rule!r} layer with parameters '
    f'{sorted(stats.roles())}: the curvature comes from another model, or '
    f'the state was sized without a layout ({_WITH_LAYOUT}).'
  )


def _check_block(block: Block, stats, shapes, numerics) -> None:
  where = _tree.format_path(block.path)
  for field in ('input_sums', 'output_sums', 'rows'):
    for value in jax.tree.leaves(getattr(stats, field)):
      if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(
          f'curvature[{where!r}].{field} has dtype {value.dtype}; '
          'statistics are floating-point (pass the curvature of '
          'value_and_grad_with_curvature unchanged).'
        )
  want = (block.h_shape, block.s_shape)
  got = stats.layer_rule.factor_shapes(
    [tuple(a.shape) for a in stats.input_sums],
    [tuple(a.shape) for a in stats.output_sums],
    numerics,
  )
  if want != tuple(map(tuple, got)):
    raise ValueError(
      f'Layer {where!r}: the optimizer state holds factors of shapes {want} '
      f'but the curvature needs factors of shapes {got}. Either the '
      'curvature comes from another model, or the factor sizes could not be '
      'inferred from parameter names (nn.scan stacks, bias-free DenseGeneral '
      f'with several output axes, tied embeddings): {_WITH_LAYOUT}.'
    )
  n_stack, d_out = len(block.stack), block.s_shape[-1]
  for role, shape in shapes.items():
    fits = tuple(shape[:n_stack]) == block.stack and (
      math.prod(shape[n_stack:]) % d_out == 0
    )
    if not fits:
      raise ValueError(
        f'The {role} of layer {where!r} has shape {shape}, which does not '
        f'fit statistics of shapes {got}: the curvature comes from another '
        'model.'
      )


def match(
  layout: FactorLayout, curvature: Any, updates: Any, numerics
) -> dict[BlockKey, tuple[statistics_lib.LayerStatistics, dict]]:
  """``{block key: (statistics, {role: parameter shape})}`` of a curvature.

  Raises when the curvature does not belong to the model and state.
  Statistics of layers the updates do not hold (an ``nnx.Optimizer`` with a
  ``wrt`` filter, or an optimizer of a sub-tree, given the whole model's
  curvature) or whose parameters are all masked out are left out; a
  curvature none of whose layers the updates hold is refused.
  """
  matched, absent = {}, []
  by_block = statistics_lib.by_block(curvature)
  for (path, _), stats in by_block.items():
    if _tree.masked_out(updates, path):
      continue
    if not isinstance(_tree.get_node(updates, path), Mapping):
      absent.append(_tree.format_path(path))
      continue
    shapes = _present_shapes(updates, path, stats.roles())
    if not shapes:
      continue  # every parameter of the layer is masked out
    block = _find_block(layout, path, stats)
    _check_block(block, stats, shapes, numerics)
    matched[block.key] = (stats, shapes)
  if absent and len(absent) == len(by_block):
    raise ValueError(
      f'curvature has statistics for layers {absent}, none of which the '
      'updates hold: the curvature comes from another model, or the updates '
      'are of a sub-tree of the params whose paths differ from the '
      "curvature's (pass the gradients with the paths the model's params "
      'have).'
    )
  return matched


@functools.cache
def _jitted_fold(block: Block, numerics, shapes: tuple, entries: int):
  """:func:`adafisher_optax.factors.refresh` for blocks alike (``block``
  without its path), as a jitted function. JAX traces it once for all of
  them (a network's repeated layers), which cut the refresh program's
  tracing and lowering by a sixth to a quarter at GPT-2 size; XLA inlines
  the calls, so the compiled program has the same kernels."""
  rule = block.layer_rule
  form = rule.curvature_sum_form(
    numerics, dict(shapes), block.stack, (block.h_shape[-1], block.s_shape[-1])
  )
  mean_of = functools.partial(
    curvature_mean, rule, numerics=numerics, shapes=dict(shapes),
    entries=entries,
  )  # fmt: skip

  def fold(vectors, counts, emas, h_hat, s_hat, rows, due, gamma):
    # Curvature estimates are not differentiated (nor is the reduction that
    # folds them in): jax.grad through an update takes the factors as given.
    vectors, emas, h_hat, s_hat = jax.lax.stop_gradient(
      (vectors, emas, h_hat, s_hat)
    )
    factors, took = factors_lib.refresh(
      factors_lib.Factors(vectors, counts, emas, block), (h_hat, s_hat), rows,
      due=due, numerics=numerics, gamma=gamma, form=form, entries=entries,
      mean_of=mean_of,
    )  # fmt: skip
    return factors.vectors, factors.counts, factors.emas, took

  return jax.jit(fold)


def refresh_if_due(
  state: AdaFisherState,
  matched: Mapping[BlockKey, tuple[Any, dict]],
  *,
  gamma: Any,
  axis_names: tuple,
) -> AdaFisherState:
  """``state`` with the factors refreshed from ``matched`` when one is due."""
  if not matched:
    return state
  settings = state.settings
  numerics: rules.Numerics = settings.numerics  # type: ignore[assignment]
  due = refresh_due(state.count, state.last_refresh, settings.t_cov)
  layout = factors_lib.layout_of(state.factors)
  entries = parameter_entries(
    layout, {key: shapes for key, (_, shapes) in matched.items()}
  )

  def refreshed(tree, due):
    current = factors_lib.by_block(tree)
    combined = statistics_lib.over_devices(
      {key: stats for key, (stats, _) in matched.items()}, axis_names
    )
    new, took = dict(current), []
    for key, stats in combined.items():
      factors, shapes = current[key], matched[key][1]
      fold = _jitted_fold(
        dataclasses.replace(factors.block, path=()), numerics,
        tuple(sorted(shapes.items())), entries[key[0]],
      )  # fmt: skip
      h_hat, s_hat = stats.means(numerics)
      *arrays, block_took = fold(
        factors.vectors, factors.counts, factors.emas, h_hat, s_hat,
        stats.rows, due, gamma,
      )  # fmt: skip
      new[key] = factors_lib.Factors(*arrays, block=factors.block)
      took.append(block_took)
    return factors_lib.nest(new), jnp.any(jnp.stack(took))

  if axis_names:  # collectives on due steps only
    tree, folded = jax.lax.cond(
      due,
      lambda t: refreshed(t, True),
      lambda t: (t, jnp.asarray(False)),
      state.factors,
    )
  else:  # a refresh that is not due changes nothing: no conditional
    tree, folded = refreshed(state.factors, due)
  # The update reads the new factors as the plain step reads the stored
  # ones: without the barrier XLA fuses each refresh into every parameter's
  # update, which costs compile time, not run time.
  tree = jax.lax.optimization_barrier(tree)
  # A refresh that no block took (every one skipped: a non-finite batch)
  # stays due, so the next curvature refreshes and `overdue` counts on.
  return state._replace(
    factors=tree,
    last_refresh=jnp.where(due & folded, state.count, state.last_refresh),
  )
