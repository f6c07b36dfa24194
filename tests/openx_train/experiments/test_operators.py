"""The operators experiment's data: logged through the SDK, read back with its metadata, each
operator's actions what its definition says, deterministic, and ordered by quality."""

from __future__ import annotations

import json
import os

import gymnasium as gym
import numpy as np
import pytest

from openx_train.data import DatasetConfig, LoaderConfig, Structure, make_dataloader
from openx_train.experiments import operators as ex
from oxe_envlogger import read_episodes
from oxe_envlogger.envs import make_policy

STATE = Structure(state=("observation",), action=("action",))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("operators")
    results = ex.run_collection(path, size="tiny", seed=3)
    return str(path), results


def _episodes_by_operator(directory):
    """(operator index, episode index within it, episode) in logged order."""
    ops = ex.operators("tiny")
    episodes = list(read_episodes(directory))
    out, k = [], 0
    for j, op in enumerate(ops):
        for i in range(op.episodes):
            out.append((j, i, episodes[k]))
            k += 1
    assert k == len(episodes)
    return ops, out


def test_operators_log_and_read_back_with_their_metadata(tiny):
    path, results = tiny
    data = os.path.join(path, "data")
    ops, episodes = _episodes_by_operator(data)
    assert [r["name"] for r in results] == [op.name for op in ops] == [
        "better_1", "better_2", "okay_1", "okay_2", "worse_1", "worse_2", "noise", "biased"]
    for j, _, ep in episodes:
        assert ep["operator"] == ops[j].name.encode() and ep["quality"] == ops[j].quality.encode()
        assert len(ep["steps"]["action"]) == 51  # 50 env steps and the final observation
    with open(os.path.join(path, "operators.json")) as f:
        summary = json.load(f)
    assert summary["domain_key"] == "episode_metadata/operator" and summary["seed"] == 3
    for row, op in zip(summary["operators"], ops):
        assert row["name"] == op.name and row["frames"] == 50 * op.episodes
        assert np.isfinite(row["return_mean"]) and row["return_ci95"] > 0
    assert "logged_actions_return_mean" in summary["operators"][6]
    loader = make_dataloader(DatasetConfig(data, STATE),
                             LoaderConfig(batch_size=32, domain_key="episode_metadata/operator"))
    assert loader.domain_names == tuple(sorted(op.name for op in ops))
    assert loader.domain_frames == tuple(
        50 * op.episodes for op in sorted(ops, key=lambda o: o.name))
    batch = next(iter(loader))
    names = [ops[j].name for j, _, _ in episodes]
    assert [loader.domain_names[d] for d in batch["domain_id"]] == [
        names[e] for e in batch["episode_index"]]


def test_each_operator_logged_what_it_did(tiny):
    """Replaying an operator's logged actions from its reset seed gives its logged states;
    the noise domain's states are the expert's own with random actions logged; the biased
    operator is the expert plus its offset; delays and pauses show as zero actions."""
    path, _ = tiny
    ops, episodes = _episodes_by_operator(os.path.join(path, "data"))
    env = gym.make(ex.ENV_ID)
    expert = make_policy("scripted", env)
    noise_sd = {op.name: [] for op in ops}
    for j, i, ep in episodes:
        op, steps = ops[j], ep["steps"]
        obs_logged, actions = steps["observation"], steps["action"][:-1]
        # Compared at float32: the logger may store float64 observations as float32.
        obs_logged = obs_logged.astype(np.float32)
        obs, _ = env.reset(seed=ex.reset_seed(3, j, i))
        np.testing.assert_array_equal(obs.astype(np.float32), obs_logged[0])
        expert_actions = []
        for t in range(50):
            expert_actions.append(expert(obs))
            obs = env.step(expert(obs) if op.random_logged else actions[t])[0]
            np.testing.assert_array_equal(obs.astype(np.float32), obs_logged[t + 1])
        expert_actions = np.asarray(expert_actions)
        assert np.all(np.abs(actions) <= 1)
        if op.random_logged:
            assert np.abs(actions).mean() > 0.3  # uniform in [-1, 1]: mean |a| 0.5
            assert np.abs(actions - expert_actions).mean() > 0.3
        elif op.name == "biased":
            np.testing.assert_allclose(
                actions, np.clip(expert_actions + np.float32([0.1, -0.1]), -1, 1), atol=1e-6)
        elif op.delay:
            np.testing.assert_array_equal(actions[: op.delay], 0)
        if op.noise == "gaussian":
            noise_sd[op.name].append(actions - expert_actions)
        if op.pause:
            paused = np.all(actions[op.delay:] == 0, axis=1).mean()
            assert 0.1 < paused < 0.55, (op.name, paused)
    for name, scale in (("better_1", 0.03), ("better_2", 0.05)):
        sd = np.concatenate(noise_sd[name]).std()
        assert scale * 0.7 < sd < scale * 1.3, (name, sd)


def test_collection_is_deterministic(tiny, tmp_path):
    path, results = tiny
    again = ex.run_collection(tmp_path, size="tiny", seed=3)
    assert again == results
    for a, b in zip(read_episodes(os.path.join(path, "data")),
                    read_episodes(os.path.join(tmp_path, "data"))):
        assert a["operator"] == b["operator"] and a["episode_id"] != b["episode_id"]
        for key in ("observation", "action", "reward"):
            np.testing.assert_array_equal(a["steps"][key], b["steps"][key])
    other = ex.collect(tmp_path / "other", ex.operators({q: 1 for q in ex.QUALITIES}), seed=4)
    assert [r["return_mean"] for r in other] != [r["return_mean"] for r in results]
    with pytest.raises(FileExistsError, match="holds a dataset already"):
        ex.run_collection(tmp_path, size="tiny", seed=3)
    ex.run_collection(tmp_path, size="tiny", seed=3, overwrite=True)
    assert len(list(read_episodes(os.path.join(tmp_path, "data")))) == 22


def test_operator_returns_order_by_quality(tmp_path):
    results = {r["name"]: r for r in ex.collect(
        tmp_path, ex.operators({"better": 15, "okay": 15, "worse": 15, "noise": 10,
                                "biased": 10}), seed=0)}
    mean = {k: r["return_mean"] for k, r in results.items()}
    assert min(mean["better_1"], mean["better_2"]) > max(mean["okay_1"], mean["okay_2"])
    assert min(mean["okay_1"], mean["okay_2"]) > max(mean["worse_1"], mean["worse_2"])
    assert mean["noise"] > -6  # the expert drove
    assert results["noise"]["logged_actions_return_mean"] < -30  # what it logged is random
    with pytest.raises(ValueError, match="no episode count for"):
        ex.operators({"better": 1})
