"""Datasets for the loader benchmark (WORKLOADS.md W1, W2, W5), logged with our own logger.

``make_w2``: the W2 camera env at full size (256x256 and 128x128 PNG frames, 8-float state,
7-float action, a language instruction), random actions seeded with 0, 200-step episodes.
``make_w1``: HalfCheetah-v5 with random actions seeded with 0, 1000-step episodes.
``replicate``: a dataset whose shard list repeats another's shards (hard links), to get 100k
frames of W2 without logging (and storing) 100k frames.
"""

from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("MUJOCO_GL", "egl")


def make_w2(directory: str, *, episodes: int = 10, seed: int = 0) -> str:
    """Logs W2 (10 x 200 steps by default) into ``directory`` unless it is already there."""
    if os.path.isfile(os.path.join(directory, "dataset_info.json")):
        return directory
    import gymnasium as gym

    from oxe_envlogger import AutoOXEEnvLogger
    from oxe_envlogger.envs import ENV_ID, run_episodes

    env = AutoOXEEnvLogger(gym.make(ENV_ID), "w2", directory)
    with env:
        run_episodes(env, episodes, seed=seed)
    return directory


def make_w1(directory: str, *, episodes: int = 20, steps: int = 1000, seed: int = 0) -> str:
    """Logs W1 (HalfCheetah-v5, random actions) into ``directory`` unless it is already there."""
    if os.path.isfile(os.path.join(directory, "dataset_info.json")):
        return directory
    import gymnasium as gym

    from oxe_envlogger import AutoOXEEnvLogger
    from oxe_envlogger.envs import run_episodes

    env = AutoOXEEnvLogger(gym.make("HalfCheetah-v5", max_episode_steps=steps), "w1", directory)
    with env:
        run_episodes(env, episodes, seed=seed)
    return directory


def replicate(source: str, directory: str, copies: int) -> str:
    """A dataset listing every shard of ``source`` ``copies`` times (hard links, or symbolic
    links across file systems). Its episodes repeat; its files and fingerprint are its own."""
    if os.path.isfile(os.path.join(directory, "dataset_info.json")):
        return directory
    from oxe_envlogger.format import layout

    info = layout.read_json(os.path.join(source, layout.DATASET_INFO))
    entry = layout.split_entry(info, "train")
    shards = layout.shard_paths(source, info, "train")
    os.makedirs(directory, exist_ok=True)
    shutil.copy(os.path.join(source, layout.FEATURES), os.path.join(directory, layout.FEATURES))
    lengths = []
    index = 0
    for _ in range(copies):
        for path, n in shards:
            dst = os.path.join(directory, layout.shard_filename(
                layout.APPEND_TEMPLATE, info["name"], "train", index, None))
            try:
                os.link(path, dst)
            except OSError:
                os.symlink(os.path.abspath(path), dst)
            lengths.append(n)
            index += 1
    new = dict(info)
    new["splits"] = [{"filepathTemplate": layout.APPEND_TEMPLATE, "name": "train",
                      "numBytes": str(int(entry.get("numBytes", 0)) * copies),
                      "shardLengths": [str(n) for n in lengths]}]
    with open(os.path.join(directory, layout.DATASET_INFO), "w", encoding="utf-8") as f:
        json.dump(new, f, indent=2)
    return directory
