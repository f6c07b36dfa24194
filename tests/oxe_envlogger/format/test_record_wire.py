"""The hand-written wire format against TensorFlow's own: every kind of feature our Example
encoder writes serializes to exactly the bytes protobuf's ``tf.train.Example`` does, and a
record framed by our writer is byte for byte what ``tf.io.TFRecordWriter`` writes."""

from __future__ import annotations

import os

import numpy as np
import pytest

from oxe_envlogger.errors import CorruptDatasetError
from oxe_envlogger.format import record

tf = pytest.importorskip("tensorflow")

IMAGE = bytes(range(256)) * 20  # above the size that is never copied (4 KiB)
INTS = np.array([0, 1, 127, 128, 16383, 16384, 2**31, 2**62, -1, -(2**63)], np.int64)
FLOATS = np.array([0.0, -0.0, 1.5, -2.25, 3.4e38, np.inf, -np.inf, 1e-45], np.float32)
ROWS = np.arange(24, dtype=np.float64).reshape(6, 4) / 7  # float64 stored exactly: row bytes


def _ours() -> dict[str, record.Payload]:
    return {
        "bytes": record.bytes_list_payload([b"", b"x", b"y" * 300, IMAGE]),
        "bytes/empty": record.bytes_list_payload([]),
        "bytes/column": record.bytes_list_column([[b"a", IMAGE], [], [b"b" * 200]]),
        "floats": record.float_list_payload(FLOATS),
        "floats/empty": record.float_list_payload(np.zeros(0, np.float32)),
        "floats/column": record.float_list_column([FLOATS[:3], FLOATS[3:], FLOATS[:0]]),
        "floats/from_float64": record.float_list_payload(np.array([0.1, 1 / 3], np.float64)),
        "ints": record.int64_list_payload(INTS),
        "ints/empty": record.int64_list_payload(np.zeros(0, np.int64)),
        "ints/column": record.int64_list_column([INTS[:4], INTS[4:]]),
        "ints/bool": record.int64_list_payload(np.array([True, False, True])),
        "rows": record.fixed_bytes_list_payload(ROWS),
        "rows/column": record.fixed_bytes_list_column([ROWS[:2], ROWS[2:]]),
        "steps/observation/é": record.bytes_list_payload(["unicode key, ü".encode()]),
    }


def _theirs() -> tf.train.Example:
    f = tf.train.Feature
    rows = [r.tobytes() for r in ROWS]
    features = {
        "bytes": f(bytes_list=tf.train.BytesList(value=[b"", b"x", b"y" * 300, IMAGE])),
        "bytes/empty": f(bytes_list=tf.train.BytesList(value=[])),
        "bytes/column": f(bytes_list=tf.train.BytesList(value=[b"a", IMAGE, b"b" * 200])),
        "floats": f(float_list=tf.train.FloatList(value=FLOATS.tolist())),
        "floats/empty": f(float_list=tf.train.FloatList(value=[])),
        "floats/column": f(float_list=tf.train.FloatList(value=FLOATS.tolist())),
        "floats/from_float64": f(float_list=tf.train.FloatList(value=[0.1, 1 / 3])),
        "ints": f(int64_list=tf.train.Int64List(value=INTS.tolist())),
        "ints/empty": f(int64_list=tf.train.Int64List(value=[])),
        "ints/column": f(int64_list=tf.train.Int64List(value=INTS.tolist())),
        "ints/bool": f(int64_list=tf.train.Int64List(value=[1, 0, 1])),
        "rows": f(bytes_list=tf.train.BytesList(value=rows)),
        "rows/column": f(bytes_list=tf.train.BytesList(value=rows)),
        "steps/observation/é": f(bytes_list=tf.train.BytesList(value=["unicode key, ü".encode()])),
    }
    return tf.train.Example(features=tf.train.Features(feature=features))


def test_every_feature_kind_serializes_as_protobuf_does():
    for key, payload in _ours().items():  # one feature per Example: the bytes are defined
        alone = tf.train.Example(features=tf.train.Features(
            feature={key: _theirs().features.feature[key]}))
        assert record.encode_example({key: payload}) == alone.SerializeToString(), key
    # Several: protobuf leaves the order of map entries open (upb's "deterministic" order even
    # puts "bytes/column" before "bytes"); we write keys sorted. Same entries, same bytes each.
    ours = record.encode_example(_ours())
    theirs = _theirs().SerializeToString(deterministic=True)
    assert len(ours) == len(theirs)
    assert list(record.split_example(ours)) == sorted(_ours())
    assert ({k: bytes(v) for k, v in record.split_example(ours).items()}
            == {k: bytes(v) for k, v in record.split_example(theirs).items()})


def test_protobuf_parses_what_we_write_and_we_parse_what_it_writes():
    parsed = tf.train.Example.FromString(record.encode_example(_ours()))
    assert parsed == _theirs()
    theirs = _theirs().SerializeToString()
    entries = record.split_example(theirs)
    assert sorted(entries) == sorted(_ours())
    kind, values = record.decode_feature(entries["ints"])
    assert kind == "int64" and values.tolist() == INTS.tolist()
    kind, values = record.decode_feature(entries["floats"])
    np.testing.assert_array_equal(values, FLOATS)
    assert record.decode_feature(entries["bytes/empty"]) == ("bytes", [])
    ranges = record.bytes_value_ranges(theirs, ["bytes", "bytes/empty"])
    assert [theirs[s:e] for s, e in ranges["bytes"]] == [b"", b"x", b"y" * 300, IMAGE]
    assert ranges["bytes/empty"] == []


def test_a_record_is_framed_as_tfrecordwriter_frames_it(tmp_path):
    data = record.encode_example(_ours())
    ours, theirs = tmp_path / "ours.tfrecord", tmp_path / "theirs.tfrecord"
    writer = record.RecordWriter(ours)
    writer.write(data)
    writer.write_chunks(*record.encode_example_chunks(_ours()))  # vectored, CRC extended
    writer.close()
    with tf.io.TFRecordWriter(str(theirs)) as w:
        w.write(data)
        w.write(data)
    assert ours.read_bytes() == theirs.read_bytes()
    assert record.frame(data) * 2 == theirs.read_bytes()


def test_the_walker_reads_an_example_straight_from_a_file_as_from_memory(tmp_path):
    data = record.encode_example(_ours())
    path = tmp_path / "one.tfrecord"
    path.write_bytes(record.frame(data))
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        length = record.record_length(fd, 0, size, str(path))
        window = record.FileWindow(fd, 12 + length)
        from_file = record.example_entries(window, 12, 12 + length)
    finally:
        os.close(fd)
    in_memory = record.example_entries(record.BufferSource(data), 0, len(data))
    assert {k: (s - 12, e - 12) for k, (s, e) in from_file.items()} == in_memory
    with pytest.raises(CorruptDatasetError, match="runs past its end"):
        record.example_entries(record.BufferSource(data[:-1]), 0, len(data) - 1)
