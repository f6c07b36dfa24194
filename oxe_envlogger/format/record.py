"""The record format, without TensorFlow: TFRecord framing and ``tf.train.Example`` encoding.

A TFRecord file is a sequence of records::

    uint64 length (little endian)
    uint32 masked crc32c of the 8 length bytes
    byte   data[length]
    uint32 masked crc32c of data

and each record here is one serialized ``tf.train.Example``::

    Example  { Features features = 1; }
    Features { map<string, Feature> feature = 1; }
    Feature  { oneof { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }

Float and int64 lists are written packed, as TensorFlow writes them. Arrays are encoded with numpy
(no per-element Python work), which is what makes logging cheap.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO, Literal

import google_crc32c
import numpy as np

from oxe_envlogger.errors import CorruptDatasetError, DamagedShardError, RecordTooLargeError

# A tf.train.Example larger than this cannot be parsed (protobuf's 2 GiB message limit).
MAX_RECORD_BYTES = (1 << 31) - 1

_MASK_DELTA = 0xA282EAD8
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_HEADER = 12
_FOOTER = 4

Kind = Literal["bytes", "float", "int64"]


def _crc32c_function() -> Callable[[Any], int]:
    """crc32c of any buffer (a memoryview of a mapped file included), releasing the GIL.

    google-crc32c (a base dependency) takes ``bytes`` only, which would mean copying every
    record into fresh memory; the ``crc32c`` package reads buffers in place where installed."""
    try:
        import crc32c as fast  # the ICRAR package: hardware crc32c over any buffer
    except ImportError:
        fast = None
    if fast is not None and hasattr(fast, "crc32c"):
        return fast.crc32c
    return lambda buf: google_crc32c.value(buf if isinstance(buf, bytes) else bytes(buf))


crc32c = _crc32c_function()


def mask(crc: int) -> int:
    """TFRecord's masking of a crc32c (rotated right by 15 bits, plus a constant)."""
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def masked_crc(data: bytes | memoryview) -> int:
    """The masked crc32c that frames a TFRecord record's length and data."""
    return mask(crc32c(data))


def frame(data: bytes) -> bytes:
    """One TFRecord record holding ``data``."""
    length = _U64.pack(len(data))
    return b"".join((length, _U32.pack(masked_crc(length)), data, _U32.pack(masked_crc(data))))


def framed_size(n: int) -> int:
    return n + _HEADER + _FOOTER


def record_length(fd: int, offset: int, size: int, path: str) -> int:
    """The data length of the record framed at ``offset`` of an open file of ``size`` bytes,
    once its header's CRC is checked and the whole record is known to fit in the file.

    Raises:
      DamagedShardError: for a truncated header or record, or a bad length CRC.
    """
    header = os.pread(fd, _HEADER, offset)
    if len(header) < _HEADER:
        raise DamagedShardError(path, offset, "truncated record header")
    (length,) = _U64.unpack_from(header)
    if _U32.unpack_from(header, 8)[0] != masked_crc(header[:8]):
        raise DamagedShardError(path, offset, "bad length CRC")
    if offset + framed_size(length) > size:
        raise DamagedShardError(path, offset, "truncated record")
    return length


def data_crc_matches(framed_tail: bytes | memoryview, data: bytes | memoryview) -> bool:
    """Whether ``data`` has the masked CRC in the 4 bytes ``framed_tail`` (a record's footer)."""
    return masked_crc(data) == _U32.unpack_from(framed_tail, 0)[0]


def iter_records(f: BinaryIO, *, verify: bool = True, path: str = "") -> Iterator[tuple[int, bytes]]:
    """Yields ``(offset, data)`` for each record of an open TFRecord file.

    Raises:
      DamagedShardError: at a truncated record or a CRC mismatch, naming the file and offset.
    """
    offset = 0
    while True:
        header = f.read(_HEADER)
        if not header:
            return
        if len(header) < _HEADER:
            raise DamagedShardError(path, offset, "truncated record header")
        (length,) = _U64.unpack_from(header)
        if verify and _U32.unpack_from(header, 8)[0] != masked_crc(header[:8]):
            raise DamagedShardError(path, offset, "bad length CRC")
        data = f.read(length)
        footer = f.read(_FOOTER)
        if len(data) < length or len(footer) < _FOOTER:
            raise DamagedShardError(path, offset, "truncated record")
        if verify and _U32.unpack(footer)[0] != masked_crc(data):
            raise DamagedShardError(path, offset, "bad data CRC")
        yield offset, data
        offset += framed_size(length)


