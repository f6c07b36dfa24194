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


SLASH_OBS = spaces.Dict({"cam/left": spaces.Box(-1, 1, (2,), np.float32),
                         "cam": spaces.Dict({"left": spaces.Box(-1, 1, (3,), np.float32)})})


@pytest.mark.parametrize("front", ["oxe", "auto", "rlds", "vector"])
def test_key_with_slash_is_refused_when_the_logger_is_built(dataset_dir, front):
    """tfds stores "cam/left" and "cam" -> "left" under one name: the dataset would be
    unreadable, so the declared space is refused before anything is written."""
    env = RecordingEnv(SLASH_OBS, ACT)
    with pytest.raises(SpecError, match=r"^observation/cam/left: expected a dict key that is a "
                                        r"non-empty str without '/', given 'cam/left'") as info:
        if front == "oxe":
            OXEEnvLogger(env, "slash", dataset_dir)
        elif front == "auto":
            AutoOXEEnvLogger(env, "slash", dataset_dir)
        elif front == "rlds":
            RLDSLogger(SLASH_OBS, ACT, "slash", dataset_dir)
        else:
            from oxe_envlogger import VectorOXEEnvLogger

            VectorOXEEnvLogger(gym.vector.SyncVectorEnv([lambda: env]), "slash", dataset_dir)
    assert info.value.path == "observation/cam/left" and "'cam_left'" in str(info.value)
    assert not os.path.exists(dataset_dir)  # nothing was written, nothing is left
    with pytest.raises(SpecError, match=r"^action/: expected a dict key that is a non-empty"):
        OXEEnvLogger(RecordingEnv(OBS, spaces.Dict({"": ACT})), "empty", dataset_dir + "2")


def test_key_with_slash_in_inferred_or_declared_values(dataset_dir):
    """Inferred specs are checked when the first value arrives, before anything changes."""
    logger = RLDSLogger(None, ACT, "slash", dataset_dir)
    with pytest.raises(SpecError, match=r"^observation/a/b: expected a dict key"):
        logger(None, {"a/b": np.zeros(2, np.float32)}, 0.0, step_type=RLDSStepType.RESTART)
    logger(None, {"a_b": np.zeros(2, np.float32)}, 0.0, step_type=RLDSStepType.RESTART)
    with pytest.raises(SpecError, match=r"^info/x/y: expected a dict key"):
        logger.set_step_metadata({"info": {"x/y": 1.0}, "speed": 2.0})
    logger(ACT.sample(), {"a_b": np.ones(2, np.float32)}, 1.0,
           step_type=RLDSStepType.TERMINATION)
    logger.close()
    (episode,) = read_tfds(dataset_dir)
    assert sorted(episode["steps"]["observation"]) == ["a_b"]
    assert "info" not in episode["steps"] and "speed" not in episode["steps"]  # nothing changed
    with pytest.raises(SpecError, match=r"^info/x/y: expected a dict key"):
        OXEEnvLogger(RecordingEnv(OBS, ACT), "declared", dataset_dir + "2",
                     episode_metadata_info={"info": {"x/y": float}})


def _suggested(err: Exception, option: str):
    """The declaration an error suggests (``option={...}``), evaluated as a user would paste it."""
    import re

    m = re.search(rf"{option}=(\{{.*?\}}) \(every logger takes it", str(err))
    assert m, str(err)
    return eval(m[1], {"gym": gym, "np": np})


def test_keys_first_set_after_the_first_episode_say_how_to_declare_them(dataset_dir):
    env = AutoOXEEnvLogger(RecordingEnv(OBS, ACT, episode_len=2), "late", dataset_dir)
    run_episodes(env, 1)
    env.reset(seed=1)
    first = r"fixed by its first episode, which did not set it; declare it when creating"
    with pytest.raises(UnknownKeyError, match=first) as step_err:
        env.set_step_metadata({"grip": np.zeros(3, np.float32)})
    assert "AutoOXEEnvLogger too" in str(step_err.value)
    with pytest.raises(UnknownKeyError, match=r"episode_metadata_info=\{'success': bool\}") as ep_err:
        env.set_episode_metadata({"success": True})
    with pytest.raises(SpecError, match=r"language_instruction=True \(every logger takes it"):
        env.set_language_instruction("pick")
    run_episodes(env, 1, seed=1)  # the run goes on
    env.close()
    assert len(read_tfds(dataset_dir)) == 2

    # What the errors suggest works: the keys first set in the second episode are logged.
    grip = _suggested(step_err.value, "step_metadata_info")
    assert isinstance(grip["grip"], spaces.Box) and grip["grip"].shape == (3,)
    env = AutoOXEEnvLogger(RecordingEnv(OBS, ACT, episode_len=2), "late", dataset_dir + "2",
                           step_metadata_info=grip, language_instruction=True,
                           episode_metadata_info=_suggested(ep_err.value,
                                                            "episode_metadata_info"))
    run_episodes(env, 1)
    env.reset(seed=1)
    env.set_step_metadata({"grip": np.ones(3, np.float32)})
    env.set_episode_metadata({"success": True})
    env.set_language_instruction("pick")
    env.step(ACT.sample())
    env.close()
    first_ep, second_ep = read_tfds(dataset_dir + "2")
    np.testing.assert_array_equal(first_ep["steps"]["grip"], np.zeros((3, 3), np.float32))
    np.testing.assert_array_equal(second_ep["steps"]["grip"], np.ones((2, 3), np.float32))
    assert [bool(first_ep["success"]), bool(second_ep["success"])] == [False, True]
    assert list(second_ep["steps"]["language_instruction"]) == [b"pick"] * 2

    # Declared features and an appended dataset say so.
    env = OXEEnvLogger(RecordingEnv(OBS, ACT), "late", dataset_dir + "3")
    with pytest.raises(UnknownKeyError, match=r"the logger's declarations fixed the features; "
                                              r"declare it when creating the logger: "
                                              r"step_metadata_info=\{'x': int\}"):
        env.set_step_metadata({"x": 1})
    env.close()
    env = AutoOXEEnvLogger(RecordingEnv(OBS, ACT), "late", dataset_dir)
    with pytest.raises(UnknownKeyError, match=r"the dataset being appended to .* has no such "
                                              r"feature; .* overwrite=True"):
        env.set_step_metadata({"grip": np.zeros(3, np.float32)})
    env.close()


