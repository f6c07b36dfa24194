"""Vector envs (sync and async, every autoreset mode) logged as one episode per sub-env
episode, compared with the same episodes run sequentially on single envs."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

from oxe_envlogger import VectorOXEEnvLogger, WriterOptions
from tests.helpers import read_tfds

NUM_ENVS = 3
STEPS = 120


def _reference(seed: int, index: int, steps: int) -> list[dict]:
    """Sub-env ``index`` run alone: its seeded first reset, unseeded resets after (as autoreset
    does), actions from its own RNG, until it has taken ``steps`` logged actions."""
    env = gym.make("CartPole-v1")
    rng = np.random.default_rng(100 + index)
    episodes = []
    obs, _ = env.reset(seed=seed + index)
    ep = {"obs": [obs], "actions": [], "rewards": [], "terminated": False}
    for _ in range(steps):
        a = int(rng.integers(2))
        obs, r, te, tr, _ = env.step(a)
        ep["obs"].append(obs)
        ep["actions"].append(a)
        ep["rewards"].append(r)
        if te or tr:
            ep["terminated"] = bool(te)
            episodes.append(ep)
            obs, _ = env.reset()
            ep = {"obs": [obs], "actions": [], "rewards": [], "terminated": False}
    return episodes


def _drive(env: gym.vector.VectorEnv, mode: AutoresetMode, seed: int, calls: int,
           flush_every: int | None = None) -> None:
    """Steps the vector env; sub-env i draws its actions from its own RNG, and only for steps
    where the env uses them (so they match the sequential reference). ``flush_every``: calls
    ``env.flush()`` every that many calls."""
    rngs = [np.random.default_rng(100 + i) for i in range(NUM_ENVS)]
    env.reset(seed=seed)
    waiting = np.zeros(NUM_ENVS, bool)  # NEXT_STEP: this call resets the sub-env
    for call in range(calls):
        if flush_every and call % flush_every == flush_every - 1:
            env.flush()
        actions = np.array([0 if waiting[i] else int(rngs[i].integers(2)) for i in range(NUM_ENVS)])
        _, _, te, tr, _ = env.step(actions)
        done = te | tr
        if mode == AutoresetMode.NEXT_STEP:
            waiting = done & ~waiting
        elif mode == AutoresetMode.DISABLED and done.any():
            env.reset(options={"reset_mask": done})


def _episode_key(steps) -> bytes:
    return np.asarray(steps["observation"][0]).tobytes()


@pytest.mark.parametrize("vectorization,flush_every", [("sync", None), ("async", None),
                                                       ("sync", 13)])
@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP,
                                  AutoresetMode.DISABLED])
def test_vector_env_matches_sequential_reference(vectorization, flush_every, mode, dataset_dir):
    """Also with ``flush()`` every 13 calls, which hands over the sub-env episodes that have
    ended and commits a shard each time, in the middle of other sub-envs' episodes."""
    venv = gym.make_vec("CartPole-v1", num_envs=NUM_ENVS, vectorization_mode=vectorization,
                        vector_kwargs={"autoreset_mode": mode})
    env = VectorOXEEnvLogger(venv, "vector", dataset_dir)
    _drive(env, mode, seed=7, calls=STEPS, flush_every=flush_every)
    shards_before_close = len(env.writer_stats["shards"])
    env.close()
    if flush_every:
        assert shards_before_close >= 3  # each flush() that had episodes committed a shard
    logged = read_tfds(dataset_dir)
    valid = [e for e in logged if not e["invalid"]]
    assert len(logged) - len(valid) <= NUM_ENVS  # the episodes cut by close()
    by_key = {_episode_key(e["steps"]): e for e in valid}
    assert len(by_key) == len(valid)
    expected = 0
    for i in range(NUM_ENVS):
        # A NEXT_STEP sub-env spends one call per reset, so it takes fewer logged actions.
        for ref in _reference(7, i, STEPS):
            key = np.asarray(ref["obs"][0]).tobytes()
            if key not in by_key:
                continue  # an episode the vector run did not finish within STEPS calls
            expected += 1
            steps = by_key[key]["steps"]
            n = len(ref["obs"])
            np.testing.assert_array_equal(steps["observation"], np.stack(ref["obs"]))
            np.testing.assert_array_equal(steps["action"][:-1], ref["actions"])
            np.testing.assert_array_equal(steps["reward"][:-1], ref["rewards"])
            assert steps["is_first"].tolist() == [True] + [False] * (n - 1)
            assert steps["is_last"].tolist() == [False] * (n - 1) + [True]
            assert bool(steps["is_terminal"][-1]) == ref["terminated"]
    assert expected == len(valid) and expected >= NUM_ENVS * 3
    assert len({e["episode_id"] for e in logged}) == len(logged)


def test_vector_metadata_per_sub_env(dataset_dir):
    venv = gym.make_vec("CartPole-v1", num_envs=2, vectorization_mode="sync")
    env = VectorOXEEnvLogger(venv, "vector_meta", dataset_dir)
    env.reset(seed=0)
    env.set_language_instruction("balance")
    env.set_episode_metadata({"sub_env": 0}, env_index=0)
    env.set_episode_metadata({"sub_env": 1}, env_index=1)
    for _ in range(5):
        env.step(np.array([0, 1]))
    env.close()
    episodes = read_tfds(dataset_dir)
    assert sorted(int(e["sub_env"]) for e in episodes) == [0, 1]
    for e in episodes:
        assert set(e["steps"]["language_instruction"].tolist()) == {b"balance"}


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_vector_env_episodes_split_at_the_byte_budget_join_back(mode, dataset_dir):
    """A tiny max_episode_bytes splits every sub-env episode longer than 32 steps; the parts,
    joined per episode id, are the sequential reference episodes."""
    venv = gym.make_vec("CartPole-v1", num_envs=NUM_ENVS, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": mode})
    env = VectorOXEEnvLogger(venv, "vector_split", dataset_dir,
                             writer_options=WriterOptions(max_episode_bytes=1000))
    _drive(env, mode, seed=7, calls=STEPS)
    env.close()
    parts: dict[str, dict[int, dict]] = {}
    for e in read_tfds(dataset_dir):
        base, _, k = e["episode_id"].decode().partition(".")
        parts.setdefault(base, {})[int(k or 0)] = e
    assert any(len(p) > 1 for p in parts.values())
    joined = {}
    for by_k in parts.values():
        assert sorted(by_k) == list(range(len(by_k)))
        seq = [by_k[k] for k in range(len(by_k))]
        assert all(not p["steps"]["is_terminal"].any() for p in seq[:-1])
        steps = {key: np.concatenate([p["steps"][key][:-1] for p in seq[:-1]]
                                     + [seq[-1]["steps"][key]])
                 for key in ("observation", "action", "reward", "is_terminal")}
        joined[_episode_key(steps)] = (steps, seq[-1]["invalid"])
    checked = 0
    for i in range(NUM_ENVS):
        for ref in _reference(7, i, STEPS):
            key = np.asarray(ref["obs"][0]).tobytes()
            if key not in joined or joined[key][1]:
                continue
            steps, _ = joined[key]
            np.testing.assert_array_equal(steps["observation"], np.stack(ref["obs"]))
            np.testing.assert_array_equal(steps["action"][:-1], ref["actions"])
            np.testing.assert_array_equal(steps["reward"][:-1], ref["rewards"])
            assert bool(steps["is_terminal"][-1]) == ref["terminated"]
            checked += 1
    assert checked == sum(not v[1] for v in joined.values()) and checked >= NUM_ENVS * 3
