"""The episode byte budget (WriterOptions.max_episode_bytes): an episode that grows past it is
split into consecutive parts, each a valid RLDS episode, that join back to exactly what the env
produced; nothing is lost and no record nears the 2 GiB limit of a tf.train.Example."""

from __future__ import annotations

import copy
import os

import gymnasium as gym
import numpy as np
import pytest

import oxe_envlogger.envs
from oxe_envlogger import AutoOXEEnvLogger, WriterOptions
from oxe_envlogger.envs.policies import run_episodes
from oxe_envlogger.format import layout
from tests.helpers import read_tfds


class Remember(gym.Wrapper):
    """Keeps a copy of every observation, action and reward that passed through."""

    def __init__(self, env):
        super().__init__(env)
        self.obs, self.actions, self.rewards = [], [], []

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.obs.append(copy.deepcopy(obs))
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.obs.append(copy.deepcopy(obs))
        self.actions.append(np.array(action))
        self.rewards.append(reward)
        return obs, reward, terminated, truncated, info


def log_one_episode(directory: str, steps: int, max_episode_bytes: int | None,
                    **options) -> Remember:
    base = Remember(gym.make(oxe_envlogger.envs.ENV_ID, image_size=64, wrist_size=32,
                             max_episode_steps=steps))
    env = AutoOXEEnvLogger(base, "budget", directory,
                           writer_options=WriterOptions(max_episode_bytes=max_episode_bytes),
                           **options)
    run_episodes(env, 1, seed=3)  # sets the env's language instruction
    env.close()
    return base


def test_long_episode_is_split_into_parts_that_join_back_exactly(dataset_dir):
    steps = 150
    seen = log_one_episode(dataset_dir, steps, max_episode_bytes=200_000)
    parts = read_tfds(dataset_dir)
    parts.sort(key=lambda e: (len(e["episode_id"]), e["episode_id"]))
    assert len(parts) >= 3
    base_id = parts[0]["episode_id"].decode()
    assert [p["episode_id"].decode() for p in parts] == (
        [base_id] + [f"{base_id}.{k}" for k in range(1, len(parts))])
    assert [layout.episode_part(p["episode_id"].decode()) for p in parts] == [
        (base_id, k) for k in range(len(parts))]
    assert layout.episode_part("traj.3") == ("traj.3", 0)  # not a logger's part id

    for k, part in enumerate(parts):
        st = part["steps"]
        n = len(st["is_first"])
        assert st["is_first"].tolist() == [True] + [False] * (n - 1)
        assert st["is_last"].tolist() == [False] * (n - 1) + [True]
        last_part = k == len(parts) - 1
        # Only the real end of the episode may be terminal; a split point is a truncation.
        assert not st["is_terminal"][:-1].any()
        if not last_part:
            assert not st["is_terminal"][-1] and st["discount"][-1] == 1.0
            nxt = parts[k + 1]["steps"]["observation"]
            for key in ("image", "wrist_image", "state"):  # the next part starts where this ended
                np.testing.assert_array_equal(st["observation"][key][-1], nxt[key][0])
        assert not part["invalid"]

    # Joined (each part's final o_N is the next part's o_0), the parts are the episode.
    joined = {key: np.concatenate([p["steps"]["observation"][key][:-1] for p in parts[:-1]]
                                  + [parts[-1]["steps"]["observation"][key]])
              for key in ("image", "wrist_image", "state")}
    for key in joined:
        np.testing.assert_array_equal(joined[key], np.stack([o[key] for o in seen.obs]))
    actions = np.concatenate([p["steps"]["action"][:-1] for p in parts])
    np.testing.assert_array_equal(actions, np.stack(seen.actions))
    rewards = np.concatenate([p["steps"]["reward"][:-1] for p in parts])
    np.testing.assert_array_equal(rewards, np.asarray(seen.rewards, np.float64))
    assert sum(len(p["steps"]["is_first"]) - 1 for p in parts) == steps

    meta = layout.read_json(os.path.join(dataset_dir, layout.METADATA))
    assert [s["episodes_split"] for s in meta["sessions"]] == [len(parts) - 1]
    assert [s["episodes"] for s in meta["sessions"]] == [len(parts)]


