"""Quantiles of statistics.json: a mergeable sketch, exact for small datasets, within its stored
rank-error bound above, merged across writers, appends and the resharder, and files of an older
logger (quantiles from a sample of at most 512 rows) still read."""

from __future__ import annotations

import base64
import itertools
import json

import gymnasium as gym
import numpy as np
import pytest

from oxe_envlogger import AutoOXEEnvLogger, read_episodes
from oxe_envlogger.datasets import recovery
from oxe_envlogger.datasets.validate import validate
from oxe_envlogger.envs import run_episodes
from oxe_envlogger.format import layout, stats
from tests.helpers import (
    as_older_logger_wrote_statistics,
    check_quantiles,
    within_rank_bound,
)


def _columns(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    nonfinite = rng.normal(size=n)
    nonfinite[rng.random(n) < 0.05] = np.nan
    nonfinite[rng.random(n) < 0.01] = np.inf
    return np.stack([
        rng.normal(size=n),                        # normal
        rng.uniform(-1, 1, n),                     # uniform
        rng.lognormal(0, 2, n),                    # heavy tail
        np.sort(rng.normal(size=n)),               # arriving in order (worst for sampling)
        -np.sort(rng.normal(size=n)),              # and in reverse
        rng.integers(0, 5, n).astype(np.float64),  # ties
        np.where(rng.random(n) < 0.3, rng.normal(-5, 0.1, n), rng.normal(5, 1, n)),  # bimodal
        nonfinite,                                 # NaN and inf left out
    ], axis=1)


def _episodes(n: int, seed: int = 0) -> list[int]:
    """Episode lengths summing to n: short and long ones, some longer than a sketch level."""
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < n:
        lengths.append(int(rng.choice([1, 7, 200, 1001, 2500])))
    lengths[-1] -= sum(lengths) - n
    return [x for x in lengths if x]


def test_quantiles_within_the_stored_bound_on_200k_rows():
    data = _columns(200_000)
    st = stats.RunningStats((data.shape[1],))
    start = 0
    for length in _episodes(len(data)):
        st.update(data[start:start + length])
        start += length
    summary = st.summary()
    worst = check_quantiles(data, summary)
    assert 0 < worst < 0.01
    # The typical error is far below the bound: the medians are within 0.1% of the ranks.
    for j in (0, 1, 2):
        assert within_rank_bound(data[:, j], summary["q50"][j], 0.5, 0.001 * len(data))


def test_merged_parts_within_the_bound_and_deterministic():
    """Parts written separately (writers, shards, appends; different seeds) and merged through
    their JSON, as statistics.json merges them, stay within the bound; the same parts merged in
    the same order give the same bytes."""
    data = _columns(150_000, seed=1)
    cuts = [0, 900, 40_000, 41_000, 100_000, 150_000]

    def merged():
        total = None
        for i, (a, b) in enumerate(itertools.pairwise(cuts)):
            part = stats.RunningStats((data.shape[1],), seed=i)
            start = a
            for length in _episodes(b - a, seed=i):
                part.update(data[start:start + length])
                start += length
            part = stats.RunningStats.from_json(json.loads(json.dumps(part.to_json())))
            if total is None:
                total = part
            else:
                total.merge(part)
        return total

    one, two = merged(), merged()
    assert json.dumps(one.to_json()) == json.dumps(two.to_json())
    assert one.summary() == two.summary()
    check_quantiles(data, one.summary())


def test_exact_up_to_the_capacity_even_across_merges():
    rng = np.random.default_rng(2)
    data = rng.normal(size=(stats.SKETCH_ROWS, 3))
    data[5, 1] = np.nan
    parts = [stats.RunningStats((3,), seed=i) for i in range(3)]
    for part, chunk in zip(parts, np.array_split(data, 3)):
        part.update(chunk)
    for part in parts[1:]:
        parts[0].merge(stats.RunningStats.from_json(part.to_json()))
    summary = parts[0].summary()
    assert summary["rank_error"] == [0.0, 0.0, 0.0]
    for p in stats.QUANTILES:
        assert summary[f"q{round(p * 100):02d}"] == np.nanquantile(data, p, axis=0).tolist()
    parts[0].update(rng.normal(size=(1, 3)))  # one row more than a level holds
    assert parts[0].summary()["rank_error"][0] > 0


def test_halfcheetah_5000_random_actions_median_issue_11(tmp_path):
    """The issue's example: the stored median of 5,000 uniform random HalfCheetah actions was
    -0.166 where the exact one is -0.006 (a 512-row sample)."""
    directory = str(tmp_path / "cheetah")
    env = AutoOXEEnvLogger(gym.make("HalfCheetah-v5", max_episode_steps=1000), "half_cheetah",
                           directory)
    with env:
        run_episodes(env, 5, seed=0)
    actions = np.concatenate([np.asarray(ep["steps"]["action"], np.float64)[:-1]
                              for ep in read_episodes(directory, keys={"action"})])
    assert actions.shape == (5000, 6)
    summary = stats.load_split(directory, "train", current=True).keys["action"].summary()
    exact = np.median(actions, axis=0)
    # Within 0.5% of the ranks, about 0.01 in value for uniform actions in [-1, 1]: 0.07 before.
    np.testing.assert_allclose(summary["q50"], exact, atol=0.01)
    assert max(summary["rank_error"]) <= 0.005
    check_quantiles(actions, summary)


def test_keys_too_wide_for_a_sketch_keep_moments_only():
    st = stats.RunningStats((64, 64))
    assert st.sketch is None
    st.update(np.random.default_rng(0).normal(size=(10, 64, 64)))
    summary = st.summary()
    assert "q50" not in summary and "rank_error" not in summary
    assert np.asarray(summary["count"]).shape == (64, 64)
    assert stats.StatsSet({"depth": (64, 64)}).legacy_keys() == []  # not an old file's


# ---------------------------------------------------------------------------------------------
# Older files and older readers


def _log_cheetah(directory: str, episodes: int, seed: int = 0) -> None:
    env = AutoOXEEnvLogger(gym.make("HalfCheetah-v5", max_episode_steps=400), "half_cheetah",
                           directory)
    with env:
        run_episodes(env, episodes, seed=seed)


def _data(directory: str, key: str) -> np.ndarray:
    return np.concatenate([np.asarray(ep["steps"][key], np.float64)[:-1]
                           for ep in read_episodes(directory, keys={key})])


def test_an_older_loggers_file_is_read_its_quantiles_not_used_and_recover_rebuilds_them(
        tmp_path):
    directory = str(tmp_path / "old")
    _log_cheetah(directory, 2)
    as_older_logger_wrote_statistics(directory)
    loaded, _ = stats.load(directory)
    assert sorted(loaded.legacy_keys()) == ["action", "observation"]
    summary = loaded.keys["action"].summary()
    assert "q50" not in summary  # a 512-row sample's quantiles are not passed on
    np.testing.assert_allclose(summary["mean"], _data(directory, "action").mean(0), rtol=1e-9)
    report = validate(directory)
    assert any(i.check == "statistics" and "512" in i.message for i in report.warnings)
    # A newer logger appends: the moments merge, the quantiles stay unknown.
    _log_cheetah(directory, 1, seed=5)
    assert stats.is_current(directory)
    loaded, _ = stats.load(directory)
    assert sorted(loaded.legacy_keys()) == ["action", "observation"]
    actions = _data(directory, "action")
    np.testing.assert_allclose(loaded.keys["action"].summary()["mean"], actions.mean(0),
                               rtol=1e-9)
    # recover rebuilds the file with sketches.
    report = recovery.recover(directory)
    assert layout.STATISTICS in report["updated"]
    loaded, _ = stats.load(directory)
    assert loaded.legacy_keys() == [] and stats.is_current(directory)
    check_quantiles(actions, loaded.keys["action"].summary())
    check_quantiles(_data(directory, "observation"), loaded.keys["observation"].summary())


def test_older_readers_take_quantiles_from_the_sample_of_a_new_file():
    """A reader that predates the sketch reads each key's state as it did (fields shape, rows,
    k, count, mean, m2, min, max, sample_keys, sample; quantiles by numpy over the sample):
    a new file gives it quantiles within the sketch's bound plus the sample's spacing."""
    data = _columns(60_000, seed=3)[:, :4]
    st = stats.RunningStats((4,))
    for chunk in np.array_split(data, 60):
        st.update(chunk)
    state = json.loads(json.dumps(st.to_json()))
    w = 4

    def unb64(s, dtype, shape):
        return np.frombuffer(base64.b64decode(s), dtype=dtype).reshape(shape)

    assert int(state["k"]) >= 1 and int(state["rows"]) == len(data)
    keys = unb64(state["sample_keys"], np.float64, (-1,))
    sample = unb64(state["sample"], np.float64, (-1, w))
    assert len(keys) == len(sample) == 512
    mean = unb64(state["mean"], np.float64, (w,))
    np.testing.assert_allclose(mean, data.mean(0), rtol=1e-9)
    error = np.asarray(st.summary()["rank_error"]) * len(data)
    spacing = len(data) / (len(sample) - 1)
    for p in stats.QUANTILES:
        q = np.nanquantile(sample, p, axis=0)
        for j in range(w):
            assert within_rank_bound(data[:, j], q[j], p, error[j] + spacing)
    # Small data: the rows themselves, so the old reader is exact too.
    small = stats.RunningStats((4,))
    small.update(data[:100])
    sample = unb64(small.to_json()["sample"], np.float64, (-1, w))
    np.testing.assert_array_equal(np.nanquantile(sample, 0.25, axis=0),
                                  np.nanquantile(data[:100], 0.25, axis=0))


@pytest.mark.parametrize("capacity", [64, 300])
def test_bound_holds_for_small_capacities(capacity):
    """Many compactions per level (capacity far below the episode length) stress the bound."""
    data = _columns(100_000, seed=4)
    st = stats.RunningStats((data.shape[1],), sketch_rows=capacity)
    assert st.sketch.capacity == capacity
    for chunk in np.array_split(data, 37):
        st.update(chunk)
    check_quantiles(data, st.summary(), capacity)
