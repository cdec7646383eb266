"""Restoring orbax checkpoints with errors that name the mismatching path.

Checkpoints of an earlier state layout are recognised: those written by
adafisher_optax 0.2 (whose AdaFisher state also held ``t_cov``, ``damping``
and ``relative_damping`` arrays) and those that kept one array per factor
field (``h``, ``s``, ``curvature_mean``, ...; before the factors were packed
into :class:`~adafisher_optax.Factors`' ``vectors`` and ``counts``).
:func:`restore` refuses them with the fix, and :func:`restore_legacy`
converts them.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from adafisher_optax import _tree
from adafisher_optax.factors import Factors


def _shapes(tree: Any) -> dict[str, tuple]:
  """``{path: shape}`` of the leaves as orbax stores them (a Flax box, an
  ``nnx.Variable`` or ``nn.Partitioned``, is its ``value`` entry)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {
    _tree.format_path(_tree.keypath_to_path(keypath)): tuple(np.shape(leaf))
    for keypath, leaf in flat
  }


def _numerics(paths) -> str | None:
  """The numerics of the AdaFisher factors among ``paths``, if any."""
  names = {path.rsplit('/', 1)[-1] for path in paths if '/factors/' in path}
  if not names:
    return None
  return 'paper' if names & {'emas', 'h_ema', 's_ema'} else 'reference'


def _is_state_relative_damping(path: str) -> bool:
  *parents, name = path.split('/')
  return name == 'relative_damping' and parents[-1:] != ['hyperparams']


def _earlier_layout(paths) -> str | None:
  """Which earlier state layout ``paths`` are of, if any: ``0.2``
  (a ``relative_damping`` leaf of the state itself, not one that
  ``optax.inject_hyperparams`` keeps) or one array per factor field."""
  if any(_is_state_relative_damping(path) for path in paths):
    return 'adafisher_optax 0.2 (one dict of factors per layer)'
  if any(
    '/factors/' in path and path.endswith('/curvature_mean') for path in paths
  ):
    return 'an earlier adafisher_optax (one array per factor field)'
  return None


def _numerics_error(directory, saved: str, asked: str) -> ValueError:
  return ValueError(
    f'checkpoint {directory}: its AdaFisher factors are for '
    f'numerics={saved!r}, the target optimizer uses numerics={asked!r}.'
  )


def _shape_error(directory, where: str, shape, want) -> ValueError:
  shape, want = tuple(shape), tuple(want)
  if shape[1:] == want or want[1:] == shape:  # one more leading axis
    why = (
      'one of them has a leading axis of devices: save and restore the '
      'state of one replica (flax.jax_utils.unreplicate, then replicate '
      'after restoring) to change the device count'
    )
  else:
    why = 'a checkpoint of another model?'
  return ValueError(
    f'checkpoint {directory}: {where!r} has shape {shape}, the target '
    f'{want} ({why}).'
  )


def _which_differs(path: str) -> str:
  if '/nu/' in f'/{path}/':  # Adam's second moment: grafting='adam' only
    return (
      'a checkpoint of another model or optimizer? AdaFisher keeps nu, '
      "Adam's second moment, only with grafting='adam' "
      '(adafisher_like_adam): restore into an optimizer of the same grafting'
    )
  return 'a checkpoint of another model or optimizer?'


def _compare(directory, stored: dict, wanted: dict) -> None:
  saved, asked = _numerics(stored), _numerics(wanted)
  if saved and asked and saved != asked:
    raise _numerics_error(directory, saved, asked)
  for path in sorted(set(stored) | set(wanted)):
    if path not in stored:
      raise ValueError(
        f'checkpoint {directory}: no entry {path!r}, which the target has '
        f'({_which_differs(path)}).'
      )
    if path not in wanted:
      raise ValueError(
        f'checkpoint {directory}: entry {path!r} is not in the target '
        f'({_which_differs(path)}).'
      )
    if stored[path] != wanted[path]:
      raise _shape_error(directory, path, stored[path], wanted[path])


def _check_exists(directory: Any) -> None:
  if not os.path.isdir(os.fspath(directory)):
    raise FileNotFoundError(f'checkpoint directory {directory} does not exist.')


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

  _check_exists(directory)
  checkpointer = checkpointer or ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(directory)
  stored = _shapes(getattr(metadata, 'item_metadata', metadata))
  earlier = _earlier_layout(stored)
  if earlier:
    raise ValueError(
      f'checkpoint {directory} was written by {earlier}; this version '
      "packs each block's factors into two arrays (vectors, counts). "
      'Convert it with '
      'adafisher_optax.checkpoint.restore_legacy(directory, target), then '
      'save it again.'
    )
  _compare(directory, stored, _shapes(target))
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return checkpointer.restore(directory, abstract)


