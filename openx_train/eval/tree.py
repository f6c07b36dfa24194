"""Nested observations and actions (dicts and tuples of arrays), batched or not: the few
structure operations the wrappers, the policy adapters and the rollouts share."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


def map_structure(fn: Callable[..., Any], *trees: Any) -> Any:
    """``fn`` applied leaf by leaf to trees of the same structure (mappings become dicts)."""
    first = trees[0]
    if isinstance(first, Mapping):
        return {k: map_structure(fn, *(t[k] for t in trees)) for k in first}
    if isinstance(first, tuple):
        return tuple(map_structure(fn, *leaves) for leaves in zip(*trees))
    return fn(*trees)


def leaves(tree: Any, path: str = "") -> list[tuple[str, Any]]:
    """``(key path, leaf)`` pairs in order; key paths join keys with ``/``."""
    if isinstance(tree, Mapping):
        return [p for k, v in tree.items() for p in leaves(v, f"{path}/{k}" if path else str(k))]
    if isinstance(tree, tuple):
        return [p for i, v in enumerate(tree) for p in leaves(v, f"{path}/{i}" if path else str(i))]
    return [(path, tree)]


def index(tree: Any, i: Any) -> Any:
    """Row (or rows) ``i`` of every leaf."""
    return map_structure(lambda x: x[i], tree)


def stack(trees: Sequence[Any]) -> Any:
    """Trees of the same structure stacked leaf by leaf on a new leading axis."""
    return map_structure(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def batch_size(tree: Any, what: str) -> int:
    """The leading dimension shared by every leaf of a batched tree.

    Raises:
      ValueError: naming the key path of a leaf without it, or whose leading size differs.
    """
    sizes = {}
    for path, leaf in leaves(tree):
        shape = np.shape(leaf)
        if not shape:
            raise ValueError(f"{what}{'/' + path if path else ''}: expected a batch (leading "
                             f"axis over the sub-envs), given a scalar")
        sizes[path] = shape[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{what}: expected one batch size for every key, given {sizes}")
    return next(iter(sizes.values()))
