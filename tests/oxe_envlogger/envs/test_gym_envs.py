"""Real gymnasium/MuJoCo environments logged and read back with tfds."""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import pytest

import oxe_envlogger.envs
from oxe_envlogger import AutoOXEEnvLogger, OXEEnvLogger
from oxe_envlogger.format.reader import read_episodes
from tests.helpers import float32_rounded, in_subprocess, read_tfds, read_tfds_skip_decoding


def tf_dtype(name: str):
    import tensorflow as tf

    return tf.as_dtype(name)


def _collect(env, episodes, seed=0, policy=None):
    """Runs the env, recording independently what it returned."""
    env.action_space.seed(seed)
    seen = []
    for ep in range(episodes):
        obs, info = env.reset(seed=seed + ep)
        rec = {"obs": [copy.deepcopy(obs)], "actions": [], "rewards": [], "info": info}
        done = False
        while not done:
            action = policy(obs) if policy else env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            rec["obs"].append(copy.deepcopy(obs))
            rec["actions"].append(copy.deepcopy(action))
            rec["rewards"].append(reward)
            rec["terminated"] = terminated
            done = terminated or truncated
        seen.append(rec)
    return seen


@pytest.mark.slow
def test_half_cheetah(dataset_dir):
    env = AutoOXEEnvLogger(gym.make("HalfCheetah-v5", max_episode_steps=60), "half_cheetah",
                           dataset_dir)
    seen = _collect(env, 3)
    env.close()
    episodes = read_tfds(dataset_dir)
    ours = list(read_episodes(dataset_dir))
    assert len(episodes) == len(ours) == 3
    for got, mine, want in zip(episodes, ours, seen):
        steps = got["steps"]
        assert len(steps["is_first"]) == 61
        # float64 observations and rewards are stored as float32 by default, read as float64.
        np.testing.assert_array_equal(steps["observation"], float32_rounded(want["obs"]))
        assert steps["observation"].dtype == np.float64
        np.testing.assert_array_equal(steps["action"][:-1], np.stack(want["actions"]))
        np.testing.assert_array_equal(steps["reward"][:-1], float32_rounded(want["rewards"]))
        assert steps["reward"].dtype == np.float64
        assert not steps["is_terminal"].any()  # a time limit is a truncation
        assert steps["is_last"][-1] and steps["discount"][-1] == 1.0
        for key in ("observation", "action", "reward", "discount"):
            np.testing.assert_array_equal(mine["steps"][key], steps[key], err_msg=key)
            assert mine["steps"][key].dtype == steps[key].dtype, key


_NUMERIC_STEP_KEYS = ("observation", "action", "reward", "discount", "is_first", "is_last",
                      "is_terminal")


@pytest.mark.slow
def test_half_cheetah_read_by_oxe_loaders_that_skip_decoding(dataset_dir):
    """The Open X-Embodiment / Octo pipelines read ``steps`` with
    ``tfds.decode.SkipDecoding()``: by default every numeric step feature reaches them as
    numbers (float64 stored as a float list, as tfds itself stores a float64 Tensor), the same
    numbers tfds' decoding, our reader and the trainer's loader give."""
    from openx_train.data import load_dataset

    env = AutoOXEEnvLogger(gym.make("HalfCheetah-v5", max_episode_steps=40), "half_cheetah",
                           dataset_dir)
    seen = _collect(env, 2)
    env.close()
    skipped = read_tfds_skip_decoding(dataset_dir)
    decoded = read_tfds(dataset_dir)
    ours = list(read_episodes(dataset_dir))
    trainer = list(load_dataset(dataset_dir, "train").as_numpy_iterator())
    assert len(skipped) == len(decoded) == len(ours) == len(trainer) == 2
    for raw, got, mine, train, want in zip(skipped, decoded, ours, trainer, seen):
        assert raw["step_dtypes"] == {
            "observation": tf_dtype("float64"), "action": tf_dtype("float32"),
            "reward": tf_dtype("float64"), "discount": tf_dtype("float32"),
            "is_first": tf_dtype("bool"), "is_last": tf_dtype("bool"),
            "is_terminal": tf_dtype("bool")}
        np.testing.assert_array_equal(raw["steps"]["observation"], float32_rounded(want["obs"]))
        np.testing.assert_array_equal(raw["steps"]["reward"][:-1],
                                      float32_rounded(want["rewards"]))
        np.testing.assert_array_equal(raw["steps"]["action"][:-1], np.stack(want["actions"]))
        for key in _NUMERIC_STEP_KEYS:
            for other in (got["steps"], mine["steps"], train["steps"]):
                np.testing.assert_array_equal(other[key], raw["steps"][key], err_msg=key)
                assert other[key].dtype == raw["steps"][key].dtype, key


