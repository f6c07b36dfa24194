"""Stage 2: one input shard -> one :class:`EpisodeRef` per record, reading only the framing and a
few small fields (through :mod:`oxe_envlogger.format.record`'s walker, straight from the file).

Part of :mod:`oxe_envlogger.datasets.reshard` (see there for the stages).
"""

from __future__ import annotations

import dataclasses
import os

from oxe_envlogger.datasets.reshard.inputs import InputShard
from oxe_envlogger.datasets.reshard.options import _MAX_LANGUAGE_PAYLOAD, _SMALL_RECORD
from oxe_envlogger.datasets.reshard.transform import Transform
from oxe_envlogger.errors import (
    CorruptDatasetError,
    DamagedShardError,
)
from oxe_envlogger.format import record


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
    float64_rows = {k: n for k, n in transform.float64_keys if transform.output_key(k) is not None}
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        offset = index = 0
        while offset < size:
            length = record.record_length(fd, offset, size, path)
            win, entries = _record_entries(fd, path, offset, length, index)
            out.append(_episode_ref(shard, index, offset, length, win, entries, transform,
                                    float64_rows))
            offset += record.framed_size(length)
            index += 1
    finally:
        os.close(fd)
    if index != shard.num_episodes:
        raise CorruptDatasetError(f"{path}: {index} records, but dataset_info.json lists "
                                  f"{shard.num_episodes}")
    return out


def _record_entries(fd: int, path: str, offset: int, length: int, index: int
                    ) -> tuple[record.FileWindow, dict[str, tuple[int, int]]]:
    """The window over the record framed at ``offset`` and ``{key: (payload offset, payload
    length)}`` of its Example; a small record is read at once, its data CRC checked."""
    start, end = offset + 12, offset + 12 + length
    win = record.FileWindow(fd, end)
    if length <= _SMALL_RECORD:  # one read; check the data CRC on the way
        data = os.pread(fd, length + 4, start)
        if not record.data_crc_matches(data[length:], data[:length]):
            raise DamagedShardError(path, offset, "bad data CRC")
        win = record.FileWindow(fd, end, start=start, buf=data[:length])
    try:
        return win, {k: (s, e - s)
                     for k, (s, e) in record.example_entries(win, start, end).items()}
    except (CorruptDatasetError, IndexError, UnicodeDecodeError) as e:
        raise CorruptDatasetError(f"{path}: record {index} (byte {offset}) is not a "
                                  f"tf.train.Example: {e}") from e


def _episode_ref(shard: InputShard, index: int, offset: int, length: int,
                 win: record.FileWindow, entries: dict[str, tuple[int, int]],
                 transform: Transform, float64_rows: dict[str, int]) -> EpisodeRef:
    """What the plan needs of one record: its id, flags, step count, language payload and the
    sizes of the entries a transformation keeps, changes or converts."""
    path = shard.path

    def value(key: str, limit: int = _MAX_LANGUAGE_PAYLOAD) -> bytes | None:
        if key not in entries or entries[key][1] > limit:
            return None
        pos, n = entries[key]
        return win.get(pos, n)

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
    if transform.language_key is not None:
        src = [k for k in entries if transform.output_key(k) == transform.language_key]
        language = value(src[0]) if src else b""
    return EpisodeRef(
        source=shard.source, split=shard.split, shard=shard.shard, path=path, index=index,
        offset=offset, length=length, episode_id=ep_id,
        invalid=bool(_int_value(invalid)) if invalid is not None else False,
        num_steps=len(flags), base_size=base, touched=tuple(touched), language=language,
        float64=tuple(converted))


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


