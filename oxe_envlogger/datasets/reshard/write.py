"""Stage 4: one task -> one output shard file (records copied byte for byte, CRC-checked, or
re-assembled where they change), its sha256 and its statistics.

Part of :mod:`oxe_envlogger.datasets.reshard` (see there for the stages).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import mmap
import os
import threading
from collections.abc import Callable, Sequence

from oxe_envlogger.datasets.reshard.options import ReshardOptions
from oxe_envlogger.datasets.reshard.plan import PlannedEpisode, ShardTask, _language_payload
from oxe_envlogger.datasets.reshard.scan import EpisodeRef
from oxe_envlogger.datasets.reshard.transform import Transform
from oxe_envlogger.errors import (
    CorruptDatasetError,
    DamagedShardError,
    SpecError,
)
from oxe_envlogger.format import reader, record, stats
from oxe_envlogger.format.specs import (
    spec_from_features_json,
)

log = logging.getLogger(__name__)


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


def _read_record(src: _MappedInput, ref: EpisodeRef, *, verify: bool
                 ) -> tuple[memoryview, memoryview]:
    """``(framed record, its data)`` of an input episode, viewed in the mapped input shard
    (the data's CRC checked with ``verify``)."""
    view = src.open(ref.path)
    start, end = ref.offset, ref.offset + record.framed_size(ref.length)
    if end > len(view):
        raise CorruptDatasetError(f"{ref.path}: record {ref.index} changed while read")
    framed = view[start:end]
    data = framed[12: 12 + ref.length]
    if verify and not record.data_crc_matches(framed[-4:], data):
        raise DamagedShardError(ref.path, ref.offset, f"bad data CRC in record {ref.index}")
    return framed, data


def _copy_record(src: _MappedInput, out: int, ref: EpisodeRef, framed: memoryview, *,
                 kernel_copy: bool) -> bool:
    """Appends an unchanged framed record to ``out``: with ``copy_file_range`` (in the kernel,
    as ``cp`` does) while that works, else from the mapped input. Returns whether the kernel
    copy still works."""
    end = ref.offset + len(framed)
    n = len(framed)
    while kernel_copy and n:
        try:
            done = os.copy_file_range(src.fd, out, n, end - n)
        except OSError:  # e.g. across file systems on older kernels
            kernel_copy = False
            break
        if done == 0:
            raise CorruptDatasetError(f"{ref.path}: record {ref.index} changed while read")
        n -= done
    if n:
        _write_all(out, framed[len(framed) - n:])
    return kernel_copy


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
            framed, data = _read_record(src, ref, verify=options.verify)
            if ep.changes:
                data = transform_record(data, ref, transform, ep.language)
                framed = record.frame(data)
                if len(framed) != ep.size:  # the plan's packing relies on this
                    raise AssertionError(f"planned {ep.size} bytes, wrote {len(framed)}")
                _write_all(out, framed)
            else:
                kernel_copy = _copy_record(src, out, ref, framed, kernel_copy=kernel_copy)
            if hasher is None:
                digest.update(framed)
            written += len(framed)
            helper.add(st, data)
            if progress is not None:
                progress(1, len(framed))
            del framed, data
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


