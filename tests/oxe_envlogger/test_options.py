"""One options bundle: every front takes the same keyword options (``LoggerOptions``), each of
them reaches the dataset, and an unknown keyword is an error naming the valid ones."""

from __future__ import annotations

import json
import os

import dm_env
import gymnasium as gym
import numpy as np
import pytest
from dm_env import specs as dm_specs
from gymnasium import spaces

from oxe_envlogger import (
    AutoOXEEnvLogger,
    DmEnvLogger,
    LoggerOptions,
    OXEEnvLogger,
    RLDSBackendWriter,
    RLDSLogger,
    RLDSStepType,
    VectorOXEEnvLogger,
    WriterOptions,
)
from oxe_envlogger.errors import UnknownOptionError
from oxe_envlogger.format import reader
from tests.helpers import RecordingEnv

FRONTS = ["oxe", "auto", "rlds", "vector", "dm", "backend"]
CAM = (8, 8, 3)
OBS = spaces.Dict({"state": spaces.Box(-1, 1, (2,), np.float64),
                   "cam": spaces.Box(0, 255, CAM, np.uint8)})
ACT = spaces.Box(-1, 1, (1,), np.float32)

# Every option, each at a value other than its default.
EVERY = {
    "step_metadata_info": {"speed": float},
    "episode_metadata_info": {"operator": str},
    "language_instruction": True,
    "doc_field": {"observation/state": "joint angles"},
    "version": "1.2.3",
    "max_episodes_per_file": 1,
    "shard_bytes": 1 << 20,
    "image_codec": "raw",
    "image_codecs": {"observation/cam": "jpeg:90"},
    "float64": "exact",
    "reward_dtype": np.float32,
    "strict_finite": True,
    "strict_bounds": True,
    "incomplete": "drop",
    "overwrite": True,
    "fsync": False,
    "writer_options": WriterOptions(queue_episodes=2, commit_every_s=None),
    "description": "two steps of a test env",
    "handle_signals": False,
}


class HalfRewards(RecordingEnv):
    """Rewards of 0.5, which a float32 ``reward_dtype`` holds exactly."""

    def step(self, action):
        obs, _, terminated, truncated, info = super().step(action)
        return obs, 0.5, terminated, truncated, info


class DmCamera(dm_env.Environment):
    """A dm_env with the same observation as ``OBS``: two steps per episode."""

    def reset(self):
        self.t = 0
        return dm_env.restart(self._obs())

    def step(self, action):
        self.t += 1
        return (dm_env.truncation if self.t == 2 else dm_env.transition)(0.5, self._obs())

    def _obs(self):
        return {"state": np.full(2, self.t / 4, np.float64), "cam": np.full(CAM, self.t, np.uint8)}

    def observation_spec(self):
        return {"state": dm_specs.BoundedArray((2,), np.float64, -1, 1),
                "cam": dm_specs.Array(CAM, np.uint8)}

    def action_spec(self):
        return dm_specs.BoundedArray((1,), np.float32, -1, 1)

    def reward_spec(self):
        return dm_specs.Array((), np.float64)


def _log_one_episode(front: str, directory: str, **options):
    """Logs one two-step episode through ``front`` with ``options``; returns the logger, closed."""
    act = np.array([0.5], np.float32)
    if front in ("oxe", "auto"):
        cls = OXEEnvLogger if front == "oxe" else AutoOXEEnvLogger
        logger = cls(HalfRewards(OBS, ACT, episode_len=2), "opts", directory, **options)
        logger.reset(seed=0)
        logger.set_language_instruction("pick")
        logger.set_episode_metadata({"operator": "ann"})
        logger.set_step_metadata({"speed": 0.1})
        logger.step(act)
        logger.step(act)
    elif front == "vector":
        logger = VectorOXEEnvLogger(
            gym.vector.SyncVectorEnv([lambda: HalfRewards(OBS, ACT, episode_len=2)]), "opts",
            directory, **options)
        logger.reset(seed=0)
        logger.set_language_instruction("pick")
        logger.set_episode_metadata({"operator": "ann"})
        logger.set_step_metadata({"speed": 0.1})
        logger.step(act[None])
        logger.step(act[None])
    elif front == "rlds":
        logger = RLDSLogger(OBS, ACT, "opts", directory, **options)
        obs = OBS.sample()
        logger.set_language_instruction("pick")
        logger.set_episode_metadata({"operator": "ann"})
        logger(None, obs, 0.0, {"speed": 0.1}, step_type=RLDSStepType.RESTART)
        logger(act, obs, 0.5)
        logger(act, obs, 0.5, step_type=RLDSStepType.TRUNCATION)
    elif front == "dm":
        logger = DmEnvLogger(DmCamera(), "opts", directory, **options)
        logger.reset()
        logger.set_language_instruction("pick")
        logger.set_episode_metadata({"operator": "ann"})
        logger.set_step_metadata({"speed": 0.1})
        logger.step(act)
        logger.step(act)
    else:
        import envlogger

        env = DmCamera()
        logger = RLDSBackendWriter(directory, "opts", observation_info=env.observation_spec(),
                                   action_info=env.action_spec(), **options)
        logger.set_language_instruction("pick")
        wrapped = envlogger.EnvLogger(env, backend=logger,
                                      step_fn=lambda ts, a, e: {"speed": 0.1},
                                      episode_fn=lambda ts, a, e: {"operator": "ann"})
        ts = wrapped.reset()
        while not ts.last():
            ts = wrapped.step(act)
        wrapped.close()
        return logger
    logger.close()
    return logger


