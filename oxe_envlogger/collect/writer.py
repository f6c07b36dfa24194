"""The background writer: encoding, serialization, shards and commits, off the control thread.

The control thread only hands over references: image frames go to encoder threads as soon as
they are observed (PNG/JPEG encoders release the GIL), and a finished episode's rows go to a
bounded queue. One writer thread assembles each episode into a ``tf.train.Example``, appends it
to a staging shard, fsyncs it (from then on a kill cannot lose it), and commits the shard into
the dataset when it reaches the byte budget and at ``close()``.

When a queue is full the caller blocks (nothing is dropped) and the time is counted as a stall;
stall counts are logged at close and kept in ``oxe_envlogger.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from oxe_envlogger.collect import encoders
from oxe_envlogger.collect.encoders import ProcessEncodePool, Stalls, ThreadEncodePool
from oxe_envlogger.datasets import recovery
from oxe_envlogger.errors import LoggerClosedError, RecordTooLargeError, WriterError
from oxe_envlogger.format import layout, record, stats
from oxe_envlogger.format.specs import Group, Leaf, iter_leaves, spec_to_features_json

log = logging.getLogger(__name__)

# An episode is held in memory until it ends, and one part may be written while the next fills:
# this bounds the logger's memory for endless episodes to about 1 GiB, far below the record
# limit (2 GiB), which leaves room for the size estimate's error.
DEFAULT_MAX_EPISODE_BYTES = 512 * 2**20
_RECORD_LIMIT = record.MAX_RECORD_BYTES


@dataclasses.dataclass(frozen=True)
class WriterOptions:
    """How episodes are written.

    Attributes:
      shard_bytes: a shard is closed once its serialized bytes reach this budget.
      max_episodes_per_file: also close a shard after this many episodes (None: no limit).
      queue_episodes: finished episodes that may wait for the writer thread; a kill can lose
        at most these plus the episode in progress.
      max_pending_frames: images that may wait for an encoder before ``step()`` blocks.
      encode_processes: image encoder worker processes (default: CPU count - 1, at most 4;
        0 encodes in threads, which the fastest PNG encoder stalls by holding the GIL).
      fsync: fsync every episode (durable against power loss, not only against crashes).
      split: the TFDS split written.
      max_episode_bytes: an episode growing past about this many serialized bytes is split:
        it ends there as truncated and the next episode continues from the same observation,
        with the episode id ``<id>.1``, ``<id>.2``, ... (a tf.train.Example cannot exceed
        2 GiB, and an episode is held in memory until it ends). None: never split (an
        episode above 2 GiB is then lost with :class:`RecordTooLargeError`).
      commit_every_s: also commit the open shard once it is this many seconds old (checked as
        each episode is written), so that readers see a long collection run's episodes within
        about this time, not only when a shard fills up; None: only at ``shard_bytes``,
        ``flush()`` and ``close()``.
    """

    shard_bytes: int = layout.DEFAULT_SHARD_BYTES
    max_episodes_per_file: int | None = None
    queue_episodes: int = 4
    max_pending_frames: int = 64
    encode_processes: int | None = None
    fsync: bool = True
    split: str = layout.DEFAULT_SPLIT
    max_episode_bytes: int | None = DEFAULT_MAX_EPISODE_BYTES
    commit_every_s: float | None = 300.0

    def __post_init__(self):
        if self.shard_bytes <= 0:
            raise ValueError(f"shard_bytes: expected > 0, given {self.shard_bytes}")
        if self.max_episodes_per_file is not None and self.max_episodes_per_file <= 0:
            raise ValueError(f"max_episodes_per_file: expected > 0, given {self.max_episodes_per_file}")
        if self.queue_episodes < 1:
            raise ValueError(f"queue_episodes: expected >= 1, given {self.queue_episodes}")
        if self.max_episode_bytes is not None and not (
                0 < self.max_episode_bytes <= _RECORD_LIMIT):
            raise ValueError(f"max_episode_bytes: expected 1..{_RECORD_LIMIT} or None, "
                             f"given {self.max_episode_bytes}")
        if self.commit_every_s is not None and not self.commit_every_s >= 0:
            raise ValueError(f"commit_every_s: expected >= 0 or None, given {self.commit_every_s}")


# ---------------------------------------------------------------------------------------------
# Episode schema: rows -> tf.train.Example


class Schema:
    """The compiled episode spec: which leaves exist, in which order, and how each is encoded.

    The step part is ``observation``, ``action``, ``reward``, ``discount``, ``is_first``,
    ``is_last``, ``is_terminal``, optionally ``language_instruction``, then step metadata.
    """

    def __init__(self, spec: Group):
        self.spec = spec
        steps = spec.fields["steps"]
        assert isinstance(steps, Group) and steps.kind == "steps"
        self.step_leaves: list[tuple[str, Leaf]] = list(iter_leaves(steps))
        self.episode_leaves: list[tuple[str, Leaf]] = [
            (p, leaf) for p, leaf in iter_leaves(spec) if not p.startswith("steps/") and p != "steps"]
        self.index = {p: i for i, (p, _) in enumerate(self.step_leaves)}
        self.stat_keys = stats.stat_keys(self.step_leaves)
        self.stat_shapes = {k: self.step_leaves[self.index[k]][1].shape for k in self.stat_keys}
        self.float_keys = [p for p, leaf in self.step_leaves if leaf.is_float]
        # (key, column, bounds, whether the final step is left out: an action's is padding).
        self.bounded = [(p, self.index[p], leaf.bounds, p.split("/", 1)[0] == "action")
                        for p, leaf in self.step_leaves
                        if leaf.bounds is not None and leaf.kind == "tensor"
                        and p.split("/", 1)[0] in ("observation", "action")]


def column_payload(leaf: Leaf, chunks: Sequence[Any]) -> record.Payload:
    """The Feature payload of one leaf's values given as consecutive chunks: arrays of the
    leaf's dtype (one row per step) for tensors, sequences of ``bytes`` or encoded frames for
    strings and images. Numbers are encoded one chunk at a time as the record is written;
    strings and encoded images are referenced, not copied."""
    if leaf.kind in ("text", "image"):
        return record.bytes_list_column(
            [[v if v.__class__ is bytes else v.result() for v in c] for c in chunks])
    if leaf.encoding == "bytes":
        return record.fixed_bytes_list_column(chunks)
    if leaf.dtype.kind == "f":
        return record.float_list_column(chunks)
    if leaf.dtype == np.uint64:
        return record.int64_list_column([c.view(np.int64) for c in chunks])
    return record.int64_list_column(chunks)


def payload(leaf: Leaf, values: Sequence[Any]) -> record.Payload:
    """The Feature payload of one leaf's values (one per step, or one for an episode field)."""
    if leaf.kind == "tensor":
        values = np.asarray(values, dtype=leaf.dtype)
    return column_payload(leaf, [values])