def read_records(path: str | os.PathLike, *, verify: bool = True) -> Iterator[bytes]:
    """Yields the data of every record in a TFRecord file."""
    with open(path, "rb", buffering=1 << 20) as f:
        for _, data in iter_records(f, verify=verify, path=os.fspath(path)):
            yield data


def valid_prefix(path: str | os.PathLike) -> tuple[int, int]:
    """``(number of records, byte length)`` of the longest prefix of whole, CRC-valid records."""
    count = end = 0
    with open(path, "rb", buffering=1 << 20) as f:
        try:
            for offset, data in iter_records(f, path=os.fspath(path)):
                count += 1
                end = offset + framed_size(len(data))
        except CorruptDatasetError:
            pass
    return count, end


@dataclasses.dataclass(frozen=True)
class ShardScan:
    """What :func:`scan_records` found in one TFRecord file.

    Attributes:
      size: the file's size in bytes.
      records: ``(offset, data length)`` of every intact record (whole, both CRCs valid), in
        file order.
      damaged: ``(start, end, what)`` of each damaged byte range between intact records, e.g.
        ``(110248, 137810, "bad data CRC")``; empty for a sound file.
    """

    size: int
    records: tuple[tuple[int, int], ...]
    damaged: tuple[tuple[int, int, str], ...]

    @property
    def torn_tail(self) -> bool:
        """Whether the only damage is at the end (what a writer killed mid-record leaves)."""
        return len(self.damaged) == 1 and self.damaged[0][1] == self.size

    def describe(self) -> str:
        """The damage in words: ``"bad data CRC at byte 110248 (27562 bytes); ..."``."""
        return "; ".join(f"{what} at byte {start} ({end - start} bytes)"
                         for start, end, what in self.damaged)


# Where the framing of a damaged file is lost, the scan looks for the next record at the offsets
# that can start one: the four high bytes of the length are zero (a record holds at most 2 GiB)
# and the data's first byte is 0x0A, the tag of a tf.train.Example's ``features``. Both CRCs
# must then verify, so a false start is as unlikely as a 64-bit CRC collision.
_EXAMPLE_TAG = 0x0A
_RESYNC_CHUNK = 8 << 20


def _record_at(fd: int, offset: int, size: int) -> tuple[int | None, str | None]:
    """``(data length, None)`` when a whole, CRC-valid record starts at ``offset``; else
    ``(length or None where the header is unsound, what is wrong)``."""
    header = os.pread(fd, _HEADER, offset)
    if len(header) < _HEADER:
        return None, "truncated record header"
    (length,) = _U64.unpack_from(header)
    if _U32.unpack_from(header, 8)[0] != masked_crc(header[:8]):
        return None, "bad length CRC"
    if offset + framed_size(length) > size:
        return length, "truncated record"
    body = os.pread(fd, length + _FOOTER, offset + _HEADER)
    if len(body) < length + _FOOTER:
        return length, "truncated record"
    if _U32.unpack_from(body, length)[0] != masked_crc(body[:length]):
        return length, "bad data CRC"
    return length, None


def _next_record(fd: int, start: int, size: int) -> int:
    """The offset of the first intact record at or after ``start``; ``size`` when none is left."""
    pos = start
    while pos < size:
        chunk = np.frombuffer(os.pread(fd, _RESYNC_CHUNK + _HEADER, pos), np.uint8)
        n = len(chunk) - _HEADER  # offsets pos .. pos + n - 1 have a full header and one byte
        if n <= 0:
            break
        maybe = chunk[_HEADER:_HEADER + n] == _EXAMPLE_TAG
        for k in range(4, 8):
            maybe &= chunk[k:k + n] == 0
        for i in np.flatnonzero(maybe):
            if _record_at(fd, pos + int(i), size)[1] is None:
                return pos + int(i)
        pos += n
    return size


