"""Restoring orbax checkpoints with errors that name the mismatching path.

The factors of all layers sit in a few arrays (one per vector length), so a
mismatch there is explained in terms of the layers whose vectors have that
length. Checkpoints written by adafisher_optax 0.2 (one dict of factors per
layer) are recognised: :func:`restore` refuses them with the fix, and
:func:`restore_legacy` converts them.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import numpy as np

from adafisher_optax import _tree
from adafisher_optax.state import AdaFisherState

_BUCKET = re.compile(r'/factors/(h|s|h_ema|s_ema)/(\d+)$')
_LEGACY_FIELDS = ('h', 's', 'h_ema', 's_ema', 'curvature_mean', 'refreshes')


def _shapes(tree: Any) -> dict[str, tuple]:
  return {
    _tree.format_path(path): tuple(np.shape(leaf))
    for path, leaf in _tree.leaves_with_paths(tree)
  }


def _numerics(paths) -> str | None:
  """The numerics of the AdaFisher factors among ``paths``, if any."""
  if not any('/factors/' in path for path in paths):
    return None
  paper = any('/factors/h_ema/' in path for path in paths)
  return 'paper' if paper else 'reference'


def _is_legacy(paths) -> bool:
  """Whether ``paths`` are of a 0.2 state (``t_cov`` and ``damping`` leaves)."""
  return any(path.endswith('/relative_damping') for path in paths)


def _adafisher_states(target: Any) -> dict[str, AdaFisherState]:
  """``{path: AdaFisherState}`` inside ``target``."""
  flat = jax.tree_util.tree_flatten_with_path(
    target, is_leaf=lambda n: isinstance(n, AdaFisherState)
  )[0]
  return {
    _tree.format_path(_tree.keypath_to_path(kp)): node
    for kp, node in flat
    if isinstance(node, AdaFisherState)
  }


def _layers_of(path: str, target: Any) -> str:
  """For a factor array of the target: the layers whose vectors it holds."""
  found = _BUCKET.search(path)
  if found is None:
    return ''
  side, length = found.group(1)[0], int(found.group(2))
  for prefix, state in _adafisher_states(target).items():
    if path.startswith(prefix + '/'):
      names = [
        _tree.format_path(b.path)
        for b in state.factors.layout.blocks
        if getattr(b, f'{side}_length') == length
      ]
      return f' (the {side.upper()} vectors of length {length}: ' + (
        ', '.join(names) + ')'
      )
  return ''


def _compare(directory, stored: dict, wanted: dict, target: Any) -> None:
  saved, asked = _numerics(stored), _numerics(wanted)
  if saved and asked and saved != asked:
    raise ValueError(
      f'checkpoint {directory}: its AdaFisher factors are for '
      f'numerics={saved!r}, the target optimizer uses numerics={asked!r}.'
    )
  # Parameters and moments first: their paths name the layer.
  paths = sorted(set(stored) | set(wanted), key=lambda p: ('/factors/' in p, p))
  for path in paths:
    where = f'checkpoint {directory}: '
    if path not in stored:
      raise ValueError(
        f'{where}no entry {path!r}, which the target has'
        f'{_layers_of(path, target)} (a checkpoint of another model or '
        'optimizer?).'
      )
    if path not in wanted:
      raise ValueError(
        f'{where}entry {path!r} is not in the target (a checkpoint of '
        'another model or optimizer?).'
      )
    if stored[path] != wanted[path]:
      raise ValueError(
        f'{where}{path!r} has shape {stored[path]}, the target '
        f'{wanted[path]}{_layers_of(path, target)} (a checkpoint of another '
        'model?).'
      )


def restore(directory: Any, target: Any, checkpointer: Any = None) -> Any:
  """Restores a checkpoint saved with orbax into the structure of ``target``.

  Before reading any array, the stored tree is compared with ``target``
  (e.g. ``{'params': params, 'opt_state': tx.init(params)}`` of the model
  and optimizer being resumed, or their ``jax.ShapeDtypeStruct``s): a
  missing, extra or differently shaped entry raises an error naming its
  path (and, for factors, the layers), and AdaFisher factors saved for the
  other numerics are named as such, where orbax's own error would not say
  which array (or which model) is wrong. The restored AdaFisher state has
  the target optimizer's settings (``t_cov``, damping), so
  :func:`adafisher_optax.refresh_schedule` follows the optimizer you run.

  Args:
    directory: the checkpoint directory (an orbax ``StandardCheckpointer``
      save, or one step of a ``CheckpointManager``).
    target: a tree like the saved one.
    checkpointer: the orbax checkpointer to use (default a
      ``StandardCheckpointer``).

  Returns:
    The restored tree.
  """
  import orbax.checkpoint as ocp  # heavy; imported only when restoring

  if not os.path.isdir(os.fspath(directory)):
    raise FileNotFoundError(f'checkpoint directory {directory} does not exist.')
  checkpointer = checkpointer or ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(directory)
  stored = _shapes(getattr(metadata, 'item_metadata', metadata))
  if _is_legacy(stored):
    raise ValueError(
      f'checkpoint {directory} was written by adafisher_optax 0.2 (one '
      'dict of factors per layer); this version keeps the factors of all '
      'layers in a few arrays. Convert it with '
      'adafisher_optax.checkpoint.restore_legacy(directory, target), then '
      'save it again.'
    )
  _compare(directory, stored, _shapes(target), target)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return checkpointer.restore(directory, abstract)


def _get(raw: Any, path: _tree.Path) -> Any:
  for key in path:
    raw = raw[int(key)] if isinstance(raw, list) else raw[key]
  return raw


def _converted(state: AdaFisherState, old: dict) -> AdaFisherState:
  """``state`` (the target's) filled from a 0.2 AdaFisher state ``old``."""
  buffers = state.factors
  arrays = {
    field: {n: np.array(v) for n, v in getattr(buffers, field).items()}
    for field in ('h', 's', 'h_ema', 's_ema')
  }
  per_slice = {
    f: np.array(getattr(buffers, f)) for f in ('curvature_mean', 'refreshes')
  }
  for block in buffers.layout.blocks:
    layer = _tree.get_node(old['factors'], block.path)
    if layer is None or block.rule == 'attend':  # new in 0.3
      continue
    for field in _LEGACY_FIELDS:
      if field in per_slice:
        first = block.first_slice
        per_slice[field][first : first + block.slices] = np.ravel(layer[field])
      elif arrays[field]:
        side = field[0]
        n, first = (
          getattr(block, f'{side}_length'),
          getattr(block, f'{side}_row'),
        )
        rows = np.reshape(layer[field], (-1, n))
        arrays[field][str(n)][first : first + block.slices] = rows
  return state._replace(
    count=np.asarray(old['count']),
    mu=jax.tree.map(np.asarray, old['mu']),
    factors=type(buffers)(
      **arrays,
      **per_slice,
      skipped=np.array(buffers.skipped),
      layout=buffers.layout,
    ),
    last_refresh=np.asarray(old['last_refresh']),
  )


def restore_legacy(
  directory: Any, target: Any, checkpointer: Any = None
) -> Any:
  """Converts a checkpoint of adafisher_optax 0.2 into ``target``'s structure.

  Every entry but the AdaFisher factors is read at its path; each layer's
  factors are placed in the arrays of the new state (a tied embedding's
  ``attend`` block, new in this version, starts unrefreshed). Save the
  result to have a checkpoint of this version.

  Args:
    directory: the 0.2 checkpoint (an orbax ``StandardCheckpointer`` save).
    target: a tree like the saved one, with this version's optimizer state
      (e.g. ``{'params': params, 'opt_state': tx.init(params)}``).
    checkpointer: the orbax checkpointer to use.

  Returns:
    The restored tree.
  """
  import orbax.checkpoint as ocp

  checkpointer = checkpointer or ocp.StandardCheckpointer()
  raw = checkpointer.restore(directory)

  def fill(keypath, node):
    path = _tree.keypath_to_path(keypath)
    if isinstance(node, AdaFisherState):
      return _converted(node, _get(raw, path))
    return np.asarray(_get(raw, path))

  return jax.tree_util.tree_map_with_path(
    fill, target, is_leaf=lambda n: isinstance(n, AdaFisherState)
  )
