"""Datasets logged once per test session by our own logger: a MuJoCo env (state) and the
synthetic camera env (images, state, language)."""

from __future__ import annotations

import os

import gymnasium as gym
import pytest

from oxe_envlogger import AutoOXEEnvLogger

CHEETAH_EPISODES, CHEETAH_STEPS = 3, 25
CAMERA_EPISODES, CAMERA_STEPS = 3, 10
CAMERA_IMAGE, CAMERA_WRIST = 32, 16


def log_cheetah(directory: str, *, episodes: int = CHEETAH_EPISODES, seed: int = 0,
                steps: int = CHEETAH_STEPS) -> str:
    env = AutoOXEEnvLogger(gym.make("HalfCheetah-v5", max_episode_steps=steps), "half_cheetah",
                           directory)
    env.action_space.seed(seed)
    with env:
        for ep in range(episodes):
            env.reset(seed=seed + ep)
            done = False
            while not done:
                _, _, term, trunc, _ = env.step(env.action_space.sample())
                done = term or trunc
    return directory


def log_camera(directory: str, *, episodes: int = CAMERA_EPISODES, seed: int = 0,
               name: str = "camera", **options) -> str:
    from oxe_envlogger.envs import ENV_ID, make_policy

    env = AutoOXEEnvLogger(gym.make(ENV_ID, image_size=CAMERA_IMAGE, wrist_size=CAMERA_WRIST,
                                    max_episode_steps=CAMERA_STEPS), name, directory, **options)
    policy = make_policy("random", env, seed=seed)
    with env:
        for ep in range(episodes):
            obs, info = env.reset(seed=seed + ep)
            env.set_language_instruction(info["language_instruction"])
            done = False
            while not done:
                obs, _, term, trunc, _ = env.step(policy(obs))
                done = term or trunc
    return directory


@pytest.fixture(scope="session")
def cheetah_dir(tmp_path_factory) -> str:
    return log_cheetah(os.fspath(tmp_path_factory.mktemp("data") / "half_cheetah"))


@pytest.fixture(scope="session")
def camera_dir(tmp_path_factory) -> str:
    return log_camera(os.fspath(tmp_path_factory.mktemp("data") / "camera"))
