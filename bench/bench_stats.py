"""The logger's statistics (oxe_envlogger/stats.py) on W1 episodes: what the writer thread pays
per episode and per commit, as a ratio against the raw env time of an episode measured in the
same run, and the quantile sketch's rank error; one JSON line.

    python bench/bench_stats.py
    python bench/bench_stats.py --reps=5 --episodes=20 --million_rows=1

W1 data: HalfCheetah-v5, random actions seeded 0, episodes of 1000 steps: per episode 1001 rows of
17 float64 observations and 6 float32 actions, as the writer hands them to ``add_episode``.
Figures (medians over ``--reps``): ``episode_ms`` (``StatsSet.add_episode`` of one episode),
``episode_over_raw_episode`` (that over the raw loop's time for the episode's 1000 steps),
``commit_ms`` and ``statistics_json_bytes`` (``merge_into``: read, merge and atomically rewrite
statistics.json, as at each shard commit) after the W1 episodes and after a million rows (the
W1 episodes over and over, with fresh noise so values do not repeat), and at a million rows the
largest stored ``rank_error`` bound and the largest actual rank error of any stored quantile.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gymnasium as gym
import numpy as np

from oxe_envlogger.format import stats

SHAPES = {"observation": (17,), "action": (6,)}


def w1_episodes(n: int) -> tuple[list[dict[str, np.ndarray]], float]:
    """W1 episodes as the writer's columns, and the median raw time of an episode's steps."""
    env = gym.make("HalfCheetah-v5")
    env.action_space.seed(0)
    episodes, times = [], []
    for ep in range(n):
        obs, _ = env.reset(seed=ep)
        observations, actions = [obs], []
        start = time.perf_counter()
        done = False
        while not done:
            action = env.action_space.sample()
            obs, _, terminated, truncated, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            done = terminated or truncated
        times.append(time.perf_counter() - start)
        actions.append(np.zeros_like(actions[0]))  # the final step's padding action
        episodes.append({"observation": np.stack(observations), "action": np.stack(actions)})
    env.close()
    return episodes, statistics.median(times)


def commit(directory: str, shard: stats.StatsSet, name: str) -> float:
    start = time.perf_counter()
    stats.merge_into(directory, shard, "train", {name: 1})
    return time.perf_counter() - start


def rank_errors(data: dict[str, np.ndarray], loaded: stats.StatsSet) -> tuple[float, float]:
    """(largest stored bound, largest actual rank error), both as fractions of the count."""
    bound = actual = 0.0
    for key, rows in data.items():
        summary = loaded.keys[key].summary()
        bound = max(bound, max(summary["rank_error"]))
        for j in range(rows.shape[1]):
            s = np.sort(rows[:, j])
            n = len(s)
            for p in stats.QUANTILES:
                q = summary[f"q{round(p * 100):02d}"][j]
                t = p * (n - 1)
                # The positions a quantile within E ranks may sit between: s[floor(t - E)] <=
                # q <= s[ceil(t + E)]; the last value <= q and the first >= q give the E needed.
                last_below = np.searchsorted(s, q, "right") - 1
                first_above = np.searchsorted(s, q, "left")
                error = max(0.0, t - last_below, first_above - t)
                actual = max(actual, math.floor(error) / n)
    return bound, actual


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--million_rows", type=float, default=1.0)
    args = parser.parse_args()
    episodes, raw_episode = w1_episodes(args.episodes)

    per_episode, w1_commit, w1_bytes = [], [], 0
    for _ in range(args.reps):
        shard = stats.StatsSet(SHAPES, seed=1)
        start = time.perf_counter()
        for ep in episodes:
            shard.add_episode(ep, len(ep["action"]))
        per_episode.append((time.perf_counter() - start) / len(episodes))
        with tempfile.TemporaryDirectory() as directory:
            commit(directory, shard, "a")
            w1_commit.append(commit(directory, shard, "b"))  # the second merges into a file
            w1_bytes = os.path.getsize(os.path.join(directory, "statistics.json"))

    rows = int(args.million_rows * 1e6)
    rng = np.random.default_rng(0)
    big = stats.StatsSet(SHAPES, seed=2)
    data = {k: [] for k in SHAPES}
    added = 0
    while added < rows:
        for ep in episodes:
            noisy = {k: (v + rng.normal(0, 1e-3, v.shape)).astype(v.dtype) for k, v in ep.items()}
            big.add_episode(noisy, len(noisy["action"]))
            for k in SHAPES:
                data[k].append(noisy[k][:-1].astype(np.float64))
            added += len(noisy["action"]) - 1
            if added >= rows:
                break
    data = {k: np.concatenate(v) for k, v in data.items()}
    big_commit = []
    with tempfile.TemporaryDirectory() as directory:
        commit(directory, big, "a")
        for i in range(args.reps):
            big_commit.append(commit(directory, stats.StatsSet(SHAPES), f"empty{i}"))
        big_bytes = os.path.getsize(os.path.join(directory, "statistics.json"))
        loaded, _ = stats.load(directory)
    bound, actual = rank_errors(data, loaded)

    episode_s = statistics.median(per_episode)
    print(json.dumps({
        "benchmark": "stats_w1",
        "episodes": args.episodes,
        "raw_episode_ms": round(raw_episode * 1e3, 2),
        "episode_ms": round(episode_s * 1e3, 3),
        "episode_over_raw_episode": round(episode_s / raw_episode, 4),
        "commit_ms": round(statistics.median(w1_commit) * 1e3, 2),
        "statistics_json_bytes": w1_bytes,
        "rows_1m": added,
        "commit_ms_1m": round(statistics.median(big_commit) * 1e3, 2),
        "commit_1m_over_raw_episode": round(statistics.median(big_commit) / raw_episode, 4),
        "statistics_json_bytes_1m": big_bytes,
        "rank_error_bound_1m": round(bound, 5),
        "rank_error_actual_1m": round(actual, 5),
    }))


if __name__ == "__main__":
    main()
