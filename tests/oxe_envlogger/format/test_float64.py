"""float64 storage: by default a float list (what tfds itself writes for a float64 Tensor, and
what the Open X-Embodiment / Octo loaders that skip tfds' decoding read as numbers), rounded to
float32; ``float64="exact"`` keeps raw float64 bytes. Every front takes the option, the checker
refuses what float32 cannot hold, appends keep a dataset's storage, and datasets stored either
way read the same through every reader of ours."""

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
    NonFiniteError,
    OXEEnvLogger,
    RLDSLogger,
    RLDSStepType,
    SpecError,
)
from oxe_envlogger.datasets import inspection
from oxe_envlogger.datasets.validate import validate
from oxe_envlogger.format import layout, reader, specs, stats
from oxe_envlogger.spaces import declaration_to_spec, space_to_spec
from tests.helpers import (
    RecordingEnv,
    float32_rounded,
    read_tfds,
    read_tfds_skip_decoding,
    run_episodes,
)

F64 = spaces.Box(-np.inf, np.inf, (3,), np.float64)
ACT = spaces.Box(-1, 1, (2,), np.float32)


def _features(directory: str) -> dict[str, dict]:
    """``{leaf path: its tensor JSON}`` of a dataset's features.json."""
    spec = reader.read_spec(directory)
    return {path: specs.spec_to_features_json(leaf).get("tensor", {})
            for path, leaf in specs.iter_leaves(spec)}


def test_default_features_json_is_what_tfds_writes_for_float64():
    """Our features for a float64 Box, a float64 reward and a ``float`` metadata declaration
    are byte for byte what tfds writes for ``Tensor(dtype=float64)`` (encoding none);
    ``float64="exact"`` is tfds' ``encoding="bytes"``."""
    import tensorflow_datasets as tfds
    from google.protobuf import json_format

    for storage, encoding in (("float32", "none"), ("exact", "bytes")):
        ours = specs.Group({
            "box": space_to_spec(F64, float64=storage),
            "reward": specs.tensor((), np.float64, float64=storage),
            "meta": declaration_to_spec(float, path="meta", float64=storage),
        })
        theirs = tfds.features.FeaturesDict({
            "box": tfds.features.Tensor(shape=(3,), dtype=np.float64, encoding=encoding),
            "reward": tfds.features.Tensor(shape=(), dtype=np.float64, encoding=encoding),
            "meta": tfds.features.Tensor(shape=(), dtype=np.float64, encoding=encoding),
        })
        assert specs.spec_to_features_json(ours) == json_format.MessageToDict(theirs.to_proto())
    # A declared tfds feature keeps its own encoding whatever the option says.
    declared = tfds.features.Tensor(shape=(2,), dtype=np.float64, encoding="bytes")
    assert declaration_to_spec(declared, path="x", float64="float32").encoding == "bytes"
    with pytest.raises(ValueError, match=r"float64: expected one of \['float32', 'exact'\], "
                                         r"given 'float16'"):
        specs.tensor((), np.float64, float64="float16")


def test_checker_rounds_refuses_overflow_and_keeps_non_finite():
    leaf = specs.tensor((3,), np.float64)
    check = specs.leaf_checker(leaf, "observation/state")
    got = check(np.array([0.1, np.nan, -np.inf]))
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, [np.float32(0.1), np.nan, -np.inf])
    # Just above float32's largest value rounds down to it; a value that would round to
    # infinity is refused, naming the key path and the element.
    top = float(np.finfo(np.float32).max)
    np.testing.assert_array_equal(check([top * (1 + 2**-26), 1e-50, -1.0]), [top, 0.0, -1.0])
    with pytest.raises(SpecError, match=r"^observation/state: expected a value float32 can hold "
                                        r"\(\|x\| <= 3.4028235e\+38\), given 1e\+300 at index "
                                        r"\[1\] \(float64 values are stored as float32.*"
                                        r"float64='exact' stores float64 values exactly\)$"):
        check(np.array([0.0, 1e300, 0.0]))
    reward = specs.leaf_checker(specs.tensor((), np.float64), "reward")
    assert reward(0.1) == float(np.float32(0.1)) and reward(np.float64(2.5)) == 2.5
    with pytest.raises(SpecError, match=r"^reward: expected a value float32 can hold"):
        reward(-1e39)
    strict = specs.leaf_checker(leaf, "observation/state", strict_finite=True)
    with pytest.raises(NonFiniteError):
        strict(np.array([0.0, np.nan, 0.0]))
    # Exact storage takes every float64 value as it is.
    exact = specs.leaf_checker(specs.tensor((3,), np.float64, float64="exact"), "x")
    np.testing.assert_array_equal(exact([0.1, 1e300, 5e-324]), [0.1, 1e300, 5e-324])


