"""The golden dataset (``tests/data/golden``, written once by ``tests/data/make_golden.py`` and
committed): the reader, tfds, the validator, statistics and the resharder must keep reading it
exactly, so that a change of the format on disk shows up here."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from oxe_envlogger.datasets import reshard
from oxe_envlogger.datasets.validate import validate
from oxe_envlogger.format import layout, reader, record, stats
from tests.data import make_golden
from tests.helpers import read_tfds

GOLDEN = make_golden.GOLDEN


@pytest.fixture
def golden(tmp_path) -> str:
    """A copy (the checks below may take the dataset lock, which creates ``.oxe/``)."""
    return shutil.copytree(GOLDEN, str(tmp_path / "golden"))


def _assert_is_golden(episodes) -> None:
    want = make_golden.episodes()
    assert len(episodes) == len(want)
    for got, w in zip(episodes, want):
        n = len(w["action"])
        steps = got["steps"]
        assert _text(got["operator"]) == w["operator"]
        assert steps["is_first"].tolist() == [True] + [False] * n
        assert steps["is_last"].tolist() == [False] * n + [True]
        assert steps["is_terminal"].tolist() == [False] * n + [w["terminated"]]
        np.testing.assert_array_equal(steps["observation"]["state"],
                                      np.stack([o["state"] for o in w["observation"]]))
        np.testing.assert_array_equal(steps["observation"]["cam"],
                                      np.stack([o["cam"] for o in w["observation"]]))
        np.testing.assert_array_equal(
            steps["action"]["move"],
            np.stack([a["move"] for a in w["action"]] + [np.zeros(2, np.float32)]))
        assert steps["action"]["grip"].tolist() == [a["grip"] for a in w["action"]] + [0]
        assert steps["reward"].tolist() == w["reward"] + [0.0]
        np.testing.assert_array_equal(steps["speed"], np.array(w["speed"], np.float32))
        assert [_text(s) for s in steps["language_instruction"]] == [
            w["language_instruction"]] * (n + 1)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def test_the_golden_dataset_is_small_and_complete():
    files = sorted(os.listdir(GOLDEN))
    assert files == ["dataset_info.json", "features.json", "golden-train.tfrecord-00000",
                     "oxe_envlogger.json", "statistics.json"]
    assert sum(os.path.getsize(os.path.join(GOLDEN, f)) for f in files) < 32 * 1024


def test_our_reader_reads_it(golden):
    _assert_is_golden(list(reader.read_episodes(golden)))
    assert layout.verify_records(golden) == {"train": 2}
    assert stats.is_current(golden)


def test_tfds_reads_it(golden):
    _assert_is_golden(read_tfds(golden))


def test_the_validator_finds_nothing_wrong(golden):
    report = validate(golden, decode_images=True)
    assert report.ok and not report.warnings, report.issues


def test_the_resharder_copies_it_byte_for_byte(golden, tmp_path):
    out = str(tmp_path / "resharded")
    reshard.reshard([golden], out)
    _assert_is_golden(list(reader.read_episodes(out)))
    assert validate(out).ok
    src = list(record.read_records(os.path.join(golden, "golden-train.tfrecord-00000")))
    [shard] = [f for f in os.listdir(out) if ".tfrecord-" in f]
    assert list(record.read_records(os.path.join(out, shard))) == src


def test_logging_the_same_episodes_again_writes_the_same_records(tmp_path):
    """What the writer produces has not drifted: the same metadata files, and the same bytes in
    every feature of every record but the episode id (its writer id is random) and the PNG
    bytes (an encoder may compress differently; the pixels are compared above)."""
    again = str(tmp_path / "again")
    make_golden.write(again)
    for name in (layout.FEATURES, layout.DATASET_INFO):
        assert layout.read_json(os.path.join(again, name)) == layout.read_json(
            os.path.join(GOLDEN, name)), name
    shard = "golden-train.tfrecord-00000"
    old = list(record.read_records(os.path.join(GOLDEN, shard)))
    new = list(record.read_records(os.path.join(again, shard)))
    assert len(new) == len(old)
    for a, b in zip(old, new):
        ea, eb = record.split_example(a), record.split_example(b)
        assert sorted(ea) == sorted(eb)
        for key in ea:
            if key not in ("episode_id", "steps/observation/cam"):
                assert bytes(ea[key]) == bytes(eb[key]), key
    new_stats, old_stats = (layout.read_json(os.path.join(d, layout.STATISTICS))
                            for d in (again, GOLDEN))
    assert sorted(new_stats["keys"]) == sorted(old_stats["keys"])
    for key, entry in old_stats["keys"].items():  # (a sketch's state holds random draws)
        assert new_stats["keys"][key]["summary"] == entry["summary"], key