@pytest.mark.parametrize("budget", [None, 12_000_000])
def test_a_camera_episode_longer_than_a_block_reads_back_exactly(budget, dataset_dir):
    """Steps are packed into blocks (encoded frames by reference; the raw wrist frames as
    arrays, in blocks of fewer steps since they are large); the frames read back exactly,
    whole or split into parts of more than 1024 steps."""
    steps = 2600
    seen = log_one_episode(dataset_dir, steps, budget,
                           image_codecs={"observation/wrist_image": "raw"})
    parts = read_tfds(dataset_dir)
    parts.sort(key=lambda e: (len(e["episode_id"]), e["episode_id"]))
    assert len(parts) == 1 if budget is None else len(parts) >= 2
    assert all(len(p["steps"]["is_first"]) > 1024 for p in parts[:-1])
    for key in ("image", "wrist_image", "state"):
        joined = np.concatenate([p["steps"]["observation"][key][:-1] for p in parts[:-1]]
                                + [parts[-1]["steps"]["observation"][key]])
        np.testing.assert_array_equal(joined, np.stack([o[key] for o in seen.obs]))
    actions = np.concatenate([p["steps"]["action"][:-1] for p in parts])
    np.testing.assert_array_equal(actions, np.stack(seen.actions))


def test_language_instruction_carries_into_every_part(dataset_dir):
    log_one_episode(dataset_dir, 100, max_episode_bytes=100_000)
    parts = read_tfds(dataset_dir)
    assert len(parts) >= 2
    instructions = {x for p in parts for x in p["steps"]["language_instruction"].tolist()}
    assert len(instructions) == 1 and instructions != {b""}


def test_no_budget_keeps_the_episode_whole(dataset_dir):
    log_one_episode(dataset_dir, 100, max_episode_bytes=None)
    (episode,) = read_tfds(dataset_dir)
    assert len(episode["steps"]["is_first"]) == 101


@pytest.mark.parametrize("bad", [0, -1, 2**31])
def test_bad_budget_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"max_episode_bytes: expected 1\.\.2147483647 or None, "
                                         rf"given {bad}"):
        WriterOptions(max_episode_bytes=bad)


def test_reshard_validation_split_keeps_the_parts_of_an_episode_together(tmp_path):
    from oxe_envlogger.datasets import reshard
    from oxe_envlogger.datasets.reshard import ReshardOptions

    source = str(tmp_path / "source")
    env = AutoOXEEnvLogger(gym.make(oxe_envlogger.envs.ENV_ID, image_size=32, wrist_size=16,
                                    max_episode_steps=100), "budget", source,
                           writer_options=WriterOptions(max_episode_bytes=20_000))
    run_episodes(env, 8)
    env.close()
    episodes = read_tfds(source)
    groups = {e["episode_id"].decode().partition(".")[0] for e in episodes}
    assert len(groups) == 8 and len(episodes) >= 16  # every episode was split
    sides_seen = set()
    for seed in range(4):
        out = str(tmp_path / f"out{seed}")
        reshard.reshard([source], out, ReshardOptions(validation_fraction=0.3, split_seed=seed))
        side = {}
        for split in ("train", "val"):
            for e in read_tfds(out, split):
                side.setdefault(e["episode_id"].decode().partition(".")[0], set()).add(split)
        assert set(side) == groups
        assert all(len(s) == 1 for s in side.values()), side  # no episode on both sides
        val = sorted(g for g, s in side.items() if s == {"val"})
        assert 0 < len(val) < len(groups)
        sides_seen.add(tuple(val))
    assert len(sides_seen) > 1  # the seed matters
