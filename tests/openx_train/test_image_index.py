"""Byte ranges of encoded images inside the shards, and reading them back."""

from __future__ import annotations

import os

import numpy as np
import pytest

from openx_train.data import DatasetFormatError
from openx_train.data import image_index as image_index_mod
from openx_train.data.image_index import RangeReader, build_image_index
from oxe_envlogger import read_episodes
from oxe_envlogger.format import record
from oxe_envlogger.format.record import bytes_value_ranges
from tests.openx_train.conftest import log_camera

KEYS = ["observation/image", "observation/wrist_image"]


def test_value_ranges_in_a_serialized_example():
    values = [b"", b"abc", bytes(range(256)) * 3]
    data = record.encode_example({
        "steps/x": record.bytes_list_payload(values),
        "steps/y": record.float_list_payload(np.arange(3, dtype=np.float32)),
        "z": record.bytes_list_payload([b"zz"])})
    ranges = bytes_value_ranges(data, ["steps/x", "z", "missing"])
    assert [data[s:e] for s, e in ranges["steps/x"]] == values
    assert [data[s:e] for s, e in ranges["z"]] == [b"zz"]
    assert "missing" not in ranges


def test_references_read_back_the_encoded_images(tmp_path):
    directory = log_camera(str(tmp_path / "d"), episodes=3, max_episodes_per_file=2)
    index = build_image_index(directory, "train", KEYS)
    reader = RangeReader(index.files)
    episodes = list(read_episodes(directory, decode_images=False, keys=set(KEYS)))
    assert len(index.files) == 2 and list(index.episode_length) == [11, 11, 11]
    for e, ep in enumerate(episodes):
        for key in KEYS:
            want = list(ep["steps"]["observation"][key.split("/")[1]])
            assert list(reader(index.refs(key, e))) == want
    assert any(f.startswith("image_index_") for f in os.listdir(directory))


def test_the_index_is_cached_and_keyed_by_the_data(tmp_path, monkeypatch):
    directory = log_camera(str(tmp_path / "d"), episodes=2)
    first = build_image_index(directory, "train", KEYS)

    def no_scan(*args):
        raise AssertionError("scanned again")

    monkeypatch.setattr(image_index_mod, "_scan", no_scan)
    again = build_image_index(directory, "train", KEYS)
    np.testing.assert_array_equal(again.offset, first.offset)
    monkeypatch.undo()
    log_camera(directory, episodes=1, seed=9)  # appended: the old index must not be used
    grown = build_image_index(directory, "train", KEYS)
    assert len(grown.episode_length) == 3


def test_a_short_file_is_an_error(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    reader = RangeReader([str(path)])
    assert list(reader(np.array([[0, 2, 3], [0, 0, 0]]))) == [b"234", b""]
    with pytest.raises(DatasetFormatError, match="file ends first"):
        reader(np.array([[0, 8, 5]]))
