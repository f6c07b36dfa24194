"""Running statistics of actions and float observations, mergeable across writers and appends.

Each key keeps per-element count, mean, M2 (for the variance), min and max, merged with Chan's
parallel formula, plus a bottom-k sample (each row gets a random key; the k rows with the smallest
keys are kept), which merges exactly into a uniform sample of all rows and gives the quantiles.
Non-finite elements are left out (and counted by the writer separately).

The statistics cover the steps a policy trains on: every step but the final one of each episode
(whose action is padding). ``statistics.json`` records which shards it covers, so a reader can
tell whether it is current. It holds the statistics of all splits together and, under
``splits``, of each split alone (a trainer normalizes with the train split's).
"""

from __future__ import annotations

import base64
import copy
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from oxe_envlogger import layout
from oxe_envlogger.specs import Leaf

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
FORMAT_VERSION = 1


def stat_keys(step_leaves: Iterable[tuple[str, Leaf]]) -> list[str]:
    """The step keys that get statistics: numeric actions and float observations."""
    out = []
    for path, leaf in step_leaves:
        if leaf.kind != "tensor":
            continue
        if ((path == "action" or path.startswith("action/")) and leaf.dtype.kind in "biuf") or (path.startswith("observation") and leaf.dtype.kind == "f"):
            out.append(path)
    return out


