"""Running statistics of actions and float observations, mergeable across writers and appends.

Each key keeps per-element count, mean, M2 (for the variance), min and max, merged with Chan's
parallel formula, and a :class:`QuantileSketch` per element for the quantiles. Non-finite
elements are left out (and counted by the writer separately).

The quantiles are exact while a key has seen at most ``capacity`` rows (1024 for keys of up to
64 elements; fewer for wider keys, see :func:`sketch_capacity`), and above that they carry a
guaranteed rank-error bound: with ``E`` the absolute bound stored per element (``rank_error``
in the summary is ``E / count``), the stored quantile ``q_p`` of ``n`` values lies between the
sorted values at positions ``floor(p (n - 1) - E)`` and ``ceil(p (n - 1) + E)``. The bound is
not probabilistic: it is summed from the compactions the sketch actually made, and it is at
most ``(1 + log2(n / capacity)) / capacity`` of ``n`` (1.1% at a million rows) however the
data arrive or are merged (up to twice that for an element with non-finite values). On a
million rows of W1 episodes (``bench/bench_stats.py``) the stored bound is 0.41% and the largest
actual error 0.06%.

The statistics cover the steps a policy trains on: every step but the final one of each episode
(whose action is padding). ``statistics.json`` records which shards it covers, so a reader can
tell whether it is current. It holds the statistics of all splits together and, under
``splits``, of each split alone (a trainer normalizes with the train split's).

Format: ``format_version`` 1, whose readers predate the sketch, still reads every file: each
key's state also holds ``sample`` (the sketch's quantiles at evenly spaced ranks, or the rows
themselves while they are few) where those readers take their quantiles from, and the sketch
under ``sketch`` (``version`` 1), which they skip. A state without ``sketch`` was written by
such a reader, from a sample of at most 512 rows: it keeps its count, mean, std, min and max,
but its quantiles are not used (the trainer computes them in one pass; ``recover`` rebuilds the
file with sketches).
"""

from __future__ import annotations

import base64
import copy
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from oxe_envlogger.format import layout, reader
from oxe_envlogger.format.specs import Leaf

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
FORMAT_VERSION = 1
SKETCH_VERSION = 1
#: Rows per sketch level the logger keeps: exact up to this many rows.
SKETCH_ROWS = 1024
#: Values per sketch level (rows x elements): keys of more than 32 elements keep fewer rows.
SKETCH_VALUES = 1 << 15
#: Fewer rows than this bound nothing useful: such wide keys (depth maps) get no quantiles.
MIN_SKETCH_ROWS = 64
_LEGACY_ROWS = 512  # the sample older readers take quantiles from


def stat_keys(step_leaves: Iterable[tuple[str, Leaf]]) -> list[str]:
    """The step keys that get statistics: numeric actions and float observations."""
    out = []
    for path, leaf in step_leaves:
        if leaf.kind != "tensor":
            continue
        if ((path == "action" or path.startswith("action/")) and leaf.dtype.kind in "biuf") or (path.startswith("observation") and leaf.dtype.kind == "f"):
            out.append(path)
    return out


def sketch_capacity(width: int, *, values: int = SKETCH_VALUES, rows: int = SKETCH_ROWS,
                    ) -> int | None:
    """Rows per sketch level for a key of ``width`` elements: ``rows``, or fewer when
    ``rows * width`` would exceed ``values``; None (no sketch) below ``MIN_SKETCH_ROWS``."""
    capacity = min(rows, values // max(width, 1))
    return capacity if capacity >= MIN_SKETCH_ROWS else None


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def _unb64(s: str, dtype, shape) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype=dtype).reshape(shape).copy()


