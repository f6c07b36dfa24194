"""Public API: TF-free collection, the original README usage, metadata alignment, RLDSLogger,
dm_env and envlogger backends, get_gym_space."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

import oxe_envlogger
from oxe_envlogger import AutoOXEEnvLogger, RLDSLogger, RLDSStepType, get_gym_space
from tests.helpers import RecordingEnv, read_tfds

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_python(code: str, cwd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_logging_run_imports_neither_tensorflow_nor_jax(tmp_path):
    out = _run_python(f"""
        import sys, numpy as np, gymnasium as gym
        import oxe_envlogger
        from oxe_envlogger import AutoOXEEnvLogger, RLDSLogger, RLDSStepType, get_gym_space
        import oxe_envlogger.envs
        env = AutoOXEEnvLogger(gym.make("oxe_envlogger/SyntheticCamera-v0", image_size=32,
                                        wrist_size=16, max_episode_steps=5), "w2",
                               {str(tmp_path / "a")!r}, image_codecs={{"observation/wrist_image": "jpeg"}})
        for ep in range(2):
            _, info = env.reset(seed=ep)
            env.set_language_instruction(info["language_instruction"])
            env.set_step_metadata({{"t": 1.0}})
            done = False
            while not done:
                _, _, te, tr, _ = env.step(env.action_space.sample()); done = te or tr
        env.close()
        oxe_envlogger.recover({str(tmp_path / "a")!r})
        eps = list(oxe_envlogger.read_episodes({str(tmp_path / "a")!r}))
        assert len(eps) == 2, len(eps)
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "jax", "jaxlib", "tensorflow_datasets"))
        print("IMPORTED:" + ",".join(bad))
    """, str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "IMPORTED:\n" in out.stdout, out.stdout


def test_original_readme_usage(tmp_path):
    """The RLDSLogger example of the original oxe_envlogger README, verbatim."""
    out = _run_python("""
        import numpy as np
        from oxe_envlogger.data_type import get_gym_space
        from oxe_envlogger.rlds_logger import RLDSLogger, RLDSStepType

        # 0. sample data
        obs_sample = {"state1": np.array([4, 5, 6]), "state2": np.array([1, 2, 3]),}
        action_sample = np.array([0, 1, 2, 4])

        # 1. Create RLDSLogger
        logger = RLDSLogger(
                observation_space=get_gym_space(obs_sample),
                action_space=get_gym_space(action_sample),
                dataset_name="test",
                directory="logs",
                max_episodes_per_file=1,
        )

        # 2. log data
        logger(action_sample, obs_sample, 1.0, step_type=RLDSStepType.RESTART)
        logger(action_sample, obs_sample, 1.0)
        logger(action_sample, obs_sample, 1.0, step_type=RLDSStepType.TERMINATION)
        logger.close() # this is important to flush the current data to disk
    """, str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    episodes = read_tfds(str(tmp_path / "logs"))
    steps = episodes[0]["steps"]
    assert len(steps["is_first"]) == 3
    np.testing.assert_array_equal(steps["observation"]["state1"], [[4, 5, 6]] * 3)
    np.testing.assert_array_equal(steps["action"], [[0, 1, 2, 4], [0, 1, 2, 4], [0, 0, 0, 0]])
    np.testing.assert_array_equal(steps["reward"], [1.0, 1.0, 0.0])
    assert steps["is_terminal"].tolist() == [False, False, True]


def test_original_wrapper_usage(tmp_path):
    """AutoOXEEnvLogger / OXEEnvLogger as the original README shows them (gymnasium for gym),
    including tfds FeatureConnectors as metadata declarations."""
    import tensorflow_datasets as tfds

    from oxe_envlogger.envlogger import AutoOXEEnvLogger as Auto
    from oxe_envlogger.envlogger import OXEEnvLogger

    os.chdir(tmp_path)
    env = Auto(gym.make("CartPole-v1"), "cartpole_auto")
    env.reset(seed=0)
    env.step(0)
    env.close()
    assert len(read_tfds(str(tmp_path / "logs" / "cartpole_auto"))) == 1

    env = OXEEnvLogger(
        gym.make("CartPole-v1"), "cartpole", directory=str(tmp_path / "explicit"),
        max_episodes_per_file=500,
        step_metadata_info={"timestamp": tfds.features.Tensor(shape=(), dtype=np.float32,
                                                              doc="Timestamp for the step.")},
        episode_metadata_info={"operator": tfds.features.Text()})
    env.reset(seed=0)
    env.set_episode_metadata({"operator": "bob"})
    env.set_step_metadata({"timestamp": np.float32(0.5)})
    env.step(1)
    env.close()
    builder = tfds.builder_from_directory(str(tmp_path / "explicit"))
    assert "Timestamp for the step." in str(builder.info.features["steps"]["timestamp"].doc)
    ep = read_tfds(str(tmp_path / "explicit"))[0]
    assert ep["operator"] == b"bob"
    np.testing.assert_array_equal(ep["steps"]["timestamp"], [0.5, 0.5])


def test_step_metadata_alignment(dataset_dir):
    """A value set before step(a_t) lands in step t, with o_t and a_t; the value set after the
    last step lands in the final step; keys never set before hold zeros; episode metadata set
    after the last step belongs to that episode."""
    space = spaces.Box(-10, 10, (1,), np.float32)
    env = AutoOXEEnvLogger(RecordingEnv(space, space, episode_len=3), "align", dataset_dir)
    env.reset(seed=0)
    env.step(np.array([0.0], np.float32))  # step 0: no metadata yet -> zeros
    env.set_step_metadata({"t": 1, "phase": "reach"})
    env.step(np.array([1.0], np.float32))  # step 1
    env.set_step_metadata({"t": 2})  # phase stays "reach" (sticky)
    env.step(np.array([2.0], np.float32))  # step 2, episode ends
    env.set_step_metadata({"t": 3, "phase": "done"})  # final step 3
    env.set_episode_metadata({"success": True})
    env.reset(seed=1)
    env.step(np.array([0.0], np.float32))
    env.close()
    episodes = read_tfds(dataset_dir)
    steps = episodes[0]["steps"]
    assert steps["t"].tolist() == [0, 1, 2, 3]
    assert steps["phase"].tolist() == [b"", b"reach", b"reach", b"done"]
    np.testing.assert_array_equal(steps["action"][:, 0], [0.0, 1.0, 2.0, 0.0])
    assert bool(episodes[0]["success"]) is True
    assert episodes[1]["steps"]["t"].tolist() == [3, 3]  # sticky across episodes
    assert bool(episodes[1]["invalid"]) is True  # cut by close()


def test_reset_mid_episode_is_a_valid_truncation(dataset_dir):
    space = spaces.Box(-1, 1, (2,), np.float32)
    env = AutoOXEEnvLogger(RecordingEnv(space, space, episode_len=50), "midreset", dataset_dir)
    env.reset(seed=0)
    for _ in range(4):
        env.step(space.sample())
    env.reset(seed=1)  # the user ends the episode early
    env.reset(seed=2)  # an episode without steps is dropped
    env.step(space.sample())
    env.close()
    episodes = read_tfds(dataset_dir)
    assert [len(e["steps"]["is_first"]) for e in episodes] == [5, 2]
    assert not episodes[0]["invalid"] and not episodes[0]["steps"]["is_terminal"].any()
    meta = json.load(open(os.path.join(dataset_dir, "oxe_envlogger.json")))
    assert meta["sessions"][0]["reset_seeds"] == [0, 1, 2]


def test_incomplete_drop(dataset_dir):
    space = spaces.Box(-1, 1, (2,), np.float32)
    env = AutoOXEEnvLogger(RecordingEnv(space, space, episode_len=2), "drop", dataset_dir,
                           incomplete="drop")
    env.reset(seed=0)
    env.step(space.sample())
    env.step(space.sample())
    env.reset(seed=1)
    env.step(space.sample())
    env.close()
    assert len(read_tfds(dataset_dir)) == 1


def test_rlds_logger_metadata_and_discount(dataset_dir):
    obs = {"pos": np.zeros(2, np.float32)}
    with RLDSLogger(get_gym_space(obs), get_gym_space(np.float32(0)), "manual", dataset_dir,
                    step_metadata_info={"tag": str}) as logger:
        logger(None, obs, 0.0, {"tag": "start"}, RLDSStepType.RESTART)
        logger(np.float32(1), {"pos": np.ones(2, np.float32)}, 0.5, {"tag": "mid"}, discount=np.float32(0.9))
        logger(np.float32(2), {"pos": np.full(2, 2, np.float32)}, 1.0,
               step_type=RLDSStepType.TRUNCATION)
        logger.flush()
        assert len(read_tfds(dataset_dir)) == 1
        logger(None, obs, 0.0, step_type=RLDSStepType.RESTART)
        logger(np.float32(3), obs, 2.0, step_type=RLDSStepType.TERMINATION)
    episodes = read_tfds(dataset_dir)
    steps = episodes[0]["steps"]
    assert steps["tag"].tolist() == [b"start", b"mid", b"mid"]
    np.testing.assert_allclose(steps["discount"], [0.9, 1.0, 1.0])
    np.testing.assert_array_equal(steps["action"], [1, 2, 0])
    assert steps["is_terminal"].tolist() == [False, False, False]
    assert episodes[1]["steps"]["is_terminal"].tolist() == [False, True]
    assert episodes[1]["steps"]["discount"].tolist() == [0.0, 0.0]


def test_get_gym_space():
    sample = {"a": np.zeros((2, 3), np.float16), "b": (1, 2.5, True), "c": "hi",
              "img": np.zeros((16, 16, 3), np.uint8), "u": np.uint64(2**63 + 5)}
    space = get_gym_space(sample)
    assert space["a"].dtype == np.float16 and space["a"].shape == (2, 3)
    assert isinstance(space["b"], spaces.Tuple)
    assert space["b"][0].dtype == np.int64 and space["b"][1].dtype == np.float64
    assert space["b"][2].dtype == np.bool_
    assert isinstance(space["c"], spaces.Text)
    assert space["img"].dtype == np.uint8 and space["img"].high.max() == 255
    with pytest.raises(oxe_envlogger.UnsupportedSpaceError, match="x/1"):
        get_gym_space({"x": ([1, 2], object())})


def test_uint64_and_large_ints_roundtrip(dataset_dir):
    obs = {"u": np.array([2**64 - 1, 0, 2**63 + 7], np.uint64), "i": np.array([-(2**63), 2**63 - 1])}
    with RLDSLogger(get_gym_space(obs), get_gym_space(0), "ints", dataset_dir) as logger:
        logger(0, obs, 0.0, step_type=RLDSStepType.RESTART)
        logger(5, obs, 1.0, step_type=RLDSStepType.TERMINATION)
    ep = next(iter(oxe_envlogger.read_episodes(dataset_dir)))
    np.testing.assert_array_equal(ep["steps"]["observation"]["u"][0], obs["u"])
    np.testing.assert_array_equal(ep["steps"]["observation"]["i"][0], obs["i"])
    steps = read_tfds(dataset_dir)[0]["steps"]
    np.testing.assert_array_equal(steps["observation"]["i"][0], obs["i"])
    np.testing.assert_array_equal(steps["observation"]["u"][0].astype(np.uint64), obs["u"])


def test_dm_env_logger(dataset_dir):
    import dm_env
    from dm_env import specs as dm_specs

    class Counter(dm_env.Environment):
        def __init__(self):
            self.t = 0

        def reset(self):
            self.t = 0
            return dm_env.restart({"x": np.array([0.0], np.float32), "label": "start"})

        def step(self, action):
            self.t += 1
            obs = {"x": np.array([self.t], np.float32), "label": f"t{self.t}"}
            if self.t == 3:
                return dm_env.termination(np.float32(1.0), obs)
            return dm_env.transition(np.float32(0.5), obs, discount=np.float32(0.9))

        def observation_spec(self):
            return {"x": dm_specs.Array((1,), np.float32), "label": dm_specs.StringArray(())}

        def action_spec(self):
            return dm_specs.DiscreteArray(4)

        def reward_spec(self):
            return dm_specs.Array((), np.float32)

    env = oxe_envlogger.DmEnvLogger(Counter(), "dm", dataset_dir)
    ts = env.reset()
    while not ts.last():
        ts = env.step(np.int64(2))
    env.flush()  # the ended episode, readable while the logger is open
    assert len(read_tfds(dataset_dir)) == 1
    ts = env.step(np.int64(1))  # dm_env: step() after LAST starts a new episode
    assert ts.first()
    while not ts.last():
        ts = env.step(np.int64(3))
    env.close()
    assert len(read_tfds(dataset_dir)) == 2
    steps = read_tfds(dataset_dir)[0]["steps"]
    np.testing.assert_array_equal(steps["observation"]["x"][:, 0], [0, 1, 2, 3])
    assert steps["observation"]["label"].tolist() == [b"start", b"t1", b"t2", b"t3"]
    np.testing.assert_allclose(steps["discount"], [0.9, 0.9, 0.0, 0.0])
    assert steps["reward"].dtype == np.float32
    assert steps["is_terminal"].tolist() == [False, False, False, True]


def test_envlogger_backend(dataset_dir):
    """Our writer behind envlogger 1.2's EnvLogger, with its step_fn and episode_fn."""
    import dm_env
    import envlogger
    from dm_env import specs as dm_specs

    class Walk(dm_env.Environment):
        def reset(self):
            self.t = 0
            return dm_env.restart(np.zeros(2, np.float64))

        def step(self, action):
            self.t += 1
            obs = np.full(2, self.t, np.float64)
            return dm_env.truncation(0.25, obs) if self.t == 4 else dm_env.transition(0.25, obs)

        def observation_spec(self):
            return dm_specs.Array((2,), np.float64)

        def action_spec(self):
            return dm_specs.BoundedArray((1,), np.float32, -1, 1)

    backend = oxe_envlogger.RLDSBackendWriter(dataset_dir, "via_envlogger",
                                              observation_info=Walk().observation_spec(),
                                              action_info=Walk().action_spec())
    env = envlogger.EnvLogger(Walk(), backend=backend,
                              step_fn=lambda ts, a, e: {"step_index": np.int32(e.t)},
                              episode_fn=lambda ts, a, e: {"length": np.int32(e.t)})
    for _ in range(2):
        ts = env.reset()
        while not ts.last():
            ts = env.step(np.array([0.5], np.float32))
    env.close()
    episodes = read_tfds(dataset_dir)
    assert len(episodes) == 2
    steps = episodes[0]["steps"]
    np.testing.assert_array_equal(steps["observation"][:, 0], [0, 1, 2, 3, 4])
    assert steps["step_index"].tolist() == [0, 1, 2, 3, 4]
    assert int(episodes[0]["length"]) == 4
    assert not steps["is_terminal"].any() and steps["is_last"][-1]
    np.testing.assert_array_equal(steps["action"][:, 0], [0.5] * 4 + [0.0])


