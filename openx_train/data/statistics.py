"""``compute_dataset_statistics``: per-key mean, std, min, max and quantiles of actions and states.

Sources, in order:

1. the split's own statistics in ``statistics.json`` (written by the logger and the resharder),
   when they cover exactly the split's committed shards (``oxe_envlogger.format.stats.is_current``) and
   have every requested key with its quantile sketch (a file of an older logger, whose quantiles
   come from a sample of at most 512 rows, is passed over: its keys are computed here);
2. a cache file ``dataset_statistics_<key>.json`` beside the data (or in the user cache directory,
   see :mod:`openx_train.data.cache`), whose key hashes the data files, the split and the keys, so
   a cache of other data is never read;
3. one streaming pass over the split's records (numpy, no TensorFlow, images never decoded),
   whose result is written to that cache. Its quantile sketches hold up to 65,536 rows per
   level (fewer for keys of more than 16 elements), so the quantiles are exact up to that many
   rows and within ``rank_error`` above.

Like the logger's, the statistics cover every step but the final one of each episode (whose
action is padding), and only the training split.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import types
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from openx_train.data import cache
from openx_train.data.errors import ConfigError, DatasetFormatError
from openx_train.data.leaves import is_image_leaf, read_spec, select_keys
from oxe_envlogger.format import reader, record
from oxe_envlogger.format import stats as oxe_stats

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
QUANTILE_NAMES = tuple(f"q{round(p * 100):02d}" for p in oxe_stats.QUANTILES)
STATISTICS_PREFIX = "dataset_statistics"
FORMAT_VERSION = 2  # 2: quantiles from a sketch, with rank_error
# Sketch capacity when we compute (the logger keeps less to stay cheap online and small on disk).
_SKETCH_ROWS = 1 << 16
_SKETCH_VALUES = 1 << 20


@dataclasses.dataclass(frozen=True)
class KeyStatistics:
    """Statistics of one key; every array is shaped like one step's value (float64).

    ``rank_error`` bounds the quantiles' error as a fraction of ``count``: the stored ``q_p`` of
    n values lies between the sorted values at positions ``p (n - 1) -+ rank_error * n``
    (rounded outwards); 0 where they are exact. None where unknown.
    """

    count: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray
    quantiles: Mapping[str, np.ndarray]
    rank_error: np.ndarray | None = None

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any], *, key: str = "") -> KeyStatistics:
        """From ``RunningStats.summary()`` (or :meth:`to_json`) output."""
        try:
            arrays = {k: np.asarray(summary[k], np.float64)
                      for k in ("count", "mean", "std", "min", "max")}
        except KeyError as e:
            raise DatasetFormatError(f"statistics of {key!r}: missing {e.args[0]!r}") from None
        shape = arrays["mean"].shape
        quantiles = {q: np.asarray(summary[q], np.float64) for q in QUANTILE_NAMES if q in summary}
        if quantiles and any(v.shape != shape for v in quantiles.values()):
            raise DatasetFormatError(f"statistics of {key!r}: quantiles do not have shape {shape}")
        rank_error = summary.get("rank_error")
        if rank_error is not None:
            rank_error = np.asarray(rank_error, np.float64)
            if rank_error.shape != shape:
                raise DatasetFormatError(f"statistics of {key!r}: rank_error does not have shape "
                                         f"{shape}")
        return cls(quantiles=types.MappingProxyType(quantiles), rank_error=rank_error, **arrays)

    def quantile(self, name: str) -> np.ndarray:
        """``"q01"`` ... ``"q99"``.

        Raises:
          ConfigError: when these statistics have no such quantile.
        """
        if name not in self.quantiles:
            raise ConfigError(f"statistics: quantile {name!r} not available (have "
                              f"{sorted(self.quantiles)})")
        return self.quantiles[name]

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k).tolist() for k in ("count", "mean", "std", "min", "max")}
        out.update({k: v.tolist() for k, v in self.quantiles.items()})
        if self.rank_error is not None:
            out["rank_error"] = self.rank_error.tolist()
        return out


@dataclasses.dataclass(frozen=True)
class DatasetStatistics:
    """Statistics of a dataset split.

    Attributes:
      keys: step key (``"action"``, ``"observation/state"``) to :class:`KeyStatistics`.
      num_episodes: episodes covered.
      num_steps: RLDS steps of those episodes (final steps included).
      source: ``"stored"`` (the logger's), ``"cache"`` or ``"computed"``.
      fingerprint: the data fingerprint the statistics belong to ("" for stored ones).
    """

    keys: Mapping[str, KeyStatistics]
    num_episodes: int = 0
    num_steps: int = 0
    source: str = "computed"
    fingerprint: str = ""

    def __getitem__(self, key: str) -> KeyStatistics:
        if key not in self.keys:
            raise ConfigError(f"statistics: no key {key!r} (have {sorted(self.keys)})")
        return self.keys[key]

    def __contains__(self, key: object) -> bool:
        return key in self.keys

    def to_json(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "num_episodes": self.num_episodes,
                "num_steps": self.num_steps, "fingerprint": self.fingerprint,
                "keys": {k: v.to_json() for k, v in self.keys.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str = "cache") -> DatasetStatistics:
        if data.get("format_version") != FORMAT_VERSION:
            raise DatasetFormatError(f"statistics: expected format_version {FORMAT_VERSION}, "
                                     f"given {data.get('format_version')!r}")
        keys = {k: KeyStatistics.from_summary(v, key=k) for k, v in data["keys"].items()}
        return cls(types.MappingProxyType(keys), int(data.get("num_episodes", 0)),
                   int(data.get("num_steps", 0)), source, str(data.get("fingerprint", "")))


def statistics_keys(path: PathLike, keys: Sequence[str] | None = None) -> list[str]:
    """The keys statistics are computed for: ``keys`` (checked), else the numeric actions and
    float observations (as the logger chooses them).

    Raises:
      MissingKeyError: for a key the dataset does not have.
      ConfigError: for a key that is not numeric (an image, a string).
    """
    leaves = dict(reader.step_leaves(read_spec(path)))
    if keys is None:
        return oxe_stats.stat_keys(leaves.items())
    out = select_keys(leaves, keys, what=f"statistics of {os.fspath(path)}")
    for k in out:
        leaf = leaves[k]
        if leaf.kind != "tensor" or is_image_leaf(leaf) or leaf.dtype.kind not in "biuf":
            raise ConfigError(f"statistics of {k!r}: expected a numeric tensor, given "
                              f"{leaf.describe()}")
    return out


def _from_stored(path: str, split: str, keys: Iterable[str]) -> DatasetStatistics | None:
    stored = oxe_stats.load_split(path, split, current=True)
    if stored is None:
        return None
    if any(k not in stored.keys or stored.keys[k].sketch is None for k in keys):
        legacy = [k for k in keys if k in stored.legacy_keys()]
        if legacy:
            log.info("%s: statistics.json has an older logger's sampled quantiles of %s; "
                     "computing them (tools/recover_rlds.py rebuilds the file)", path, legacy)
        return None
    summaries = {k: KeyStatistics.from_summary(stored.keys[k].summary(), key=k) for k in keys}
    return DatasetStatistics(types.MappingProxyType(summaries), stored.num_episodes,
                             stored.num_steps, "stored", "")


def _compute(path: str, split: str, keys: list[str], fingerprint: str) -> DatasetStatistics:
    spec = read_spec(path)
    leaves = dict(reader.step_leaves(spec))
    shapes = {k: leaves[k].shape for k in keys}
    total = oxe_stats.StatsSet(shapes, sketch_rows=_SKETCH_ROWS, sketch_values=_SKETCH_VALUES)
    for shard, _ in cache.shard_files(path, split):
        for data in record.read_records(shard):
            episode = reader.decode_episode(data, spec, keys=set(keys), decode_images=False)
            steps = episode["steps"]
            total.add_episode({k: reader.get_path(steps, k) for k in keys},
                              len(reader.get_path(steps, "is_first")))
    summaries = {k: KeyStatistics.from_summary(total.keys[k].summary(), key=k) for k in keys}
    return DatasetStatistics(types.MappingProxyType(summaries), total.num_episodes,
                             total.num_steps, "computed", fingerprint)


def compute_dataset_statistics(
    path: PathLike,
    *,
    split: str = "train",
    keys: Sequence[str] | None = None,
    use_stored: bool = True,
    recompute: bool = False,
) -> DatasetStatistics:
    """Statistics of a dataset split's actions and states (see the module docstring).

    Args:
      path: the dataset directory.
      split: the split the statistics cover (the training split).
      keys: step keys (or prefixes) to cover; default: numeric actions and float observations.
      use_stored: use the logger's ``statistics.json`` when it is current.
      recompute: ignore stored and cached statistics and compute (then refresh the cache).

    Returns:
      The statistics; ``source`` says where they came from.

    Raises:
      DatasetFormatError: when the directory is not a readable dataset or lacks the split.
      MissingKeyError, ConfigError: for keys that are absent or not numeric.
    """
    path = os.fspath(path)
    keys = statistics_keys(path, keys)
    if use_stored and not recompute:
        stored = _from_stored(path, split, keys)
        if stored is not None:
            log.info("%s: using the logger's statistics.json", path)
            return stored
    # The format is part of the key: a cache of another format is never found.
    fingerprint = cache.dataset_fingerprint(path, split,
                                            extra=[*keys, f"statistics:v{FORMAT_VERSION}"])
    filename = f"{STATISTICS_PREFIX}_{fingerprint}.json"
    cached = None if recompute else cache.find_cached(path, filename)
    if cached is not None:
        try:
            with open(cached, encoding="utf-8") as f:
                result = DatasetStatistics.from_json(json.load(f), source="cache")
            if result.fingerprint == fingerprint and all(k in result.keys for k in keys):
                log.info("%s: statistics from cache %s", path, cached)
                return result
        except (OSError, ValueError, KeyError, DatasetFormatError) as e:
            log.warning("ignoring unreadable statistics cache %s: %s", cached, e)
    log.info("%s: computing statistics of split %r for %s", path, split, keys)
    result = _compute(path, split, keys, fingerprint)
    cache.write_cached(path, filename, (json.dumps(result.to_json()) + "\n").encode("utf-8"))
    return result
