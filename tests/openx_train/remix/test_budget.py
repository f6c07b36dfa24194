"""Data budgets: water-filling on small examples, whole episodes chosen by seed, the kept list,
and a loader restricted to it on a logged dataset."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from openx_train.data import (
    ConfigError,
    DatasetConfig,
    EpisodeRecord,
    LoaderConfig,
    make_dataloader,
    save_mixture_weights,
)
from openx_train.remix import (
    load_kept_episodes,
    restrict_datasets,
    save_kept_episodes,
    select_episodes,
    water_fill,
)
from tests.openx_train.test_loader_domains import STATE, STEPS, log_reacher


@pytest.mark.parametrize("weights, capacities, total, expected", [
    ([0.5, 0.3, 0.2], [100, 100, 100], 100, [50, 30, 20]),
    # A domain smaller than its share gives all it has; the rest goes 0.3 : 0.2.
    ([0.5, 0.3, 0.2], [10, 100, 100], 100, [10, 54, 36]),
    # Two capped in the first round.
    ([0.6, 0.3, 0.1], [10, 20, 1000], 200, [10, 20, 170]),
    # A cascade: capping the first makes the second's share exceed it.
    ([0.5, 0.25, 0.25], [10, 45, 1000], 120, [10, 45, 65]),
    # Zero weight gets nothing, even when the others cannot take the whole total.
    ([1.0, 0.0], [10, 10], 15, [10, 0]),
    # Everything fits exactly.
    ([0.2, 0.8], [20, 80], 100, [20, 80]),
    ([0.2, 0.8], [20, 80], 0, [0, 0]),
])
def test_water_filling(weights, capacities, total, expected):
    out = water_fill(weights, capacities, total)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-9)
    assert np.all(out <= np.asarray(capacities) + 1e-9)


def test_water_filling_refuses_bad_input():
    with pytest.raises(ConfigError, match="one length"):
        water_fill([1, 2], [1], 1)
    with pytest.raises(ConfigError, match="finite non-negative"):
        water_fill([1, -1], [1, 1], 1)


def _episodes(rng, sizes):
    """Episodes of random lengths per domain (two datasets)."""
    out = []
    for domain, n in sizes.items():
        for i in range(n):
            out.append(EpisodeRecord(f"ds{i % 2}", f"{domain}-{i:04d}", domain,
                                     int(rng.integers(20, 120))))
    return out


def _check_selection(selection, episodes, weights):
    """The targets are a water-filling of the budget (one level for the uncapped domains,
    capped ones at or below it); each domain keeps whole episodes within half of its largest
    episode of its target, at least one for a positive target, all of it when capped."""
    kept = set(selection.episodes)
    w = np.array([weights[d] for d in selection.domains]) / sum(weights.values())
    caps = np.array(selection.domain_frames, float)
    targets = np.array(selection.targets)
    capped = np.isclose(targets, caps)
    levels = targets[~capped] / w[~capped]
    if len(levels):
        np.testing.assert_allclose(levels, levels[0], rtol=1e-9)
        assert np.all(caps[capped] <= levels[0] * w[capped] + 1e-6)
    for k, domain in enumerate(selection.domains):
        mine = [r for r in episodes if r.domain == domain]
        n_kept = sum(r in kept for r in mine)
        frames = selection.kept_frames[k]
        assert frames == sum(r.frames for r in mine if r in kept)
        if capped[k]:
            assert n_kept == len(mine)
        elif targets[k] > 0:
            assert n_kept >= 1
            biggest = max(r.frames for r in mine)
            assert abs(frames - targets[k]) <= biggest / 2 or (n_kept == 1 and
                                                                frames > targets[k])


def test_selection_reaches_the_targets_in_whole_episodes():
    rng = np.random.default_rng(0)
    episodes = _episodes(rng, {"better": 20, "okay": 30, "worse": 40, "noise": 5})
    weights = {"better": 0.5, "okay": 0.2, "worse": 0.1, "noise": 0.2}
    capped_at = {}
    for budget in (0.01, 0.05, 0.25, 0.5, 0.9, 1.0):
        sel = select_episodes(episodes, weights, data_budget=budget, seed=3)
        total = sum(r.frames for r in episodes)
        assert sel.total_frames == total
        np.testing.assert_allclose(sum(sel.targets), budget * total, rtol=1e-9)
        _check_selection(sel, episodes, weights)
        assert sel.kept_total == sum(r.frames for r in sel.episodes)
        assert list(sel.episodes) == [r for r in episodes if r in set(sel.episodes)]  # in order
        capped_at[budget] = [d for d, t, f in zip(sel.domains, sel.targets, sel.domain_frames)
                             if t == f]
    assert capped_at[0.05] == [] and capped_at[0.5] == ["better", "noise"]
    assert capped_at[1.0] == ["better", "okay", "worse", "noise"]


def test_rounding_ties_to_fewer_episodes_and_keeps_one_for_a_small_target():
    episodes = [EpisodeRecord("d", f"e{i}", "a", 10) for i in range(4)] + [
        EpisodeRecord("d", f"f{i}", "b", 100) for i in range(4)]
    # Domain a's target: 15 frames, between 1 episode (10) and 2 (20): the shorter prefix.
    sel = select_episodes(episodes, {"a": 15, "b": 205}, data_budget=220 / 440, seed=0)
    np.testing.assert_allclose(sel.targets, [15, 205])
    assert sel.kept_frames == (10, 200)
    # A target of 2 frames (under half an episode) still keeps one episode.
    sel = select_episodes(episodes, {"a": 2, "b": 98}, data_budget=100 / 440, seed=0)
    assert sel.kept_frames == (10, 100)


def test_selection_is_deterministic_nested_and_seeded():
    rng = np.random.default_rng(1)
    episodes = _episodes(rng, {"a": 30, "b": 30})
    small = select_episodes(episodes, "size", data_budget=0.2, seed=5)
    again = select_episodes(list(reversed(episodes)), "size", data_budget=0.2, seed=5,
                            domains=["a", "b"])
    assert set(small.episodes) == set(again.episodes)  # the order given does not matter
    large = select_episodes(episodes, "size", data_budget=0.6, seed=5)
    assert set(small.episodes) < set(large.episodes)  # a smaller budget keeps a subset
    other = select_episodes(episodes, "size", data_budget=0.2, seed=6)
    assert set(other.episodes) != set(small.episodes)
    # By size, each domain keeps about the same fraction.
    for k in range(2):
        assert small.kept_frames[k] / small.domain_frames[k] == pytest.approx(0.2, abs=0.05)


def test_selection_refusals():
    episodes = [EpisodeRecord("d", "e0", "a", 10)]
    with pytest.raises(ConfigError, match=r"data_budget: expected a fraction in \(0, 1\]"):
        select_episodes(episodes, data_budget=0)
    with pytest.raises(ConfigError, match=r"data_budget: expected a fraction in \(0, 1\]"):
        select_episodes(episodes, data_budget=1.5)
    with pytest.raises(ConfigError, match=r"episodes of domains \['a'\] not among"):
        select_episodes(episodes, data_budget=0.5, domains=["b"])
    with pytest.raises(ConfigError, match=r"no weight for domains \['a'\]"):
        select_episodes(episodes, {"b": 1.0}, data_budget=0.5)


def test_budget_restricts_a_loader_on_a_logged_dataset(tmp_path):
    """Operators logged with metadata; a 40% budget by Re-Mix-style weights; the restricted
    loader reads exactly the kept episodes and frames, per domain."""
    operators = ["better"] * 4 + ["okay"] * 6 + ["worse"] * 10
    path = log_reacher(str(tmp_path / "ops"), [{"operator": op} for op in operators])
    config = LoaderConfig(batch_size=16, domain_key="episode_metadata/operator", weights="size")
    full = make_dataloader(DatasetConfig(path, STATE), config)
    assert full.domain_frames == (4 * STEPS, 6 * STEPS, 10 * STEPS)
    weights_file = tmp_path / "mixture_weights.json"
    save_mixture_weights(weights_file, {"better": 0.6, "okay": 0.3, "worse": 0.1})
    sel = select_episodes(full.episodes, str(weights_file), data_budget=0.4, seed=0,
                          domains=full.domain_names)
    # 64 frames: better asks 38.4 > 32, gives all 4 episodes; okay 24 of 0.3/0.4 of 32 = 24;
    # worse 8: one episode each of STEPS frames.
    np.testing.assert_allclose(sel.targets, [32, 24, 8])
    assert sel.kept_frames == (32, 24, 8)
    kept_file = tmp_path / "kept_episodes.json"
    save_kept_episodes(kept_file, sel)
    with open(kept_file) as f:
        data = json.load(f)
    assert data["frames"] == {"total": 160, "budget": 64.0, "kept": 64}
    assert [d["name"] for d in data["domains"]] == ["better", "okay", "worse"]
    kept = load_kept_episodes(kept_file)
    assert kept == {"reacher": frozenset(r.episode_id for r in sel.episodes)}
    (restricted,) = restrict_datasets([DatasetConfig(path, STATE)], kept_file)
    loader = make_dataloader(restricted, LoaderConfig(batch_size=16, weights=str(weights_file),
                                                      domain_key="episode_metadata/operator"))
    assert loader.domain_frames == sel.kept_frames and loader.num_frames == (64,)
    assert loader.episodes == sel.episodes
    it = iter(loader)
    seen = {int(e) for _ in range(10) for e in next(it)["episode_index"]}
    del it
    index = {r.episode_id: i for i, r in enumerate(full.episodes)}  # no hold-out: index order
    assert seen == {index[r.episode_id] for r in sel.episodes}
    assert restrict_datasets([DatasetConfig(path, STATE)], {}) == []  # nothing kept: left out
    with pytest.raises(ConfigError, match=r"name datasets \['elsewhere'\]"):
        restrict_datasets([DatasetConfig(path, STATE)], {"elsewhere": {"x"}})
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ConfigError, match=r"expected format 'openx_train\.kept_episodes'"):
        load_kept_episodes(tmp_path / "bad.json")
    assert os.path.exists(kept_file)