def test_run_gym_cli(tmp_path):
    out_dir = tmp_path / "cartpole"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "run_gym.py"), "--env_name=CartPole-v1",
         "--num_episodes=3", "--policy=scripted", "--enable_envlogger", f"--output_dir={out_dir}",
         "--language_instruction=balance the pole"],
        capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "episodes: 3 (0 invalid)" in proc.stdout
    episodes = read_tfds(str(out_dir))
    assert len(episodes) == 3
    assert episodes[0]["steps"]["language_instruction"][0] == b"balance the pole"
    meta = json.load(open(out_dir / "oxe_envlogger.json"))
    assert meta["sessions"][0]["env"]["id"] == "CartPole-v1"
    assert meta["sessions"][0]["reset_seeds"] == [0, 1, 2]
    assert "numpy" in meta["sessions"][0]["versions"]


def test_every_public_name_imports_lazily():
    """``__all__`` (literal, for static tools) and the lazy name map list the same names, and
    each resolves to the object its module defines."""
    import importlib

    assert sorted(oxe_envlogger.__all__) == sorted(oxe_envlogger._WHERE)
    for name, module in oxe_envlogger._WHERE.items():
        assert getattr(oxe_envlogger, name) is getattr(
            importlib.import_module(f"oxe_envlogger.{module}"), name)
