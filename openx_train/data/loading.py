"""``load_dataset``: an RLDS/TFDS directory to a ``tf.data`` dataset of episodes.

The records are parsed with ``tf.io.parse_single_example`` from the dataset's ``features.json``
(read by ``oxe_envlogger.format.reader``), so any OXE-style dataset in tfrecord shards loads the same way
as ours, without ``tfds.builder``'s nested per-episode datasets. Each episode is a dict::

    {"steps": {<step keys as logged>: [T, ...], "step_index": int32 [T]},
     "episode_index": int64,    # position in the split: shards in order, records in order
     "episode_length": int32,   # T, the number of RLDS steps
     <episode-level fields as logged: episode_id, invalid, metadata>}

Images stay encoded (PNG/JPEG strings, one per step); float64 and other bytes-encoded tensors
are decoded to their dtype; text stays ``tf.string``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from openx_train.data.cache import shard_files
from openx_train.data.errors import DatasetFormatError, MissingKeyError
from openx_train.data.leaves import is_image_leaf, read_spec, select_keys, step_leaves
from oxe_envlogger.format import reader
from oxe_envlogger.format.specs import Group, Leaf

log = logging.getLogger(__name__)

__all__ = ["is_image_leaf", "load_dataset", "read_spec", "select_keys", "step_leaves"]

PathLike = str | os.PathLike
Episode = dict[str, Any]
EpisodeFilter = Callable[[Mapping[str, Any]], Any]
_ALWAYS = ("is_first", "is_last", "is_terminal")
_READ_BUFFER = 8 << 20


def _parse_feature(leaf: Leaf, sequence: bool):
    if leaf.kind in ("image", "text") or leaf.encoding in ("bytes", "zlib"):
        dtype, shape = tf.string, ()
    elif leaf.dtype.kind == "f":
        dtype, shape = tf.float32, leaf.shape
    else:
        dtype, shape = tf.int64, leaf.shape
    if sequence:
        return tf.io.FixedLenSequenceFeature(shape, dtype, allow_missing=True)
    return tf.io.FixedLenFeature(shape, dtype)


_RAW_OUT = {np.dtype(np.uint32): (tf.int32, tf.uint32), np.dtype(np.uint64): (tf.int64, tf.uint64)}


def _convert(value: tf.Tensor, leaf: Leaf, sequence: bool) -> tf.Tensor:
    """A parsed feature to the leaf's dtype and shape (``[T, *shape]`` in a sequence)."""
    if leaf.kind in ("image", "text"):
        return value
    lead = [tf.shape(value)[0]] if sequence else []
    if leaf.encoding in ("bytes", "zlib"):
        if leaf.encoding == "zlib":
            value = tf.io.decode_compressed(value, "ZLIB")
        raw_type, final = _RAW_OUT.get(leaf.dtype, (tf.as_dtype(leaf.dtype), None))
        out = tf.io.decode_raw(value, raw_type, little_endian=True)
        if final is not None:
            out = tf.bitcast(out, final)
        return tf.reshape(out, lead + list(leaf.shape))
    target = tf.as_dtype(leaf.dtype)
    if target == tf.bool:
        return tf.not_equal(value, 0)
    if target == tf.uint64:
        return tf.bitcast(value, tf.uint64)
    return value if value.dtype == target else tf.cast(value, target)


def _parse_fn(spec: Group, step_keys: list[str]):
    step_spec = dict(reader.step_leaves(spec))
    episode_spec = reader.episode_leaves(spec)
    features = {f"steps/{k}": _parse_feature(step_spec[k], True) for k in step_keys}
    features.update({k: _parse_feature(leaf, False) for k, leaf in episode_spec})
    # Nested by the keys of features.json, as tfds nests them (a key may hold '/').
    nest = {f"steps/{k}": reader.split_path(spec, f"steps/{k}")[1:] for k in step_keys}
    nest.update({k: reader.split_path(spec, k) for k, _ in episode_spec})

    def parse(index: tf.Tensor, record: tf.Tensor) -> Episode:
        raw = tf.io.parse_single_example(record, features)
        steps: dict[str, Any] = {}
        for key in step_keys:
            reader.set_path(steps, nest[f"steps/{key}"],
                            _convert(raw[f"steps/{key}"], step_spec[key], True))
        episode: dict[str, Any] = {}
        for key, leaf in episode_spec:
            reader.set_path(episode, nest[key], _convert(raw[key], leaf, False))
        length = tf.shape(raw[f"steps/{step_keys[0]}"], out_type=tf.int32)[0]
        steps["step_index"] = tf.range(length, dtype=tf.int32)
        episode["steps"] = steps
        episode["episode_index"] = tf.cast(index, tf.int64)
        episode["episode_length"] = length
        return episode

    return parse