def test_metadata_none_and_lists_of_strings_name_a_workaround(dataset_dir):
    env = AutoOXEEnvLogger(RecordingEnv(OBS, ACT, episode_len=1), "none", dataset_dir)
    env.reset(seed=0)
    with pytest.raises(UnsupportedSpaceError, match=r"^info/x: None has no feature .*"
                                                    r"step_metadata_info=\{'info': \{'x': "
                                                    r"float\}\}"):
        env.set_step_metadata({"info": {"x": None}})
    with pytest.raises(UnsupportedSpaceError, match=r"^names: .*log a tuple of str"):
        env.set_step_metadata({"names": ["cup", "plate"]})
    env.set_step_metadata({"names": ("cup", "plate"), "x": 0.5})
    with pytest.raises(SpecError, match=r"^x: expected shape \(\) float64, given None "
                                        r"\(None is not a value"):
        env.set_step_metadata({"x": None})
    env.step(ACT.sample())
    env.close()
    steps = read_tfds(dataset_dir)[0]["steps"]
    assert list(steps["names"]["0"]) == [b"cup"] * 2 and list(steps["names"]["1"]) == [b"plate"] * 2


class OutOfSpaceEnv(RecordingEnv):
    """Observation "state" (Box(-1, 1, (3,))) at [2, 0, -3] at step 2 of episode 0."""

    def step(self, action):
        obs, *rest = super().step(action)
        if self._episode == 0 and self._t == 2:
            obs = {**obs, "state": np.array([2, 0, -3], np.float32)}
            self.episodes[-1]["obs"][-1] = obs
        return (obs, *rest)


def test_out_of_bounds_counted_by_default_and_raised_when_strict(dataset_dir, caplog):
    from oxe_envlogger import OutOfBoundsError
    from oxe_envlogger.datasets import inspection

    act = spaces.Discrete(3, start=1)  # the final step's zero action lies outside: not counted
    env = OXEEnvLogger(OutOfSpaceEnv(OBS, act, episode_len=3), "bounds", dataset_dir)
    env.reset(seed=0)
    env.step(np.int64(7))
    env.step(np.int64(2))
    env.step(np.int64(3))
    with caplog.at_level("WARNING", logger="oxe_envlogger.collect.writer"):
        env.close()
    steps = read_tfds(dataset_dir)[0]["steps"]
    assert steps["action"].tolist() == [7, 2, 3, 0]  # logged as given
    np.testing.assert_array_equal(steps["observation"]["state"][2], [2, 0, -3])
    counts = {"observation/state": 2, "action": 1}
    meta = json.load(open(os.path.join(dataset_dir, "oxe_envlogger.json")))
    assert meta["sessions"][0]["out_of_bounds_values"] == counts
    assert "values outside the declared spaces logged" in caplog.text and "'action': 1" in caplog.text
    summary = inspection.summarize(dataset_dir)
    assert summary["provenance"]["out_of_bounds_values"] == counts
    assert "values outside the declared spaces logged" in inspection.format_summary(summary)

    # Bounds are not part of the feature: a wider space appends to the same dataset.
    features = open(os.path.join(dataset_dir, "features.json")).read()
    wide = spaces.Dict({"state": spaces.Box(-5, 5, (3,), np.float32), "cam": OBS["cam"]})
    env = OXEEnvLogger(RecordingEnv(wide, spaces.Discrete(9)), "bounds", dataset_dir)
    run_episodes(env, 1)
    env.close()
    assert open(os.path.join(dataset_dir, "features.json")).read() == features
    assert len(read_tfds(dataset_dir)) == 2
    assert inspection.summarize(dataset_dir)["provenance"]["out_of_bounds_values"] == counts

    inner = OutOfSpaceEnv(OBS, act, episode_len=3)
    strict = OXEEnvLogger(inner, "bounds", dataset_dir + "_strict", strict_bounds=True)
    strict.reset(seed=0)
    with pytest.raises(OutOfBoundsError, match=r"^action: expected a value in \[1, 3\], given "
                                               r"np.int64\(7\) \(the declared space's bounds"):
        strict.step(np.int64(7))
    assert inner._t == 0  # the env never saw the action
    strict.step(np.int64(2))
    with pytest.raises(OutOfBoundsError, match=r"^observation/state: expected a value in "
                                               r"\[-1.0, 1.0\], given np.float32\(2.0\) at "
                                               r"index \[0\]") as info:
        strict.step(np.int64(2))
    assert isinstance(info.value, SpecError) and info.value.path == "observation/state"
    strict.close()
    assert len(read_tfds(dataset_dir + "_strict")[0]["steps"]["is_first"]) == 2