def _leaf(features: dict, *path: str) -> dict:
    node = features["featuresDict"]["features"]
    for key in path[:-1]:
        node = node[key]
        node = (node.get("sequence", {}).get("feature", node).get("featuresDict", {})
                .get("features", node))
    return node[path[-1]]


@pytest.mark.parametrize("front", FRONTS)
def test_every_front_takes_every_option_and_each_reaches_the_dataset(tmp_path, front):
    directory = str(tmp_path / front)
    os.makedirs(directory)
    open(os.path.join(directory, "notes.txt"), "w").write("kept")  # overwrite keeps notes
    logger = _log_one_episode(front, directory, **EVERY)
    assert logger.writer_stats["episodes"] == 1
    info = json.load(open(os.path.join(directory, "dataset_info.json")))
    assert info["description"] == "two steps of a test env"
    assert info["version"] == "1.2.3"
    features = json.load(open(os.path.join(directory, "features.json")))
    steps = features["featuresDict"]["features"]["steps"]["sequence"]["feature"]["featuresDict"][
        "features"]
    obs = steps["observation"]["featuresDict"]["features"]
    assert obs["cam"]["image"]["encodingFormat"] == "jpeg"  # image_codecs over image_codec
    assert obs["state"]["description"] == "joint angles"  # doc_field
    assert obs["state"]["tensor"]["encoding"] == "bytes"  # float64="exact"
    assert steps["reward"]["tensor"]["dtype"] == "float32"  # reward_dtype
    assert "language_instruction" in steps and "speed" in steps
    assert "operator" in features["featuresDict"]["features"]
    assert logger.writer_options == WriterOptions(
        shard_bytes=1 << 20, max_episodes_per_file=1, fsync=False, queue_episodes=2,
        commit_every_s=None)
    [episode] = reader.read_episodes(directory)
    assert episode["operator"] == b"ann"
    assert episode["steps"]["language_instruction"][0] == b"pick"
    assert open(os.path.join(directory, "notes.txt")).read() == "kept"


@pytest.mark.parametrize("front", FRONTS)
def test_an_unknown_option_is_an_error_naming_the_valid_ones(tmp_path, front):
    with pytest.raises(UnknownOptionError) as err:
        _log_one_episode(front, str(tmp_path / front), shard_byte=1 << 20)
    message = str(err.value)
    assert "unknown option 'shard_byte' (did you mean shard_bytes?)" in message
    assert message.endswith("the options are: " + ", ".join(LoggerOptions.names()))
    assert isinstance(err.value, TypeError)  # what Python raises for an unknown keyword
    assert not os.path.exists(tmp_path / front)  # refused before anything was created


def test_a_bundle_and_flat_keywords_combine_with_the_keywords_winning(dataset_dir):
    bundle = LoggerOptions(**{**EVERY, "version": "2.0.0", "description": "from the bundle"})
    logger = _log_one_episode("oxe", dataset_dir, options=bundle, description="from a keyword")
    info = json.load(open(os.path.join(dataset_dir, "dataset_info.json")))
    assert (info["version"], info["description"]) == ("2.0.0", "from a keyword")
    assert logger.writer_stats["episodes"] == 1
    with pytest.raises(ValueError, match="incomplete: expected 'keep' or 'drop', given 'lose'"):
        LoggerOptions(incomplete="lose")
    with pytest.raises(TypeError, match="options: expected a LoggerOptions, given dict"):
        OXEEnvLogger(RecordingEnv(OBS, ACT), "x", dataset_dir, options={"version": "1"})


def test_every_option_is_documented_on_the_bundle():
    doc = LoggerOptions.__doc__
    for name in LoggerOptions.names():
        assert f"\n      {name}:" in doc, name
