"""Test helpers: fake envs that remember what they returned, and reading datasets with tfds."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

import gymnasium as gym
import numpy as np


class RecordingEnv(gym.Env):
    """A deterministic env over any spaces that keeps an independent copy of everything it
    returned, so tests compare what tfds reads with what the agent saw, not with the logger."""

    metadata = {"render_modes": []}

    def __init__(self, observation_space: gym.Space, action_space: gym.Space, *,
                 episode_len: int = 5, terminate_every: int = 2, seed: int = 0):
        self.observation_space = observation_space
        self.action_space = action_space
        self.episode_len = episode_len
        self.terminate_every = terminate_every
        self.observation_space.seed(seed)
        self._episode = -1
        self._t = 0
        self.episodes: list[dict[str, Any]] = []

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self._episode += 1
        self._t = 0
        obs = self.observation_space.sample()
        self.episodes.append({"obs": [copy.deepcopy(obs)], "actions": [], "rewards": [],
                              "terminated": False, "truncated": False, "options": options})
        return obs, {"episode": self._episode}

    def step(self, action):
        self._t += 1
        obs = self.observation_space.sample()
        reward = float(self._t) + 0.1  # 0.1 is not exact in float32: float64 must survive
        done = self._t >= self.episode_len
        terminated = done and self._episode % self.terminate_every == 0
        truncated = done and not terminated
        ep = self.episodes[-1]
        ep["obs"].append(copy.deepcopy(obs))
        ep["actions"].append(copy.deepcopy(action))
        ep["rewards"].append(reward)
        ep["terminated"], ep["truncated"] = terminated, truncated
        return obs, reward, terminated, truncated, {"t": self._t}


def run_episodes(env: gym.Env, n: int, *, seed: int = 0, steps: int | None = None) -> None:
    env.action_space.seed(seed)
    for ep in range(n):
        env.reset(seed=seed + ep)
        t = 0
        while True:
            _, _, term, trunc, _ = env.step(env.action_space.sample())
            t += 1
            if term or trunc or (steps is not None and t >= steps):
                break


def as_older_logger_wrote_statistics(directory: str) -> None:
    """Rewrites ``statistics.json`` as the logger before the quantile sketch wrote it: the same
    schema (format_version 1; per key the moments and a bottom-k sample of at most 512 rows,
    whose fields the new file keeps for older readers) without ``sketch`` and ``rank_error``."""
    from oxe_envlogger.format import layout

    path = os.path.join(directory, layout.STATISTICS)
    data = layout.read_json(path)
    for body in [data, *data.get("splits", {}).values()]:
        for entry in body["keys"].values():
            del entry["state"]["sketch"]
            del entry["summary"]["rank_error"]
    layout.atomic_write_json(path, data)


def within_rank_bound(column: np.ndarray, q: float, p: float, error: float) -> bool:
    """Whether ``q`` lies between the sorted finite values of ``column`` at positions
    p (n - 1) -+ error, rounded outwards (the guarantee of ``oxe_envlogger.format.stats``)."""
    s = np.sort(column[np.isfinite(column)])
    t = p * (len(s) - 1)
    lo = min(len(s) - 1, max(0, math.floor(t - error)))
    hi = min(len(s) - 1, max(0, math.ceil(t + error)))
    return bool(s[lo] <= q <= s[hi])


def check_quantiles(data: np.ndarray, summary: dict, capacity: int | None = None) -> float:
    """Asserts that every stored quantile of every column of ``data`` ``[n, width]`` (a
    ``RunningStats.summary()``) is within its stored ``rank_error`` of its exact rank, and that
    bound within the documented (1 + log2(n / capacity)) / capacity (twice that for a column with
    non-finite values); returns the largest bound."""
    from oxe_envlogger.format import stats

    capacity = capacity or stats.SKETCH_ROWS
    summary = {k: np.asarray(v).reshape(-1) for k, v in summary.items()}
    worst = 0.0
    for j in range(data.shape[1]):
        column = data[:, j]
        n = int(np.isfinite(column).sum())
        assert summary["count"][j] == n
        error = summary["rank_error"][j] * n
        assert abs(error - round(error)) < 1e-6 * max(1, n)  # a whole number of rows
        error = round(error)
        factor = 1 if n == len(column) else 2
        assert error / n <= factor * (1 + math.log2(max(n / capacity, 1))) / capacity
        worst = max(worst, error / n)
        for p in stats.QUANTILES:
            q = summary[f"q{round(p * 100):02d}"][j]
            assert within_rank_bound(column, q, p, error), (j, p, q, error)
    return worst


def in_subprocess(fn, *args, timeout: float = 600):
    """Runs ``fn(*args)`` in a fresh (spawned) Python process and returns its result.

    MuJoCo's EGL renderer and TensorFlow crash when loaded into the same process (seen with
    TF 2.21 and mujoco 4.0), so tests that render log in a subprocess and read tfds here."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply_async(fn, args).get(timeout=timeout)