def _get(raw: Any, keypath) -> Any:
  """The entry of a raw (target-free) restore at a ``jax`` key path, or
  ``None`` (an empty ``nu`` of a state without ``grafting='adam'`` is
  ``()``)."""
  for key in _tree.keypath_to_path(keypath):
    if isinstance(raw, (list, tuple)):
      index = int(key) if str(key).isdigit() else len(raw)
      raw = raw[index] if index < len(raw) else None
    elif isinstance(raw, dict):
      raw = raw.get(key)
    else:
      return None
    if raw is None:
      return None
  return raw


def _where(keypath) -> str:
  return _tree.format_path(_tree.keypath_to_path(keypath))


def _converted(directory, keypath, value, like) -> np.ndarray:
  """``value`` in the shape of ``like``, or an error naming the path."""
  value = np.asarray(value)
  if value.size != np.size(like):
    raise _shape_error(directory, _where(keypath), value.shape, np.shape(like))
  return value.reshape(np.shape(like))


def _legacy_factors(directory, raw, keypath, factors: Factors) -> Factors:
  """A block's factors from a checkpoint with one entry per factor field, or
  ``factors`` (the target's initial ones) for a block it did not have (0.2
  had no tied table's ``attend``)."""
  old = _get(raw, keypath)  # one dict per block, in a tuple where several
  if not isinstance(old, dict) or 'h' not in old:  # 0.2: one dict per layer
    if factors.rule == 'attend':
      return factors
    in_tuple = isinstance(keypath[-1], jax.tree_util.SequenceKey)
    old = _get(raw, keypath[:-1] if in_tuple else keypath)
  if old is None:
    return factors
  saved = 'paper' if old.get('h_ema') is not None else 'reference'
  asked = 'paper' if factors.emas is not None else 'reference'
  if saved != asked:
    raise _numerics_error(directory, saved, asked)
  return Factors.pack(
    factors.block,
    **{
      f: _converted(
        directory, (*keypath, jax.tree_util.DictKey(f)), old[f], view
      )
      for f in _FIELDS
      if (view := getattr(factors, f)) is not None
    },
  )


_FIELDS = ('h', 's', 'curvature_mean', 'refreshes', 'skipped', 'h_ema', 's_ema')


def restore_legacy(
  directory: Any, target: Any, checkpointer: Any = None
) -> Any:
  """Converts a checkpoint of an earlier state layout into ``target``'s.

  Reads checkpoints of adafisher_optax 0.2 and those with one array per
  factor field (``h``, ``s``, ``curvature_mean``, ``refreshes``, ...).
  Every entry of the target is read at its path (the 0.2 state's
  ``t_cov``, ``damping`` and ``relative_damping`` are dropped: the target
  optimizer's settings apply); a tied embedding's ``attend`` factors, new in
  this version, and ``grafting='adam'``'s second moment start afresh. Save
  the result to have a checkpoint of this version.

  Args:
    directory: the checkpoint (an orbax ``StandardCheckpointer`` save).
    target: a tree like the saved one, with this version's optimizer state
      (e.g. ``{'params': params, 'opt_state': tx.init(params)}``).
    checkpointer: the orbax checkpointer to use.

  Returns:
    The restored tree.
  """
  import orbax.checkpoint as ocp

  _check_exists(directory)
  checkpointer = checkpointer or ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(directory)
  if not _earlier_layout(_shapes(getattr(metadata, 'item_metadata', metadata))):
    raise ValueError(
      f"checkpoint {directory} is of this version's layout (or holds no "
      'AdaFisher state): restore it with adafisher_optax.checkpoint.restore.'
    )
  raw = checkpointer.restore(directory)

  def fill(keypath, node):
    if isinstance(node, Factors):
      return _legacy_factors(directory, raw, keypath, node)
    value = _get(raw, keypath)
    if value is None:
      where = _where(keypath)
      if '/nu/' not in f'/{where}/':
        raise ValueError(f'checkpoint {directory}: no entry {where!r}.')
      return node
    if np.shape(value) != np.shape(node):
      raise _shape_error(
        directory, _where(keypath), np.shape(value), np.shape(node)
      )
    return np.asarray(value)

  return jax.tree_util.tree_map_with_path(
    fill, target, is_leaf=lambda n: isinstance(n, Factors)
  )
