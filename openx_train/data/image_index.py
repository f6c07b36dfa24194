"""Byte ranges of the encoded images inside a dataset's shards: frames are shuffled as small
references and their images read after shuffling.

A shuffle buffer of encoded W2 frames costs about 126 KB per frame (12 GiB for 100k frames) and
one of decoded frames four times that; a reference is three int64 (shard, offset, length). One
pass over the records (numpy and the protobuf wire format, no TensorFlow) finds where each step's
image bytes lie inside its ``tf.train.Example``; the result is cached like the statistics (see
:mod:`openx_train.data.cache`). :class:`RangeReader` then reads exactly those bytes with
``os.pread``, which neither moves a file position nor holds the GIL while it waits.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import threading
from collections.abc import Sequence

import numpy as np

from openx_train.data import cache
from openx_train.data.errors import DatasetFormatError
from oxe_envlogger.format import record

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
INDEX_PREFIX = "image_index"
_HEADER = 12  # TFRecord framing before a record's data: uint64 length + uint32 CRC
_MAX_OPEN_FILES = 512


@dataclasses.dataclass(frozen=True)
class ImageIndex:
    """Where every step's images lie in a split's shards.

    Attributes:
      files: the shard paths, in split order.
      keys: the step keys indexed (``"observation/image"``).
      episode_start: int64 ``[E]``: the row of each episode's first step.
      episode_length: int64 ``[E]``: RLDS steps per episode.
      file_id: int32 ``[S]``: the shard of each step (row).
      offset: int64 ``[K, S]``: byte offset of each key's image of each step in its shard.
      length: int64 ``[K, S]``: its length in bytes.
    """

    files: tuple[str, ...]
    keys: tuple[str, ...]
    episode_start: np.ndarray
    episode_length: np.ndarray
    file_id: np.ndarray
    offset: np.ndarray
    length: np.ndarray

    def refs(self, key: str, episode_index: int) -> np.ndarray:
        """int64 ``[L, 3]`` references ``(file id, offset, length)`` of one episode's images."""
        k = self.keys.index(key)
        s = int(self.episode_start[episode_index])
        rows = slice(s, s + int(self.episode_length[episode_index]))
        return np.stack([self.file_id[rows].astype(np.int64), self.offset[k, rows],
                         self.length[k, rows]], axis=-1)

    def save(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, files=np.array(self.files), keys=np.array(self.keys),
                 episode_start=self.episode_start, episode_length=self.episode_length,
                 file_id=self.file_id, offset=self.offset, length=self.length)
        return buf.getvalue()

    @classmethod
    def load(cls, path: str) -> ImageIndex:
        with np.load(path, allow_pickle=False) as z:
            return cls(tuple(str(f) for f in z["files"]), tuple(str(k) for k in z["keys"]),
                       z["episode_start"], z["episode_length"], z["file_id"], z["offset"],
                       z["length"])


def _scan(path: str, split: str, keys: Sequence[str]) -> ImageIndex:
    feature_keys = [f"steps/{k}" for k in keys]
    files = [os.path.abspath(f) for f, _ in cache.shard_files(path, split)]
    lengths: list[int] = []
    file_ids: list[np.ndarray] = []
    offsets: list[list[np.ndarray]] = [[] for _ in keys]
    sizes: list[list[np.ndarray]] = [[] for _ in keys]
    for fid, shard in enumerate(files):
        with open(shard, "rb", buffering=1 << 20) as f:
            for rec_offset, data in record.iter_records(f, path=shard):
                ranges = record.bytes_value_ranges(data, feature_keys)
                counts = {len(ranges.get(k, ())) for k in feature_keys}
                missing = [k for k in feature_keys if k not in ranges]
                if missing or len(counts) != 1:
                    raise DatasetFormatError(
                        f"{shard}: record at byte {rec_offset}: expected one image per step for "
                        f"{feature_keys}, found {[len(ranges.get(k, ())) for k in feature_keys]}")
                n = counts.pop()
                base = rec_offset + _HEADER
                for i, k in enumerate(feature_keys):
                    r = np.asarray(ranges[k], np.int64).reshape(-1, 2)
                    offsets[i].append(base + r[:, 0])
                    sizes[i].append(r[:, 1] - r[:, 0])
                lengths.append(n)
                file_ids.append(np.full(n, fid, np.int32))
    ep_len = np.asarray(lengths, np.int64)
    ep_start = np.concatenate([[0], np.cumsum(ep_len)[:-1]]).astype(np.int64) if lengths \
        else np.zeros(0, np.int64)

    def cat(parts: list[np.ndarray], dtype) -> np.ndarray:
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

    return ImageIndex(tuple(files), tuple(keys), ep_start, ep_len, cat(file_ids, np.int32),
                      np.stack([cat(p, np.int64) for p in offsets]) if keys else
                      np.zeros((0, 0), np.int64),
                      np.stack([cat(p, np.int64) for p in sizes]) if keys else
                      np.zeros((0, 0), np.int64))


