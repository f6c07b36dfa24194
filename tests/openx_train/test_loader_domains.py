"""Domains in the loader (``LoaderConfig.domain_key``), weights per domain, and the restriction
of a dataset to a list of episodes, on datasets logged by our logger with episode metadata."""

from __future__ import annotations

import collections
import os

import gymnasium as gym
import numpy as np
import pytest

from openx_train.data import (
    ConfigError,
    DatasetConfig,
    LoaderConfig,
    MissingKeyError,
    Structure,
    make_dataloader,
    save_mixture_weights,
)
from oxe_envlogger import AutoOXEEnvLogger, read_episodes
from oxe_envlogger.envs import make_policy

STATE = Structure(state=("observation",), action=("action",))
STEPS = 8  # env steps per episode: 8 training frames (the final RLDS step is not one)
OPERATORS = ("bob", "alice", "carol", "alice", "bob", "bob", "carol", "alice", "bob")


def log_reacher(directory: str, metadata: list[dict], *, seed: int = 0,
                name: str = "reacher") -> str:
    """One Reacher-v5 episode of ``STEPS`` steps per metadata dict, scripted."""
    env = AutoOXEEnvLogger(gym.make("Reacher-v5", max_episode_steps=STEPS), name, directory)
    policy = make_policy("scripted", env)
    with env:
        for i, meta in enumerate(metadata):
            obs, _ = env.reset(seed=seed + i)
            env.set_episode_metadata(meta)
            done = False
            while not done:
                obs, _, terminated, truncated, _ = env.step(policy(obs))
                done = terminated or truncated
    return directory


@pytest.fixture(scope="module")
def operators_dir(tmp_path_factory) -> str:
    return log_reacher(os.fspath(tmp_path_factory.mktemp("data") / "operators"),
                       [{"operator": op, "level": len(op)} for op in OPERATORS])


def _take(loader, n):
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    del it
    return out


def _metadata(directory: str, key: str) -> list:
    return [ep[key].decode() if isinstance(ep[key], bytes) else ep[key]
            for ep in read_episodes(directory)]


@pytest.mark.parametrize("key", ["episode_metadata/operator", "operator"])
def test_domain_ids_come_from_episode_metadata(operators_dir, key):
    loader = make_dataloader(DatasetConfig(operators_dir, STATE),
                             LoaderConfig(batch_size=32, seed=1, domain_key=key))
    assert loader.domain_key == key
    assert loader.domain_names == ("alice", "bob", "carol")
    counts = collections.Counter(OPERATORS)
    assert loader.domain_frames == tuple(counts[n] * STEPS for n in loader.domain_names)
    assert loader.names == ("reacher",) and loader.num_frames == (len(OPERATORS) * STEPS,)
    np.testing.assert_allclose(loader.domain_weights, [1 / 3] * 3)  # "uniform", per domain
    np.testing.assert_allclose(loader.weights, [1.0])
    operator = _metadata(operators_dir, "operator")
    assert [(r.dataset, r.domain, r.frames) for r in loader.episodes] == [
        ("reacher", op, STEPS) for op in operator]
    assert [r.episode_id for r in loader.episodes] == [
        ep["episode_id"].decode() for ep in read_episodes(operators_dir)]
    for batch in _take(loader, 5):
        assert batch["domain_id"].dtype == np.int32 and batch["domain_id"].shape == (32,)
        for e, d in zip(batch["episode_index"], batch["domain_id"]):
            assert loader.domain_names[d] == operator[e]


def test_integer_metadata_domains_sort_numerically(tmp_path):
    path = log_reacher(str(tmp_path / "ints"), [{"level": v} for v in (10, 2, 33, 2)])
    loader = make_dataloader(DatasetConfig(path, STATE),
                             LoaderConfig(batch_size=8, domain_key="episode_metadata/level",
                                          weights="size"))
    assert loader.domain_names == ("2", "10", "33")
    assert loader.domain_frames == (2 * STEPS, STEPS, STEPS)
    np.testing.assert_allclose(loader.domain_weights, [0.5, 0.25, 0.25])


