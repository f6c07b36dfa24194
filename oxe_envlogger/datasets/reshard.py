"""Merge, filter, relabel, split and reshard RLDS datasets by copying serialized records.

The resharder never decodes an episode it does not change: it reads the framing and a few small
fields of every record (``episode_id``, ``invalid``, the step count, the language payload), plans
the output, then copies the framed records byte for byte (CRC-checked) into the output shards.
Episodes it changes (language relabelled, features renamed or dropped, float64 features converted
between their two storages) are re-assembled from their raw feature payloads
(:func:`oxe_envlogger.format.record.split_example`), so even then no image is decoded; only the float64
features being converted are. Nothing here imports TensorFlow.

The work has four stages, each a pure function of its inputs, so that the same stages run in one
process (:func:`reshard`, with a thread per output shard) or as an Apache Beam pipeline
(:mod:`oxe_envlogger.datasets.reshard_beam`) and give byte-identical output:

1. :func:`discover`: find the input datasets (sorted) and check that their features agree.
2. :func:`scan_shard`: one input shard -> one :class:`EpisodeRef` per record.
3. :func:`build_plan`: every ref, in the merged order -> filtered, relabelled, split and packed
   into :class:`ShardTask` s by the byte budget.
4. :func:`write_shard`: one task -> one output shard file, its sha256 and its statistics;
   :func:`finalize` writes the metadata and :func:`commit_output` moves the finished directory
   into place (until then the output exists only as a hidden temporary sibling).

Episodes are numbered in the merged input order (input datasets sorted by path, then each
dataset's splits in ``dataset_info.json`` order, shards in order, records in order); that global
index is what ``skip_episodes`` and index keys of ``language_map`` refer to, and the manifest
(``reshard_manifest.json``) maps every output episode back to it and to its source.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import filecmp
import hashlib
import json
import logging
import mmap
import os
import shutil
import stat
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from oxe_envlogger.datasets import recovery
from oxe_envlogger.errors import (
    CorruptDatasetError,
    DamagedShardError,
    DatasetExistsError,
    FeatureMismatchError,
    SpecError,
)
from oxe_envlogger.format import layout, provenance, reader, record, stats
from oxe_envlogger.format.specs import (
    check_float64_storage,
    diff_features,
    float64_features,
    round_to_float32,
    spec_from_features_json,
    strip_docs,
)

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
LANGUAGE_KEY = "steps/language_instruction"
TMP_PREFIX = ".oxe-reshard-"
# Steps fields that RLDS readers need; renaming or dropping them would break the dataset.
PROTECTED = ("steps", "steps/is_first", "steps/is_last", "steps/is_terminal")
# dataset_info.json fields carried over from the first input (the others are recomputed).
_INFO_CARRIED = ("description", "citation", "location", "releaseNotes", "redistributionInfo",
                 "version")
_SMALL_RECORD = 256 * 1024  # records up to this size are scanned with one read
_MAX_LANGUAGE_PAYLOAD = 1 << 20

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class ReshardOptions:
    """What :func:`reshard` does.

    Attributes:
      dataset_name: TFDS name of the output (default: the first input's name).
      shard_bytes: close an output shard before it would exceed this many bytes (an episode
        larger than the budget gets a shard of its own).
      shard_episodes: also close a shard after this many episodes (``--shard_size``).
      skip_episodes: global input indices (see the module docstring) of episodes to leave out.
      drop_invalid: leave out episodes whose ``invalid`` flag is set.
      relabel_language: new language instruction for every episode (unless ``language_map``
        names the episode).
      language_map: ``{episode_id or global index: instruction}`` for single episodes.
      language_key: the feature that holds the instruction (added as a Text feature if the input
        has none); a ``steps/`` key holds one value per step, another key one per episode.
      validation_fraction: fraction of the kept episodes moved to ``validation_split``; the
        choice is a seeded hash ranking of the episode ids, so it does not depend on numpy.
        The parts of an episode that the logger split at ``max_episode_bytes`` stay together.
      validation_split: name of that split (``"val"``, as the Open X-Embodiment loaders expect).
      split_seed: seed of the validation choice.
      rename_features: ``{old path: new path}`` of features (and feature groups), e.g.
        ``{"steps/observation/image": "steps/observation/image_0"}``.
      drop_features: paths of features (or groups) to remove.
      float64: convert every float64 feature to this storage: ``"float32"`` (a float list,
        rounded to float32, which loaders that skip tfds' decoding read as numbers) or
        ``"exact"`` (raw float64 bytes; exact only where the input was, float32-stored values
        are widened). Inputs that differ only in this storage can then be merged. Tensors a
        foreign dataset compresses with zlib or gives no fixed shape are left as they are
        (see :func:`oxe_envlogger.format.specs.float64_features`). None: keep each feature as it is
        stored (the inputs must agree).
      input_splits: splits read from every input (default: all of each input's splits). All
        of them go into ``train`` (and ``validation_split``).
      overwrite: replace an existing dataset at the output path.
      verify: check the CRC of every copied record.
      fsync: fsync every output file before the output is moved into place.
      workers: threads writing output shards in :func:`reshard` (default: CPU count, at most 8).
    """

    dataset_name: str | None = None
    shard_bytes: int = layout.DEFAULT_SHARD_BYTES
    shard_episodes: int | None = None
    skip_episodes: tuple[int, ...] = ()
    drop_invalid: bool = False
    relabel_language: str | None = None
    language_map: Mapping[str, str] | None = None
    language_key: str = LANGUAGE_KEY
    validation_fraction: float = 0.0
    validation_split: str = "val"
    split_seed: int = 0
    rename_features: Mapping[str, str] | None = None
    drop_features: tuple[str, ...] = ()
    float64: str | None = None
    input_splits: tuple[str, ...] | None = None
    overwrite: bool = False
    verify: bool = True
    fsync: bool = True
    workers: int | None = None

    def __post_init__(self):
        if self.shard_bytes <= 0:
            raise ValueError(f"shard_bytes: expected > 0, given {self.shard_bytes}")
        if self.shard_episodes is not None and self.shard_episodes <= 0:
            raise ValueError(f"shard_episodes: expected > 0, given {self.shard_episodes}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction: expected 0 <= f < 1, given {self.validation_fraction}")
        if self.validation_split == layout.DEFAULT_SPLIT:
            raise ValueError(f"validation_split: must differ from {layout.DEFAULT_SPLIT!r}")
        if any(int(i) < 0 for i in self.skip_episodes):
            raise ValueError(f"skip_episodes: expected indices >= 0, given {self.skip_episodes}")
        if self.dataset_name is not None:
            layout.check_dataset_name(self.dataset_name)
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers: expected >= 1, given {self.workers}")
        if self.float64 is not None:
            check_float64_storage(self.float64)

    def to_json(self) -> dict[str, Any]:
        """The options that shape the output (for the manifest; deterministic)."""
        lang_map = dict(self.language_map or {})
        return {
            "dataset_name": self.dataset_name,
            "shard_bytes": self.shard_bytes,
            "shard_episodes": self.shard_episodes,
            "skip_episodes": sorted({int(i) for i in self.skip_episodes}),
            "drop_invalid": self.drop_invalid,
            "relabel_language": self.relabel_language,
            "language_map": {"entries": len(lang_map),
                             "sha256": hashlib.sha256(json.dumps(
                                 lang_map, sort_keys=True).encode()).hexdigest()}
            if lang_map else None,
            "language_key": self.language_key,
            "validation_fraction": self.validation_fraction,
            "validation_split": self.validation_split,
            "split_seed": self.split_seed,
            "rename_features": dict(self.rename_features or {}),
            "drop_features": list(self.drop_features),
            "float64": self.float64,
            "input_splits": list(self.input_splits) if self.input_splits is not None else None,
        }


# ---------------------------------------------------------------------------------------------
# Stage 1: inputs


@dataclasses.dataclass(frozen=True)
class Source:
    """One input dataset."""

    index: int
    directory: str
    name: str
    splits: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class InputShard:
    """One committed shard of an input dataset."""

    source: int
    split: str
    shard: int
    path: str
    num_episodes: int


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The input datasets, their shards in the merged order, and the output's features."""

    sources: tuple[Source, ...]
    shards: tuple[InputShard, ...]
    features: dict
    info: dict
    metadata: tuple[dict | None, ...]


def _is_tmp(path: str) -> bool:
    return any(part.startswith(TMP_PREFIX) for part in path.split(os.sep))


def discover(rlds_dirs: Sequence[PathLike], *, output_dir: PathLike | None = None,
             input_splits: Sequence[str] | None = None, float64: str | None = None) -> Inputs:
    """Finds the datasets under ``rlds_dirs`` (recursively; sorted) and checks their features.

    A dataset found under a root that is the output directory is left out (it would be a
    previous output); naming it directly in ``rlds_dirs`` reshards it in place. With
    ``float64`` (the storage the output converts to), features that differ only in how float64
    is stored agree.

    Raises:
      FileNotFoundError: for a missing directory, or when no dataset is found.
      NotADirectoryError: for a path that is a file.
      FeatureMismatchError: listing, per input, how its features differ from the first's.
      CorruptDatasetError: for an input that is not a tfrecord dataset.
    """
    out = os.path.abspath(os.fspath(output_dir)) if output_dir is not None else None
    explicit, found = set(), set()
    for root in rlds_dirs:
        root = layout.check_directory(root)
        if layout.is_dataset(root):
            explicit.add(root)
        elif layout.holds_dataset_remains(root):
            raise layout.no_dataset_error(root)
        found.update(d for d in layout.find_datasets(root) if not _is_tmp(d))
    if out is not None and out in found and out not in explicit:
        log.warning("%s is the output directory; not reading it as an input", out)
        found.discard(out)
    if not found:
        raise FileNotFoundError(f"no RLDS dataset (dataset_info.json + features.json) under "
                                f"{[os.fspath(d) for d in rlds_dirs]}")
    sources, shards, metadata = [], [], []
    first_features = first_info = None
    differences = []
    for i, directory in enumerate(sorted(found)):
        info = layout.read_json(os.path.join(directory, layout.DATASET_INFO))
        features = layout.read_json(os.path.join(directory, layout.FEATURES))
        if not layout.is_tfrecord(info):
            raise CorruptDatasetError(
                f"{directory}: file format {info.get('fileFormat')!r}; only tfrecord datasets "
                "can be resharded without TensorFlow")
        if float64 is not None:
            features = float64_features(features, float64)[0]
        if first_features is None:
            first_features, first_info = features, info
        elif strip_docs(features) != strip_docs(first_features):
            differences += [f"{directory}: {d}"
                            for d in _feature_differences(first_features, features)]
        available = layout.list_splits(info)
        splits = list(input_splits) if input_splits is not None else available
        missing = [s for s in splits if s not in available]
        if missing:
            raise KeyError(f"{directory}: no split {missing} (splits: {available})")
        if recovery.needs_recovery(directory):
            log.warning("%s holds episodes that are not committed yet (a live writer, or a crash: "
                        "run tools/recover_rlds.py); only committed episodes are read", directory)
        sources.append(Source(i, directory, info["name"], tuple(splits)))
        metadata.append(layout.read_json(os.path.join(directory, layout.METADATA)))
        for split in splits:
            for k, (path, n) in enumerate(layout.shard_paths(directory, info, split)):
                shards.append(InputShard(i, split, k, path, n))
    if differences:
        raise FeatureMismatchError(
            f"cannot merge {len(sources)} datasets whose features differ (first: "
            f"{sources[0].directory}, second: the dataset named)", differences)
    return Inputs(tuple(sources), tuple(shards), first_features, first_info, tuple(metadata))


def _feature_differences(a: dict, b: dict) -> list[str]:
    try:
        out = diff_features(a, b)
    except Exception:  # features our spec reader does not know: compare the JSON itself
        out = []
    return out or _json_differences(strip_docs(a), strip_docs(b))


def _json_differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for k in sorted(set(a) | set(b)):
            sub = f"{path}/{k}" if path else str(k)
            if k not in b:
                out.append(f"{sub}: only in the first")
            elif k not in a:
                out.append(f"{sub}: only in the second")
            else:
                out += _json_differences(a[k], b[k], sub)
        return out
    return [] if a == b else [f"{path}: {json.dumps(a)[:80]} vs {json.dumps(b)[:80]}"]


# ---------------------------------------------------------------------------------------------
# Feature transformations (on features.json and on raw Example keys)


def _under(key: str, path: str) -> bool:
    return key == path or key.startswith(path + "/")


@dataclasses.dataclass(frozen=True)
class Transform:
    """Renames and drops of feature paths, the language feature to rewrite, and the float64
    features to convert (``float64_keys``: input key and elements per value, of every float64
    feature when ``float64`` names the storage to convert to)."""

    drop: tuple[str, ...] = ()
    rename: tuple[tuple[str, str], ...] = ()
    language_key: str | None = None
    language_added: bool = False  # the inputs have no language feature: every episode gets one
    float64: str | None = None
    float64_keys: tuple[tuple[str, int], ...] = ()

    def float64_payload(self, payload: bytes | memoryview, key: str, rows: int) -> bytes:
        """The payload of float64 feature ``key`` (``rows`` values) stored the other way: raw
        float64 bytes as a float list (rounded to float32) or a float list as raw bytes
        (widened exactly).

        Raises:
          SpecError: converting to float32, for a finite value beyond its range.
          CorruptDatasetError: for a payload that holds no float64 values of ``rows`` rows.
        """
        kind, values = record.decode_feature(payload)
        exact = self.float64 == "exact"
        per_row = dict(self.float64_keys)[key]
        if kind == "bytes" and not exact:
            if len(values) != rows or any(len(v) != 8 * per_row for v in values):
                raise CorruptDatasetError(
                    f"{key}: expected {rows} float64 byte strings of {8 * per_row} bytes, found "
                    f"{len(values)} of {sorted({len(v) for v in values})} bytes")
            flat = np.frombuffer(b"".join(values), "<f8")
            return record.float_list_payload(round_to_float32(flat, key))
        if kind == "float" and exact:
            if values.size != rows * per_row:
                raise CorruptDatasetError(f"{key}: expected {rows} x {per_row} floats, found "
                                          f"{values.size}")
            return record.fixed_bytes_list_payload(values.astype("<f8").reshape(rows, per_row))
        raise CorruptDatasetError(f"{key}: expected float64 values stored "
                                  f"{'as floats' if exact else 'as bytes'}, found a {kind} list")

    @property
    def changes_features(self) -> bool:
        return bool(self.drop or self.rename)

    def output_key(self, key: str) -> str | None:
        """The output key of an input key (None when dropped)."""
        if any(_under(key, d) for d in self.drop):
            return None
        for old, new in self.rename:
            if _under(key, old):
                return new + key[len(old):]
        return key

    def touches(self, key: str) -> bool:
        """Whether a transformation may change this input key's entry."""
        out = self.output_key(key)
        return out != key or (self.language_key is not None and out == self.language_key)


def _node_children(node: dict) -> dict | None:
    """The ``{name: feature}`` dict of a FeaturesDict or of a Dataset of FeaturesDict."""
    if "featuresDict" in node:
        return node["featuresDict"].setdefault("features", {})
    if "sequence" in node:
        return _node_children(node["sequence"]["feature"])
    return None


def feature_paths(features: dict) -> list[str]:
    """Every feature path (groups and leaves) of a features.json, e.g. ``steps/observation``."""
    out = []

    def walk(node, prefix):
        children = _node_children(node)
        if children is None:
            return
        for k, v in children.items():
            p = f"{prefix}/{k}" if prefix else k
            out.append(p)
            walk(v, p)

    walk(features, "")
    return out


def _pop_feature(features: dict, path: str) -> dict:
    parts = path.split("/")
    node = features
    for p in parts[:-1]:
        node = _node_children(node)[p]
    return _node_children(node).pop(parts[-1])


def _put_feature(features: dict, path: str, feature: dict) -> None:
    parts = path.split("/")
    node = features
    for p in parts[:-1]:
        children = _node_children(node)
        if children is None:
            raise ValueError(f"{path}: {p!r} is not a feature group")
        if p not in children:
            children[p] = {"pythonClassName": "tensorflow_datasets.core.features.features_dict."
                                              "FeaturesDict", "featuresDict": {"features": {}}}
        node = children[p]
    children = _node_children(node)
    if children is None:
        raise ValueError(f"{path}: the parent is not a feature group")
    children[parts[-1]] = feature


def _prune_empty_groups(node: dict) -> None:
    children = _node_children(node)
    if children is None:
        return
    for k in list(children):
        sub = _node_children(children[k])
        if sub is not None:
            _prune_empty_groups(children[k])
            if not _node_children(children[k]) and "featuresDict" in children[k]:
                del children[k]


_TEXT_FEATURE = {"pythonClassName": "tensorflow_datasets.core.features.text_feature.Text",
                 "text": {}, "description": "Language instruction of the episode."}


def make_transform(features: dict, options: ReshardOptions) -> tuple[Transform, dict]:
    """Checks the renames and drops against ``features`` and returns the transform and the
    output features.json.

    Raises:
      ValueError: for an unknown, protected or conflicting path, naming it.
    """
    paths = feature_paths(features)
    known = set(paths)
    out = copy.deepcopy(features)
    drops = tuple(dict.fromkeys(options.drop_features))
    renames = tuple((str(a), str(b)) for a, b in (options.rename_features or {}).items())
    for path in list(drops) + [a for a, _ in renames]:
        if path not in known:
            raise ValueError(f"feature {path!r} does not exist; features: {paths}")
        if any(_under(p, path) for p in PROTECTED) or path in PROTECTED:
            raise ValueError(f"feature {path!r} cannot be renamed or dropped: RLDS readers need "
                             f"{list(PROTECTED[1:])}")
    for a, b in renames:
        if any(_under(a, d) for d in drops):
            raise ValueError(f"feature {a!r} is both renamed and dropped")
        if a.startswith("steps/") != b.startswith("steps/") or b in ("", "steps"):
            raise ValueError(f"rename {a!r} -> {b!r}: a feature stays inside steps/ (one value "
                             "per step) or outside it (one per episode)")
    for path in drops:
        _pop_feature(out, path)
    moved = [(a, b, _pop_feature(out, a)) for a, b in renames]
    remaining = set(feature_paths(out))
    for a, b, feature in moved:
        if b in remaining:
            raise ValueError(f"rename {a!r} -> {b!r}: {b!r} exists already")
        _put_feature(out, b, feature)
        remaining = set(feature_paths(out))
    _prune_empty_groups(out)
    float64_keys: tuple[tuple[str, int], ...] = ()
    if options.float64 is not None:
        out = float64_features(out, options.float64)[0]
        float64_keys = float64_features(features, options.float64)[1]  # the input keys
    language_key, added = None, False
    if options.relabel_language is not None or options.language_map:
        language_key = options.language_key
        if language_key in ("steps", "") or language_key in PROTECTED:
            raise ValueError(f"language_key {language_key!r} is not a text feature path")
        if language_key not in set(feature_paths(out)):
            _put_feature(out, language_key, copy.deepcopy(_TEXT_FEATURE))
            added = True
        else:
            node = _node_at(out, language_key)
            cls = node.get("pythonClassName", "")
            dtype = node.get("tensor", {}).get("dtype")
            if not (cls.endswith("text_feature.Text") or dtype == "string"):
                raise ValueError(f"language_key {language_key!r} is a {cls.rsplit('.', 1)[-1]}, "
                                 "not a Text feature")
    return Transform(drops, renames, language_key, added, options.float64, float64_keys), out


def _node_at(features: dict, path: str) -> dict:
    node = features
    for p in path.split("/"):
        node = _node_children(node)[p]
    return node


# ---------------------------------------------------------------------------------------------
# Stage 2: scanning input shards


@dataclasses.dataclass(frozen=True)
class EpisodeRef:
    """Where one input episode is, and the few fields the plan needs.

    Attributes:
      offset, length: byte offset of the framed record in ``path`` and its data length.
      base_size: the canonical size of the Example entries no transformation touches.
      touched: ``(key, payload length)`` of the entries a transformation may change.
      language: the current payload of the language feature (when relabelling; else None).
      float64: ``(key, output payload length)`` of the float64 features whose storage the
        transform converts (those not stored as the output stores them already).
    """

    source: int
    split: str
    shard: int
    path: str
    index: int
    offset: int
    length: int
    episode_id: str | None
    invalid: bool
    num_steps: int
    base_size: int
    touched: tuple[tuple[str, int], ...]
    language: bytes | None
    float64: tuple[tuple[str, int], ...] = ()


def _varint_len(n: int) -> int:
    return len(record.varint(n))


def entry_size(key: str, payload_len: int) -> int:
    """Bytes one ``{key: Feature}`` map entry takes inside an Example's Features."""
    k = len(key.encode("utf-8"))
    inner = 1 + _varint_len(k) + k + 1 + _varint_len(payload_len) + payload_len
    return 1 + _varint_len(inner) + inner


def example_size(body: int) -> int:
    """Bytes of an Example whose Features body (all entries) is ``body`` bytes."""
    return 1 + _varint_len(body) + body


def _int_value(payload: bytes) -> int | None:
    kind, values = record.decode_feature(payload)
    return int(values[0]) if kind == "int64" and len(values) else None


def scan_shard(shard: InputShard, transform: Transform) -> list[EpisodeRef]:
    """Reads the framing and a few small fields of every record of one input shard.

    Raises:
      DamagedShardError: for a truncated record or a bad CRC (naming the file and byte).
      CorruptDatasetError: for a malformed Example, an episode without ``steps/is_first``, or
        a record count that differs from ``dataset_info.json``.
    """
    out = []
    path = shard.path
    lang_key = transform.language_key
    float64_rows = {k: n for k, n in transform.float64_keys if transform.output_key(k) is not None}
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        offset = index = 0
        while offset < size:
            length = record.record_length(fd, offset, size, path)
            start, end = offset + 12, offset + 12 + length
            win = record.FileWindow(fd, end)
            if length <= _SMALL_RECORD:  # one read; check the data CRC on the way
                data = os.pread(fd, length + 4, start)
                if not record.data_crc_matches(data[length:], data[:length]):
                    raise DamagedShardError(path, offset, "bad data CRC")
                win = record.FileWindow(fd, end, start=start, buf=data[:length])
            try:
                entries = {k: (s, e - s)  # (payload offset, payload length)
                           for k, (s, e) in record.example_entries(win, start, end).items()}
            except (CorruptDatasetError, IndexError, UnicodeDecodeError) as e:
                raise CorruptDatasetError(f"{path}: record {index} (byte {offset}) is not a "
                                          f"tf.train.Example: {e}") from e

            def value(key: str, limit: int = _MAX_LANGUAGE_PAYLOAD, _e=entries, _w=win) -> bytes | None:
                if key not in _e or _e[key][1] > limit:
                    return None
                pos, n = _e[key]
                return _w.get(pos, n)

            first = value("steps/is_first", 1 << 28)
            if first is None:
                raise CorruptDatasetError(f"{path}: record {index} has no steps/is_first; "
                                          "not an RLDS episode")
            _, flags = record.decode_feature(first)
            ep_id = value("episode_id", 4096)
            if ep_id is not None:
                kind_id, ids = record.decode_feature(ep_id)
                ep_id = ids[0].decode("utf-8", "replace") if kind_id == "bytes" and ids else None
            invalid = value("invalid", 64)
            base, touched, converted = 0, [], []
            for key, (pos, n) in entries.items():
                out_n = None
                if key in float64_rows:  # its payload's first byte says how it is stored
                    out_n = _converted_size(transform, key, float64_rows[key],
                                            n and win.get(pos, 1)[0], len(flags))
                if out_n is not None:
                    converted.append((key, out_n))
                elif transform.touches(key):
                    touched.append((key, n))
                else:
                    base += entry_size(key, n)
            language = None
            if lang_key is not None:
                src = [k for k in entries if transform.output_key(k) == lang_key]
                language = value(src[0]) if src else b""
            out.append(EpisodeRef(
                source=shard.source, split=shard.split, shard=shard.shard, path=path, index=index,
                offset=offset, length=length, episode_id=ep_id,
                invalid=bool(_int_value(invalid)) if invalid is not None else False,
                num_steps=len(flags), base_size=base, touched=tuple(touched), language=language,
                float64=tuple(converted)))
            offset = end + 4
            index += 1
    finally:
        os.close(fd)
    if index != shard.num_episodes:
        raise CorruptDatasetError(f"{path}: {index} records, but dataset_info.json lists "
                                  f"{shard.num_episodes}")
    return out


def _converted_size(transform: Transform, key: str, per_row: int, tag: int, num_steps: int
                    ) -> int | None:
    """The output payload length of float64 entry ``key`` (``per_row`` elements a value, its
    payload starting with ``tag``) when the transform converts its storage; None when it is
    stored so already."""
    exact = transform.float64 == "exact"
    if record.FEATURE_TAGS.get(tag) != ("float" if exact else "bytes"):
        return None  # stored as the output stores it already (or not float64 at all: as is)
    rows = num_steps if key.startswith("steps/") else 1
    return record.float64_payload_size(exact=exact, rows=rows, per_row=per_row)


# ---------------------------------------------------------------------------------------------
# Stage 3: the plan


@dataclasses.dataclass(frozen=True)
class PlannedEpisode:
    """One output episode: its source, and the language to write (None: as it is)."""

    ref: EpisodeRef
    global_index: int
    language: str | None
    changes: str  # "", or what changes joined by "+": "features", "float64", "language"
    size: int  # framed output size


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One output shard to write."""

    split: str
    index: int
    filename: str
    episodes: tuple[PlannedEpisode, ...]

    @property
    def num_bytes(self) -> int:
        return sum(e.size for e in self.episodes)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything :func:`write_shard` and :func:`finalize` need."""

    name: str
    inputs: Inputs
    transform: Transform
    features: dict
    splits: tuple[str, ...]
    tasks: tuple[ShardTask, ...]
    skipped: tuple[tuple[int, EpisodeRef, str], ...]
    options: ReshardOptions
    unmatched_language_keys: tuple[str, ...]

    @property
    def num_episodes(self) -> int:
        return sum(len(t.episodes) for t in self.tasks)

    @property
    def num_bytes(self) -> int:
        return sum(t.num_bytes for t in self.tasks)


def _language_payload(text: str, ref: EpisodeRef, language_key: str) -> bytes:
    n = ref.num_steps if language_key.startswith("steps/") else 1
    return record.bytes_list_payload([text.encode("utf-8")] * n)


def _output_size(ref: EpisodeRef, transform: Transform, language: bytes | None) -> int:
    """The framed size of the episode after :func:`transform_record`; mirrors it exactly."""
    entries: dict[str, int] = {}
    for key, n in (*ref.touched, *ref.float64):
        new = transform.output_key(key)
        if new is not None:
            entries[new] = n
    if language is not None:
        entries[transform.language_key] = len(language)
    body = ref.base_size + sum(entry_size(k, n) for k, n in entries.items())
    return record.framed_size(example_size(body))


def _episode_group(ref: EpisodeRef, global_index: int) -> str:
    """The episode an episode record belongs to (see :func:`layout.episode_group`); the merged
    index where there is no id."""
    return layout.episode_group(ref.episode_id) if ref.episode_id else f"#{global_index}"


def _validation_rank(seed: int, group: str) -> bytes:
    # Keyed by the episode id where there is one, so that an episode keeps its side when
    # other datasets join the merge.
    return hashlib.sha256(f"{seed}\0{group}".encode()).digest()


def _choose_validation(kept: list[PlannedEpisode], k: int, seed: int) -> set[int]:
    """Indices into ``kept`` of about ``k`` validation episodes, chosen by a seeded hash of each
    episode's group, so that the parts of a split episode stay on one side."""
    groups = [_episode_group(e.ref, e.global_index) for e in kept]
    ranked = sorted(range(len(kept)), key=lambda i: _validation_rank(seed, groups[i]))
    chosen: set[int] = set()
    chosen_groups: set[str] = set()
    for i in ranked:  # the parts of a group are adjacent: they share its rank
        if len(chosen) >= k and groups[i] not in chosen_groups:
            break
        chosen.add(i)
        chosen_groups.add(groups[i])
    return chosen


def build_plan(inputs: Inputs, refs: Iterable[EpisodeRef], options: ReshardOptions,
               transform: Transform, features: dict) -> Plan:
    """Filters, relabels, splits and packs the episodes (in any order; sorted here).

    Raises:
      ValueError: for ``skip_episodes`` out of range, or when no episode is left.
    """
    order = {(s.source, s.split, s.shard): i for i, s in enumerate(inputs.shards)}
    refs = sorted(refs, key=lambda r: (order[(r.source, r.split, r.shard)], r.index))
    total = len(refs)
    skip = {int(i) for i in options.skip_episodes}
    beyond = sorted(i for i in skip if i >= total)
    if beyond:
        raise ValueError(f"skip_episodes {beyond}: the inputs hold {total} episodes "
                         f"(indices 0..{total - 1})")
    lang_map = {str(k): v for k, v in (options.language_map or {}).items()}
    used_keys: set[str] = set()
    kept, skipped = [], []
    for gi, ref in enumerate(refs):
        if gi in skip:
            skipped.append((gi, ref, "skip_episodes"))
            continue
        if options.drop_invalid and ref.invalid:
            skipped.append((gi, ref, "invalid"))
            continue
        text = None
        if ref.episode_id is not None and ref.episode_id in lang_map:
            text = lang_map[ref.episode_id]
            used_keys.add(ref.episode_id)
        elif str(gi) in lang_map:
            text = lang_map[str(gi)]
            used_keys.add(str(gi))
        elif options.relabel_language is not None:
            text = options.relabel_language
        elif transform.language_added:
            text = ""
        payload = None
        if text is not None:
            payload = _language_payload(text, ref, transform.language_key)
            if payload == ref.language and not transform.changes_features:
                text, payload = None, None  # already says so: copy the record unchanged
        parts = ((["features"] if transform.changes_features else [])
                 + (["float64"] if ref.float64 else [])
                 + (["language"] if text is not None else []))
        size = (_output_size(ref, transform, payload) if parts
                else record.framed_size(ref.length))
        kept.append(PlannedEpisode(ref, gi, text, "+".join(parts), size))
    if not kept:
        raise ValueError(f"no episode left of {total} (skipped: {len(skipped)})")
    unmatched = tuple(sorted(set(lang_map) - used_keys))
    if unmatched:
        log.warning("language_map: %d keys match no episode id or index: %s", len(unmatched),
                    list(unmatched[:10]))
    splits: dict[str, list[PlannedEpisode]] = {layout.DEFAULT_SPLIT: kept}
    k = int(options.validation_fraction * len(kept) + 0.5)
    if options.validation_fraction > 0 and k == 0:
        log.warning("validation_fraction %s of %d episodes rounds to none; no %r split",
                    options.validation_fraction, len(kept), options.validation_split)
    if k:
        chosen = _choose_validation(kept, k, options.split_seed)
        splits = {layout.DEFAULT_SPLIT: [e for i, e in enumerate(kept) if i not in chosen],
                  options.validation_split: [e for i, e in enumerate(kept) if i in chosen]}
        if not splits[layout.DEFAULT_SPLIT]:
            raise ValueError("validation_fraction leaves no training episode")
    name = options.dataset_name or inputs.sources[0].name
    tasks = []
    for split, episodes in splits.items():
        groups: list[list[PlannedEpisode]] = []
        current: list[PlannedEpisode] = []
        nbytes = 0
        for ep in episodes:
            if current and (nbytes + ep.size > options.shard_bytes or (
                    options.shard_episodes and len(current) >= options.shard_episodes)):
                groups.append(current)
                current, nbytes = [], 0
            current.append(ep)
            nbytes += ep.size
        groups.append(current)
        for i, group in enumerate(groups):
            filename = layout.shard_filename(layout.DEFAULT_TEMPLATE, name, split, i, len(groups))
            tasks.append(ShardTask(split, i, filename, tuple(group)))
    return Plan(name, inputs, transform, features, tuple(splits), tuple(tasks), tuple(skipped),
                options, unmatched)


# ---------------------------------------------------------------------------------------------
# Stage 4: writing


@dataclasses.dataclass(frozen=True)
class ShardResult:
    """What writing one output shard produced."""

    split: str
    index: int
    filename: str
    num_episodes: int
    num_bytes: int
    sha256: str
    stats: dict | None  # StatsSet.to_json({}) of the shard's episodes


def transform_record(data: bytes, ref: EpisodeRef, transform: Transform,
                     language: str | None) -> bytes:
    """The Example ``data`` with features renamed/dropped, float64 features converted and the
    language replaced; every other payload is kept byte for byte (images are not decoded)."""
    out = {}
    converted = {key for key, _ in ref.float64}
    for key, payload in record.split_example(data).items():
        new = transform.output_key(key)
        if new is not None:
            if key in converted:
                rows = ref.num_steps if key.startswith("steps/") else 1
                try:
                    payload = transform.float64_payload(payload, key, rows)
                except SpecError as e:
                    raise SpecError(e.path, e.expected, e.given,
                                    f"in episode {ref.episode_id} ({ref.path}, record "
                                    f"{ref.index}): float32 cannot store it; keep float64 "
                                    "exact (--float64=exact)") from None
            out[new] = payload
    if language is not None:
        out[transform.language_key] = _language_payload(language, ref, transform.language_key)
    return record.encode_raw_features(out)


class _StatsHelper:
    """Statistics of the output, computed exactly as :func:`oxe_envlogger.format.stats.catch_up` does."""

    def __init__(self, features: dict):
        self.reader, self.stats = reader, stats
        try:
            self.spec = spec_from_features_json(features)
        except Exception as e:  # a foreign dataset with features our reader does not know
            log.debug("no statistics: %s", e)
            self.spec = None
            return
        leaves = dict(reader.step_leaves(self.spec))
        self.keys = stats.stat_keys(reader.step_leaves(self.spec))
        self.shapes = {k: leaves[k].shape for k in self.keys}

    def new(self):
        return None if self.spec is None else self.stats.StatsSet(self.shapes)

    def add(self, st, data: bytes) -> None:
        if st is None:
            return
        episode = self.reader.decode_episode(data, self.spec, keys=set(self.keys),
                                             decode_images=False)
        steps = episode["steps"]
        st.add_episode({k: self.reader.get_path(steps, k) for k in self.keys},
                       len(self.reader.get_path(steps, "is_first")))


class _MappedInput:
    """The input file being read, mapped into memory: records are hashed, checked and handed
    to ``copy_file_range`` without being copied into Python objects."""

    def __init__(self):
        self.path: str | None = None
        self.fd: int | None = None
        self.map: mmap.mmap | None = None
        self.view: memoryview | None = None

    def open(self, path: str) -> memoryview:
        if path != self.path:
            self.close()
            self.fd = os.open(path, os.O_RDONLY)
            self.path = path
            if os.fstat(self.fd).st_size:
                self.map = mmap.mmap(self.fd, 0, prot=mmap.PROT_READ)
                with contextlib.suppress(AttributeError, OSError):
                    self.map.madvise(mmap.MADV_SEQUENTIAL)
                self.view = memoryview(self.map)
            else:
                self.view = memoryview(b"")
        return self.view

    def close(self) -> None:
        if self.view is not None:
            self.view.release()
            self.view = None
        if self.map is not None:
            with contextlib.suppress(BufferError):  # a view still held by a traceback
                self.map.close()
            self.map = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.path = None


class _SourceHasher(threading.Thread):
    """sha256 of the framed source records of an unchanged shard, in a thread of its own: the
    output holds exactly these bytes, and hashing (the costliest part of a copy) then runs
    beside the kernel copy instead of after it."""

    def __init__(self, episodes: Sequence[PlannedEpisode]):
        super().__init__(name="oxe-reshard-hash", daemon=True)
        self.episodes = episodes
        self.digest = hashlib.sha256()
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        src = _MappedInput()
        try:
            for ep in self.episodes:
                if self.stop.is_set():
                    return
                view = src.open(ep.ref.path)
                start = ep.ref.offset
                self.digest.update(view[start: start + record.framed_size(ep.ref.length)])
        except BaseException as e:  # reported by result()
            self.error = e
        finally:
            src.close()

    def result(self) -> str:
        self.join()
        if self.error is not None:
            raise self.error
        return self.digest.hexdigest()


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_shard(task: ShardTask, staging: str, *, transform: Transform, features: dict,
                options: ReshardOptions, progress: Callable[[int, int], None] | None = None
                ) -> ShardResult:
    """Writes one output shard into ``staging`` (CRC-checking copied records).

    An unchanged episode is copied with ``copy_file_range`` (in the kernel, as ``cp`` does)
    and hashed from the mapped input; a changed one is re-assembled and written.

    Args:
      task: the shard (from :func:`build_plan`).
      staging: the directory written into.
      transform, features, options: the plan's (``plan.transform`` ...).
      progress: called with ``(1, bytes)`` after each episode.

    Raises:
      CorruptDatasetError: for a record whose CRC does not match.
    """
    helper = _StatsHelper(features)
    st = helper.new()
    digest = hashlib.sha256()
    path = os.path.join(staging, task.filename)
    src = _MappedInput()
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    kernel_copy = hasattr(os, "copy_file_range")
    hasher = None
    if not any(ep.changes for ep in task.episodes):
        hasher = _SourceHasher(task.episodes)
        hasher.start()
    written = 0
    try:
        for ep in task.episodes:
            ref = ep.ref
            view = src.open(ref.path)
            start, end = ref.offset, ref.offset + record.framed_size(ref.length)
            if end > len(view):
                raise CorruptDatasetError(f"{ref.path}: record {ref.index} changed while read")
            framed = view[start:end]
            data = framed[12: 12 + ref.length]
            if options.verify and not record.data_crc_matches(framed[-4:], data):
                raise DamagedShardError(ref.path, ref.offset, f"bad data CRC in record {ref.index}")
            if ep.changes:
                data = transform_record(data, ref, transform, ep.language)
                framed = record.frame(data)
                if len(framed) != ep.size:  # the plan's packing relies on this
                    raise AssertionError(f"planned {ep.size} bytes, wrote {len(framed)}")
                _write_all(out, framed)
            else:
                n = len(framed)
                while kernel_copy and n:
                    try:
                        done = os.copy_file_range(src.fd, out, n, end - n)
                    except OSError:  # e.g. across file systems on older kernels
                        kernel_copy = False
                        break
                    if done == 0:
                        raise CorruptDatasetError(f"{ref.path}: record {ref.index} changed "
                                                  "while read")
                    n -= done
                if n:
                    _write_all(out, framed[len(framed) - n:])
            if hasher is None:
                digest.update(framed)
            written += len(framed)
            helper.add(st, data)
            del framed, data
            if progress is not None:
                progress(1, end - start if not ep.changes else ep.size)
        if options.fsync:
            os.fsync(out)
        sha256 = hasher.result() if hasher is not None else digest.hexdigest()
    finally:
        if hasher is not None:
            hasher.stop.set()
            hasher.join()
        os.close(out)
        src.close()
    return ShardResult(task.split, task.index, task.filename, len(task.episodes), written,
                       sha256, st.to_json({}) if st is not None else None)


# ---------------------------------------------------------------------------------------------
# Finishing: metadata, manifest, and the move into place


def _statistics_json(plan: Plan, results: Sequence[ShardResult]) -> dict | None:
    if any(r.stats is None for r in results):
        return None
    total = stats.StatsSet({})
    splits: dict[str, stats.StatsSet] = {}
    covers: dict[str, dict[str, int]] = {}
    for r in _ordered(plan, results):
        shard = stats.StatsSet.from_json(r.stats)
        total.merge(shard)
        splits.setdefault(r.split, stats.StatsSet({})).merge(shard)
        covers.setdefault(r.split, {})[r.filename] = r.num_episodes
    return total.to_json(covers, splits)


def _ordered(plan: Plan, results: Sequence[ShardResult]) -> list[ShardResult]:
    rank = {s: i for i, s in enumerate(plan.splits)}
    return sorted(results, key=lambda r: (rank[r.split], r.index))


def manifest_json(plan: Plan, results: Sequence[ShardResult], runner: str) -> dict:
    """The manifest: sources, options, shards (with sha256) and one row per output episode."""
    sources = plan.inputs.sources
    results = _ordered(plan, results)
    by_task = {(r.split, r.index): r for r in results}
    splits = {}
    for split in plan.splits:
        rs = [r for r in results if r.split == split]
        splits[split] = {
            "episodes": sum(r.num_episodes for r in rs),
            "bytes": sum(r.num_bytes for r in rs),
            "shards": [{"file": r.filename, "episodes": r.num_episodes, "bytes": r.num_bytes,
                        "sha256": r.sha256} for r in rs],
        }
    rows = []
    for task in plan.tasks:
        assert (task.split, task.index) in by_task
        for i, ep in enumerate(task.episodes):
            ref = ep.ref
            rows.append([task.split, task.index, i, ref.source, ref.split,
                         os.path.basename(ref.path), ref.index, ep.global_index, ref.episode_id,
                         ref.num_steps, ep.changes])
    skipped = [[gi, ref.source, ref.split, os.path.basename(ref.path), ref.index, ref.episode_id,
                reason] for gi, ref, reason in plan.skipped]
    return {
        "format_version": MANIFEST_VERSION,
        "dataset_name": plan.name,
        "runner": runner,
        "sources": [{"index": s.index, "directory": s.directory, "name": s.name,
                     "splits": list(s.splits),
                     "episodes": sum(sh.num_episodes for sh in plan.inputs.shards
                                     if sh.source == s.index)} for s in sources],
        "options": plan.options.to_json(),
        "splits": splits,
        "episode_columns": ["split", "shard", "index", "source", "source_split", "source_shard",
                            "source_index", "global_index", "episode_id", "num_steps", "changes"],
        "episodes": rows,
        "skipped_columns": ["global_index", "source", "source_split", "source_shard",
                            "source_index", "episode_id", "reason"],
        "skipped": skipped,
        "unmatched_language_keys": list(plan.unmatched_language_keys),
    }


def _dataset_info(plan: Plan, results: Sequence[ShardResult]) -> dict:
    first = plan.inputs.info
    splits = {}
    for split in plan.splits:
        rs = [r for r in _ordered(plan, results) if r.split == split]
        splits[split] = ([r.num_episodes for r in rs], sum(r.num_bytes for r in rs))
    info = layout.new_dataset_info(
        plan.name, version=first.get("version") or layout.DEFAULT_VERSION,
        description=first.get("description", ""), citation=first.get("citation", ""),
        splits=splits, template=layout.DEFAULT_TEMPLATE)
    for key in _INFO_CARRIED:
        if key in first and key not in info:
            info[key] = copy.deepcopy(first[key])
    return info


def _metadata_json(plan: Plan, results: Sequence[ShardResult], runner: str) -> dict:
    codecs: dict[str, str] = {}
    for meta in plan.inputs.metadata:
        for key, codec in ((meta or {}).get("image_codecs") or {}).items():
            new = plan.transform.output_key(key)
            if new is not None:
                codecs.setdefault(new, codec)
    created = layout.now_iso()
    session = provenance.session_info(extra={
        "writer_id": f"reshard-{uuid.uuid4().hex[:12]}", "tool": "reshard", "runner": runner,
        "started": created, "closed": created, "ended": "closed",
        "episodes": plan.num_episodes,
        "steps": sum(e.ref.num_steps for t in plan.tasks for e in t.episodes),
        "bytes": sum(r.num_bytes for r in results),
        "shards": [r.filename for r in _ordered(plan, results)]})
    return {
        **layout.new_metadata(plan.name, created=created, sessions=[session]),
        "image_codecs": codecs,
        "resharded_from": [
            {"directory": s.directory, "name": s.name, "splits": list(s.splits),
             "metadata": plan.inputs.metadata[s.index]} for s in plan.inputs.sources],
        "manifest": layout.RESHARD_MANIFEST,
    }


def finalize(plan: Plan, results: Sequence[ShardResult], staging: str, runner: str) -> dict:
    """Writes features.json, statistics.json, the manifest, oxe_envlogger.json and, last,
    dataset_info.json into ``staging``. Returns the manifest."""
    results = _ordered(plan, results)
    want = sorted((t.split, t.index) for t in plan.tasks)
    if sorted((r.split, r.index) for r in results) != want:
        raise RuntimeError("finalize: the shard results do not match the plan")
    manifest = manifest_json(plan, results, runner)
    layout.atomic_write_json(os.path.join(staging, layout.FEATURES), plan.features)
    stats_json = _statistics_json(plan, results)
    if stats_json is not None:
        layout.atomic_write_json(os.path.join(staging, layout.STATISTICS), stats_json)
    else:
        log.warning("no statistics.json: the TF-free reader does not know these features")
    layout.atomic_write_bytes(os.path.join(staging, layout.RESHARD_MANIFEST),
                              layout.dump_manifest(manifest))
    layout.atomic_write_json(os.path.join(staging, layout.METADATA),
                             _metadata_json(plan, results, runner))
    layout.atomic_write_json(os.path.join(staging, layout.DATASET_INFO),
                             _dataset_info(plan, results))
    return manifest


def check_output(output_dir: PathLike, *, overwrite: bool) -> str:
    """The absolute output path, after checking that it may be written (and finishing a
    replacement of it that a killed resharder left half done, see :func:`finish_interrupted`).

    Raises:
      DatasetExistsError: when it holds a dataset and ``overwrite`` is False, when it is a
        non-empty directory that is not a dataset (never replaced), or when a logger is
        writing into it.
    """
    out = os.path.abspath(os.fspath(output_dir))
    finish_interrupted(out)
    if os.path.lexists(out):
        if not os.path.isdir(out):
            raise DatasetExistsError(f"{out} exists and is not a directory")
        entries = [e for e in os.listdir(out) if e != layout.INTERNAL]
        if entries and not layout.is_dataset(out):
            raise DatasetExistsError(f"{out} is a non-empty directory that holds no dataset; "
                                     "refusing to replace it")
        if layout.is_dataset(out) and not overwrite:
            raise DatasetExistsError(f"{out} holds a dataset; pass overwrite=True (--overwrite) "
                                     "to replace it")
        live = layout.live_writers(out)
        if live:
            raise DatasetExistsError(f"{out}: writers {live} are logging into it; replace it "
                                     "once they are closed")
    return out


def make_staging(output_dir: str) -> str:
    """A fresh hidden sibling directory of ``output_dir`` to write into."""
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    stale = sorted(e for e in os.listdir(parent)
                   if e.startswith(TMP_PREFIX) and f"-{os.path.basename(output_dir)}-" in e)
    if stale:
        log.warning("%s holds %s, left by a resharder that was killed (or is running); delete "
                    "them once no resharder runs", parent, stale)
    staging = os.path.join(parent, f"{TMP_PREFIX}tmp-{os.path.basename(output_dir)}-"
                                   f"{uuid.uuid4().hex[:12]}")
    os.makedirs(staging)
    return staging


# Written into the output being replaced just before the swap: a hidden sibling that holds it
# is then known to be the previous output (to take apart), not a staging directory.
_PREVIOUS_MARK = "reshard-previous-output"


def _link_tree(src: str, dst: str) -> None:
    """``dst`` as the same files as ``src``: hard links (copies where the file system has
    none), symbolic links and directories recreated.

    Raises:
      DatasetExistsError: for a special file (a FIFO, a socket) that cannot be linked.
    """
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
    elif os.path.isdir(src):
        os.mkdir(dst)
        for entry in sorted(os.listdir(src)):
            _link_tree(os.path.join(src, entry), os.path.join(dst, entry))
        shutil.copystat(src, dst)
    else:
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            if not stat.S_ISREG(os.lstat(src).st_mode):
                raise DatasetExistsError(f"{src}: a special file that cannot be kept in the new "
                                         "output; move it away first") from None
            shutil.copy2(src, dst)


def _carry_foreign(output_dir: str, staging: str) -> list[str]:
    """Links every entry of ``output_dir`` that is not part of its dataset (a user's
    ``NOTES.txt``, an ``eval/`` directory) into ``staging``. Returns their names.

    Raises:
      DatasetExistsError: when one has the name of an entry of the new output (listed; nothing
        is changed).
    """
    owned = set(layout.dataset_entries(output_dir))
    foreign = [e for e in sorted(os.listdir(output_dir)) if e not in owned]
    clash = [e for e in foreign if os.path.lexists(os.path.join(staging, e))]
    if clash:
        raise DatasetExistsError(f"{output_dir}: {clash} are not part of its dataset but have the "
                                 "names of files of the new output; move them away first")
    for entry in foreign:
        _link_tree(os.path.join(output_dir, entry), os.path.join(staging, entry))
    shutil.copymode(output_dir, staging)
    return foreign


def _same_entry(a: str, b: str) -> bool:
    """Whether ``b`` is what :func:`_link_tree` made of ``a`` (and neither changed since)."""
    if os.path.islink(a) or os.path.islink(b):
        return os.path.islink(a) and os.path.islink(b) and os.readlink(a) == os.readlink(b)
    if not os.path.isfile(a) or not os.path.isfile(b):
        return False
    return os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False)


def _move_over(src: str, dst: str) -> list[str]:
    """Empties ``src`` into ``dst``: an entry ``dst`` lacks is moved there, one it holds the
    same is dropped from ``src``. Returns the paths left in ``src`` (it differs in ``dst``)."""
    left = []
    for entry in sorted(os.listdir(src)):
        a, b = os.path.join(src, entry), os.path.join(dst, entry)
        if not os.path.lexists(b):
            os.rename(a, b)
        elif _same_entry(a, b):
            os.unlink(a)
        elif os.path.isdir(a) and not os.path.islink(a) and os.path.isdir(b) \
                and not os.path.islink(b):
            inner = _move_over(a, b)
            if inner:
                left += inner
            else:
                os.rmdir(a)
        else:
            left.append(a)
    return left


def _retire(previous: str, output_dir: str) -> None:
    """Takes apart a replaced output: its dataset files are deleted; its other entries go over
    to ``output_dir`` (they are there already, as links, unless made during the reshard), and
    one that differs from its namesake there is left in ``previous``, with a warning."""
    if not os.path.isdir(previous):  # retired already (by another resharder)
        return
    for entry in layout.dataset_entries(previous):
        path = os.path.join(previous, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    left = _move_over(previous, output_dir)
    if left:
        log.warning("%s: %s differ from the files of the same name in %s (changed while the "
                    "reshard ran?); they are kept here", previous, left, output_dir)
    else:
        os.rmdir(previous)


def finish_interrupted(output_dir: str) -> None:
    """Finishes what a resharder killed while replacing ``output_dir`` left: when the swap had
    not happened (only where it takes two renames), the previous output is put back; after it,
    the previous output, in a hidden sibling, is taken apart (see :func:`_retire`)."""
    parent, base = os.path.split(output_dir)
    if not os.path.isdir(parent):
        return
    for entry in sorted(os.listdir(parent)):
        if not (entry.startswith(TMP_PREFIX) and f"-{base}-" in entry):
            continue
        previous = os.path.join(parent, entry)
        mark = os.path.join(previous, layout.INTERNAL, _PREVIOUS_MARK)
        try:
            if (layout.read_json(mark) or {}).get("output") != output_dir:
                continue
        except (OSError, ValueError):
            continue
        if os.path.lexists(output_dir):
            log.warning("%s: taking apart %s, the output a killed resharder replaced",
                        output_dir, previous)
            _retire(previous, output_dir)
        else:
            log.warning("%s: putting the previous output back from %s (a resharder was killed "
                        "while replacing it)", output_dir, previous)
            os.unlink(mark)
            os.rename(previous, output_dir)


def commit_output(staging: str, output_dir: str, *, overwrite: bool, fsync: bool = True) -> None:
    """Moves the finished ``staging`` directory to ``output_dir`` (replacing a dataset there
    only when ``overwrite``).

    The entries of ``output_dir`` that are not its dataset's (:func:`layout.dataset_entries`: a
    user's notes, an ``eval/`` directory, ``quarantine/``) stay: they are hard-linked into the
    new output, which then takes the old one's place in one step (``renameat2`` with
    ``RENAME_EXCHANGE``; two renames where the file system cannot), so that a reader sees the
    old output or the new one, each whole, and those files all along. The old output is then
    taken apart (:func:`_retire`); a resharder killed on the way leaves it in a hidden sibling,
    which the next reshard into ``output_dir`` finishes (:func:`finish_interrupted`).

    Raises:
      DatasetExistsError: as :func:`check_output`; or when an entry of the user's has the name
        of one of the new output's (nothing is changed then).
    """
    check_output(output_dir, overwrite=overwrite)
    parent = os.path.dirname(output_dir)
    if not os.path.isdir(output_dir):
        if fsync:
            layout.fsync_dir(staging)
        os.rename(staging, output_dir)
        if fsync:
            layout.fsync_dir(parent)
        return
    # Under the old output's lock, so that no logger starts writing into it meanwhile.
    with layout.dataset_lock(output_dir):
        check_output(output_dir, overwrite=overwrite)
        _carry_foreign(output_dir, staging)
        layout.atomic_write_json(os.path.join(output_dir, layout.INTERNAL, _PREVIOUS_MARK),
                                 {"output": output_dir})
        if fsync:
            for dirpath, _, _ in os.walk(staging):
                layout.fsync_dir(dirpath)
        if layout.exchange_paths(staging, output_dir):
            previous = staging
        else:
            previous = os.path.join(parent, f"{TMP_PREFIX}old-{os.path.basename(output_dir)}-"
                                            f"{uuid.uuid4().hex[:12]}")
            os.rename(output_dir, previous)
            os.rename(staging, output_dir)
    if fsync:
        layout.fsync_dir(parent)
    try:
        _retire(previous, output_dir)
    except OSError as e:  # the new output is in place; what is left is finished next time
        log.warning("%s: could not take apart the previous output %s (%s); the next reshard "
                    "into it finishes that", output_dir, previous, e)


def discard_staging(staging: str) -> None:
    """Deletes a staging directory after a failure (its links to the user's files are only
    links), unless the swap had happened: then it holds the previous output, which
    :func:`finish_interrupted` takes apart."""
    if not os.path.exists(os.path.join(staging, layout.INTERNAL, _PREVIOUS_MARK)):
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# One process


@dataclasses.dataclass(frozen=True)
class ReshardReport:
    """What :func:`reshard` did."""

    output_dir: str
    manifest: dict
    episodes: int
    bytes: int
    skipped: int
    sources: int

    def format(self) -> str:
        splits = ", ".join(f"{s}: {v['episodes']} episodes in {len(v['shards'])} shards"
                           for s, v in self.manifest["splits"].items())
        return (f"wrote {self.output_dir}: {self.episodes} episodes ({self.bytes / 1e6:.1f} MB) "
                f"from {self.sources} datasets; {splits}; skipped {self.skipped}")


class Progress:
    """Progress hooks (the tools draw a tqdm bar); every method may be called from threads."""

    def start(self, episodes: int, num_bytes: int) -> None:
        """Called once the plan is known."""

    def update(self, episodes: int, num_bytes: int) -> None:
        """Called after each episode written."""

    def close(self) -> None:
        """Called at the end."""


def plan_reshard(rlds_dirs: Sequence[PathLike], output_dir: PathLike,
                 options: ReshardOptions) -> Plan:
    """Stages 1-3 in this process: the plan of :func:`reshard` without writing anything."""
    inputs = discover(rlds_dirs, output_dir=output_dir, input_splits=options.input_splits,
                      float64=options.float64)
    transform, features = make_transform(inputs.features, options)
    refs: list[EpisodeRef] = []
    for shard in inputs.shards:
        refs += scan_shard(shard, transform)
    return build_plan(inputs, refs, options, transform, features)


def reshard(rlds_dirs: Sequence[PathLike], output_dir: PathLike,
            options: ReshardOptions | None = None, *, progress: Progress | None = None
            ) -> ReshardReport:
    """Merges the datasets under ``rlds_dirs`` into one dataset at ``output_dir``.

    See the module docstring for the stages and :class:`ReshardOptions` for what can be done on
    the way. The output appears at ``output_dir`` only when it is complete.

    Raises:
      FeatureMismatchError: when the inputs' features differ (listing the differences).
      DatasetExistsError: when ``output_dir`` holds a dataset and not ``options.overwrite``.
      CorruptDatasetError: for a damaged input record.
      ValueError: for options that do not fit the inputs.
    """
    options = options or ReshardOptions()
    out = check_output(output_dir, overwrite=options.overwrite)
    plan = plan_reshard(rlds_dirs, out, options)
    progress = progress or Progress()
    progress.start(plan.num_episodes, plan.num_bytes)
    staging = make_staging(out)
    lock = threading.Lock()

    def tick(episodes: int, nbytes: int) -> None:
        with lock:
            progress.update(episodes, nbytes)

    try:
        workers = options.workers or min(8, os.cpu_count() or 1)
        # Largest shards first, so that the threads finish together.
        tasks = sorted(plan.tasks, key=lambda t: -t.num_bytes)
        with ThreadPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
            results = list(pool.map(lambda t: write_shard(
                t, staging, transform=plan.transform, features=plan.features, options=options,
                progress=tick), tasks))
        manifest = finalize(plan, results, staging, "local")
        commit_output(staging, out, overwrite=options.overwrite, fsync=options.fsync)
    except BaseException:
        discard_staging(staging)
        raise
    finally:
        progress.close()
    report = ReshardReport(out, manifest, plan.num_episodes, sum(r.num_bytes for r in results),
                           len(plan.skipped), len(plan.inputs.sources))
    log.info("%s", report.format())
    return report


def load_language_map(path: PathLike) -> dict[str, str]:
    """Reads a language map file: a JSON object ``{episode id or index: instruction}``, or
    JSON lines ``{"episode_id" | "index": ..., "language_instruction": ...}``, or a TSV
    ``key<TAB>instruction`` per line.

    Raises:
      ValueError: for a file in none of these forms, naming the line.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    with contextlib.suppress(json.JSONDecodeError):
        data = json.loads(text)
        if isinstance(data, dict):
            return {str(k): str(v) for k, v in data.items()}
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
                key = row.get("episode_id", row.get("index"))
                value = row.get("language_instruction", row.get("instruction"))
            except (json.JSONDecodeError, AttributeError) as e:
                raise ValueError(f"{path}:{n}: not a JSON object: {e}") from e
            if key is None or value is None:
                raise ValueError(f"{path}:{n}: expected keys episode_id or index, and "
                                 "language_instruction")
            out[str(key)] = str(value)
        elif "\t" in line:
            key, value = line.split("\t", 1)
            out[key.strip()] = value.rstrip("\n")
        else:
            raise ValueError(f"{path}:{n}: expected a JSON object, JSON lines or "
                             "'key<TAB>instruction' lines")
    return out
