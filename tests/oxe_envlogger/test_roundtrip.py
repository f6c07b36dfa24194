"""Every space type logged, read back with tfds.builder_from_directory, compared exactly with
what the env returned (recorded independently of the logger): float64 rounded to float32 by
default, bit for bit with ``float64="exact"``."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from oxe_envlogger import OXEEnvLogger
from oxe_envlogger.format.specs import iter_leaves
from oxe_envlogger.spaces import space_to_spec
from tests.helpers import RecordingEnv, float32_rounded, read_tfds, run_episodes, tree_get

BIG = np.iinfo(np.int64).max

SPACES = {
    "box_f32": spaces.Box(-2, 2, (3,), np.float32),
    "box_f64_2d": spaces.Box(-1e300, 1e300, (2, 2), np.float64),  # exact storage only
    "box_f64": spaces.Box(-3e38, 3e38, (3,), np.float64),
    "box_f16": spaces.Box(-5, 5, (4,), np.float16),
    "box_i8": spaces.Box(-128, 127, (3,), np.int8),
    "box_i16": spaces.Box(-30000, 30000, (2,), np.int16),
    "box_i32": spaces.Box(-(2**31), 2**31 - 1, (2,), np.int32),
    "box_i64": spaces.Box(-BIG, BIG, (2,), np.int64),
    "box_u8_vector": spaces.Box(0, 255, (5,), np.uint8),
    "box_u16": spaces.Box(0, 65535, (3,), np.uint16),
    "box_u32": spaces.Box(0, 2**32 - 1, (3,), np.uint32),
    "box_bool": spaces.Box(0, 1, (4,), np.bool_),
    "scalar_f32": spaces.Box(-1, 1, (), np.float32),
    "image_rgb": spaces.Box(0, 255, (24, 32, 3), np.uint8),
    "image_gray": spaces.Box(0, 255, (16, 16, 1), np.uint8),
    "image_rgba": spaces.Box(0, 255, (16, 8, 4), np.uint8),
    "depth_f32": spaces.Box(0, 10, (12, 12), np.float32),
    "discrete": spaces.Discrete(7, start=-3),
    "multi_discrete": spaces.MultiDiscrete([3, 5, 2]),
    "multi_binary": spaces.MultiBinary(6),
    "text": spaces.Text(min_length=0, max_length=12),
    "dict_nested": spaces.Dict({"a": spaces.Box(-1, 1, (2,), np.float32),
                                "b": spaces.Dict({"c": spaces.Discrete(3),
                                                  "d": spaces.Text(5)})}),
    "tuple": spaces.Tuple((spaces.Box(-1, 1, (2,), np.float64), spaces.Discrete(4))),
}


def _leaf_values(space: gym.Space, value):
    """Yields (path, value) in spec order, for values recorded by the env."""
    spec = space_to_spec(space)
    for path, _ in iter_leaves(spec):
        v = value
        if path:
            for k in path.split("/"):
                v = v[int(k)] if isinstance(v, tuple) else v[k]
        yield path, v


def _assert_equal(got, want, path, float64):
    if isinstance(want, str):
        assert got == want.encode(), path
        return
    want = np.asarray(want)
    if want.dtype == np.float64 and float64 == "float32":
        want = float32_rounded(want)
    got = np.asarray(got)
    assert got.shape == want.shape, (path, got.shape, want.shape)
    assert got.dtype == want.dtype or (want.dtype == np.int64 and got.dtype == np.int64), \
        (path, got.dtype, want.dtype)
    np.testing.assert_array_equal(got, want, err_msg=path)


# Every space with the default storage of float64 (whose range is float32's), and the spaces
# holding float64 values with exact storage too.
_CASES = ([(name, "float32") for name in sorted(SPACES) if name != "box_f64_2d"]
          + [(name, "exact") for name in ("box_f32", "box_f64", "box_f64_2d", "tuple")])


@pytest.mark.parametrize(("name", "float64"), _CASES)
def test_space_roundtrips_exactly_through_tfds(name, float64, dataset_dir):
    space = SPACES[name]
    env = RecordingEnv(space, space, episode_len=4)
    logger = OXEEnvLogger(env, "roundtrip", dataset_dir, float64=float64)
    run_episodes(logger, 3)
    logger.close()
    episodes = read_tfds(dataset_dir)
    assert len(episodes) == 3
    for got, want in zip(episodes, env.episodes):
        steps = got["steps"]
        n = len(want["obs"])
        assert len(steps["is_first"]) == n == len(want["actions"]) + 1
        for t in range(n):
            for path, value in _leaf_values(space, want["obs"][t]):
                key = f"observation/{path}" if path else "observation"
                _assert_equal(tree_get(steps, key)[t], value, f"{key}[{t}]", float64)
            if t < n - 1:
                for path, value in _leaf_values(space, want["actions"][t]):
                    key = f"action/{path}" if path else "action"
                    _assert_equal(tree_get(steps, key)[t], value, f"{key}[{t}]", float64)
        _assert_equal(steps["reward"][:-1], np.array(want["rewards"]), "reward", float64)
        assert steps["reward"].dtype == np.float64
        assert steps["reward"][-1] == 0.0
        np.testing.assert_array_equal(steps["is_first"], [True] + [False] * (n - 1))
        np.testing.assert_array_equal(steps["is_last"], [False] * (n - 1) + [True])
        np.testing.assert_array_equal(steps["is_terminal"],
                                      [False] * (n - 1) + [want["terminated"]])
        expected_discount = [1.0] * (n - 2) + [0.0 if want["terminated"] else 1.0] * 2
        np.testing.assert_array_equal(steps["discount"], expected_discount)
        assert not got["invalid"]


def test_final_step_action_is_zero(dataset_dir):
    space = SPACES["dict_nested"]
    env = RecordingEnv(space, space, episode_len=3)
    logger = OXEEnvLogger(env, "zeros", dataset_dir)
    run_episodes(logger, 1)
    logger.close()
    steps = read_tfds(dataset_dir)[0]["steps"]
    assert np.all(steps["action"]["a"][-1] == 0)
    assert steps["action"]["b"]["c"][-1] == 0
    assert steps["action"]["b"]["d"][-1] == b""


def test_jpeg_codec_is_close_and_png_exact(dataset_dir):
    space = spaces.Dict({"cam": spaces.Box(0, 255, (32, 32, 3), np.uint8),
                         "wrist": spaces.Box(0, 255, (32, 32, 3), np.uint8)})

    class Smooth(RecordingEnv):
        def reset(self, **kw):
            obs, info = super().reset(**kw)
            return self._smooth(obs), info

        def step(self, action):
            obs, *rest = super().step(action)
            return (self._smooth(obs), *rest)

        def _smooth(self, obs):
            y, x = np.mgrid[0:32, 0:32]
            img = np.stack([x * 8, y * 8, (x + y) * 4], -1).astype(np.uint8)
            obs = {"cam": img, "wrist": img}
            self.episodes[-1]["obs"][-1] = obs
            return obs

    env = Smooth(space, spaces.Discrete(2), episode_len=3)
    logger = OXEEnvLogger(env, "codecs", dataset_dir,
                          image_codecs={"observation/wrist": "jpeg:90"})
    run_episodes(logger, 1)
    logger.close()
    steps = read_tfds(dataset_dir)[0]["steps"]
    want = np.stack([o["cam"] for o in env.episodes[0]["obs"]])
    np.testing.assert_array_equal(steps["observation"]["cam"], want)
    diff = np.abs(steps["observation"]["wrist"].astype(int) - want.astype(int))
    assert diff.mean() < 3.0 and not np.array_equal(steps["observation"]["wrist"], want)


def _assert_trees_equal(got, want, path=""):
    """The same nested keys and the same values (text as bytes)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), (path, got, want)
        for k in want:
            _assert_trees_equal(got[k], want[k], f"{path}/{k}")
        return
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (path, got.shape, want.shape)
    np.testing.assert_array_equal(got, want, err_msg=path)


def test_keys_holding_slash_are_read_as_tfds_reads_them(tmp_path):
    """A dataset written by tfds with the keys "cam/left" (beside "cam" -> "right") and
    "meta/operator": our reader nests by features.json's keys, exactly as tfds does."""
    from oxe_envlogger import read_episodes
    from oxe_envlogger.datasets.validate import validate
    from oxe_envlogger.format.reader import get_path
    from tests.tools.datasets import make_slash_keys

    directory = make_slash_keys(str(tmp_path / "slash"))
    want = read_tfds(directory)
    got = list(read_episodes(directory))
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert sorted(w["steps"]["observation"]) == ["cam", "cam/left"]
        assert w["meta/operator"] in (b"op0", b"op1")
        _assert_trees_equal(g, w)
        np.testing.assert_array_equal(get_path(g, "steps/observation/cam/left"),
                                      w["steps"]["observation"]["cam/left"])
        np.testing.assert_array_equal(get_path(g, "steps/observation/cam/right"),
                                      w["steps"]["observation"]["cam"]["right"])
    report = validate(directory)
    assert report.ok, report.format()
    assert "features" in report.checks