class _Overflowing(RecordingEnv):
    """Its third observation holds a value float32 cannot hold; rewards are large too."""

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        if self._t == 2:
            obs = np.array([0.0, 1e39, 0.0])
        return obs, reward, terminated, truncated, info


def test_logging_refuses_overflow_counts_non_finite_and_stats_see_stored_values(dataset_dir):
    env = OXEEnvLogger(_Overflowing(F64, ACT, episode_len=5), "f64", dataset_dir)
    env.reset(seed=0)
    env.step(ACT.sample())
    with pytest.raises(SpecError, match=r"^observation: expected a value float32 can hold .* "
                                        r"given 1e\+39 at index \[1\]"):
        env.step(ACT.sample())
    env.close()

    class NonFinite(RecordingEnv):
        def step(self, action):
            _, *rest = super().step(action)
            return (np.array([np.nan, np.inf, 0.1 * self._t]), *rest)

    env = OXEEnvLogger(NonFinite(F64, ACT, episode_len=4), "f64", dataset_dir + "_nan")
    run_episodes(env, 1)
    env.close()
    meta = json.load(open(os.path.join(dataset_dir + "_nan", layout.METADATA)))
    assert meta["sessions"][0]["nonfinite_values"]["observation"] == 8

    env = OXEEnvLogger(RecordingEnv(F64, ACT, episode_len=7), "f64", dataset_dir + "_stats")
    run_episodes(env, 3)
    env.close()
    loaded, _ = stats.load(dataset_dir + "_stats")
    obs = np.concatenate([e["steps"]["observation"][:-1] for e in read_tfds(dataset_dir + "_stats")])
    summary = loaded.keys["observation"].summary()
    # The statistics are those of the stored (rounded) values, as any reader computes them.
    np.testing.assert_array_equal(summary["min"], obs.min(0))
    np.testing.assert_array_equal(summary["max"], obs.max(0))
    np.testing.assert_allclose(summary["mean"], obs.mean(0), rtol=1e-12)


def _dm_env():
    """A dm_env env with float64 observations and rewards (dm_env's default reward spec)."""
    import dm_env
    from dm_env import specs as dm_specs

    class Walk(dm_env.Environment):
        def reset(self):
            self.t = 0
            return dm_env.restart(np.zeros(3))

        def step(self, action):
            self.t += 1
            obs = np.full(3, 0.1 * self.t)
            return (dm_env.truncation(0.1 * self.t, obs) if self.t == 3
                    else dm_env.transition(0.1 * self.t, obs))

        def observation_spec(self):
            return dm_specs.Array((3,), np.float64)

        def action_spec(self):
            return dm_specs.BoundedArray((2,), np.float32, -1, 1)

    return Walk()


def _log_with(front: str, directory: str, **kw) -> None:
    """Logs two episodes with float64 observations and rewards through ``front``."""
    from oxe_envlogger import DmEnvLogger, RLDSBackendWriter, VectorOXEEnvLogger

    if front in ("oxe", "auto"):
        cls = OXEEnvLogger if front == "oxe" else AutoOXEEnvLogger
        logger = cls(RecordingEnv(F64, ACT, episode_len=3), "f", directory, **kw)
        run_episodes(logger, 2)
    elif front == "vector":
        venv = gym.vector.SyncVectorEnv([lambda: RecordingEnv(F64, ACT, episode_len=3)])
        logger = VectorOXEEnvLogger(venv, "f", directory, **kw)
        logger.reset(seed=0)
        for _ in range(7):
            logger.step(np.zeros((1, 2), np.float32))
    elif front == "rlds":
        logger = RLDSLogger(F64, ACT, "f", directory, **kw)
        for ep in range(2):
            logger(None, np.full(3, 0.1 * ep), 0.0, step_type=RLDSStepType.RESTART)
            logger(np.zeros(2, np.float32), np.full(3, 0.3), 0.1)
            logger(np.zeros(2, np.float32), np.full(3, 0.7), 0.2,
                   step_type=RLDSStepType.TRUNCATION)
    elif front == "dm":
        logger = DmEnvLogger(_dm_env(), "f", directory, **kw)
        for _ in range(2):
            ts = logger.reset()
            while not ts.last():
                ts = logger.step(np.zeros(2, np.float32))
    else:
        import envlogger

        walk = _dm_env()
        logger = RLDSBackendWriter(directory, "f", observation_info=walk.observation_spec(),
                                   action_info=walk.action_spec(), **kw)
        env = envlogger.EnvLogger(walk, backend=logger)
        for _ in range(2):
            ts = env.reset()
            while not ts.last():
                ts = env.step(np.zeros(2, np.float32))
        env.close()
    logger.close()