@dataclasses.dataclass
class EpisodeRows:
    """A finished episode as handed to the writer. The callables build, in the writer thread,
    one column per step leaf and one value per episode leaf, in schema order. A column is a
    list of chunks of consecutive steps (columns may be cut into chunks differently): arrays
    of the leaf's dtype (``(steps, *shape)``) for tensors, sequences of values for strings
    and images (``bytes``, or encoded frames still being encoded)."""

    step_columns: Callable[[], list[list[Any]]]
    episode_values: Callable[[], list[Any]]
    num_steps: int
    episode_id: str


# ---------------------------------------------------------------------------------------------
# The writer


_CLOSE = object()


class _Flush:
    """A marker in the writer queue: everything queued before it is written when it is reached."""

    def __init__(self, commit: bool):
        self.commit = commit
        self.done = threading.Event()
        self.error: BaseException | None = None


class DatasetWriter:
    """Writes episodes into one dataset directory from a background thread.

    Args:
      directory: the dataset directory (created if missing).
      dataset_name: the TFDS name (letters, digits, underscores).
      options: :class:`WriterOptions`.
      overwrite: delete an existing dataset in ``directory`` first (never done silently).
      session: provenance of this writer, kept in ``oxe_envlogger.json``.
    """

    def __init__(self, directory: str | os.PathLike, dataset_name: str, *,
                 options: WriterOptions | None = None, overwrite: bool = False,
                 session: Mapping[str, Any] | None = None):
        self.options = options or WriterOptions()
        self.dir = layout.DatasetDir(directory, dataset_name, split=self.options.split)
        self.writer_id = uuid.uuid4().hex[:12]
        self.stalls = Stalls()
        self.encoder: ThreadEncodePool | ProcessEncodePool | None = None
        self.schema: Schema | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=self.options.queue_episodes)
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # the thread's failure, until check() raises it
        self._fatal = False
        self._closed = False
        self._registration: layout.WriterRegistration | None = None
        self._shard: record.RecordWriter | None = None
        self._shard_seq = 0
        self._shard_opened = 0.0  # time.monotonic() when the open shard was created
        self._shard_episodes = 0
        self._shard_stats: stats.StatsSet | None = None
        self.committed_shards: list[str] = []
        self.episodes_written = 0
        self.episodes_split = 0  # episodes ended early at the byte budget (note_split)
        self.steps_written = 0
        self.bytes_written = 0
        self.nonfinite: dict[str, int] = {}
        self.out_of_bounds: dict[str, int] = {}  # values outside the declared spaces
        self.session: dict[str, Any] = {"writer_id": self.writer_id, "started": layout.now_iso(),
                                        **(session or {})}
        self._created_dir = not os.path.exists(self.dir.path)
        layout.check_directory(self.dir.path, create=True)
        with self.dir.lock():
            if overwrite:
                if layout.live_writers(self.dir.path):
                    raise WriterError(f"{self.dir.path}: cannot overwrite while another writer is live")
                self.dir.remove_dataset()
        if recovery.needs_recovery(self.dir.path):
            recovery.recover(self.dir.path, verify=False)
        self._registration = layout.WriterRegistration(self.dir.path, self.writer_id)

    # -- spec -------------------------------------------------------------------------------

    def existing_features(self) -> dict | None:
        """The features.json of the dataset already in the directory, if any."""
        return self.dir.read_features() if self.dir.read_info() is not None else None

    def start(self, spec: Group, *, description: str = "", version: str = layout.DEFAULT_VERSION,
              metadata: Mapping[str, Any] | None = None) -> None:
        """Fixes the episode spec (creating the dataset or checking the existing one's features)
        and starts the writer thread."""
        schema = Schema(spec)
        features = spec_to_features_json(spec)
        with self.dir.lock():
            self.dir.ensure(features, description=description, version=version, metadata=metadata)
            self.dir.update_metadata(lambda meta: layout.update_session(meta, self.session_json()))
        self.schema = schema
        self._thread = threading.Thread(target=self._run, name="oxe-writer", daemon=True)
        self._thread.start()

    @property
    def started(self) -> bool:
        return self.schema is not None

    # -- producer side ------------------------------------------------------------------------

    def prepare_encoder(self, frame_bytes: int) -> None:
        """Starts the image encoders now (worker processes take a moment to start), sized for
        frames of up to ``frame_bytes``."""
        if self.encoder is None:
            self.encoder = encoders.make_pool(self.options.encode_processes,
                                              self.options.max_pending_frames, frame_bytes,
                                              self.stalls)

    def encode_images(self, images: list[tuple[np.ndarray, Any]]) -> list[encoders.EncodedFrame]:
        """Starts encoding the frames of one step (copied before this returns), handing them
        to the encoders together."""
        if self.encoder is None:
            self.prepare_encoder(max(image.size for image, _ in images))
        return self.encoder.submit_many(images)

    def note_split(self) -> None:
        """Counts an episode that the recorder ended early at its byte budget (continued as a
        next part), for the session's ``episodes_split``."""
        self.episodes_split += 1

    def check(self) -> None:
        """Raises the writer thread's error, if any (once for per-episode errors)."""
        if self._closed:
            raise LoggerClosedError(f"the writer of {self.dir.path} is closed")
        err = self.error
        if err is not None:
            if not self._fatal:
                self.error = None
            if isinstance(err, RecordTooLargeError):
                raise err
            raise WriterError(f"writing to {self.dir.path} failed: {err}") from err

    def put(self, rows: EpisodeRows) -> None:
        """Queues a finished episode; blocks (counting a stall) while the queue is full."""
        self.check()
        assert self._thread is not None, "start() first"
        try:
            self._queue.put_nowait(rows)
            return
        except queue.Full:
            pass
        t0 = time.perf_counter()
        self._enqueue(rows)
        self.stalls.add(time.perf_counter() - t0)

    def _enqueue(self, item: Any) -> None:
        """Puts ``item`` in the writer queue, waiting while it is full, unless the writer stops."""
        while True:
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                self._check_running()

    def _check_running(self) -> None:
        if self._fatal or not self._thread.is_alive():
            self.check()
            raise WriterError(f"the writer of {self.dir.path} stopped") from None

    def flush(self, *, commit: bool = True) -> None:
        """Blocks until every episode queued so far is written (and fsynced, with ``fsync``);
        with ``commit``, also commits the open shard, so that readers see those episodes now
        (and ``statistics.json`` covers them). Without ``commit`` they are durable but reach
        readers at the next commit, or through recovery after a crash.

        Raises:
          LoggerClosedError: after :meth:`close`.
          WriterError: when writing failed.
        """
        self.check()
        if self._thread is None:
            return  # nothing was ever queued
        marker = _Flush(commit)
        self._enqueue(marker)
        while not marker.done.wait(0.5):
            self._check_running()
        if marker.error is not None:
            raise WriterError(f"flushing {self.dir.path} failed: {marker.error}") from marker.error
        self.check()

    def close(self) -> None:
        """Writes everything queued, commits the last shard, and releases the directory.
        Idempotent. Raises :class:`WriterError` if something queued could not be written."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._thread is not None:
                self._queue.put(_CLOSE)
                self._thread.join()
        finally:
            if self.encoder is not None:
                self.encoder.shutdown()
            commit_error = None
            try:
                if self.schema is not None:
                    self._commit(final=True)
            except Exception as e:  # reported below, after the earlier error if there was one
                commit_error = e
            finally:
                if self._registration is not None:
                    self._registration.release()
                    self._registration = None
                if self.schema is None:
                    try:
                        self._remove_unstarted()
                    except OSError as e:  # (leftovers cost nothing; close() goes on)
                        log.warning("%s: could not remove the empty dataset directory: %s",
                                    self.dir.path, e)
        self._log_summary()
        if self.error is not None:
            err, self.error = self.error, None
            raise WriterError(f"writing to {self.dir.path} failed: {err}") from err
        if commit_error is not None:
            raise WriterError(
                f"committing {self.dir.path} at close failed: {commit_error}; the episodes "
                "written are kept in staging, and reopening the directory (or "
                "oxe_envlogger.recover) commits them") from commit_error

    def _remove_unstarted(self) -> None:
        """Leaves no dataset directory behind when the features never became known (nothing
        was written): without ``features.json`` no reader could open it. Only what a writer
        makes before it starts is removed (the lock file and empty internal folders, and the
        directory if this writer created it and it is empty): never another writer's files or
        anything else a directory already held."""
        internal = os.path.join(self.dir.path, layout.INTERNAL)
        with self.dir.lock():
            if self.dir.read_info() is not None or layout.live_writers(self.dir.path):
                return  # another writer started a dataset here, or is starting one
            for sub in ("writers", "staging"):
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(internal, sub))
            if os.listdir(internal) == ["lock"]:
                os.unlink(os.path.join(internal, "lock"))
                os.rmdir(internal)
        if self._created_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self.dir.path)

    # -- writer thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while self._handle(self._queue.get()):
            pass

    def _handle(self, item: Any) -> bool:
        """Writes one queued item; False at the end. (Its own frame, so that a part written is
        freed at once, not held until the next one arrives.)"""
        if item is _CLOSE:
            return False
        if isinstance(item, _Flush):
            self._flush(item)
            return True
        if self._fatal:
            return True  # drain; the error is reported to the producer
        try:
            self._write_episode(item)
        except (RecordTooLargeError, ValueError) as e:
            log.error("episode %s not written: %s", item.episode_id, e)
            self.error = e
        except BaseException as e:
            log.error("writer of %s failed: %s", self.dir.path, e)
            self.error = e
            self._fatal = True
        return True

    def _flush(self, marker: _Flush) -> None:
        try:
            if not self._fatal:
                if marker.commit:
                    if self._shard is not None:
                        self._commit()
                elif self._shard is not None and self.options.fsync:
                    self._shard.sync()
        except BaseException as e:  # as a failed episode write: the writer stops (what it
            # wrote is fsynced in staging, where recovery commits it)
            log.error("flushing %s failed: %s", self.dir.path, e)
            marker.error = e
            self.error = e
            self._fatal = True
        finally:
            marker.done.set()

    def _serialize(self, columns: list[list[Any]], values: list[Any]) -> tuple[list, int]:
        schema = self.schema
        assert len(columns) == len(schema.step_leaves), (len(columns), len(schema.step_leaves))
        assert len(values) == len(schema.episode_leaves), (len(values), len(schema.episode_leaves))
        features = {}
        for (path, leaf), col in zip(schema.step_leaves, columns):
            features[f"steps/{path}"] = column_payload(leaf, col)
        for (path, leaf), value in zip(schema.episode_leaves, values):
            features[path] = payload(leaf, [value])
        return record.encode_example_chunks(features)

    def _write_episode(self, rows: EpisodeRows) -> None:
        schema = self.schema
        step_columns = rows.step_columns()
        chunks, length = self._serialize(step_columns, rows.episode_values())
        opts = self.options
        size = record.framed_size(length)
        if self._shard is not None and self._shard_episodes and (
                self._shard.bytes_written + size > opts.shard_bytes
                or (opts.max_episodes_per_file and self._shard_episodes >= opts.max_episodes_per_file)):
            self._commit()
        if self._shard is None:
            os.makedirs(layout.staging_dir(self.dir.path), exist_ok=True)
            path = os.path.join(layout.staging_dir(self.dir.path),
                                f"{self.writer_id}-{opts.split}-{self._shard_seq:05d}.tfrecord")
            self._shard_seq += 1
            self._shard = record.RecordWriter(path)
            self._shard_opened = time.monotonic()
            self._shard_episodes = 0
            self._shard_stats = stats.StatsSet(
                schema.stat_shapes, seed=int(self.writer_id[:8], 16) + self._shard_seq)
        self._shard.write_chunks(chunks, length)
        # Once write() returns the episode survives a crash of this process (it is in the page
        # cache); fsync makes it survive power loss too. Episodes queued behind this one share
        # one fsync (group commit), so many short episodes do not wait on the disk each.
        if opts.fsync and self._queue.empty():
            self._shard.sync()
        self._shard_episodes += 1
        self.episodes_written += 1
        self.steps_written += rows.num_steps
        self.bytes_written += size
        # Statistics, non-finite and out-of-bounds counts, chunk by chunk.
        for key in schema.float_keys:
            bad = sum(int(np.count_nonzero(~np.isfinite(c)))
                      for c in step_columns[schema.index[key]])
            if bad:
                self.nonfinite[key] = self.nonfinite.get(key, 0) + bad
        for key, i, bounds, padded in schema.bounded:
            column = step_columns[i]
            bad = sum(bounds.count_outside(c[:-1] if padded and j == len(column) - 1 else c)
                      for j, c in enumerate(column))
            if bad:
                self.out_of_bounds[key] = self.out_of_bounds.get(key, 0) + bad
        self._shard_stats.add_episode({k: step_columns[schema.index[k]] for k in schema.stat_keys},
                                      rows.num_steps)
        if (opts.commit_every_s is not None
                and time.monotonic() - self._shard_opened >= opts.commit_every_s):
            self._commit()

    def _commit(self, *, final: bool = False) -> None:
        """Commits the open staging shard (if any) and refreshes this session's metadata."""
        shard, self._shard = self._shard, None
        with self.dir.lock():
            if shard is not None:
                if self.options.fsync:
                    shard.sync()
                shard.close()
                if self._shard_episodes:
                    committed = self.dir.commit_shard(shard.path, self._shard_episodes,
                                                      shard.bytes_written)
                    self.committed_shards.append(os.path.basename(committed))
                    stats.merge_into(self.dir.path, self._shard_stats, self.options.split,
                                     {committed: self._shard_episodes})
                else:
                    os.unlink(shard.path)
            session = self.session_json()
            if final:
                session["closed"] = layout.now_iso()
                session["ended"] = "error: " + str(self.error) if self._fatal else "closed"
            self.dir.update_metadata(lambda meta: layout.update_session(meta, session))
        self._shard_episodes = 0

    def session_json(self) -> dict[str, Any]:
        """This writer's session entry of ``oxe_envlogger.json``: its provenance and what it
        wrote so far (episodes, steps, bytes, shards, stalls, counts of odd values)."""
        out = dict(self.session)
        out.update({
            "episodes": self.episodes_written,
            "steps": self.steps_written,
            "bytes": self.bytes_written,
            "shards": list(self.committed_shards),
            "stalls": self.stalls.to_json(),
            "nonfinite_values": dict(self.nonfinite),
            "out_of_bounds_values": dict(self.out_of_bounds),
            "episodes_split": self.episodes_split,
            "frames_encoded": self.encoder.frames if self.encoder else 0,
            "image_encoders": self.encoder.kind if self.encoder else None,
        })
        cpu = self.encoder.cpu_seconds() if self.encoder else None
        if cpu is not None:
            out["encoder_cpu_seconds"] = round(cpu, 3)  # the worker processes' CPU time
        return out

    def _log_summary(self) -> None:
        s = self.stalls
        log.info("%s: wrote %d episodes (%d steps, %.1f MB) in %d shards; %d stalls, %.3f s blocked",
                 self.dir.path, self.episodes_written, self.steps_written, self.bytes_written / 1e6,
                 len(self.committed_shards), s.count, s.seconds)
        if self.nonfinite:
            log.warning("%s: non-finite values logged: %s", self.dir.path, self.nonfinite)
        if self.out_of_bounds:
            log.warning("%s: values outside the declared spaces logged (strict_bounds=True "
                        "refuses them): %s", self.dir.path, self.out_of_bounds)

