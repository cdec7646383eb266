"""Nested parameter trees addressed by paths, with boxed leaves seen through.

A *box* wraps one array with metadata: Flax linen's ``nn.Partitioned`` (and
every ``flax.core.meta.AxisMetadata``) and Flax NNX's ``Variable`` in an
``nnx.State``. Paths here name the boxed array, not the box's ``value``
field, so ``params``, ``nnx.state(model, nnx.Param)`` and their gradients
give the same paths as plain dicts. Duck-typed: importing this module does
not import Flax.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

Path = tuple[str, ...]


def is_box(node: Any) -> bool:
  """Whether ``node`` is a Flax box (linen axis metadata or an NNX Variable)."""
  if hasattr(node, 'unbox') and hasattr(node, 'replace_boxed'):
    return True
  return hasattr(node, 'get_value') and hasattr(node, 'replace')


def unbox(node: Any) -> Any:
  """The array inside a box; anything else unchanged."""
  if not is_box(node):
    return node
  return node.unbox() if hasattr(node, 'unbox') else node.get_value()


def rebox(like: Any, value: Any) -> Any:
  """``value`` in a box like ``like`` (same metadata), if ``like`` is one."""
  if not is_box(like):
    return value
  if hasattr(like, 'replace_boxed'):
    return like.replace_boxed(value)
  return like.replace(value)


def unbox_tree(tree: Any) -> Any:
  return jax.tree.map(unbox, tree, is_leaf=is_box)


def key_to_str(key: Any) -> str:
  """The plain name of one entry of a ``jax.tree_util`` key path."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def keypath_to_path(keypath) -> Path:
  return tuple(key_to_str(k) for k in keypath)


def format_path(path: Path) -> str:
  return '/'.join(str(key) for key in path) if path else '<root>'


def leaves_with_paths(tree: Any, is_leaf=None) -> list[tuple[Path, Any]]:
  """``[(path, leaf)]`` with boxes opened (``is_leaf`` may stop earlier)."""

  def stop(node):
    return is_box(node) or (is_leaf is not None and is_leaf(node))

  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=stop)
  return [(keypath_to_path(kp), unbox(leaf)) for kp, leaf in flat]


def map_with_path(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
  """``fn(path, leaf, *other_leaves)`` over ``tree`` with boxes opened.

  Results are boxed like ``tree``'s leaves (logical axes and NNX variable
  types kept).
  """

  def apply(keypath, leaf, *others):
    value = fn(keypath_to_path(keypath), unbox(leaf), *map(unbox, others))
    return rebox(leaf, value)

  return jax.tree_util.tree_map_with_path(apply, tree, *rest, is_leaf=is_box)


def is_sequence(node: Any) -> bool:
  """A list or tuple of params (not a NamedTuple such as optax's
  ``MaskedNode``, which stands for a leaf)."""
  return isinstance(node, (list, tuple)) and not hasattr(node, '_fields')


def is_container(node: Any) -> bool:
  """A mapping, list or tuple of params (not a leaf)."""
  return isinstance(node, Mapping) or is_sequence(node)


def _index(node: Any, key: Any) -> Any:
  """The key of ``node`` (a mapping, list or tuple) that ``key`` names, or
  ``None``."""
  if isinstance(node, Mapping):
    if key in node:
      return key
    return next((k for k in node if str(k) == str(key)), None)
  if is_sequence(node):
    index = str(key)
    if index.isdigit() and int(index) < len(node):
      return int(index)
  return None


def masked_out(tree: Any, path: Path) -> bool:
  """Whether ``optax.masked`` put a ``MaskedNode`` at ``path`` of ``tree``
  or above it (a mask given as a prefix of the params)."""
  return any(
    isinstance(get_node(tree, path[:i]), optax.MaskedNode)
    for i in range(len(path) + 1)
  )


def shape_differences(
  tree: Any, reference: Any
) -> dict[Path, tuple[tuple | None, tuple | None]]:
  """``{path: (shape in tree, shape in reference)}`` where the two differ
  (``None``: no such leaf), ``tree``'s paths first in its order, then those
  only ``reference`` has. Paths that ``reference`` masks out
  (:func:`masked_out`) are not compared."""
  got = {
    p: tuple(getattr(v, 'shape', ()))
    for p, v in leaves_with_paths(tree)
    if not masked_out(reference, p)
  }
  want = {p: tuple(v.shape) for p, v in leaves_with_paths(reference)}
  differences = {
    p: (s, want.get(p)) for p, s in got.items() if want.get(p) != s
  }
  differences.update({p: (None, s) for p, s in want.items() if p not in got})
  return differences


def get_node(tree: Any, path: Path) -> Any:
  """Returns ``tree[p0][p1]...`` or ``None`` when any key is missing.

  A key also matches by its name, as :func:`key_to_str` writes it: paths read
  from flattened trees are strings, while an ``nnx.State`` keys the items of
  a list by integers, and params may hold lists or tuples.
  """
  node = tree
  for key in path:
    key = _index(node, key)
    if key is None:
      return None
    node = node[key]
  return node


def nest(flat: Mapping[Path, Any]) -> Any:
  """Builds nested dicts from ``{path: value}``; ``{(): v}`` gives ``v``."""
  if () in flat:
    return flat[()]
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def set_in(tree: Any, path: Path, value: Any) -> Any:
  """A copy of ``tree`` with ``value`` at ``path``: mappings are copied as
  dicts (a missing key is added), lists and tuples keep their type."""
  key = _index(tree, path[0])
  if is_sequence(tree):
    if key is None:
      raise KeyError(f'{path[0]!r} is not an index of a {type(tree).__name__}')
    entries: Any = list(tree)
    child = entries[key]
  else:
    entries = dict(tree)
    key, child = (path[0], {}) if key is None else (key, entries[key])
  entries[key] = value if len(path) == 1 else set_in(child, path[1:], value)
  return tuple(entries) if isinstance(tree, tuple) else entries


def first_leaf_not_of(tree: Any, kind: Any) -> tuple[Path, Any] | None:
  """``(path, dtype)`` of the first leaf whose dtype is not a ``kind``
  (``jnp.floating``, ``jnp.inexact``), or ``None``."""
  import jax.numpy as jnp

  for path, leaf in leaves_with_paths(tree):
    dtype = getattr(leaf, 'dtype', None)
    if dtype is None and isinstance(leaf, (int, float, complex)):
      dtype = jnp.result_type(leaf)  # a Python scalar (bool: bool)
    if dtype is None or not jnp.issubdtype(dtype, kind):
      return path, dtype
  return None


def nodes_of(tree: Any, kind: type) -> list:
  """The nodes of ``tree`` that are ``kind`` (none inside another)."""
  leaves = jax.tree.leaves(tree, is_leaf=lambda n: isinstance(n, kind))
  return [node for node in leaves if isinstance(node, kind)]