def _stack(values: list) -> Any:
    if isinstance(values[0], dict):
        return {k: _stack([v[k] for v in values]) for k in values[0]}
    return np.stack([np.asarray(v) for v in values])


def read_tfds(directory: str, split: str = "train") -> list[dict[str, Any]]:
    """Every episode as tfds reads it: ``steps`` as a dict of arrays stacked over steps."""
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(directory)
    out = []
    ds = builder.as_dataset(split=split, read_config=tfds.ReadConfig(interleave_cycle_length=1))
    for episode in tfds.as_numpy(ds):
        episode = dict(episode)
        steps = list(episode.pop("steps"))
        episode["steps"] = _stack(steps) if steps else {}
        out.append(episode)
    return out


def read_tfds_skip_decoding(directory: str, split: str = "train") -> list[dict[str, Any]]:
    """Every episode as the Open X-Embodiment / Octo data pipelines read it (dlimp's
    ``from_rlds``): ``as_dataset(decoders={"steps": tfds.decode.SkipDecoding()})``, so ``steps``
    is a nest of tensors stacked over steps that tfds only parsed, never decoded. Returns numpy
    values, with the TensorFlow dtype of each step leaf under ``"step_dtypes"`` (by key path)."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(directory)
    ds = builder.as_dataset(split=split, decoders={"steps": tfds.decode.SkipDecoding()},
                            read_config=tfds.ReadConfig(interleave_cycle_length=1))
    def dtypes(tree: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(tree, dict):
            return {p: d for k, v in tree.items() for p, d in dtypes(v, f"{prefix}{k}/").items()}
        return {prefix[:-1]: tree.dtype}

    out = []
    for episode in ds:
        steps = episode["steps"]
        out.append({"steps": tf.nest.map_structure(lambda t: t.numpy(), steps),
                    "step_dtypes": dtypes(steps)})
    return out


def float32_rounded(values: Any) -> np.ndarray:
    """float64 values as the default storage keeps them: rounded to float32, read as float64."""
    return np.asarray(values, np.float64).astype(np.float32).astype(np.float64)


def tree_get(tree: Any, path: str) -> Any:
    for k in path.split("/"):
        tree = tree[k]
    return tree


def assert_observations_equal(logged: Sequence[dict], recorded: Sequence[dict], key: str) -> None:
    """Observation ``key`` of each episode tfds read equals what the ``RecordingEnv`` returned
    (``len(logged)`` episodes are compared)."""
    assert len(logged) <= len(recorded)
    for got, want in zip(logged, recorded):
        np.testing.assert_array_equal(got["steps"]["observation"][key],
                                      np.stack([o[key] for o in want["obs"]]))


@contextlib.contextmanager
def tmpfs(path: str | os.PathLike, size: str) -> Iterator[str]:
    """A tmpfs of ``size`` (``"2m"``) mounted at ``path`` for the block; skips the test where
    mounting is not allowed (it needs root, which CI has)."""
    import pytest

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


def kill_when_ready(args: Sequence[str], **popen_kwargs) -> None:
    """Runs ``args`` in a real subprocess, waits until it prints ``ready``, and SIGKILLs it."""
    import signal

    proc = subprocess.Popen(list(args), stdout=subprocess.PIPE, text=True, **popen_kwargs)
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