def build_image_index(path: PathLike, split: str, keys: Sequence[str], *,
                      use_cache: bool = True) -> ImageIndex:
    """The :class:`ImageIndex` of a split's image keys, from the cache or one pass.

    Raises:
      DatasetFormatError: when a record does not hold one image per step for every key.
    """
    path = os.fspath(path)
    keys = tuple(keys)
    fingerprint = cache.dataset_fingerprint(path, split, extra=[f"image:{k}" for k in keys])
    filename = f"{INDEX_PREFIX}_{fingerprint}.npz"
    if use_cache:
        cached = cache.find_cached(path, filename)
        if cached is not None:
            try:
                index = ImageIndex.load(cached)
                if index.keys == keys:
                    return index
            except (OSError, ValueError, KeyError) as e:
                log.warning("ignoring unreadable image index %s: %s", cached, e)
    log.info("%s: indexing the images %s of split %r", path, list(keys), split)
    index = _scan(path, split, keys)
    if use_cache:
        cache.write_cached(path, filename, index.save())
    return index


class RangeReader:
    """Reads byte ranges ``(file id, offset, length)`` of a fixed list of files; safe to call
    from several threads (``pread`` has no file position) and after ``fork``."""

    def __init__(self, files: Sequence[str]):
        self.files = tuple(files)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def _fd(self, file_id: int) -> tuple[int, bool]:
        """An open descriptor, and whether the caller must close it."""
        if len(self.files) > _MAX_OPEN_FILES:
            return os.open(self.files[file_id], os.O_RDONLY), True
        with self._lock:
            if self._pid != os.getpid():
                self._fds, self._pid = {}, os.getpid()
            fd = self._fds.get(file_id)
            if fd is None:
                fd = self._fds[file_id] = os.open(self.files[file_id], os.O_RDONLY)
        return fd, False

    def read(self, file_id: int, offset: int, length: int) -> bytes:
        fd, close = self._fd(int(file_id))
        try:
            data = os.pread(fd, int(length), int(offset))
            while len(data) < length:  # pread may return short on some filesystems
                more = os.pread(fd, int(length) - len(data), int(offset) + len(data))
                if not more:
                    raise DatasetFormatError(
                        f"{self.files[int(file_id)]}: {length} bytes at {offset} expected, file "
                        "ends first (the dataset changed after it was indexed?)")
                data += more
            return data
        finally:
            if close:
                os.close(fd)

    def __call__(self, refs: np.ndarray) -> np.ndarray:
        """``refs`` int64 ``[..., 3]`` to an object array ``[...]`` of bytes (``b""`` where the
        length is 0)."""
        refs = np.asarray(refs)
        flat = refs.reshape(-1, 3)
        out = np.empty(flat.shape[0], dtype=object)
        for i, (fid, off, n) in enumerate(flat.tolist()):
            out[i] = self.read(fid, off, n) if n > 0 else b""
        return out.reshape(refs.shape[:-1])

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds = {}

    def __getstate__(self):  # picklable (tf.data may copy functions): no descriptors
        return {"files": self.files}

    def __setstate__(self, state):
        self.__init__(state["files"])
