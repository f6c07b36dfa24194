"""Small real datasets for the dataset-tool tests, logged with our own logger.

W2-like: the synthetic camera env (two cameras, state, one language instruction per episode) at
small image sizes and short episodes; W1-like: HalfCheetah-v5 with random actions.
"""

from __future__ import annotations

import os
import subprocess
import sys

import gymnasium as gym

from oxe_envlogger import AutoOXEEnvLogger
from oxe_envlogger.envs import random_policy, run_episodes  # (registers the W2 env too)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_w2(directory: str, episodes: int, *, seed: int = 0, steps: int = 8,
            image_size: int = 32, wrist_size: int = 16, per_file: int = 2,
            unfinished: bool = False, name: str = "w2") -> str:
    """Logs ``episodes`` W2-like episodes; ``unfinished`` adds one cut short by close()
    (stored truncated, with ``invalid=True``)."""
    env = AutoOXEEnvLogger(
        gym.make("oxe_envlogger/SyntheticCamera-v0", image_size=image_size,
                 wrist_size=wrist_size, max_episode_steps=steps),
        name, directory, max_episodes_per_file=per_file)
    policy = random_policy(env, seed)
    run_episodes(env, episodes, policy=policy, seed=seed)
    if unfinished:
        run_episodes(env, 1, policy=policy, seed=seed + episodes, max_steps=steps // 2)
    env.close()
    return directory


def make_w1(directory: str, episodes: int, *, seed: int = 0, steps: int = 30,
            per_file: int = 2, float64: str | None = None) -> str:
    """Logs ``episodes`` HalfCheetah-v5 episodes with random actions (W1-like; float64
    observations and rewards stored as ``float64`` says)."""
    env = AutoOXEEnvLogger(gym.make("HalfCheetah-v5", max_episode_steps=steps), "half_cheetah",
                           directory, max_episodes_per_file=per_file, float64=float64)
    run_episodes(env, episodes, seed=seed)
    env.close()
    return directory


def run_tool(tool: str, *args: str, python: str | None = None, env: dict | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs ``tools/<tool>.py`` in a real subprocess (text output captured)."""
    full_env = dict(os.environ)
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    full_env.setdefault("MUJOCO_GL", "egl")
    full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run([python or sys.executable, os.path.join(REPO, "tools", f"{tool}.py"),
                           *args], capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=REPO, check=False)


def make_foreign(directory: str, episodes: int = 3) -> str:
    """An RLDS dataset written by TFDS itself (not by us), with features our TF-free reader does
    not decode (a variable-length zlib tensor), JPEG images under another key, a float32
    reward, a language instruction and an ``episode_metadata`` dict."""
    import numpy as np
    import tensorflow_datasets as tfds

    features = tfds.features.FeaturesDict({
        "steps": tfds.features.Dataset({
            "observation": tfds.features.FeaturesDict({
                "rgb": tfds.features.Image(shape=(24, 32, 3), encoding_format="jpeg"),
                "joints": tfds.features.Tensor(shape=(None,), dtype=np.float32,
                                               encoding="zlib"),
            }),
            "action": tfds.features.Tensor(shape=(4,), dtype=np.float32),
            "reward": tfds.features.Scalar(dtype=np.float32),
            "is_first": tfds.features.Scalar(dtype=np.bool_),
            "is_last": tfds.features.Scalar(dtype=np.bool_),
            "is_terminal": tfds.features.Scalar(dtype=np.bool_),
            "language_instruction": tfds.features.Text(),
        }),
        "episode_metadata": tfds.features.FeaturesDict({"file_path": tfds.features.Text()}),
    })
    rng = np.random.default_rng(0)
    out = []
    for e in range(episodes):
        n = 5 + e
        y, x = np.mgrid[0:24, 0:32]
        steps = [{"observation": {
                      "rgb": np.stack([(x * 8 + 20 * t) % 255, y * 10, np.full_like(x, 60 * e)],
                                      -1).astype(np.uint8),
                      "joints": rng.normal(size=3).astype(np.float32)},
                  "action": rng.normal(size=4).astype(np.float32),
                  "reward": np.float32(t == n - 1),
                  "is_first": t == 0, "is_last": t == n - 1, "is_terminal": t == n - 1,
                  "language_instruction": f"task {e % 2}"} for t in range(n)]
        out.append({"steps": steps, "episode_metadata": {"file_path": f"ep{e}"}})
    return _write_with_tfds(directory, "foreign", features, out)


def _write_with_tfds(directory: str, name: str, features, episodes: list) -> str:
    """Writes ``episodes`` into ``directory`` with TFDS's own writer (2 episodes a shard)."""
    import tensorflow_datasets as tfds

    os.makedirs(directory, exist_ok=True)
    info = tfds.core.DatasetInfo(
        builder=tfds.core.DatasetIdentity(name=name, version="1.0.0", data_dir=directory,
                                          module_name=""), features=features)
    writer = tfds.core.SequentialWriter(info, max_examples_per_shard=2, overwrite=True)
    writer.initialize_splits(["train"])
    writer.add_examples({"train": episodes})
    writer.close_all()
    return directory


def make_slash_keys(directory: str, episodes: int = 2) -> str:
    """An RLDS dataset written by TFDS itself whose keys hold '/' (tfds allows it; our loggers
    refuse them): observation ``{"cam/left": (2,), "cam": {"right": (3,)}}`` and an episode
    field ``"meta/operator"``. Their stored names (``steps/observation/cam/left``, ...) differ,
    so tfds reads it; a reader that nests by splitting names on '/' gets other keys."""
    import numpy as np
    import tensorflow_datasets as tfds

    features = tfds.features.FeaturesDict({
        "steps": tfds.features.Dataset({
            "observation": tfds.features.FeaturesDict({
                "cam/left": tfds.features.Tensor(shape=(2,), dtype=np.float32),
                "cam": tfds.features.FeaturesDict({
                    "right": tfds.features.Tensor(shape=(3,), dtype=np.float32)}),
            }),
            "action": tfds.features.Tensor(shape=(2,), dtype=np.float32),
            "is_first": tfds.features.Scalar(dtype=np.bool_),
            "is_last": tfds.features.Scalar(dtype=np.bool_),
            "is_terminal": tfds.features.Scalar(dtype=np.bool_),
        }),
        "meta/operator": tfds.features.Text(),
    })
    rng = np.random.default_rng(0)
    out = []
    for e in range(episodes):
        n = 3 + e
        steps = [{"observation": {"cam/left": rng.normal(size=2).astype(np.float32),
                                  "cam": {"right": rng.normal(size=3).astype(np.float32)}},
                  "action": rng.normal(size=2).astype(np.float32),
                  "is_first": t == 0, "is_last": t == n - 1, "is_terminal": False}
                 for t in range(n)]
        out.append({"steps": steps, "meta/operator": f"op{e}"})
    return _write_with_tfds(directory, "slash_keys", features, out)


USER_FILES = {"NOTES.txt": b"collected on robot 3, gripper recalibrated\n",
              "eval/results.json": b'{"success_rate": 0.8}\n',
              "eval/run1/log.txt": b"step 1\n" * 700}


def add_user_files(directory: str) -> dict[str, int]:
    """A user's files in a dataset directory (and a symbolic link); returns their inodes."""
    for rel, data in USER_FILES.items():
        os.makedirs(os.path.dirname(os.path.join(directory, rel)), exist_ok=True)
        with open(os.path.join(directory, rel), "wb") as f:
            f.write(data)
    os.symlink("eval/results.json", os.path.join(directory, "latest.json"))
    return {rel: os.stat(os.path.join(directory, rel)).st_ino for rel in USER_FILES}


def assert_user_files(directory: str) -> None:
    for rel, data in USER_FILES.items():
        with open(os.path.join(directory, rel), "rb") as f:
            assert f.read() == data, rel
    assert os.readlink(os.path.join(directory, "latest.json")) == "eval/results.json"
