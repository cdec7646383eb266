"""Restoring orbax checkpoints with errors that name the mismatching path."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from adafisher_optax import _tree
from adafisher_optax import factors as factors_lib

_PAPER_ONLY = {f.name for f in dataclasses.fields(factors_lib.PaperFactors)} - {
  f.name for f in dataclasses.fields(factors_lib.Factors)
}


def _shapes(tree: Any) -> dict[str, tuple]:
  return {
    _tree.format_path(path): tuple(np.shape(leaf))
    for path, leaf in _tree.leaves_with_paths(tree)
  }


def _numerics(paths) -> str | None:
  """The numerics of the AdaFisher factors among ``paths``, if any."""
  names = {path.rsplit('/', 1)[-1] for path in paths if '/factors/' in path}
  if not names:
    return None
  return 'paper' if names & _PAPER_ONLY else 'reference'


def restore(directory: Any, target: Any, checkpointer: Any = None) -> Any:
  """Restores a checkpoint saved with orbax into the structure of ``target``.

  Before reading any array, the stored tree is compared with ``target``
  (e.g. ``{'params': params, 'opt_state': opt_state}`` of the model being
  resumed, or their ``jax.ShapeDtypeStruct``s): a missing, extra or
  differently shaped entry raises an error naming its path, and AdaFisher
  factors saved for the other numerics are named as such, where orbax's own
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

  if not os.path.isdir(os.fspath(directory)):
    raise FileNotFoundError(f'checkpoint directory {directory} does not exist.')
  checkpointer = checkpointer or ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(directory)
  stored = _shapes(getattr(metadata, 'item_metadata', metadata))
  wanted = _shapes(target)
  saved, asked = _numerics(stored), _numerics(wanted)
  if saved and asked and saved != asked:
    raise ValueError(
      f'checkpoint {directory}: its AdaFisher factors are for '
      f'numerics={saved!r}, the target optimizer uses numerics={asked!r}.'
    )
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