def _dm_walk():
    """A dm_env env whose action spec is DiscreteArray(3) (a BoundedArray: bounds [0, 2])."""
    import dm_env
    from dm_env import specs as dm_specs

    class Walk(dm_env.Environment):
        def reset(self):
            self.t = 0
            return dm_env.restart(np.zeros(2, np.float32))

        def step(self, action):
            self.t += 1
            obs = np.full(2, self.t, np.float32)
            return dm_env.truncation(0.0, obs) if self.t == 2 else dm_env.transition(0.0, obs)

        def observation_spec(self):
            return dm_specs.BoundedArray((2,), np.float32, -1, 1)

        def action_spec(self):
            return dm_specs.DiscreteArray(3)

    return Walk()


@pytest.mark.parametrize("front", ["oxe", "auto", "rlds", "vector", "dm", "backend"])
@pytest.mark.parametrize("strict", [False, True])
def test_every_front_counts_or_refuses_values_outside_the_space(dataset_dir, front, strict):
    """Action 7 for Discrete(3) (DiscreteArray(3) on the dm_env fronts): counted, or refused
    with strict_bounds=True before the env steps."""
    from oxe_envlogger import DmEnvLogger, OutOfBoundsError, RLDSBackendWriter, VectorOXEEnvLogger

    box = spaces.Box(-1, 1, (2,), np.float32)
    act = spaces.Discrete(3)
    kw = {"strict_bounds": strict}
    if front in ("oxe", "auto", "vector"):
        inner = RecordingEnv(box, act, episode_len=2)
        if front == "vector":
            logger = VectorOXEEnvLogger(gym.vector.SyncVectorEnv([lambda: inner]), "b", dataset_dir,
                                        **kw)
            logger.reset(seed=0)
            log_bad = lambda: logger.step(np.array([7]))  # noqa: E731
        else:
            logger = (OXEEnvLogger if front == "oxe" else AutoOXEEnvLogger)(inner, "b", dataset_dir,
                                                                            **kw)
            logger.reset(seed=0)
            log_bad = lambda: logger.step(7)  # noqa: E731
    elif front == "rlds":
        logger = RLDSLogger(box, act, "b", dataset_dir, **kw)
        logger(None, np.zeros(2, np.float32), 0.0, step_type=RLDSStepType.RESTART)
        log_bad = lambda: logger(7, np.zeros(2, np.float32), 0.0)  # noqa: E731
    elif front == "dm":
        logger = DmEnvLogger(_dm_walk(), "b", dataset_dir, **kw)
        logger.reset()
        log_bad = lambda: logger.step(np.int64(7))  # noqa: E731
    else:
        walk = _dm_walk()
        logger = RLDSBackendWriter(dataset_dir, "b", observation_info=walk.observation_spec(),
                                   action_info=walk.action_spec(), **kw)
        rec = logger._recorder
        rec.begin(np.zeros(2, np.float32))
        log_bad = lambda: rec.step(rec.check_action(np.int64(7)), 0.0,  # noqa: E731
                                   np.zeros(2, np.float32), terminated=False, truncated=True)
    if strict:
        with pytest.raises(OutOfBoundsError, match=r"^action: expected a value in \[0, 2\]"):
            log_bad()
        logger.close()
        return
    log_bad()
    logger.close()
    meta = json.load(open(os.path.join(dataset_dir, "oxe_envlogger.json")))
    assert meta["sessions"][0]["out_of_bounds_values"] == {"action": 1}


def test_a_dataset_path_that_is_a_file_is_one_clear_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a dataset")
    with pytest.raises(NotADirectoryError) as err:
        AutoOXEEnvLogger(RecordingEnv(OBS, ACT), "ds", str(path))
    assert str(err.value) == f"{path}: a file, not a dataset directory"
    assert path.read_text() == "not a dataset"