@pytest.mark.parametrize("front", ["oxe", "auto", "vector", "rlds", "dm", "backend"])
def test_every_front_takes_the_float64_option(tmp_path, front):
    """Default: float64 observations and rewards reach a SkipDecoding loader as float64
    numbers, rounded to float32; ``float64="exact"``: raw bytes, exact through tfds."""
    default, exact = str(tmp_path / "default"), str(tmp_path / "exact")
    _log_with(front, default)
    _log_with(front, exact, float64="exact")
    for directory, encoding in ((default, "none"), (exact, "bytes")):
        features = _features(directory)
        assert features["steps/observation"]["encoding"] == encoding
        assert features["steps/reward"]["encoding"] == encoding
    raw = read_tfds_skip_decoding(default)
    assert len(raw) == 2
    assert raw[0]["step_dtypes"]["observation"].name == "float64"
    assert raw[0]["step_dtypes"]["reward"].name == "float64"
    assert read_tfds_skip_decoding(exact)[0]["step_dtypes"]["observation"].name == "string"
    for got, want in zip(read_tfds(default), read_tfds(exact)):
        for key in ("observation", "reward"):
            assert got["steps"][key].dtype == want["steps"][key].dtype == np.float64
            np.testing.assert_array_equal(got["steps"][key], float32_rounded(want["steps"][key]))


def test_appending_keeps_the_storage_of_the_dataset(dataset_dir):
    """A logger whose float64 storage is not given appends to a dataset stored either way;
    one that asks for the other storage gets a FeatureMismatchError that says how to match."""
    env = OXEEnvLogger(RecordingEnv(F64, ACT, episode_len=3), "f", dataset_dir, float64="exact")
    run_episodes(env, 1)
    env.close()
    before = _features(dataset_dir)
    env = OXEEnvLogger(RecordingEnv(F64, ACT, episode_len=3, seed=1), "f", dataset_dir)
    run_episodes(env, 1)
    env.close()
    assert _features(dataset_dir) == before
    episodes = read_tfds(dataset_dir)
    assert len(episodes) == 2
    assert episodes[1]["steps"]["reward"][0] == 1.1  # exact: 1.1 is not a float32
    with pytest.raises(FeatureMismatchError) as err:
        OXEEnvLogger(RecordingEnv(F64, ACT), "f", dataset_dir, float64="float32")
    text = str(err.value)
    assert ("steps/observation: shape (3,) float64 encoding=bytes, float64 stored exactly vs "
            "shape (3,) float64 encoding=none, float64 stored as float32; the loggers' "
            "float64='float32'|'exact' chooses, tools/reshard_rlds.py --float64 converts a "
            "dataset") in text
    assert "steps/reward:" in text

    other = dataset_dir + "_f32"
    for seed in range(2):  # float32-stored: the default appends with float32 storage too
        env = OXEEnvLogger(RecordingEnv(F64, ACT, episode_len=3, seed=seed), "f", other)
        run_episodes(env, 1)
        env.close()
    assert _features(other)["steps/observation"]["encoding"] == "none"
    with pytest.raises(FeatureMismatchError, match="float64 stored as float32 vs"):
        OXEEnvLogger(RecordingEnv(F64, ACT), "f", other, float64="exact")


def test_exact_datasets_read_the_same_through_every_reader(dataset_dir):
    """Datasets written before float32 storage was the default (float64 as raw bytes) stay
    readable by tfds, our reader, the validator, statistics, inspection and the trainer's
    loader, all with the same float64 values."""
    from openx_train.data import load_dataset

    env = OXEEnvLogger(RecordingEnv(spaces.Dict({"state": F64}), ACT, episode_len=4), "f",
                       dataset_dir, float64="exact")
    run_episodes(env, 2)
    env.close()
    want = env.unwrapped.episodes
    report = validate(dataset_dir)
    assert report.ok and not report.num_warnings, report.format()
    assert inspection.summarize(dataset_dir)["episodes"] == 2
    loaded, _ = stats.load(dataset_dir)
    tfds_eps = read_tfds(dataset_dir)
    ours = list(reader.read_episodes(dataset_dir))
    trainer = list(load_dataset(dataset_dir, "train").as_numpy_iterator())
    for got, mine, train, rec in zip(tfds_eps, ours, trainer, want):
        state = np.stack([o["state"] for o in rec["obs"]])
        for steps in (got["steps"], mine["steps"], train["steps"]):
            np.testing.assert_array_equal(steps["observation"]["state"], state)
            np.testing.assert_array_equal(steps["reward"][:-1], rec["rewards"])
            assert steps["observation"]["state"].dtype == np.float64
    states = np.concatenate([e["steps"]["observation"]["state"][:-1] for e in ours])
    np.testing.assert_array_equal(loaded.keys["observation/state"].summary()["max"],
                                  states.max(0))
