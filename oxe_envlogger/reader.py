"""Reading datasets back without TensorFlow: features.json to a spec, records to numpy.

``tfds.builder_from_directory(dir)`` is the reference reader (the tests compare against it); this
one serves the tools that must not pay for TensorFlow (recovery, statistics, validation, the
byte-level resharder) and users who want numpy episodes quickly.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import numpy as np

from oxe_envlogger import codecs, layout, record
from oxe_envlogger.errors import CorruptDatasetError
from oxe_envlogger.specs import Group, Leaf, iter_leaves, spec_from_features_json

PathLike = str | os.PathLike


def read_spec(directory: PathLike) -> Group:
    """The episode spec of a dataset directory, from its ``features.json``."""
    data = layout.read_json(os.path.join(directory, layout.FEATURES))
    if data is None:
        raise FileNotFoundError(f"{directory}: no {layout.FEATURES}; not a dataset directory")
    spec = spec_from_features_json(data)
    assert isinstance(spec, Group)
    return spec


def step_leaves(spec: Group) -> list[tuple[str, Leaf]]:
    """``(path relative to a step, leaf)`` for every leaf inside ``steps``."""
    steps = spec.fields.get("steps")
    if not isinstance(steps, Group):
        return []
    return list(iter_leaves(steps))


def episode_leaves(spec: Group) -> list[tuple[str, Leaf]]:
    """Episode-level leaves (everything outside ``steps``)."""
    return [(p, leaf) for p, leaf in iter_leaves(spec) if not p.startswith("steps/")]


def get_path(tree: Mapping[str, Any], path: str) -> Any:
    node: Any = tree
    for key in path.split("/"):
        node = node[key]
    return node


def set_path(tree: dict, path: str, value: Any) -> None:
    keys = path.split("/")
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
    for path, leaf in step_leaves(spec):
        if keys is not None and path not in keys and path != "is_first":
            continue
        key = f"steps/{path}"
        if key not in raw:
            raise CorruptDatasetError(f"episode lacks {key}")
        kind, values = record.decode_feature(raw[key])
        set_path(out["steps"], path, decode_leaf(kind, values, leaf, n, key=key,
                                                 decode_images=decode_images))
    for path, leaf in episode_leaves(spec):
        if path not in raw:
            raise CorruptDatasetError(f"episode lacks {path}")
        kind, values = record.decode_feature(raw[path])
        set_path(out, path, decode_leaf(kind, values, leaf, None, key=path,
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
