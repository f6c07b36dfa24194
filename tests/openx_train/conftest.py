"""Datasets logged once per test session by our own logger: a MuJoCo env (state) and the
synthetic camera env (images, state, language)."""

from __future__ import annotations

import os

import gymnasium as gym
import pytest

from oxe_envlogger import AutoOXEEnvLogger
from oxe_envlogger.envs import run_episodes

# The model and train-step tests compile many small XLA programs, and XLA's CPU backend
# optimizations take 2-3x longer to compile them than the programs take to run; the tests check
# values, not speed (bench/ measures that, with the default flags). Read when JAX first
# computes, after collection.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

CHEETAH_EPISODES, CHEETAH_STEPS = 3, 25
CAMERA_EPISODES, CAMERA_STEPS = 3, 10
CAMERA_IMAGE, CAMERA_WRIST = 32, 16


def log_cheetah(directory: str, *, episodes: int = CHEETAH_EPISODES, seed: int = 0,
                steps: int = CHEETAH_STEPS) -> str:
    env = AutoOXEEnvLogger(gym.make("HalfCheetah-v5", max_episode_steps=steps), "half_cheetah",
                           directory)
    with env:
        run_episodes(env, episodes, seed=seed)
    return directory


def log_camera(directory: str, *, episodes: int = CAMERA_EPISODES, seed: int = 0,
               name: str = "camera", **options) -> str:
    from oxe_envlogger.envs import ENV_ID

    env = AutoOXEEnvLogger(gym.make(ENV_ID, image_size=CAMERA_IMAGE, wrist_size=CAMERA_WRIST,
                                    max_episode_steps=CAMERA_STEPS), name, directory, **options)
    with env:
        run_episodes(env, episodes, seed=seed)
    return directory


@pytest.fixture(scope="session")
def cheetah_dir(tmp_path_factory) -> str:
    return log_cheetah(os.fspath(tmp_path_factory.mktemp("data") / "half_cheetah"))


@pytest.fixture(scope="session")
def camera_dir(tmp_path_factory) -> str:
    return log_camera(os.fspath(tmp_path_factory.mktemp("data") / "camera"))
