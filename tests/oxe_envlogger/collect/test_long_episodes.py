"""Long episodes: what the logger holds for an episode in progress does not grow by Python
objects per step (steps are packed into column blocks the garbage collector does not track),
a split episode's memory stays near its byte budget, and what is written reads back exactly
through tfds across blocks, split parts, vector sub-envs and metadata set mid-episode."""

from __future__ import annotations

import gc
import os

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from oxe_envlogger import AutoOXEEnvLogger, VectorOXEEnvLogger, WriterOptions
from oxe_envlogger.format import reader
from tests.helpers import in_subprocess, read_tfds


def action_at(t: int) -> np.ndarray:
    return np.full(6, (t % 16) / 16 - 0.5, np.float32)


class StateEnv(gym.Env):
    """State only (17 float32 observations, 6 float32 actions, as the bench's long workload);
    observation t is a function of t, and nothing is kept per step, so the objects the
    collector sees are the logger's."""

    observation_space = spaces.Box(-np.inf, np.inf, (17,), np.float32)
    action_space = spaces.Box(-1, 1, (6,), np.float32)

    def __init__(self, episode_len: int = 10**9):
        self.episode_len = episode_len
        self.t = 0

    @staticmethod
    def obs_at(t: int) -> np.ndarray:
        return np.arange(17, dtype=np.float32) + t

    def reset(self, *, seed=None, options=None):
        self.t = 0
        return self.obs_at(0), {}

    def step(self, action):
        self.t += 1
        return self.obs_at(self.t), self.t / 8, False, self.t >= self.episode_len, {}


class DriftEnv(gym.Env):
    """Every kind of step leaf (float32, float64, int, text), each a function of t; values are
    exact in float32, so they read back equal whatever a float leaf is stored as."""

    observation_space = spaces.Dict({
        "state": spaces.Box(-np.inf, np.inf, (17,), np.float32),
        "pos": spaces.Box(-np.inf, np.inf, (3,), np.float64),
        "count": spaces.Discrete(7),
        "note": spaces.Text(4),
    })
    action_space = spaces.Box(-1, 1, (6,), np.float32)

    def __init__(self, episode_len: int):
        self.episode_len = episode_len
        self.t = 0

    @staticmethod
    def obs_at(t: int) -> dict:
        return {"state": np.arange(17, dtype=np.float32) + t,
                "pos": np.array([t / 4, -t, 0.5]), "count": np.int64(t % 7), "note": f"n{t % 10}"}

    def reset(self, *, seed=None, options=None):
        self.t = 0
        return self.obs_at(0), {}

    def step(self, action):
        self.t += 1
        done = self.t >= self.episode_len
        return self.obs_at(self.t), self.t / 8, done, False, {}


def _tracked_objects() -> int:
    gc.collect()
    gc.collect()  # (a tuple is untracked at the first collection that sees its items untracked)
    return len(gc.get_objects())


@pytest.mark.parametrize("make_env", [StateEnv, lambda: DriftEnv(10**9)], ids=["state", "dict"])
def test_a_long_episode_leaves_no_per_step_objects_for_the_garbage_collector(make_env,
                                                                            dataset_dir):
    """The collector walks every object it tracks in each full collection, so per-step objects
    held for the episode made collections (and the step that ran one) grow with the episode,
    and their promotion triggered full collections: 588 ms stalls at 1M steps."""
    env = AutoOXEEnvLogger(make_env(), "long", dataset_dir, language_instruction=True)
    env.reset(seed=0)
    env.set_language_instruction("hold")
    for t in range(2000):
        env.step(action_at(t))
    before = _tracked_objects()
    full = gc.get_stats()[2]["collections"]
    steps = 40_000
    for t in range(steps):
        env.step(action_at(t))
    full_runs = gc.get_stats()[2]["collections"] - full
    grown = _tracked_objects() - before
    env.close()
    assert grown < 500, f"{grown} more objects tracked after {steps} steps"
    assert full_runs == 0, f"{full_runs} full collections while logging {steps} steps"


