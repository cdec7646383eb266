"""Small helpers for nested parameter dictionaries addressed by paths."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

Path = tuple[str, ...]


def key_to_str(key: Any) -> str:
  """Returns the plain name of one entry of a ``jax.tree_util`` key path."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def keypath_to_path(keypath) -> Path:
  return tuple(key_to_str(k) for k in keypath)


def format_path(path: Path) -> str:
  return '/'.join(str(key) for key in path) if path else '<root>'


def get_node(tree: Any, path: Path) -> Any:
  """Returns ``tree[p0][p1]...`` or ``None`` when any key is missing.

  A key also matches by its name, as :func:`key_to_str` writes it: paths read
  from flattened trees are strings, while an ``nnx.State`` keys the items of
  a list by integers.
  """
  node = tree
  for key in path:
    if not isinstance(node, Mapping):
      return None
    if key not in node:
      key = next((k for k in node if str(k) == key), None)
      if key is None:
        return None
    node = node[key]
  return node


def _rebuild(mapping: Mapping, entries: dict) -> Mapping:
  return entries if isinstance(mapping, dict) else type(mapping)(entries)


def set_node(tree: Mapping, path: Path, value: Any) -> Mapping:
  """Returns a copy of ``tree`` with ``value`` stored at ``path``."""
  entries = dict(tree)
  if len(path) == 1:
    entries[path[0]] = value
  else:
    entries[path[0]] = set_node(tree[path[0]], path[1:], value)
  return _rebuild(tree, entries)


def pop_node(tree: Mapping, path: Path) -> tuple[Mapping, Any]:
  """Returns ``(tree without path, removed value)``, keeping mapping types."""
  entries = dict(tree)
  if len(path) == 1:
    value = entries.pop(path[0])
  else:
    entries[path[0]], value = pop_node(tree[path[0]], path[1:])
  return _rebuild(tree, entries), value


def leaves_with_paths(tree: Any, is_leaf=None) -> list[tuple[Path, Any]]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return [(keypath_to_path(kp), leaf) for kp, leaf in flat]


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
