"""Restoring orbax checkpoints with errors that name the mismatching path."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from adafisher_optax import _tree


def _shapes(tree: Any) -> dict[str, tuple]:
  return {
    _tree.format_path(path): tuple(np.shape(leaf))
    for path, leaf in _tree.leaves_with_paths(tree)
  }


def restore(directory: Any, target: Any, checkpointer: Any = None) -> Any:
  """Restores a checkpoint saved with orbax into the structure of ``target``.

  Before reading any array, the stored tree is compared with ``target``
  (e.g. ``{'params': params, 'opt_state': opt_state}`` of the model being
  resumed, or their ``jax.ShapeDtypeStruct``s): a missing, extra or
  differently shaped entry raises an error naming its path, where orbax's own
  error would not say which array (or which model) is wrong.

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

  checkpointer = checkpointer or ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(directory)
  stored = _shapes(getattr(metadata, 'item_metadata', metadata))
  wanted = _shapes(target)
  for path in sorted(set(stored) | set(wanted)):
    if path not in stored:
      raise ValueError(
        f'checkpoint {directory}: no entry {path!r}, which the target has '
        '(a checkpoint of another model or optimizer?).'
      )
    if path not in wanted:
      raise ValueError(
        f'checkpoint {directory}: entry {path!r} is not in the target (a '
        'checkpoint of another model or optimizer?).'
      )
    if stored[path] != wanted[path]:
      raise ValueError(
        f'checkpoint {directory}: {path!r} has shape {stored[path]}, the '
        f'target {wanted[path]} (a checkpoint of another model?).'
      )
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return checkpointer.restore(directory, abstract)