def _check_episode(steps: dict, first: int, n: int, *, final_action_zero: bool = True) -> None:
    """``steps`` (tfds, stacked) are env steps ``first .. first + n`` of a DriftEnv episode."""
    t = np.arange(first, first + n + 1)
    obs = steps["observation"]
    np.testing.assert_array_equal(obs["state"], np.arange(17, dtype=np.float32)[None] + t[:, None])
    np.testing.assert_array_equal(obs["pos"], np.stack([t / 4, -t, np.full(len(t), 0.5)], 1))
    np.testing.assert_array_equal(obs["count"], t % 7)
    assert obs["note"].tolist() == [f"n{i % 10}".encode() for i in t]
    np.testing.assert_array_equal(steps["action"][:-1], np.stack([action_at(i) for i in t[:-1]]))
    np.testing.assert_array_equal(steps["reward"][:-1], (t[:-1] + 1) / 8)
    if final_action_zero:
        assert not steps["action"][-1].any() and steps["reward"][-1] == 0


def _log_drift(directory: str, n: int, *, budget: int | None, declared: bool) -> None:
    """One DriftEnv episode of ``n`` steps with the language changed at step 2500 and step
    metadata set from step 1500 (``timestamp``, every step) and 3000 (``phase``, once)."""
    kwargs = {}
    if declared:
        kwargs = {"step_metadata_info": {"timestamp": float, "phase": str},
                  "language_instruction": True}
    env = AutoOXEEnvLogger(DriftEnv(n), "drift", directory,
                           writer_options=WriterOptions(max_episode_bytes=budget), **kwargs)
    env.reset(seed=0)
    env.set_language_instruction("first")
    for t in range(n):
        if t >= 1500:
            env.set_step_metadata({"timestamp": t / 4})
        if t == 2500:
            env.set_language_instruction("second")
        if t == 3000:
            env.set_step_metadata({"phase": "late"})
        env.step(action_at(t))
    env.close()


@pytest.mark.parametrize("budget,declared", [(None, False), (640_000, True)],
                         ids=["whole-inferred-metadata", "split-declared-metadata"])
def test_a_long_episode_reads_back_exactly_across_blocks_and_parts(budget, declared,
                                                                   dataset_dir):
    """5000 steps: several blocks of 1024 steps; split by the budget into parts of about 1800
    steps (or whole). A metadata key first set after blocks were packed holds zeros in
    them."""
    n = 5000
    _log_drift(dataset_dir, n, budget=budget, declared=declared)
    parts = read_tfds(dataset_dir)
    parts.sort(key=lambda e: (len(e["episode_id"]), e["episode_id"]))
    assert len(parts) == 1 if budget is None else len(parts) >= 3
    first = 0
    for k, part in enumerate(parts):
        st = part["steps"]
        m = len(st["is_first"]) - 1
        _check_episode(st, first, m)
        assert st["is_first"].tolist() == [True] + [False] * m
        assert st["is_last"].tolist() == [False] * m + [True]
        assert st["is_terminal"].tolist() == [False] * m + [k == len(parts) - 1]
        assert m > 1024 or k == len(parts) - 1  # (every part but the last spans blocks)
        first += m
    assert first == n
    joined = {key: np.concatenate([p["steps"][key][:-1] for p in parts[:-1]]
                                  + [parts[-1]["steps"][key]])
              for key in ("timestamp", "phase", "language_instruction")}
    t = np.arange(n + 1)
    stamp = np.where(t >= 1500, np.minimum(t, n - 1) / 4, 0.0)
    np.testing.assert_array_equal(joined["timestamp"], stamp)
    assert joined["phase"].tolist() == [b"late" if i >= 3000 else b"" for i in t]
    assert joined["language_instruction"].tolist() == [
        b"second" if i >= 2500 else b"first" for i in t]