class QuantileSketch:
    """A mergeable quantile sketch of each column of a stream of rows.

    Compactors as in KLL (Karnin, Lang and Liberty, 2016), with one capacity for every level
    and the compaction offset alternating per level, so that the error is bounded for every
    input, not only with high probability. Level ``h`` holds values of weight ``2**h``, one row
    of ``width`` values per kept row (each column is sorted on its own, so a level's rows are
    not the input's rows). While no level holds more than ``capacity`` rows nothing is lost
    (level 0 holds every row: exact). A level holding more is compacted: an even number of its
    rows is sorted per column and every other value (from the first or the second, alternately)
    moves up a level with twice the weight. That moves the weighted count of values <= x by at
    most ``2**h`` for any x, which ``error`` adds up; merging adds the other sketch's error. So
    the weighted count of kept values <= x is within ``error`` of the true count, and since a
    compaction at level h consumes at least ``capacity * 2**h`` of the n rows' weight, which
    passes each level once, ``error <= n / capacity`` per level and
    ``(1 + log2(n / capacity)) * n / capacity`` in all (with the smallest capacity merged).

    Non-finite values are held as NaN (sorted last) and never counted. Merging is
    deterministic, and depends on the order: merge in a fixed order for identical results.
    """

    def __init__(self, width: int, capacity: int, *, parity: int = 0):
        if capacity < 2:
            raise ValueError(f"sketch capacity: expected >= 2, given {capacity}")
        self.width = int(width)
        self.capacity = int(capacity)
        self.levels: list[np.ndarray] = []  # level h: float64 [width, rows], NaN for non-finite
        self.error = 0  # absolute rank-error bound, in rows
        self.parity = int(parity)  # bit h: the offset of level h's next compaction

    @property
    def exact(self) -> bool:
        return self.error == 0

    def update(self, columns: np.ndarray) -> None:
        """Adds rows given column-major: ``columns`` is float64 ``[width, n]``, NaN for
        non-finite values."""
        if not self.levels:
            self.levels.append(np.array(columns, np.float64))
        else:
            self.levels[0] = np.concatenate([self.levels[0], columns], axis=1)
        self._compress()

    def merge(self, other: QuantileSketch) -> None:
        """Adds ``other``'s values (``other`` is not changed)."""
        if other.width != self.width:
            raise ValueError(f"cannot merge sketches of {self.width} and {other.width} columns")
        self.capacity = max(self.capacity, other.capacity)
        for h, level in enumerate(other.levels):
            if h < len(self.levels):
                self.levels[h] = np.concatenate([self.levels[h], level], axis=1)
            else:
                self.levels.append(level.copy())
        self.error += other.error
        self._compress()

    def _compress(self) -> None:
        h = 0
        while h < len(self.levels):
            level = self.levels[h]
            n = level.shape[1]
            if n > self.capacity:
                even = n - n % 2
                ordered = np.sort(level[:, :even], axis=1)  # NaN last
                offset = (self.parity >> h) & 1
                self.parity ^= 1 << h
                up = np.ascontiguousarray(ordered[:, offset::2])
                self.levels[h] = np.ascontiguousarray(level[:, even:])
                if h + 1 == len(self.levels):
                    self.levels.append(up)
                else:
                    self.levels[h + 1] = np.concatenate([self.levels[h + 1], up], axis=1)
                self.error += 1 << h
            h += 1

    def quantiles(self, ps: Sequence[float], counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Quantiles of each column, interpolated linearly between order statistics as
        ``numpy.quantile`` does (and equal to it while exact).

        Args:
          ps: probabilities in [0, 1].
          counts: int ``[width]``: the number of finite values of each column.

        Returns:
          ``(quantiles [len(ps), width], error [width])``: NaN for a column without values;
          ``error`` is the absolute rank-error bound of each column: the sketch's ``error``
          plus, for a column with non-finite values, how far its kept finite weight is from
          ``counts`` (a compaction may pair a finite value with a NaN), at most as much again.
        """
        ps = np.asarray(ps, np.float64)
        counts = np.asarray(counts, np.int64)
        if not self.levels:
            return np.full((len(ps), self.width), np.nan), np.zeros(self.width, np.int64)
        if self.exact:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
                return (np.nanquantile(self.levels[0], ps, axis=1).reshape(len(ps), self.width),
                        np.zeros(self.width, np.int64))
        values = np.concatenate(self.levels, axis=1)
        weights = np.concatenate([np.full(level.shape[1], 1 << h, np.int64)
                                  for h, level in enumerate(self.levels)])
        order = np.argsort(values, axis=1, kind="stable")
        ordered = np.take_along_axis(values, order, axis=1)
        cum = np.cumsum(np.where(np.isnan(ordered), 0, weights[order]), axis=1)
        total = cum[:, -1]
        # One searchsorted for every column: column c's cumulative weights shifted past the
        # previous columns' (each target is clipped into its own column's range first).
        rows = cum.shape[1]
        shift = np.arange(self.width, dtype=np.int64) * (int(total.max()) + 1)
        flat = (cum + shift[:, None]).ravel()
        t = ps[:, None] * (counts - 1)[None, :]
        base = np.arange(self.width) * rows

        def at(position):
            target = np.clip(position.astype(np.int64), 0, np.maximum(total - 1, 0)[None, :])
            index = np.searchsorted(flat, (target + shift[None, :]).ravel(), side="right")
            return ordered.ravel()[np.minimum(index.reshape(t.shape), base + rows - 1)]

        lo = np.floor(t)
        v_lo, v_hi = at(lo), at(np.ceil(t))
        with np.errstate(invalid="ignore"):
            q = v_lo + (t - lo) * (v_hi - v_lo)
        q[:, (counts <= 0) | (total <= 0)] = np.nan
        return q, self.error + np.abs(total - counts)

    def to_json(self) -> dict[str, Any]:
        return {"version": SKETCH_VERSION, "capacity": self.capacity, "error": self.error,
                "parity": self.parity, "levels": [_b64(level) for level in self.levels]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], width: int) -> QuantileSketch | None:
        """The sketch, or None for a version this reader does not know."""
        if data.get("version") != SKETCH_VERSION:
            return None
        s = cls(width, int(data["capacity"]), parity=int(data["parity"]))
        s.error = int(data["error"])
        s.levels = [_unb64(level, np.float64, (width, -1)) for level in data["levels"]]
        return s


class RunningStats:
    """Statistics of one key; rows are flattened to vectors of ``width`` elements.

    Attributes:
      sketch: the quantile sketch; None for keys too wide for one (see
        :func:`sketch_capacity`) and for statistics merged with a state that had none (written
        by an older logger): their quantiles are unknown.
    """

    def __init__(self, shape: tuple[int, ...], *, seed: int = 0, sketch_rows: int = SKETCH_ROWS,
                 sketch_values: int = SKETCH_VALUES):
        """
        Args:
          shape: one row's shape.
          seed: picks the sketch's first compaction offsets, so that the rounding of separately
            written sketches (writers, shards) does not lean one way.
          sketch_rows, sketch_values: the sketch's capacity (see :func:`sketch_capacity`).
        """
        self.shape = tuple(shape)
        self.width = int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1
        w = self.width
        self.count = np.zeros(w, np.int64)
        self.mean = np.zeros(w, np.float64)
        self.m2 = np.zeros(w, np.float64)
        self.min = np.full(w, np.inf)
        self.max = np.full(w, -np.inf)
        self.rows = 0
        capacity = sketch_capacity(w, values=sketch_values, rows=sketch_rows)
        self.sketch: QuantileSketch | None = None
        if capacity is not None:
            parity = int(np.random.default_rng(seed).integers(0, 1 << 62))
            self.sketch = QuantileSketch(w, capacity, parity=parity)

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
            kept = xt
        else:
            n_b = finite.sum(1)
            with np.errstate(all="ignore"):
                mean_b = np.where(n_b > 0, np.where(finite, xt, 0.0).sum(1) / np.maximum(n_b, 1),
                                  0.0)
                m2_b = np.where(finite, (xt - mean_b[:, None]) ** 2, 0.0).sum(1)
            self._combine(n_b, mean_b, m2_b, np.where(finite, xt, np.inf).min(1),
                          np.where(finite, xt, -np.inf).max(1))
            kept = np.where(finite, xt, np.nan)
        self.rows += n
        if self.sketch is not None:
            self.sketch.update(kept)

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

    def merge(self, other: RunningStats) -> None:
        """Adds ``other``'s rows (``other`` is not changed)."""
        if other.width != self.width:
            raise ValueError(f"cannot merge statistics of shapes {self.shape} and {other.shape}")
        self._combine(other.count, other.mean, other.m2, other.min, other.max)
        self.rows += other.rows
        if self.sketch is None or other.sketch is None:
            self.sketch = None
        else:
            self.sketch.merge(other.sketch)

    def summary(self) -> dict[str, Any]:
        """count, mean, std, min, max, and where known the quantiles ``q01`` ... ``q99`` and
        their ``rank_error`` bound (a fraction of the count; 0: exact), shaped like a row."""
        with np.errstate(invalid="ignore", divide="ignore"):
            var = np.where(self.count > 1, self.m2 / np.maximum(self.count, 1), 0.0)

        def shaped(a):
            a = np.where(np.isfinite(a), a, np.nan) if a.dtype.kind == "f" else a
            return np.asarray(a).reshape(self.shape).tolist()

        out = {"count": shaped(self.count), "mean": shaped(self.mean), "std": shaped(np.sqrt(var)),
               "min": shaped(self.min), "max": shaped(self.max)}
        if self.sketch is not None and self.sketch.levels:
            q, error = self.sketch.quantiles(QUANTILES, self.count)
            for p, row in zip(QUANTILES, q):
                out[f"q{round(p * 100):02d}"] = shaped(row)
            out["rank_error"] = shaped(error / np.maximum(self.count, 1))
        return out

    def _legacy_sample(self) -> tuple[np.ndarray, np.ndarray]:
        """``(keys, rows)`` for readers that predate the sketch and take their quantiles from a
        bottom-k sample: the rows themselves while exact and few, else the sketch's quantiles
        at evenly spaced ranks, with keys such as the smallest of ``self.rows`` uniform draws
        have, in a fixed shuffled order (their merges then drop no range of ranks)."""
        sk = self.sketch
        if sk is None or not sk.levels:
            return np.zeros(0), np.zeros((0, self.width))
        if sk.exact and sk.levels[0].shape[1] <= _LEGACY_ROWS:
            rows = sk.levels[0].T
        else:
            rows = sk.quantiles(np.linspace(0.0, 1.0, _LEGACY_ROWS), self.count)[0]
        order = np.random.default_rng(0).permutation(len(rows))
        return (order + 0.5) / max(self.rows, len(rows)), rows

    def to_json(self) -> dict[str, Any]:
        keys, sample = self._legacy_sample()
        out = {"shape": list(self.shape), "rows": self.rows, "k": max(len(keys), 1),
               "count": _b64(self.count), "mean": _b64(self.mean), "m2": _b64(self.m2),
               "min": _b64(self.min), "max": _b64(self.max),
               "sample_keys": _b64(keys.astype(np.float64)),
               "sample": _b64(sample.astype(np.float64))}
        if self.sketch is not None:
            out["sketch"] = self.sketch.to_json()
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunningStats:
        s = cls(tuple(data["shape"]))
        w = s.width
        s.rows = int(data["rows"])
        s.count = _unb64(data["count"], np.int64, (w,))
        s.mean = _unb64(data["mean"], np.float64, (w,))
        s.m2 = _unb64(data["m2"], np.float64, (w,))
        s.min = _unb64(data["min"], np.float64, (w,))
        s.max = _unb64(data["max"], np.float64, (w,))
        s.sketch = QuantileSketch.from_json(data["sketch"], w) if "sketch" in data else None
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

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], *, seed: int = 0,
                 sketch_rows: int = SKETCH_ROWS, sketch_values: int = SKETCH_VALUES):
        self.keys = {k: RunningStats(shape, seed=seed + i, sketch_rows=sketch_rows,
                                     sketch_values=sketch_values)
                     for i, (k, shape) in enumerate(shapes.items())}
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

    def legacy_keys(self) -> list[str]:
        """Keys merged with statistics written before the sketch (an older logger's 512-row
        sample): their quantiles are unknown; :func:`catch_up` on a fresh file rebuilds them."""
        return [k for k, st in self.keys.items()
                if st.sketch is None and sketch_capacity(st.width) is not None]

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
                    "the shards included; 'splits' holds each split's own statistics; "
                    "quantiles come from a mergeable sketch, within 'rank_error' (a fraction "
                    "of the count) of the exact ranks",
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
