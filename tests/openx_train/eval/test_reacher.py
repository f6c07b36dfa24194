"""evaluate() on real MuJoCo: the scripted Reacher-v5 expert and random actions in async
sub-envs give the returns measured by run_gym (README), the video has a frame per reset and
step, and the logged rollouts read back through tfds with the reported returns."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest

from openx_train.eval import batch_policy, evaluate
from oxe_envlogger.envs import make_policy, run_episodes
from tests.helpers import read_tfds

pytestmark = pytest.mark.slow

ENV, EPISODES = "Reacher-v5", 20
# Over 150 episodes (seeds 0-149, measured through evaluate and run_gym): expert -3.51, std of
# an episode's return 1.29; random -42.95, std 3.80. The ranges below are those means +- 4
# standard errors of a 20-episode mean (4 * std / sqrt(20)): loose, yet far apart.
EXPERT_RANGE = (-3.51 - 1.15, -3.51 + 1.15)
RANDOM_RANGE = (-42.95 - 3.4, -42.95 + 3.4)


def expert():
    return make_policy("scripted", gym.make(ENV))


def test_scripted_expert_in_async_sub_envs_matches_a_plain_loop():
    res = evaluate(batch_policy(expert()), ENV, num_episodes=EPISODES, num_envs=2, seed=0)
    assert res["vectorization"] == "async" and res["num_envs"] == 2
    assert EXPERT_RANGE[0] < res["return_mean"] < EXPERT_RANGE[1]
    assert res["length_mean"] == 50 and res["success_rate"] is None
    # The same seeds in a plain single-env loop (run_gym's): the same returns, to the bit.
    env = gym.make(ENV)
    plain = run_episodes(env, EPISODES, policy=expert(), seed=0)
    assert [e["return"] for e in res["episodes"]] == [e["return"] for e in plain]


def test_random_actions():
    rng = np.random.default_rng(0)
    res = evaluate(lambda obs: rng.uniform(-1, 1, (len(obs), 2)), ENV,
                   num_episodes=EPISODES, num_envs=2, seed=0)
    assert RANDOM_RANGE[0] < res["return_mean"] < RANDOM_RANGE[1]


def test_video_and_logged_rollouts_from_a_process_with_tensorflow(tmp_path):
    """TensorFlow is loaded here (as it is where load_policy runs); the sub-envs render in
    processes of their own, since MuJoCo's EGL renderer and TensorFlow crash together."""
    import imageio.v3 as iio
    import tensorflow_datasets  # noqa: F401

    video, log_dir = tmp_path / "reacher.mp4", tmp_path / "rollouts"
    res = evaluate(batch_policy(expert()), ENV, num_episodes=6, num_envs=2, seed=3,
                   env_kwargs={"width": 64, "height": 64}, video_path=video, video_episodes=2,
                   log_dir=log_dir, log_options={"float64": "exact"})
    frames = iio.imread(video, index=None)
    assert frames.shape == (2 * (50 + 1), 64, 64, 3)
    assert frames.std() > 0  # a picture, not a blank
    logged = read_tfds(str(log_dir))
    assert len(logged) == 6
    # The rewards added up in step order, as evaluate does: the same float64 returns.
    assert sorted(sum(ep["steps"]["reward"].tolist()) for ep in logged) == sorted(
        e["return"] for e in res["episodes"])
    # The logged episodes are the env's own 50 steps (+ the final observation), and their
    # first observations are those of seeds 3..8.
    assert {len(ep["steps"]["reward"]) for ep in logged} == {51}
    firsts = sorted(ep["steps"]["observation"][0].tobytes() for ep in logged)
    env = gym.make(ENV)
    assert firsts == sorted(env.reset(seed=s)[0].tobytes() for s in range(3, 9))


def test_a_jax_policy_runs_without_forking_jax():
    """Once JAX runs in this process, the async sub-envs start from a fresh forkserver process:
    a forked copy of JAX's threads can deadlock (JAX warns on every fork)."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    act = jax.jit(lambda obs: jnp.clip(-obs[:, 8:10] * 0.0, -1, 1))  # zero actions
    act(np.zeros((2, 10), np.float32)).block_until_ready()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = evaluate(act, ENV, num_episodes=4, num_envs=2, seed=0)
    assert not [w for w in caught if "fork" in str(w.message)]
    assert res["num_episodes"] == 4