def test_sampled_domain_frequencies_follow_the_weights(operators_dir, tmp_path):
    weights = {"alice": 0.6, "bob": 0.1, "carol": 0.3}
    path = tmp_path / "weights.json"
    save_mixture_weights(path, weights)
    loader = make_dataloader(DatasetConfig(operators_dir, STATE),
                             LoaderConfig(batch_size=64, seed=2, weights=str(path),
                                          domain_key="episode_metadata/operator"))
    np.testing.assert_allclose(loader.domain_weights, [0.6, 0.1, 0.3])
    batches = _take(loader, 60)
    ids = np.concatenate([b["domain_id"] for b in batches])
    for k, name in enumerate(loader.domain_names):
        p = weights[name]
        # 3840 draws: within 4 standard deviations of the weight.
        assert abs((ids == k).mean() - p) < 4 * np.sqrt(p * (1 - p) / len(ids))
    # Each domain's frames come as a permutation of that domain: its first N draws (N its
    # frames) are N distinct frames, all of its episodes.
    operator = _metadata(operators_dir, "operator")
    for k, name in enumerate(loader.domain_names):
        n = loader.domain_frames[k]
        drawn = [(int(e), int(t)) for b in batches
                 for e, t, d in zip(b["episode_index"], b["step_index"], b["domain_id"])
                 if d == k][:n]
        assert len(drawn) == n and len(set(drawn)) == n
        assert {operator[e] for e, _ in drawn} == {name}


def test_domains_across_datasets(operators_dir, tmp_path):
    """Two datasets sharing an operator: the domains are the values across the mixture, the
    weights per domain, and each dataset gets what its share of each domain's frames says."""
    other = log_reacher(str(tmp_path / "other"),
                        [{"operator": op, "level": 0} for op in ("dave", "alice", "dave")],
                        seed=50, name="reacher_b")
    datasets = [DatasetConfig(operators_dir, STATE), DatasetConfig(other, STATE)]
    weights = {"alice": 0.5, "bob": 0.2, "carol": 0.2, "dave": 0.1}
    loader = make_dataloader(datasets, LoaderConfig(batch_size=64, seed=3, weights=weights,
                                                    domain_key="episode_metadata/operator"))
    assert loader.domain_names == ("alice", "bob", "carol", "dave")
    assert loader.domain_frames == (4 * STEPS, 4 * STEPS, 2 * STEPS, 2 * STEPS)
    # alice: 3 of her 4 episodes in the first dataset.
    expected = [0.5 * 3 / 4 + 0.2 + 0.2, 0.5 * 1 / 4 + 0.1]
    np.testing.assert_allclose(loader.weights, expected)
    batches = _take(loader, 40)
    dataset_ids = np.concatenate([b["dataset_id"] for b in batches])
    domain_ids = np.concatenate([b["domain_id"] for b in batches])
    p = expected[1]
    assert abs((dataset_ids == 1).mean() - p) < 4 * np.sqrt(p * (1 - p) / len(dataset_ids))
    assert set(dataset_ids[domain_ids == 3]) == {1}  # dave is only in the second dataset
    assert set(dataset_ids[domain_ids == 1]) == {0}
    assert set(dataset_ids[domain_ids == 0]) == {0, 1}
    with pytest.raises(ConfigError, match=r"no weight for domains \['dave'\]"):
        make_dataloader(datasets, LoaderConfig(domain_key="episode_metadata/operator",
                                               weights={"alice": 1, "bob": 1, "carol": 1}))


def test_dataset_domains_are_the_default(operators_dir, tmp_path):
    other = log_reacher(str(tmp_path / "other"), [{"operator": "x", "level": 0}] * 2,
                        name="reacher_b")
    loader = make_dataloader([DatasetConfig(operators_dir, STATE), DatasetConfig(other, STATE)],
                             LoaderConfig(batch_size=32, seed=4, weights="size"))
    assert loader.domain_key == "dataset" and loader.domain_names == loader.names
    assert loader.domain_frames == loader.num_frames
    np.testing.assert_allclose(loader.domain_weights, loader.weights)
    for b in _take(loader, 3):
        np.testing.assert_array_equal(b["domain_id"], b["dataset_id"])
    assert {r.domain for r in loader.episodes} == {"reacher", "reacher_b"}


def test_a_missing_or_unusable_domain_key_is_named(operators_dir, tmp_path):
    with pytest.raises(MissingKeyError, match=r"domain_key 'episode_metadata/scene' is not an "
                                              r"episode field; the dataset's episode fields are "
                                              r"\['episode_id', 'invalid', 'level', 'operator'\]"):
        make_dataloader(DatasetConfig(operators_dir, STATE),
                        LoaderConfig(domain_key="episode_metadata/scene"))
    path = log_reacher(str(tmp_path / "floats"), [{"speed": 0.5}, {"speed": 1.5}])
    with pytest.raises(ConfigError, match=r"domain_key 'speed': expected a scalar string, "
                                          r"integer or bool episode field, given tensor of "
                                          r"dtype float"):
        make_dataloader(DatasetConfig(path, STATE), LoaderConfig(domain_key="speed"))
    other = log_reacher(str(tmp_path / "ints"), [{"operator": 3}], name="reacher_b")
    with pytest.raises(ConfigError, match="expected one kind of value across the mixture"):
        make_dataloader([DatasetConfig(operators_dir, STATE), DatasetConfig(other, STATE)],
                        LoaderConfig(domain_key="operator"))
    with pytest.raises(ConfigError, match="domain_key: expected 'dataset' or an episode field"):
        LoaderConfig(domain_key="")


