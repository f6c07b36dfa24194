"""compute_dataset_statistics: the logger's statistics when current, else one pass, cached beside
the data under a key that changes with the data."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from openx_train.data import ConfigError, MissingKeyError, compute_dataset_statistics
from openx_train.data import cache as cache_mod
from oxe_envlogger import read_episodes
from oxe_envlogger.datasets import recovery
from tests.helpers import as_older_logger_wrote_statistics
from tests.openx_train.conftest import log_camera, log_cheetah


def _numpy_stats(directory: str, key: str) -> dict:
    rows = np.concatenate([np.asarray(ep["steps"][key], np.float64)[:-1]
                           for ep in read_episodes(directory, keys={key})])
    return {"mean": rows.mean(0), "std": rows.std(0), "min": rows.min(0), "max": rows.max(0),
            "n": len(rows)}


def _cache_files(directory: str) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f.startswith("dataset_statistics_"))


def test_the_loggers_statistics_are_used_when_current(cheetah_dir):
    stats = compute_dataset_statistics(cheetah_dir)
    assert stats.source == "stored"
    want = _numpy_stats(cheetah_dir, "action")
    np.testing.assert_allclose(stats["action"].mean, want["mean"], rtol=1e-9)
    np.testing.assert_allclose(stats["action"].std, want["std"], rtol=1e-9)
    np.testing.assert_array_equal(stats["action"].min, want["min"])
    np.testing.assert_array_equal(stats["action"].count, np.full(6, want["n"]))
    assert set(stats.keys) == {"action", "observation"}


def test_computed_once_then_read_from_the_cache(tmp_path):
    directory = log_cheetah(str(tmp_path / "d"), episodes=2)
    first = compute_dataset_statistics(directory, use_stored=False)
    assert first.source == "computed"
    for key in ("action", "observation"):
        want = _numpy_stats(directory, key)
        np.testing.assert_allclose(first[key].mean, want["mean"], rtol=1e-9)
        np.testing.assert_allclose(first[key].std, want["std"], rtol=1e-9)
        np.testing.assert_array_equal(first[key].max, want["max"])
        q = first[key].quantile("q50")
        assert (q >= want["min"]).all() and (q <= want["max"]).all()
    (cached,) = _cache_files(directory)
    assert first.fingerprint in cached
    again = compute_dataset_statistics(directory, use_stored=False)
    assert again.source == "cache"
    np.testing.assert_array_equal(again["observation"].std, first["observation"].std)
    only_action = compute_dataset_statistics(directory, use_stored=False, keys=["action"])
    assert only_action.source == "computed" and set(only_action.keys) == {"action"}
    assert len(_cache_files(directory)) == 2  # keyed by the selected keys too


def test_the_cache_is_invalidated_when_the_data_changes(tmp_path):
    directory = log_cheetah(str(tmp_path / "d"), episodes=2, seed=0)
    before = compute_dataset_statistics(directory, use_stored=False)
    log_cheetah(directory, episodes=2, seed=10)  # appends two episodes
    after = compute_dataset_statistics(directory, use_stored=False)
    assert after.source == "computed" and after.fingerprint != before.fingerprint
    assert after.num_episodes == 4
    np.testing.assert_allclose(after["action"].mean, _numpy_stats(directory, "action")["mean"],
                               rtol=1e-9)
    assert not np.allclose(after["action"].mean, before["action"].mean)
    stored = compute_dataset_statistics(directory)  # the logger merged the new episodes
    assert stored.source == "stored" and stored.num_episodes == 4
    # Written anew in the same place, same episode count: still a different key.
    shutil.rmtree(directory)
    log_cheetah(directory, episodes=4, seed=20)
    fresh = compute_dataset_statistics(directory, use_stored=False)
    assert fresh.source == "computed" and fresh.fingerprint != after.fingerprint


def test_stale_or_foreign_stored_statistics_are_not_used(tmp_path):
    directory = log_cheetah(str(tmp_path / "d"), episodes=2)
    path = os.path.join(directory, "statistics.json")
    with open(path) as f:
        data = json.load(f)
    assert "splits" not in data  # one split: its statistics are the totals, written once
    own = {"train": {k: data[k] for k in ("num_episodes", "num_steps", "keys")}}
    data["covers"]["validation"] = {"x-validation.tfrecord-00000": 1}
    with open(path, "w") as f:
        json.dump(data, f)
    # Totals over two splits, without each split's own: not the train split's statistics.
    assert compute_dataset_statistics(directory).source == "computed"
    data["splits"] = own
    with open(path, "w") as f:
        json.dump(data, f)
    assert compute_dataset_statistics(directory).source == "stored"  # the train split's own
    data["covers"].pop("validation")
    data["covers"]["train"] = {}
    with open(path, "w") as f:
        json.dump(data, f)
    assert compute_dataset_statistics(directory).source == "cache"  # stale: not current


def test_an_older_loggers_sampled_quantiles_are_computed_anew(tmp_path):
    """statistics.json of a logger before the sketch (quantiles from at most 512 sampled rows):
    its keys are computed in one pass (exact here), until recover rebuilds the file."""
    directory = log_cheetah(str(tmp_path / "d"), episodes=2)
    as_older_logger_wrote_statistics(directory)
    stats = compute_dataset_statistics(directory)
    assert stats.source == "computed"
    rows = np.concatenate([np.asarray(ep["steps"]["action"], np.float64)[:-1]
                           for ep in read_episodes(directory, keys={"action"})])
    for name in ("q01", "q50", "q99"):
        np.testing.assert_array_equal(stats["action"].quantile(name),
                                      np.quantile(rows, int(name[1:]) / 100, axis=0))
    np.testing.assert_array_equal(stats["action"].rank_error, np.zeros(6))
    recovery.recover(directory)
    stored = compute_dataset_statistics(directory)
    assert stored.source == "stored"
    np.testing.assert_array_equal(stored["action"].quantile("q50"), stats["action"].quantile("q50"))
    np.testing.assert_array_equal(stored["action"].rank_error, np.zeros(6))


def test_the_train_splits_own_statistics_are_used_in_a_multi_split_dataset(tmp_path):
    from oxe_envlogger.datasets import reshard
    from oxe_envlogger.datasets.reshard import ReshardOptions

    source = log_cheetah(str(tmp_path / "d"), episodes=6)
    out = str(tmp_path / "split")
    reshard.reshard([source], out, ReshardOptions(validation_fraction=0.34))
    stats = compute_dataset_statistics(out)
    assert stats.source == "stored" and stats.num_episodes == 4
    want = _numpy_stats_split(out, "action", "train")
    np.testing.assert_allclose(stats["action"].mean, want["mean"], rtol=1e-9)
    np.testing.assert_allclose(stats["action"].std, want["std"], rtol=1e-9)
    computed = compute_dataset_statistics(out, use_stored=False)
    np.testing.assert_allclose(computed["action"].mean, stats["action"].mean, rtol=1e-9)


def _numpy_stats_split(directory: str, key: str, split: str) -> dict:
    rows = np.concatenate([np.asarray(ep["steps"][key], np.float64)[:-1]
                           for ep in read_episodes(directory, split=split, keys={key})])
    return {"mean": rows.mean(0), "std": rows.std(0)}


def test_a_read_only_dataset_caches_in_the_user_cache_dir(tmp_path, monkeypatch):
    directory = log_camera(str(tmp_path / "ro"), episodes=2)
    monkeypatch.setenv("OPENX_TRAIN_CACHE_DIR", str(tmp_path / "cache"))
    real_access = os.access
    monkeypatch.setattr(cache_mod.os, "access",
                        lambda p, mode: False if os.path.abspath(p) == os.path.abspath(directory)
                        else real_access(p, mode))
    first = compute_dataset_statistics(directory, use_stored=False, keys=["observation/state"])
    assert first.source == "computed" and not _cache_files(directory)
    user_dir = cache_mod.user_cache_dir(directory)
    assert _cache_files(user_dir)
    second = compute_dataset_statistics(directory, use_stored=False, keys=["observation/state"])
    assert second.source == "cache"


def test_keys_are_checked(camera_dir):
    with pytest.raises(MissingKeyError, match="observation/joints"):
        compute_dataset_statistics(camera_dir, keys=["observation/joints"])
    with pytest.raises(ConfigError, match="expected a numeric tensor"):
        compute_dataset_statistics(camera_dir, keys=["observation/image"])
    stats = compute_dataset_statistics(camera_dir, keys=["observation/state", "action"])
    assert set(stats.keys) == {"observation/state", "action"}
    with pytest.raises(ConfigError, match="no key"):
        stats["reward"]
    assert stats.to_json()["keys"]["action"]["mean"] == stats["action"].mean.tolist()