def test_vector_sub_env_episodes_longer_than_a_block(dataset_dir):
    """Each sub-env's stream packs its own blocks; their episodes stay apart and whole."""
    lengths = (1500, 2600)
    venv = gym.vector.SyncVectorEnv([lambda n=n: DriftEnv(n) for n in lengths])
    env = VectorOXEEnvLogger(venv, "vector_long", dataset_dir)
    env.reset(seed=0)
    for t in range(max(lengths)):
        env.step(np.stack([action_at(t)] * len(lengths)))
    env.close()
    done = sorted((e for e in read_tfds(dataset_dir) if not e["invalid"]),
                  key=lambda e: len(e["steps"]["is_first"]))
    assert [len(e["steps"]["is_first"]) for e in done] == [n + 1 for n in lengths]
    for e, n in zip(done, lengths):
        _check_episode(e["steps"], 0, n)
        assert e["steps"]["is_terminal"][-1]


def test_an_episode_cut_by_close_keeps_its_packed_steps(dataset_dir):
    env = AutoOXEEnvLogger(StateEnv(), "cut", dataset_dir)
    env.reset(seed=0)
    for t in range(3000):
        env.step(action_at(t))
    env.close()
    (episode,) = read_tfds(dataset_dir)
    assert episode["invalid"]
    steps = episode["steps"]
    np.testing.assert_array_equal(steps["observation"],
                                  np.stack([StateEnv.obs_at(t) for t in range(3001)]))
    np.testing.assert_array_equal(steps["action"][:-1], np.stack([action_at(t) for t in range(3000)]))
    assert not steps["is_terminal"].any() and steps["is_last"][-1]


def _split_episode_peak(directory: str, steps: int, budget: int) -> dict:
    """Logs one StateEnv episode in this (fresh) process; the peak resident memory above the
    memory at the first step (the kernel's high-water mark, reset there)."""
    env = AutoOXEEnvLogger(StateEnv(steps), "memory", directory,
                           writer_options=WriterOptions(max_episode_bytes=budget))
    env.reset(seed=0)
    env.step(action_at(0))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    base = _status_kb("VmRSS")
    for t in range(1, steps):
        env.step(action_at(t))
    env.close()
    return {"peak_above_start": (_status_kb("VmHWM") - base) * 1024,
            "parts": env.writer_stats["episodes_split"] + 1}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_a_split_episode_stays_near_its_budget_in_memory(dataset_dir):
    """The README's bound: about twice ``max_episode_bytes`` (one part written while the next
    fills; 0.95x measured here), a few parts more while a busy host slows the writer down.
    Before, a part was held as per-step Python objects, about three times its serialized
    size, and the writer built it again whole: 11x the budget here, 709 MB for 64 MiB."""
    budget = 8 * 2**20
    steps = 300_000
    out = in_subprocess(_split_episode_peak, dataset_dir, steps, budget)
    assert out["parts"] >= 5
    # 4.15x was measured once beside a CPU-bound benchmark (the writer fell behind by a part
    # more); the regression this guards against held 11x.
    assert out["peak_above_start"] < 5 * budget, out
    episodes = list(reader.read_episodes(dataset_dir))
    episodes.sort(key=lambda e: (len(e["episode_id"]), e["episode_id"]))
    assert len(episodes) == out["parts"]
    obs = np.concatenate([e["steps"]["observation"][:-1] for e in episodes[:-1]]
                         + [episodes[-1]["steps"]["observation"]])
    np.testing.assert_array_equal(obs, np.arange(17, dtype=np.float32)[None]
                                  + np.arange(steps + 1, dtype=np.float32)[:, None])
    actions = np.concatenate([e["steps"]["action"][:-1] for e in episodes])
    np.testing.assert_array_equal(actions[:64], np.stack([action_at(t) for t in range(64)]))
    assert len(actions) == steps