def load_dataset(
    path: PathLike,
    split: str = "train",
    *,
    keys: Sequence[str] | None = None,
    filters: Sequence[EpisodeFilter] = (),
    min_length: int = 1,
    drop_invalid: bool = False,
    shuffle_files: bool = False,
    seed: int = 0,
    num_parallel_reads: int = 4,
    num_parallel_calls: int = tf.data.AUTOTUNE,
    deterministic: bool = True,
) -> tf.data.Dataset:
    """An RLDS/TFDS dataset directory as a ``tf.data`` dataset of episodes (see the module
    docstring for the element format).

    Args:
      path: the dataset directory (``dataset_info.json``, ``features.json``, tfrecord shards).
      split: the split to read.
      keys: step keys to load (exact paths or prefixes like ``"observation"``); all when None.
        ``is_first``, ``is_last`` and ``is_terminal`` are always loaded.
      filters: predicates ``episode -> tf.bool`` applied right after parsing, before any other
        transformation; an episode is kept when all return True.
      min_length: episodes with fewer RLDS steps are dropped.
      drop_invalid: drop episodes whose ``invalid`` flag is set (an episode cut short).
      shuffle_files: visit the shards in a random order (per ``seed``, new each iteration).
      seed: seed of the file shuffle.
      num_parallel_reads: shards read at once.
      num_parallel_calls: records parsed at once (each record, images included, is in memory
        while it is parsed: lower this for long episodes of large images).
      deterministic: keep the order of episodes (in shard order unless ``shuffle_files``).

    Returns:
      A dataset of episodes; ``episode_index`` is the same whatever the read order.

    Raises:
      DatasetFormatError: when the directory is not a readable dataset or lacks the split.
      MissingKeyError: for a key the dataset does not have.
    """
    path = os.fspath(path)
    spec = read_spec(path)
    leaves = dict(reader.step_leaves(spec))
    if not leaves:
        raise DatasetFormatError(f"{path}: features.json has no 'steps'; expected RLDS episodes")
    wanted = select_keys(leaves, keys, what=f"load_dataset({path!r})")
    step_keys = [k for k in _ALWAYS if k in leaves and k not in wanted] + wanted
    if drop_invalid and "invalid" not in dict(reader.episode_leaves(spec)):
        raise MissingKeyError(f"load_dataset({path!r}): drop_invalid needs an episode field "
                              "'invalid', which this dataset does not have")
    files = shard_files(path, split)
    if not files:
        log.warning("%s: split %r has no episodes", path, split)
    names = [f for f, _ in files]
    offsets = np.concatenate([[0], np.cumsum([n for _, n in files])[:-1]]).astype(np.int64)
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(names, tf.string),
                                             tf.constant(offsets[: len(names)], tf.int64)))
    if shuffle_files:
        ds = ds.shuffle(max(len(names), 1), seed=seed, reshuffle_each_iteration=True)

    def read_shard(name, offset):
        records = tf.data.TFRecordDataset(name, buffer_size=_READ_BUFFER)
        return records.enumerate().map(lambda i, r: (offset + i, r))

    cycle = max(1, min(num_parallel_reads, len(names)))
    if cycle > 1:
        ds = ds.interleave(read_shard, cycle_length=cycle, num_parallel_calls=cycle,
                           deterministic=deterministic)
    else:
        ds = ds.flat_map(read_shard)
    ds = ds.map(_parse_fn(spec, step_keys), num_parallel_calls=num_parallel_calls,
                deterministic=deterministic)
    if min_length > 1:
        ds = ds.filter(lambda ep: ep["episode_length"] >= min_length)
    if drop_invalid:
        ds = ds.filter(lambda ep: tf.logical_not(ep["invalid"]))
    for fn in filters:
        ds = ds.filter(lambda ep, fn=fn: tf.reduce_all(tf.cast(fn(ep), tf.bool)))
    return ds