def test_validation_batches_carry_the_training_domains(operators_dir):
    cfg = DatasetConfig(operators_dir, STATE, val_fraction=0.3)
    config = LoaderConfig(batch_size=16, domain_key="episode_metadata/operator", weights="size")
    train = make_dataloader(cfg, config)
    val = make_dataloader(cfg, config, split="validation")
    assert val.domain_names == train.domain_names == ("alice", "bob", "carol")
    assert np.add(train.domain_frames, val.domain_frames).tolist() == [
        collections.Counter(OPERATORS)[n] * STEPS for n in train.domain_names]
    operator = _metadata(operators_dir, "operator")
    batches = list(val)
    assert sum(len(b["domain_id"]) for b in batches) == val.num_frames[0]
    for b in batches:
        assert [val.domain_names[d] for d in b["domain_id"]] == [
            operator[e] for e in b["episode_index"]]
    padded = make_dataloader(cfg, LoaderConfig(batch_size=16, remainder="pad",
                                               domain_key="operator"), split="validation")
    for b in padded:
        assert [val.domain_names[d] for d in b["domain_id"]] == [
            operator[e] for e in b["episode_index"]]  # the padding rows too


def test_restricting_a_dataset_to_a_list_of_episodes(operators_dir):
    full = make_dataloader(DatasetConfig(operators_dir, STATE, val_fraction=0.2),
                           LoaderConfig(batch_size=16, domain_key="operator"))
    kept = [r for i, r in enumerate(full.episodes) if i % 2 == 0]
    cfg = DatasetConfig(operators_dir, STATE, val_fraction=0.2,
                        episodes=[r.episode_id for r in kept])
    loader = make_dataloader(cfg, LoaderConfig(batch_size=16, domain_key="operator",
                                               weights="size"))
    assert loader.episodes == tuple(kept)
    assert loader.num_frames == (sum(r.frames for r in kept),)
    assert loader.domain_names == full.domain_names  # a domain may be left with no frames
    ids = [ep["episode_id"].decode() for ep in read_episodes(operators_dir)]
    kept_ids = {r.episode_id for r in kept}
    seen = {ids[e] for b in _take(loader, 8) for e in b["episode_index"]}
    assert seen == kept_ids
    # Validation is not restricted: the same frames as the unrestricted loader's.
    val = make_dataloader(cfg, LoaderConfig(batch_size=16), split="validation")
    full_val = make_dataloader(DatasetConfig(operators_dir, STATE, val_fraction=0.2),
                               LoaderConfig(batch_size=16), split="validation")
    assert val.episodes == full_val.episodes and not kept_ids & {r.episode_id
                                                                 for r in val.episodes}
    held = full_val.episodes[0].episode_id
    with pytest.raises(ConfigError, match=r"1 of the 2 episodes to keep are not among its "
                                          r"\d+ training episodes"):
        make_dataloader(DatasetConfig(operators_dir, STATE, val_fraction=0.2,
                                      episodes=[kept[0].episode_id, held]), LoaderConfig())
    with pytest.raises(ConfigError, match="episodes expected a collection of episode ids"):
        DatasetConfig(operators_dir, STATE, episodes=kept[0].episode_id)


def test_uniform_weights_leave_out_a_domain_without_training_frames(operators_dir):
    """A domain can lose every training episode (to the validation hold-out, which follows the
    random episode ids, or to a restriction): "uniform" is then over the other domains, while a
    weight given to it by name is still an error."""
    full = make_dataloader(DatasetConfig(operators_dir, STATE),
                           LoaderConfig(batch_size=16, domain_key="operator"))
    gone = full.domain_names[0]
    rest = [r.episode_id for r in full.episodes if r.domain != gone]
    cfg = DatasetConfig(operators_dir, STATE, episodes=rest)
    loader = make_dataloader(cfg, LoaderConfig(batch_size=16, domain_key="operator"))
    assert loader.domain_names == full.domain_names
    i = loader.domain_names.index(gone)
    assert loader.domain_weights[i] == 0
    others = np.delete(loader.domain_weights, i)
    np.testing.assert_allclose(others, 1 / len(others))
    seen = {int(d) for b in _take(loader, 4) for d in b["domain_id"][b["valid"]]}
    assert i not in seen and seen
    named = {n: 1.0 for n in full.domain_names}
    with pytest.raises(ConfigError, match=rf"\['{gone}'\] have weight but no frames"):
        make_dataloader(cfg, LoaderConfig(batch_size=16, domain_key="operator", weights=named))
