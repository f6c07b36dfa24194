"""Reading datasets back without TensorFlow: features.json to a spec, records to numpy.

``tfds.builder_from_directory(dir)`` is the reference reader (the tests compare against it); this
one serves the tools that must not pay for TensorFlow (recovery, statistics, validation, the
byte-level resharder) and users who want numpy episodes quickly.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import numpy as np

from oxe_envlogger.errors import CorruptDatasetError
from oxe_envlogger.format import codecs, layout, record
from oxe_envlogger.format.specs import Group, Leaf, iter_leaf_keys, spec_from_features_json

PathLike = str | os.PathLike
Keys = tuple[str, ...]


def read_spec(directory: PathLike) -> Group:
    """The episode spec of a dataset directory, from its ``features.json``.

    Raises:
      FileNotFoundError: without ``features.json``.
      CorruptDatasetError: when two features are stored under the same name (a key holding
        ``/`` that collides with a nested key; tfds cannot read such a dataset either).
    """
    data = layout.read_json(os.path.join(directory, layout.FEATURES))
    if data is None:
        raise FileNotFoundError(f"{directory}: no {layout.FEATURES}; not a dataset directory")
    spec = spec_from_features_json(data)
    assert isinstance(spec, Group)
    seen: dict[str, Keys] = {}
    for keys, _ in iter_leaf_keys(spec):
        name = "/".join(keys)
        if name in seen:
            raise CorruptDatasetError(
                f"{directory}: {layout.FEATURES} stores two features as {name!r} (keys "
                f"{list(seen[name])} and {list(keys)}): no reader can tell them apart")
        seen[name] = keys
    return spec


def _step_leaf_keys(spec: Group) -> list[tuple[Keys, Leaf]]:
    steps = spec.fields.get("steps")
    return list(iter_leaf_keys(steps)) if isinstance(steps, Group) else []


def _episode_leaf_keys(spec: Group) -> list[tuple[Keys, Leaf]]:
    return [(keys, leaf) for keys, leaf in iter_leaf_keys(spec) if keys[0] != "steps"]


def step_leaves(spec: Group) -> list[tuple[str, Leaf]]:
    """``(path relative to a step, leaf)`` for every leaf inside ``steps``."""
    return [("/".join(keys), leaf) for keys, leaf in _step_leaf_keys(spec)]


def episode_leaves(spec: Group) -> list[tuple[str, Leaf]]:
    """Episode-level leaves (everything outside ``steps``)."""
    return [("/".join(keys), leaf) for keys, leaf in _episode_leaf_keys(spec)]


def _split(node: Any, path: str, children) -> Keys:
    """The keys that lead from ``node`` to ``path`` (``children(node)`` gives a node's
    children, or None for a leaf): ``path.split("/")`` unless a key itself holds ``/``. In a
    dataset tfds can read no two splits name different leaves, so the first one found is it."""
    kids = children(node)
    if kids is None:
        raise KeyError(path)
    if path in kids:
        return (path,)
    i = path.find("/")
    while i != -1:
        head = path[:i]
        if head in kids:
            with contextlib.suppress(KeyError):
                return (head, *_split(kids[head], path[i + 1:], children))
        i = path.find("/", i + 1)
    raise KeyError(path)


def split_path(spec: Group, path: str) -> Keys:
    """The keys of ``path`` (names joined with ``/``, as in ``features.json``) in ``spec``.

    Raises:
      KeyError: when ``spec`` has no such path.
    """
    return _split(spec, path, lambda n: n.fields if isinstance(n, Group) else None)


def get_path(tree: Mapping[str, Any], path: str) -> Any:
    """The value at ``path`` (keys joined with ``/``) of a nested dict, such as an episode
    from :func:`decode_episode`; a key holding ``/`` is found too."""
    node: Any = tree
    for key in _split(tree, path, lambda n: n if isinstance(n, Mapping) else None):
        node = node[key]
    return node


def set_path(tree: dict, path: str | Keys, value: Any) -> None:
    """Sets ``tree[k0][k1]...`` for the keys ``path`` (a ``/``-joined str is split; give the
    keys, e.g. from :func:`split_path`, where a key may hold ``/``)."""
    keys = path.split("/") if isinstance(path, str) else path
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def decode_leaf(kind: str, values: Any, leaf: Leaf, n: int | None, *, key: str,
                decode_images: bool = True) -> Any:
    """Decodes one feature into an array with a leading axis of ``n`` (or a single value when
    ``n`` is None)."""
    count = 1 if n is None else n
    if leaf.kind == "text":
        if kind != "bytes" or len(values) != count:
            raise CorruptDatasetError(f"{key}: expected {count} strings, found {kind} x {len(values)}")
        out = np.empty(count, dtype=object)
        out[:] = values
        return out[0] if n is None else out
    if leaf.kind == "image":
        if kind != "bytes" or len(values) != count:
            raise CorruptDatasetError(f"{key}: expected {count} images, found {kind} x {len(values)}")
        if not decode_images:
            out = np.empty(count, dtype=object)
            out[:] = values
            return out[0] if n is None else out
        frames = [codecs.decode(v, leaf.shape[-1]).reshape(leaf.shape) for v in values]
        arr = np.stack(frames) if frames else np.zeros((0, *leaf.shape), np.uint8)
        return arr[0] if n is None else arr
    per = int(np.prod(leaf.shape, dtype=np.int64)) if leaf.shape else 1
    if leaf.encoding in ("bytes", "zlib"):
        if kind != "bytes" or len(values) != count:
            raise CorruptDatasetError(f"{key}: expected {count} byte strings, found {kind} x {len(values)}")
        raw = [zlib.decompress(v) for v in values] if leaf.encoding == "zlib" else values
        arr = np.frombuffer(b"".join(raw), dtype=leaf.dtype)
    elif kind == "float":
        arr = values.astype(leaf.dtype)
    elif kind == "int64":
        arr = values.view(np.uint64) if leaf.dtype == np.uint64 else values
        arr = arr.astype(leaf.dtype)
    else:
        raise CorruptDatasetError(f"{key}: expected a numeric list, found {kind}")
    if arr.size != count * per:
        raise CorruptDatasetError(f"{key}: expected {count} x {leaf.shape} values, found {arr.size}")
    arr = arr.reshape((count, *leaf.shape))
    return arr[0] if n is None else arr


def decode_episode(data: bytes, spec: Group, *, keys: Collection[str] | None = None,
                   decode_images: bool = True) -> dict[str, Any]:
    """One serialized episode as nested dicts of numpy arrays.

    Args:
      data: the serialized ``tf.train.Example``.
      spec: the dataset's spec (:func:`read_spec`).
      keys: step keys to decode (paths relative to a step); all when None. ``is_first`` is
        always decoded, and every episode-level field.
      decode_images: decode PNG/JPEG to arrays, or leave the encoded bytes.
    """
    raw = record.split_example(data)
    out: dict[str, Any] = {"steps": {}}
    first = raw.get("steps/is_first")
    if first is None:
        raise CorruptDatasetError("episode without steps/is_first")
    kind, values = record.decode_feature(first)
    n = len(values)
    # Values nest by the keys of features.json, as tfds nests them (never by splitting names).
    for leaf_keys, leaf in _step_leaf_keys(spec):
        path = "/".join(leaf_keys)
        if keys is not None and path not in keys and path != "is_first":
            continue
        key = f"steps/{path}"
        if key not in raw:
            raise CorruptDatasetError(f"episode lacks {key}")
        kind, values = record.decode_feature(raw[key])
        set_path(out["steps"], leaf_keys, decode_leaf(kind, values, leaf, n, key=key,
                                                      decode_images=decode_images))
    for leaf_keys, leaf in _episode_leaf_keys(spec):
        path = "/".join(leaf_keys)
        if path not in raw:
            raise CorruptDatasetError(f"episode lacks {path}")
        kind, values = record.decode_feature(raw[path])
        set_path(out, leaf_keys, decode_leaf(kind, values, leaf, None, key=path,
                                             decode_images=decode_images))
    return out


def read_shard(path: PathLike, spec: Group, **kwargs) -> Iterator[dict[str, Any]]:
    for data in record.read_records(path):
        yield decode_episode(data, spec, **kwargs)


def read_episodes(directory: PathLike, split: str = layout.DEFAULT_SPLIT, **kwargs
                  ) -> Iterator[dict[str, Any]]:
    """Yields every committed episode of a split as nested numpy dicts (see
    :func:`decode_episode` for ``keys`` and ``decode_images``)."""
    spec = read_spec(directory)
    for _, _, data in layout.iter_serialized(directory, split):
        yield decode_episode(data, spec, **kwargs)