@pytest.mark.slow
def test_half_cheetah_float64_exact(dataset_dir):
    """``float64="exact"`` keeps every float64 bit (tfds' decoding and our reader give them
    back); the trade-off: a loader that skips decoding gets those features as strings."""
    env = AutoOXEEnvLogger(gym.make("HalfCheetah-v5", max_episode_steps=30), "half_cheetah",
                           dataset_dir, float64="exact")
    seen = _collect(env, 2)
    env.close()
    for got, mine, raw, want in zip(read_tfds(dataset_dir), read_episodes(dataset_dir),
                                    read_tfds_skip_decoding(dataset_dir), seen):
        for steps in (got["steps"], mine["steps"]):
            np.testing.assert_array_equal(steps["observation"], np.stack(want["obs"]))
            np.testing.assert_array_equal(steps["reward"][:-1], np.array(want["rewards"]))
        assert raw["step_dtypes"]["observation"] == tf_dtype("string")
        assert raw["step_dtypes"]["reward"] == tf_dtype("string")
        assert raw["step_dtypes"]["action"] == tf_dtype("float32")


def test_cartpole_terminations(dataset_dir):
    from oxe_envlogger.envs import make_policy

    base = gym.make("CartPole-v1")
    policy = make_policy("random", base, 0)
    env = OXEEnvLogger(base, "cartpole", dataset_dir)
    seen = _collect(env, 5, policy=policy)
    env.close()
    episodes = read_tfds(dataset_dir)
    assert len(episodes) == 5
    for got, want in zip(episodes, seen):
        steps = got["steps"]
        assert want["terminated"]  # random CartPole falls long before the time limit
        np.testing.assert_array_equal(steps["observation"], np.stack(want["obs"]))
        np.testing.assert_array_equal(steps["action"][:-1], np.array(want["actions"]))
        assert steps["is_terminal"][-1] and steps["is_terminal"].sum() == 1
        assert steps["discount"][-2] == 0.0 and steps["discount"][-1] == 0.0
        assert (steps["discount"][:-2] == 1.0).all()


def _log_rendered_pendulum(directory):
    base = gym.make("InvertedPendulum-v5", render_mode="rgb_array", width=64, height=48,
                    max_episode_steps=15)
    base = gym.wrappers.AddRenderObservation(base, render_only=False, render_key="image",
                                             obs_key="state")
    env = AutoOXEEnvLogger(base, "pendulum_camera", directory)
    seen = _collect(env, 2)
    env.close()
    return seen


@pytest.mark.slow
def test_mujoco_rendered_camera_images(dataset_dir):
    seen = in_subprocess(_log_rendered_pendulum, dataset_dir)  # EGL and TF: separate processes
    episodes = read_tfds(dataset_dir)
    for got, want in zip(episodes, seen):
        images = got["steps"]["observation"]["image"]
        assert images.shape == (len(want["obs"]), 48, 64, 3)
        np.testing.assert_array_equal(images, np.stack([o["image"] for o in want["obs"]]))
        assert images.std() > 0  # a real rendering, not a blank frame
        np.testing.assert_array_equal(got["steps"]["observation"]["state"],
                                      float32_rounded([o["state"] for o in want["obs"]]))


def test_synthetic_camera_env_with_language(dataset_dir):
    base = gym.make(oxe_envlogger.envs.ENV_ID, image_size=64, wrist_size=32, max_episode_steps=12)
    env = AutoOXEEnvLogger(base, "synthetic", dataset_dir, image_codecs={"observation/wrist_image": "jpeg"})
    env.action_space.seed(0)
    instructions = []
    for ep in range(3):
        _, info = env.reset(seed=ep)
        env.set_language_instruction(info["language_instruction"])
        instructions.append(info["language_instruction"])
        done = False
        while not done:
            _, _, term, trunc, _ = env.step(env.action_space.sample())
            done = term or trunc
    env.close()
    episodes = read_tfds(dataset_dir)
    for got, want in zip(episodes, instructions):
        lang = got["steps"]["language_instruction"]
        assert set(lang.tolist()) == {want.encode()}
        assert got["steps"]["observation"]["image"].shape[1:] == (64, 64, 3)


