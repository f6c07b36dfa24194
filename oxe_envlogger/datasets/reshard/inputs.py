"""Stage 1: find the input datasets (sorted) and check that their features agree.

Part of :mod:`oxe_envlogger.datasets.reshard` (see there for the stages).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from oxe_envlogger.datasets import recovery
from oxe_envlogger.datasets.reshard.options import TMP_PREFIX, PathLike
from oxe_envlogger.errors import (
    CorruptDatasetError,
    FeatureMismatchError,
)
from oxe_envlogger.format import layout
from oxe_envlogger.format.specs import (
    diff_features,
    float64_features,
    strip_docs,
)

log = logging.getLogger(__name__)


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


