"""Bad input raises an error naming the key path, the expected and the given value; the dataset
stays readable with every earlier episode."""

from __future__ import annotations

import json
import os

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from oxe_envlogger import (
    AutoOXEEnvLogger,
    FeatureMismatchError,
    LoggerClosedError,
    NonFiniteError,
    OXEEnvLogger,
    RLDSLogger,
    RLDSStepType,
    SpecError,
    StepOrderError,
    UnknownKeyError,
    UnsupportedSpaceError,
)
from tests.helpers import RecordingEnv, read_tfds, run_episodes

OBS = spaces.Dict({"state": spaces.Box(-1, 1, (3,), np.float32),
                   "cam": spaces.Box(0, 255, (8, 8, 3), np.uint8)})
ACT = spaces.Box(-1, 1, (2,), np.float32)


class BadObsEnv(RecordingEnv):
    """Returns a bad observation at one step of one episode."""

    def __init__(self, bad, at_episode=2, at_step=2, **kw):
        super().__init__(OBS, ACT, episode_len=4, **kw)
        self.bad, self.at_episode, self.at_step = bad, at_episode, at_step

    def step(self, action):
        obs, *rest = super().step(action)
        if self._episode == self.at_episode and self._t == self.at_step:
            obs = self.bad(obs)
        return (obs, *rest)


def _logged_then_bad(dataset_dir, bad, error, match):
    env = OXEEnvLogger(BadObsEnv(bad), "errors", dataset_dir)
    run_episodes(env, 2)
    env.reset(seed=5)
    env.step(ACT.sample())
    with pytest.raises(error, match=match) as info:
        env.step(ACT.sample())
    env.close()
    episodes = read_tfds(dataset_dir)
    assert [bool(e["invalid"]) for e in episodes] == [False, False, True]
    assert len(episodes[2]["steps"]["is_first"]) == 2  # the episode up to the bad value, cut
    return info.value


def test_wrong_shape_names_path_expected_and_given(dataset_dir):
    err = _logged_then_bad(dataset_dir, lambda o: {**o, "state": np.zeros(4, np.float32)},
                           SpecError, "observation/state")
    assert err.path == "observation/state"
    assert "(3,)" in err.expected and "float32" in err.expected
    assert "(4,)" in err.given


def test_lossy_dtype_is_rejected(dataset_dir):
    err = _logged_then_bad(dataset_dir, lambda o: {**o, "state": np.full(3, 0.1, np.float64)},
                           SpecError, r"would change element 0")
    assert "float64" in err.given


def test_image_of_wrong_dtype(dataset_dir):
    _logged_then_bad(dataset_dir, lambda o: {**o, "cam": o["cam"].astype(np.float32) + 0.5},
                     SpecError, "observation/cam")


def test_unknown_and_missing_keys(dataset_dir):
    err = _logged_then_bad(dataset_dir, lambda o: {**o, "extra": 1}, UnknownKeyError,
                           "observation/extra")
    assert "unknown keys" in str(err)
    env = OXEEnvLogger(RecordingEnv(OBS, ACT), "missing", dataset_dir + "2")
    with pytest.raises(UnknownKeyError, match=r"missing keys .*observation/cam"):
        env._recorder.check_observation({"state": np.zeros(3, np.float32)})
    env.close()


def test_exact_conversions_are_accepted(dataset_dir):
    """int64 values that fit an int8 spec, float64 values exact in float32, python scalars."""
    space = spaces.Dict({"i": spaces.Box(-5, 5, (2,), np.int8), "f": spaces.Box(-1, 1, (), np.float32)})
    logger = RLDSLogger(space, spaces.Discrete(3), "exact", dataset_dir)
    logger(0, {"i": np.array([1, -2]), "f": 0.5}, 0.0, step_type=RLDSStepType.RESTART)
    logger(np.int64(2), {"i": [3, 4], "f": np.float64(0.25)}, 1.5,
           step_type=RLDSStepType.TERMINATION)
    with pytest.raises(SpecError, match="observation/i"):
        logger(0, {"i": np.array([300, 0]), "f": 0.5}, 0.0, step_type=RLDSStepType.RESTART)
    logger.close()
    steps = read_tfds(dataset_dir)[0]["steps"]
    np.testing.assert_array_equal(steps["observation"]["i"], [[1, -2], [3, 4]])
    assert steps["observation"]["i"].dtype == np.int8
    np.testing.assert_array_equal(steps["observation"]["f"], np.array([0.5, 0.25], np.float32))


def test_bad_action_is_rejected_before_the_env_steps(dataset_dir):
    inner = RecordingEnv(OBS, ACT, episode_len=4)
    env = OXEEnvLogger(inner, "action", dataset_dir)
    env.reset(seed=0)
    with pytest.raises(SpecError, match=r"^action: expected shape \(2,\) float32"):
        env.step(np.zeros(3, np.float32))
    assert inner._t == 0  # the env never saw the bad action
    env.step(ACT.sample())
    env.close()
    assert len(read_tfds(dataset_dir)[0]["steps"]["is_first"]) == 2


def test_nonfinite_counted_by_default_and_raised_when_strict(dataset_dir):
    def nan(o):
        return {**o, "state": np.array([np.nan, 0, np.inf], np.float32)}

    env = OXEEnvLogger(BadObsEnv(nan, at_episode=0), "nan", dataset_dir)
    run_episodes(env, 1)
    env.close()
    steps = read_tfds(dataset_dir)[0]["steps"]
    assert np.isnan(steps["observation"]["state"][2, 0])
    meta = json.load(open(os.path.join(dataset_dir, "oxe_envlogger.json")))
    assert meta["sessions"][0]["nonfinite_values"] == {"observation/state": 2}

    strict = OXEEnvLogger(BadObsEnv(nan, at_episode=0), "nan", dataset_dir + "_strict",
                          strict_finite=True)
    strict.reset(seed=0)
    strict.step(ACT.sample())
    with pytest.raises(NonFiniteError, match=r"observation/state: expected finite values, given nan at index \[0\]"):
        strict.step(ACT.sample())
    strict.close()