def _reservoir_size(width: int) -> int:
    return int(min(512, max(16, 65536 // max(width, 1))))


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _unb64(s: str, dtype, shape) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype=dtype).reshape(shape).copy()


class RunningStats:
    """Statistics of one key; rows are flattened to vectors of ``width`` elements."""

    def __init__(self, shape: tuple[int, ...], *, seed: int = 0):
        self.shape = tuple(shape)
        self.width = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        w = self.width
        self.count = np.zeros(w, np.int64)
        self.mean = np.zeros(w, np.float64)
        self.m2 = np.zeros(w, np.float64)
        self.min = np.full(w, np.inf)
        self.max = np.full(w, -np.inf)
        self.rows = 0
        self.k = _reservoir_size(w)
        self.sample_keys = np.zeros(0, np.float64)
        self.sample = np.zeros((0, w), np.float64)
        self._rng = np.random.default_rng(seed)

    def update(self, batch: np.ndarray) -> None:
        """Adds rows; ``batch`` has shape ``(n, *shape)``."""
        x = np.asarray(batch, dtype=np.float64).reshape(-1, self.width)
        n = x.shape[0]
        if n == 0:
            return
        # One element per row, rows contiguous: numpy reduces a contiguous axis several times
        # faster than the outer axis of a narrow (steps, width) array.
        xt = np.ascontiguousarray(x.T)
        finite = np.isfinite(xt)
        if finite.all():  # the common case: no masks
            with np.errstate(all="ignore"):  # huge values overflow to inf, as in the masked path
                mean_b = xt.sum(1) / n
                d = xt - mean_b[:, None]
                d *= d
            self._combine(np.full(self.width, n, np.int64), mean_b, d.sum(1),
                          xt.min(1), xt.max(1))
            kept = x
        else:
            n_b = finite.sum(1)
            with np.errstate(all="ignore"):
                mean_b = np.where(n_b > 0, np.where(finite, xt, 0.0).sum(1) / np.maximum(n_b, 1),
                                  0.0)
                m2_b = np.where(finite, (xt - mean_b[:, None]) ** 2, 0.0).sum(1)
            self._combine(n_b, mean_b, m2_b, np.where(finite, xt, np.inf).min(1),
                          np.where(finite, xt, -np.inf).max(1))
            kept = np.where(finite.T, x, np.nan)
        self.rows += n
        keys = self._rng.random(n)
        self._keep(np.concatenate([self.sample_keys, keys]),
                   np.concatenate([self.sample, kept]))

    def _combine(self, n_b, mean_b, m2_b, min_b, max_b) -> None:
        n_a = self.count
        n = n_a + n_b
        with np.errstate(all="ignore"):
            delta = mean_b - self.mean
            frac = np.where(n > 0, n_b / np.maximum(n, 1), 0.0)
            self.mean = self.mean + delta * frac
            self.m2 = self.m2 + m2_b + delta**2 * n_a * frac
        self.count = n
        self.min = np.minimum(self.min, min_b)
        self.max = np.maximum(self.max, max_b)

    def _keep(self, keys: np.ndarray, rows: np.ndarray) -> None:
        if keys.size > self.k:
            idx = np.argpartition(keys, self.k - 1)[: self.k]
            idx = idx[np.argsort(keys[idx])]
            keys, rows = keys[idx], rows[idx]
        self.sample_keys, self.sample = keys, rows

    def merge(self, other: RunningStats) -> None:
        if other.width != self.width:
            raise ValueError(f"cannot merge statistics of shapes {self.shape} and {other.shape}")
        self._combine(other.count, other.mean, other.m2, other.min, other.max)
        self.rows += other.rows
        self.k = max(self.k, other.k)
        self._keep(np.concatenate([self.sample_keys, other.sample_keys]),
                   np.concatenate([self.sample, other.sample]))

    def summary(self) -> dict[str, Any]:
        with np.errstate(invalid="ignore", divide="ignore"):
            var = np.where(self.count > 1, self.m2 / np.maximum(self.count, 1), 0.0)

        def shaped(a):
            a = np.where(np.isfinite(a), a, np.nan) if a.dtype.kind == "f" else a
            return np.asarray(a).reshape(self.shape).tolist()

        out = {"count": shaped(self.count), "mean": shaped(self.mean), "std": shaped(np.sqrt(var)),
               "min": shaped(self.min), "max": shaped(self.max)}
        if self.sample.shape[0]:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                q = np.nanquantile(self.sample, QUANTILES, axis=0)
            for p, row in zip(QUANTILES, q):
                out[f"q{round(p * 100):02d}"] = shaped(row)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "rows": self.rows, "k": self.k,
                "count": _b64(self.count), "mean": _b64(self.mean), "m2": _b64(self.m2),
                "min": _b64(self.min), "max": _b64(self.max),
                "sample_keys": _b64(self.sample_keys), "sample": _b64(self.sample)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunningStats:
        s = cls(tuple(data["shape"]))
        w = s.width
        s.rows, s.k = int(data["rows"]), int(data["k"])
        s.count = _unb64(data["count"], np.int64, (w,))
        s.mean = _unb64(data["mean"], np.float64, (w,))
        s.m2 = _unb64(data["m2"], np.float64, (w,))
        s.min = _unb64(data["min"], np.float64, (w,))
        s.max = _unb64(data["max"], np.float64, (w,))
        s.sample_keys = _unb64(data["sample_keys"], np.float64, (-1,))
        s.sample = _unb64(data["sample"], np.float64, (-1, w))
        return s


# Chunks are added in batches of about this many elements: fewer calls for a long episode (each
# also merges the sample) with temporaries (float64 copies of a batch) that stay in the CPU's
# cache: 20% less CPU than one call per 1024-step block, 3x less than 2**18-element batches.
_BATCH_ELEMENTS = 1 << 15


def _batches(chunks: Sequence[np.ndarray], limit: int) -> Iterator[np.ndarray]:
    """Consecutive ``chunks`` joined into arrays of at most ``limit`` elements (a larger chunk
    alone); empty chunks are skipped."""
    group: list[np.ndarray] = []
    size = 0
    for chunk in map(np.asarray, chunks):
        if not len(chunk):
            continue
        if group and size + chunk.size > limit:
            yield group[0] if len(group) == 1 else np.concatenate(group)
            group, size = [], 0
        group.append(chunk)
        size += chunk.size
    if group:
        yield group[0] if len(group) == 1 else np.concatenate(group)


class StatsSet:
    """Statistics of several keys plus episode/step counts."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], *, seed: int = 0):
        self.keys = {k: RunningStats(shape, seed=seed + i) for i, (k, shape) in enumerate(shapes.items())}
        self.num_episodes = 0
        self.num_steps = 0

    def add_episode(self, columns: Mapping[str, np.ndarray | Sequence[np.ndarray]],
                    num_steps: int) -> None:
        """Adds one episode; ``columns[key]`` holds every RLDS step (the final one is skipped),
        as one array or as a list of arrays of consecutive steps (added in batches, so a long
        episode is never converted whole)."""
        self.num_episodes += 1
        self.num_steps += num_steps
        for key, st in self.keys.items():
            col = columns.get(key)
            if col is None:
                continue
            chunks = [col] if isinstance(col, np.ndarray) else list(col)
            chunks[-1] = chunks[-1][:-1]
            for rows in _batches(chunks, _BATCH_ELEMENTS):
                st.update(rows)

    def merge(self, other: StatsSet) -> None:
        self.num_episodes += other.num_episodes
        self.num_steps += other.num_steps
        for k, st in other.keys.items():
            if k in self.keys:
                self.keys[k].merge(st)
            else:  # a copy: merging `other` into several sets must not tie them together
                self.keys[k] = copy.deepcopy(st)

    def body_json(self) -> dict[str, Any]:
        return {
            "num_episodes": self.num_episodes,
            "num_steps": self.num_steps,
            "keys": {k: {"summary": st.summary(), "state": st.to_json()}
                     for k, st in self.keys.items()},
        }

    def to_json(self, covers: Mapping[str, Mapping[str, int]],
                splits: Mapping[str, StatsSet] | None = None) -> dict[str, Any]:
        """``statistics.json``: this set (all splits), the shards it covers, and the set of
        each split where known."""
        out = {
            "format_version": FORMAT_VERSION,
            "note": "statistics over every step but the last of each episode; 'covers' lists "
                    "the shards included; 'splits' holds each split's own statistics",
            **self.body_json(),
            "covers": {s: dict(v) for s, v in covers.items()},
        }
        # A single split's statistics are the totals: written once (see _split_json).
        if splits is not None and not (len(splits) == 1 and set(splits) == set(covers)):
            out["splits"] = {name: st.body_json() for name, st in splits.items()}
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StatsSet:
        s = cls({})
        s.num_episodes = int(data.get("num_episodes", 0))
        s.num_steps = int(data.get("num_steps", 0))
        s.keys = {k: RunningStats.from_json(v["state"]) for k, v in data.get("keys", {}).items()}
        return s


def _read(directory: str | os.PathLike) -> dict | None:
    data = layout.read_json(os.path.join(directory, layout.STATISTICS))
    if not data or data.get("format_version") != FORMAT_VERSION:
        return None
    return data


def _split_json(data: Mapping[str, Any], covers: Mapping[str, Any], split: str,
                ) -> Mapping[str, Any] | None:
    """One split's statistics as stored. A file that covers a single split holds them once, as
    the totals; one written before they were kept per split has them only in that case."""
    if "splits" in data:
        return data["splits"].get(split)
    return data if list(covers) == [split] else None


def _splits_of(data: Mapping[str, Any], covers: Mapping[str, Any],
               ) -> dict[str, StatsSet] | None:
    """Each split's statistics (see :func:`_split_json`); None when not kept per split."""
    names = list(data["splits"]) if "splits" in data else list(covers)
    if "splits" not in data and len(names) > 1:
        return None
    return {name: StatsSet.from_json(_split_json(data, covers, name)) for name in names}


def _covers(data: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    return {s: dict(v) for s, v in data.get("covers", {}).items()}


def load(directory: str | os.PathLike) -> tuple[StatsSet, dict[str, dict[str, int]]] | None:
    """The statistics of all splits together and the shards they cover; None if missing."""
    data = _read(directory)
    if data is None:
        return None
    return StatsSet.from_json(data), _covers(data)


def load_split(directory: str | os.PathLike, split: str, *, current: bool = False,
               ) -> StatsSet | None:
    """The statistics of one split alone; None if missing or not kept per split, and with
    ``current``, also unless they cover exactly the split's committed shards (one read of the
    file for both)."""
    data = _read(directory)
    if data is None:
        return None
    covers = _covers(data)
    if current and not _covers_committed(directory, covers, split):
        return None
    own = _split_json(data, covers, split)
    return None if own is None else StatsSet.from_json(own)


def merge_into(directory: str | os.PathLike, new: StatsSet, split: str,
               shard_files: Mapping[str, int]) -> None:
    """Merges ``new`` (covering ``shard_files`` of ``split``) into ``statistics.json``, into
    the totals and into ``split``'s own statistics. Caller holds the dataset lock."""
    data = _read(directory)
    if data is None:
        total, covers, splits = StatsSet({}), {}, {}
    else:
        total = StatsSet.from_json(data)
        covers = _covers(data)
        splits = _splits_of(data, covers)
    total.merge(new)
    if splits is not None:
        splits.setdefault(split, StatsSet({})).merge(new)
    covers.setdefault(split, {}).update({os.path.basename(k): int(v) for k, v in shard_files.items()})
    layout.atomic_write_json(os.path.join(directory, layout.STATISTICS),
                             total.to_json(covers, splits))


def is_current(directory: str | os.PathLike, split: str | None = None) -> bool:
    """Whether ``statistics.json`` covers exactly the committed shards (of one or all splits)."""
    data = _read(directory)
    return data is not None and _covers_committed(directory, _covers(data), split)


def _covers_committed(directory: str | os.PathLike, covers: Mapping[str, Mapping[str, int]],
                      split: str | None) -> bool:
    info = layout.read_json(os.path.join(directory, layout.DATASET_INFO))
    if info is None:
        return False
    splits = [split] if split else layout.list_splits(info)
    for s in splits:
        want = {os.path.basename(p): n for p, n in layout.shard_paths(directory, info, s)}
        if covers.get(s, {}) != want:
            return False
    return not (split is None and set(covers) - set(splits))


def catch_up(directory: str | os.PathLike) -> None:
    """Adds the committed shards that ``statistics.json`` does not cover yet (decoding them).
    Caller holds the dataset lock."""
    from oxe_envlogger import reader

    directory = os.fspath(directory)
    info = layout.read_json(os.path.join(directory, layout.DATASET_INFO))
    if info is None:
        return
    data = _read(directory)
    covers = _covers(data) if data else {}
    spec = reader.read_spec(directory)
    keys = stat_keys(reader.step_leaves(spec))
    shapes = {k: dict(reader.step_leaves(spec))[k].shape for k in keys}
    for split in layout.list_splits(info):
        for path, n in layout.shard_paths(directory, info, split):
            name = os.path.basename(path)
            if covers.get(split, {}).get(name) == n:
                continue
            new = StatsSet(shapes)
            for episode in reader.read_shard(path, spec, keys=set(keys), decode_images=False):
                steps = episode["steps"]
                new.add_episode({k: reader.get_path(steps, k) for k in keys},
                                len(reader.get_path(steps, "is_first")))
            merge_into(directory, new, split, {name: n})
            covers.setdefault(split, {})[name] = n