def test_reacher_inverse_kinematics_reaches_the_target_with_the_nearer_elbow():
    from oxe_envlogger.envs.policies import reacher_joint_targets

    rng = np.random.default_rng(0)
    l1, l2 = 0.1, 0.11  # gymnasium's reacher.xml
    for _ in range(200):
        radius, angle = rng.uniform(0.02, 0.2), rng.uniform(-np.pi, np.pi)
        target = radius * np.array([np.cos(angle), np.sin(angle)])
        q = rng.uniform(-3, 3, size=2)
        q[0] += 2 * np.pi * rng.integers(-2, 3)  # the shoulder turns freely
        got = reacher_joint_targets(target, q)
        tip = np.array([l1 * np.cos(got[0]) + l2 * np.cos(got.sum()),
                        l1 * np.sin(got[0]) + l2 * np.sin(got.sum())])
        np.testing.assert_allclose(tip, target, atol=1e-12)
        assert abs(got[0] - q[0]) <= np.pi + 1e-12  # no needless full turn
        # The other elbow solution (mirrored about the line to the target) moves further.
        other_elbow = -got[1]
        other_shoulder = got[0] + 2 * np.arctan2(l2 * np.sin(got[1]), l1 + l2 * np.cos(got[1]))
        other_shoulder = q[0] + (other_shoulder - q[0] + np.pi) % (2 * np.pi) - np.pi
        assert np.abs(got - q).sum() <= np.abs([other_shoulder - q[0], other_elbow - q[1]]).sum()


def _returns(env, policy, episodes, seed):
    from oxe_envlogger.envs import run_episodes

    return np.array([r["return"] for r in run_episodes(env, episodes, policy=policy, seed=seed)])


def test_scripted_reacher_beats_random_actions_on_the_real_env():
    from oxe_envlogger.envs import make_policy

    env = gym.make("Reacher-v5")
    expert = _returns(env, make_policy("scripted", env), 10, seed=500)
    random = _returns(env, make_policy("random", env, seed=500), 10, seed=500)
    # Expected about -3.5 (sd 1.3) against about -43 (sd 4): the gap is some 30 standard errors;
    # ask for 10, and for the expert to close most of random's distance from zero.
    stderr = np.sqrt(expert.var(ddof=1) / len(expert) + random.var(ddof=1) / len(random))
    assert expert.mean() - random.mean() > 10 * stderr
    assert expert.mean() > random.mean() / 4
    # Torques stay within the bounds, without saturating needlessly (the reward charges them).
    obs, _ = env.reset(seed=0)
    actions = []
    for _ in range(50):
        actions.append(make_policy("scripted", env)(obs))
        obs, *_ = env.step(actions[-1])
    actions = np.stack(actions)
    assert actions.dtype == np.float32 and np.abs(actions).max() <= 1.0
    assert (np.abs(actions) == 1.0).mean() < 0.1


def test_actions_outside_the_space_of_a_mujoco_env_are_counted(dataset_dir):
    """HalfCheetah's actuators clamp what lies outside [-1, 1] without a word; the log keeps the
    commanded actions as given and counts every element outside the action space."""
    import json
    import os

    env = AutoOXEEnvLogger(gym.make("HalfCheetah-v5", max_episode_steps=20), "half_cheetah",
                           dataset_dir)
    seen = _collect(env, 2, policy=lambda obs: 2 * env.action_space.sample())
    env.close()
    actions = np.concatenate([np.stack(s["actions"]) for s in seen])
    outside = int(np.count_nonzero(np.abs(actions) > 1))
    assert 0 < outside < actions.size
    meta = json.load(open(os.path.join(dataset_dir, "oxe_envlogger.json")))
    assert meta["sessions"][0]["out_of_bounds_values"] == {"action": outside}
    steps = read_tfds(dataset_dir)[0]["steps"]
    np.testing.assert_array_equal(steps["action"][:-1], np.stack(seen[0]["actions"]))