def test_step_order_errors(dataset_dir):
    env = OXEEnvLogger(RecordingEnv(OBS, ACT, episode_len=2), "order", dataset_dir)
    with pytest.raises(StepOrderError, match="before reset"):
        env.step(ACT.sample())
    env.reset(seed=0)
    env.step(ACT.sample())
    env.step(ACT.sample())  # episode ends (terminated)
    with pytest.raises(StepOrderError, match="after the episode ended"):
        env.step(ACT.sample())
    env.close()
    assert len(read_tfds(dataset_dir)) == 1


def test_metadata_keys_fixed_after_first_episode(dataset_dir):
    env = AutoOXEEnvLogger(RecordingEnv(OBS, ACT, episode_len=2), "meta", dataset_dir)
    env.reset(seed=0)
    env.set_step_metadata({"speed": 1.5})
    env.step(ACT.sample())
    env.step(ACT.sample())
    env.reset(seed=1)
    with pytest.raises(UnknownKeyError, match="new_key"):
        env.set_step_metadata({"new_key": 1})
    with pytest.raises(SpecError, match="speed: expected shape"):
        env.set_step_metadata({"speed": "fast"})
    with pytest.raises(SpecError, match="reserved"):
        AutoOXEEnvLogger(RecordingEnv(OBS, ACT), "m2", dataset_dir + "2",
                         step_metadata_info={"reward": float})
    env.close()


def test_unsupported_space_names_path(dataset_dir):
    space = spaces.Dict({"ok": spaces.Discrete(2), "seq": spaces.Sequence(spaces.Discrete(2))})
    with pytest.raises(UnsupportedSpaceError, match="observation/seq"):
        OXEEnvLogger(RecordingEnv(space, ACT), "unsupported", dataset_dir)


def test_closed_logger_and_bad_name(dataset_dir):
    env = OXEEnvLogger(RecordingEnv(OBS, ACT), "closed", dataset_dir)
    env.close()
    env.close()  # idempotent
    with pytest.raises(LoggerClosedError):
        env.set_step_metadata({"a": 1})
    with pytest.raises(ValueError, match="half_cheetah_v5"):
        OXEEnvLogger(RecordingEnv(OBS, ACT), "HalfCheetah-v5", dataset_dir + "2")


def test_language_not_declared(dataset_dir):
    env = OXEEnvLogger(RecordingEnv(OBS, ACT), "nolang", dataset_dir)
    with pytest.raises(SpecError, match="language_instruction"):
        env.set_language_instruction("pick")
    env.close()


def test_append_with_different_features_lists_differences(dataset_dir):
    env = OXEEnvLogger(RecordingEnv(OBS, ACT), "append", dataset_dir)
    run_episodes(env, 1)
    env.close()
    other = spaces.Dict({"state": spaces.Box(-1, 1, (4,), np.float32),
                         "cam": spaces.Box(0, 255, (8, 8, 3), np.uint8)})
    with pytest.raises(FeatureMismatchError) as info:
        OXEEnvLogger(RecordingEnv(other, spaces.Discrete(3)), "append", dataset_dir)
    diffs = "\n".join(info.value.differences)
    assert "steps/observation/state: shape (3,) float32" in diffs and "shape (4,) float32" in diffs
    assert "steps/action" in diffs
    assert len(read_tfds(dataset_dir)) == 1  # untouched
    env = OXEEnvLogger(RecordingEnv(other, spaces.Discrete(3)), "append", dataset_dir,
                       overwrite=True)
    run_episodes(env, 2)
    env.close()
    assert len(read_tfds(dataset_dir)) == 2


def test_append_same_features_adds_episodes(dataset_dir):
    for run in range(3):
        env = OXEEnvLogger(RecordingEnv(OBS, ACT, seed=run), "grow", dataset_dir)
        run_episodes(env, 2, seed=10 * run)
        env.close()
    episodes = read_tfds(dataset_dir)
    assert len(episodes) == 6
    assert len({e["episode_id"] for e in episodes}) == 6
    meta = json.load(open(os.path.join(dataset_dir, "oxe_envlogger.json")))
    assert [s["episodes"] for s in meta["sessions"]] == [2, 2, 2]


def test_gym_unwrapped_obs_error_from_env(dataset_dir):
    """A real env whose space says float32 but whose values are float64 and not exact."""

    class Liar(gym.Env):
        observation_space = spaces.Box(-1, 1, (2,), np.float32)
        action_space = spaces.Discrete(2)

        def reset(self, *, seed=None, options=None):
            return np.array([0.1, 0.2]), {}

        def step(self, action):
            return np.array([0.1, 0.2]), 0.0, True, False, {}

    env = AutoOXEEnvLogger(Liar(), "liar", dataset_dir)
    with pytest.raises(SpecError, match=r"observation: expected shape \(2,\) float32, given shape \(2,\) float64"):
        env.reset()
    env.close()


def test_a_dataset_path_that_is_a_file_is_one_clear_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a dataset")
    with pytest.raises(NotADirectoryError) as err:
        AutoOXEEnvLogger(RecordingEnv(OBS, ACT), "ds", str(path))
    assert str(err.value) == f"{path}: a file, not a dataset directory"
    assert path.read_text() == "not a dataset"