def scan_records(path: str | os.PathLike) -> ShardScan:
    """Finds every intact record of a TFRecord file, before and after any damage.

    A record whose header is sound but whose data fails its CRC is skipped by its length; where
    the header itself is damaged (or the file is cut short), the scan resynchronizes at the next
    offset where a whole record verifies.
    """
    records: list[tuple[int, int]] = []
    damaged: list[tuple[int, int, str]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            length, what = _record_at(fd, pos, size)
            if what is None:
                records.append((pos, length))
                pos += framed_size(length)
                continue
            resume = None
            if what == "bad data CRC":  # the length is sound: the next record should follow
                after = pos + framed_size(length)
                if after == size or _record_at(fd, after, size)[1] is None:
                    resume = after
            if resume is None:
                resume = _next_record(fd, pos + 1, size)
            damaged.append((pos, resume, what))
            pos = resume
    finally:
        os.close(fd)
    return ShardScan(size, tuple(records), tuple(damaged))


# ---------------------------------------------------------------------------------------------
# Protobuf wire format


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_SMALL_VARINTS = [_varint(i) for i in range(1 << 14)]


def varint(n: int) -> bytes:
    return _SMALL_VARINTS[n] if n < 16384 else _varint(n)


def encode_varints(values: np.ndarray) -> bytes:
    """Packed varint encoding of int64 values (negative values take 10 bytes, as in protobuf)."""
    v = np.ascontiguousarray(values, dtype=np.int64).reshape(-1).view(np.uint64)
    if v.size == 0:
        return b""
    vmax = int(v.max())
    if vmax < 0x80:
        return v.astype(np.uint8).tobytes()
    nbytes = max(1, (vmax.bit_length() + 6) // 7)
    shifts = np.arange(nbytes, dtype=np.uint64) * np.uint64(7)
    groups = ((v[:, None] >> shifts[None, :]) & np.uint64(0x7F)).astype(np.uint8)
    # Bytes needed per value: at least one, then one per remaining 7-bit group.
    lengths = np.ones(v.shape, dtype=np.int64)
    rest = v >> np.uint64(7)
    while rest.any():
        lengths += rest > 0
        rest = rest >> np.uint64(7)
    col = np.arange(nbytes)[None, :]
    groups |= np.where(col < (lengths[:, None] - 1), np.uint8(0x80), np.uint8(0))
    return groups[col < lengths[:, None]].tobytes()


def decode_varints(buf: bytes | memoryview) -> np.ndarray:
    """Inverse of :func:`encode_varints`."""
    b = np.frombuffer(buf, dtype=np.uint8)
    if b.size == 0:
        return np.zeros(0, np.int64)
    if (b < 0x80).all():
        return b.astype(np.int64)
    ends = np.flatnonzero(b < 0x80)
    starts = np.concatenate(([0], ends[:-1] + 1))
    pos = np.arange(b.size) - np.repeat(starts, ends - starts + 1)
    parts = (b & 0x7F).astype(np.uint64) << (pos.astype(np.uint64) * np.uint64(7))
    return np.add.reduceat(parts, starts).view(np.int64)


class Lazy:
    """``length`` bytes of a payload that are produced only when the record is written or
    joined, piece by piece (:func:`iter_pieces`), so that a long episode's encoding is never
    held whole in memory next to its values.

    Args:
      length: the number of bytes ``pieces()`` yields in all.
      pieces: a function returning an iterable of ``bytes``.
    """

    __slots__ = ("length", "pieces")

    def __init__(self, length: int, pieces: Callable[[], Iterable[bytes]]):
        self.length = length
        self.pieces = pieces

    def __len__(self) -> int:
        return self.length


Payload = bytes | list  # bytes, or a list of bytes and Lazy parts


def iter_pieces(parts: Iterable[bytes | Lazy]) -> Iterator[bytes]:
    """The bytes of ``parts`` in order, producing each :class:`Lazy` part's pieces."""
    for part in parts:
        if part.__class__ is not Lazy:
            yield part
            continue
        n = 0
        for piece in part.pieces():
            n += len(piece)
            yield piece
        assert n == part.length, (n, part.length)


def _join(parts: list) -> bytes:
    return b"".join(iter_pieces(parts))


def _list_feature(tag: int, data: list) -> list:
    """A Feature holding a packed float/int64 list (field ``tag``) of ``data``'s bytes."""
    n = sum(map(len, data))
    if not n:
        return [bytes((tag, 0))]
    inner = 1 + len(varint(n)) + n
    return [bytes((tag,)) + varint(inner) + b"\x0a" + varint(n), *data]


def float_list_column(chunks: Sequence[np.ndarray]) -> list:
    """A Feature holding a FloatList of every value of ``chunks`` (consecutive arrays, converted
    to float32 one chunk at a time when written)."""
    n = 4 * sum(int(np.size(c)) for c in chunks)

    def pieces() -> Iterator[bytes]:
        for c in chunks:
            yield np.ascontiguousarray(c, dtype="<f4").tobytes()

    return _list_feature(0x12, [Lazy(n, pieces)])


def int64_list_column(chunks: Sequence[np.ndarray]) -> list:
    """A Feature holding an Int64List of every value of ``chunks`` (packed varints, which are
    encoded now: their size depends on the values)."""
    return _list_feature(0x1A, [encode_varints(c) for c in chunks])


def fixed_bytes_list_column(chunks: Sequence[np.ndarray]) -> list:
    """A Feature holding a BytesList with one entry per row of ``chunks`` (each row's raw
    bytes; rows are along the first axis of each chunk)."""
    arrays = [np.asarray(c) for c in chunks]
    rows = [a.shape[0] if a.ndim else 1 for a in arrays]
    width = 0  # the bytes of one row
    if arrays:
        a = arrays[0]
        width = a.itemsize * (int(np.prod(a.shape[1:], dtype=np.int64)) if a.ndim else 1)
    head = b"\x0a" + varint(width)
    total = sum(rows) * (len(head) + width)

    def pieces() -> Iterator[bytes]:
        header = np.frombuffer(head, np.uint8)
        for a, n in zip(arrays, rows):
            table = np.empty((n, header.size + width), np.uint8)
            table[:, : header.size] = header
            table[:, header.size:] = np.ascontiguousarray(a).reshape(n, -1).view(np.uint8)
            yield table.tobytes()

    return [b"\x0a" + varint(total), Lazy(total, pieces)]


_INLINE_BYTES = 4096  # smaller values are copied into one piece with their headers


def bytes_list_column(chunks: Sequence[Sequence[bytes]]) -> list:
    """A Feature holding a BytesList of every value of ``chunks``; values of
    ``_INLINE_BYTES`` or more (encoded images) are written as they are, never copied."""
    total = 0
    for c in chunks:
        if len(c):
            lens = np.fromiter(map(len, c), np.int64, len(c))
            heads = 2 + sum((lens >= 1 << k).astype(np.int64) for k in range(7, 35, 7))
            total += int(lens.sum() + heads.sum())

    def pieces() -> Iterator[bytes]:
        for c in chunks:
            small: list[bytes] = []
            for v in c:
                small.append(b"\x0a" + varint(len(v)))
                if len(v) < _INLINE_BYTES:
                    small.append(v)
                else:
                    yield b"".join(small)
                    small = []
                    yield v
            if small:
                yield b"".join(small)

    return [b"\x0a" + varint(total), Lazy(total, pieces)]


def bytes_list_payload(values: Sequence[bytes]) -> bytes:
    """The content of a ``Feature`` holding a BytesList."""
    return _join(bytes_list_column([values]))


def fixed_bytes_list_payload(array: np.ndarray) -> bytes:
    """A BytesList with one entry per row of ``array`` (each row's raw bytes), built at once."""
    return _join(fixed_bytes_list_column([array]))


def float_list_payload(values: np.ndarray) -> bytes:
    return _join(float_list_column([values]))


def int64_list_payload(values: np.ndarray) -> bytes:
    return _join(int64_list_column([values]))


def encode_example_chunks(features: Mapping[str, Payload]) -> tuple[list, int]:
    """A serialized Example from ``{key: feature payload}`` as ``(chunks, total length)``;
    payloads are bytes (from the ``*_payload`` functions) or lists of bytes and :class:`Lazy`
    parts (from the ``*_column`` functions), and so are the chunks returned (write them with
    :meth:`RecordWriter.write_chunks`, or join them with :func:`iter_pieces`). Keys are written
    sorted: the same content gives the same bytes.

    Raises:
      RecordTooLargeError: above the 2 GiB a tf.train.Example can hold.
    """
    chunks: list = []
    body = 0
    for key in sorted(features):
        payload = features[key]
        parts = [payload] if isinstance(payload, (bytes, bytearray, memoryview)) else payload
        plen = sum(map(len, parts))
        k = key.encode("utf-8")
        head = b"\x0a" + varint(len(k)) + k + b"\x12" + varint(plen)
        entry = len(head) + plen
        outer = b"\x0a" + varint(entry)
        chunks.append(outer + head)
        chunks.extend(parts)
        body += len(outer) + entry
    top = b"\x0a" + varint(body)
    total = len(top) + body
    if total > MAX_RECORD_BYTES:
        raise RecordTooLargeError(
            f"one episode serializes to {total / 2**30:.2f} GiB; a tf.train.Example holds at "
            "most 2 GiB: log shorter episodes, or store images as JPEG")
    return [top, *chunks], total


def encode_example(features: Mapping[str, Payload]) -> bytes:
    """A serialized Example (see :func:`encode_example_chunks`)."""
    return _join(encode_example_chunks(features)[0])


# ---------------------------------------------------------------------------------------------
# Decoding


_WINDOW = 64 * 1024  # what one read of a FileWindow fetches ahead


class BufferSource:
    """An in-memory serialized message, for :func:`field_spans`."""

    def __init__(self, data: bytes | memoryview):
        self.buf = memoryview(data)

    def get(self, pos: int, n: int) -> memoryview:
        return self.buf[pos: pos + n]

    def varint(self, pos: int) -> tuple[int, int]:
        buf = self.buf
        result = shift = 0
        while True:
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result, pos
            shift += 7


class FileWindow:
    """A message inside a file, read in small pieces at any offset through one read-ahead
    buffer (for :func:`field_spans` over a record too large to read whole)."""

    def __init__(self, fd: int, end: int, *, start: int = 0, buf: bytes = b""):
        self.fd, self.end = fd, end
        self.start, self.buf = start, buf

    def get(self, pos: int, n: int) -> bytes:
        if not (self.start <= pos and pos + n <= self.start + len(self.buf)):
            self.start = pos
            self.buf = os.pread(self.fd, max(n, min(_WINDOW, self.end - pos)), pos)
        off = pos - self.start
        return self.buf[off: off + n]

    def varint(self, pos: int) -> tuple[int, int]:
        chunk = self.get(pos, min(10, self.end - pos))
        result = shift = 0
        for i, b in enumerate(chunk):
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result, pos + i + 1
            shift += 7
        raise CorruptDatasetError("bad varint")


Source = BufferSource | FileWindow


def field_spans(src: Source, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yields ``(field number, wire type, start, end)`` of each protobuf field in ``[pos, end)``
    of ``src``; for varints, ``start`` is the value and ``end`` is -1.

    The one walker of the wire format: the reader, the loader's image index, the resharder and
    the validator all read Examples through it, in memory or straight from a file.

    Raises:
      CorruptDatasetError: for a field that runs past ``end`` or an unknown wire type.
    """
    while pos < end:
        key, pos = src.varint(pos)
        field, wire = key >> 3, key & 7
        if wire == 2:
            n, pos = src.varint(pos)
            if pos + n > end:
                raise CorruptDatasetError("malformed message: a field runs past its end")
            yield field, wire, pos, pos + n
            pos += n
        elif wire == 0:
            v, pos = src.varint(pos)
            yield field, wire, v, -1
        elif wire == 5:
            yield field, wire, pos, pos + 4
            pos += 4
        elif wire == 1:
            yield field, wire, pos, pos + 8
            pos += 8
        else:
            raise CorruptDatasetError(f"unsupported protobuf wire type {wire}")
    if pos != end:
        raise CorruptDatasetError("malformed message: a field runs past its end")


def example_entries(src: Source, start: int, end: int) -> dict[str, tuple[int, int]]:
    """``{feature key: (payload start, payload end)}`` of the Example at ``[start, end)`` of
    ``src``, without reading any payload.

    Raises:
      CorruptDatasetError: for bytes that are not an Example.
      UnicodeDecodeError: for a key that is not UTF-8.
    """
    out = {}
    for field, wire, s, e in field_spans(src, start, end):
        if field != 1 or wire != 2:  # not Example.features
            continue
        for f_entry, w_entry, es, ee in field_spans(src, s, e):
            if f_entry != 1 or w_entry != 2:  # not Features.feature
                continue
            key, value = None, (ee, ee)
            for f_kv, w_kv, ks, ke in field_spans(src, es, ee):
                if w_kv != 2:
                    continue
                if f_kv == 1:
                    key = bytes(src.get(ks, ke - ks)).decode("utf-8")
                elif f_kv == 2:
                    value = (ks, ke)
            if key is not None:
                out[key] = value
    return out


def _iter_fields(buf: memoryview) -> Iterator[tuple[int, int, memoryview | int]]:
    """Yields ``(field number, wire type, payload)``; payload is an int for varints."""
    for field, wire, start, end in field_spans(BufferSource(buf), 0, len(buf)):
        yield field, wire, (start if end < 0 else buf[start:end])


def bytes_value_ranges(data: bytes | memoryview, keys: Sequence[str]
                       ) -> dict[str, list[tuple[int, int]]]:
    """``{feature key: [(start, end)]}``: where each value of the BytesList features ``keys``
    lies inside a serialized Example (to read, say, one encoded image without the others)."""
    src = BufferSource(data)
    wanted = set(keys)
    out: dict[str, list[tuple[int, int]]] = {}
    for name, (s, e) in example_entries(src, 0, len(src.buf)).items():
        if name not in wanted or s == e:
            continue
        ranges: list[tuple[int, int]] = []
        for f_kind, _, ls, le in field_spans(src, s, e):
            if f_kind != 1:
                raise CorruptDatasetError(f"{name}: expected a bytes list, found field {f_kind}")
            ranges.extend((vs, ve) for f_v, _, vs, ve in field_spans(src, ls, le) if f_v == 1)
        out[name] = ranges
    return out


def split_example(data: bytes | memoryview) -> dict[str, memoryview]:
    """``{key: raw Feature payload}`` of a serialized Example, without decoding the values.

    Used to rewrite a few features of a record and keep the others' bytes as they are."""
    src = BufferSource(data)
    return {k: src.buf[s:e] for k, (s, e) in example_entries(src, 0, len(src.buf)).items()}


def decode_feature(payload: bytes | memoryview) -> tuple[Kind, list[bytes] | np.ndarray]:
    """Decodes one Feature payload into ``("bytes", [bytes])``, ``("float", float32 array)`` or
    ``("int64", int64 array)``. Packed and unpacked lists are both read."""
    for field, _, body in _iter_fields(memoryview(payload)):
        if field == 1:
            return "bytes", [bytes(v) for f, _, v in _iter_fields(body) if f == 1]
        if field == 2:
            chunks = [bytes(v) for f, _, v in _iter_fields(body) if f == 1]
            return "float", np.frombuffer(b"".join(chunks), "<f4").astype(np.float32)
        if field == 3:
            parts = []
            for f, wire, v in _iter_fields(body):
                if f != 1:
                    continue
                parts.append(decode_varints(v) if wire == 2 else np.array([v], np.uint64).view(np.int64))
            return "int64", np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return "bytes", []  # an empty Feature: no kind set


# The first byte of a Feature payload: which of its lists it holds (the field tag).
FEATURE_TAGS: dict[int, Kind] = {0x0A: "bytes", 0x12: "float", 0x1A: "int64"}


def _list_size(tag_body: int) -> int:
    """Bytes of a Feature whose one list field holds ``tag_body`` bytes."""
    return 1 + len(varint(tag_body)) + tag_body


def float64_payload_size(*, exact: bool, rows: int, per_row: int) -> int:
    """Bytes of the Feature payload of ``rows`` float64 values of ``per_row`` elements each,
    stored exactly (:func:`fixed_bytes_list_payload`) or as a float list
    (:func:`float_list_payload`)."""
    if exact:
        row = 8 * per_row
        return _list_size(rows * (1 + len(varint(row)) + row))
    data = 4 * rows * per_row
    return _list_size(_list_size(data) if data else 0)


def encode_raw_features(features: Mapping[str, bytes | memoryview]) -> bytes:
    """Re-assembles an Example from raw payloads (as :func:`split_example` returns them)."""
    return encode_example({k: bytes(v) for k, v in features.items()})


_IOV_MAX = 1024
_WRITE_BYTES = 1 << 20  # what one write hands the kernel: bounds the pieces held at once


def _writev_all(fd: int, buffers: list) -> None:
    """Writes every buffer, in order, with as few system calls as the kernel allows."""
    i = 0
    while i < len(buffers):
        batch = buffers[i: i + _IOV_MAX]
        written = os.writev(fd, batch)
        for b in batch:
            n = len(b)
            if written >= n:
                written -= n
                i += 1
                continue
            # A short write: finish this buffer, then go on with the next batch.
            view = memoryview(b)[written:]
            while view:
                view = view[os.write(fd, view):]
            i += 1
            break


class RecordWriter:
    """Appends framed records to a file (unbuffered), tracking the bytes written so far.

    A failed write (e.g. disk full) leaves the file cut back to its last whole record."""

    def __init__(self, path: str | os.PathLike, *, append: bool = False):
        self.path = os.fspath(path)
        flags = os.O_WRONLY | os.O_CREAT | (0 if append else os.O_TRUNC)
        self._fd: int | None = os.open(self.path, flags, 0o644)
        self.bytes_written = os.lseek(self._fd, 0, os.SEEK_END)
        self.num_records = 0

    def write(self, data: bytes) -> int:
        """Writes one record; returns its framed size."""
        return self.write_chunks([data], len(data))

    def write_chunks(self, chunks: Sequence[bytes | Lazy], length: int) -> int:
        """Writes one record whose data is the concatenation of ``chunks`` (``length`` bytes in
        all; :class:`Lazy` parts are produced as they are written) with vectored writes of at
        most ``_WRITE_BYTES`` at a time, never joining the chunks in memory. Returns the
        framed size."""
        assert self._fd is not None, "write after close"
        head = _U64.pack(length)
        start = self.bytes_written
        crc = n = pending = 0
        batch = [head + _U32.pack(masked_crc(head))]
        try:
            for piece in iter_pieces(chunks):
                crc = google_crc32c.extend(crc, piece)
                n += len(piece)
                pending += len(piece)
                batch.append(piece)
                if pending >= _WRITE_BYTES or len(batch) >= _IOV_MAX:
                    _writev_all(self._fd, batch)
                    batch, pending = [], 0
            assert n == length, (n, length)
            batch.append(_U32.pack(mask(crc)))
            _writev_all(self._fd, batch)
        except BaseException:
            self.truncate(start)
            raise
        size = framed_size(length)
        self.bytes_written = start + size
        self.num_records += 1
        return size

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def truncate(self, size: int) -> None:
        """Cuts the file back to ``size`` bytes."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, size)
        os.lseek(self._fd, size, os.SEEK_SET)
        self.bytes_written = size

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
