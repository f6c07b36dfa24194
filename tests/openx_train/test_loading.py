"""load_dataset on datasets logged by our logger, compared with what tfds reads."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import tensorflow as tf

from openx_train.data import DatasetFormatError, MissingKeyError, load_dataset
from oxe_envlogger import AutoOXEEnvLogger, read_episodes
from tests.helpers import read_tfds
from tests.openx_train.conftest import CAMERA_EPISODES, CAMERA_STEPS, log_camera


def test_episodes_match_tfds_with_images_left_encoded(camera_dir):
    want = read_tfds(camera_dir)
    got = list(load_dataset(camera_dir).as_numpy_iterator())
    assert len(got) == len(want) == CAMERA_EPISODES
    for i, (g, w) in enumerate(zip(got, want)):
        n = CAMERA_STEPS + 1
        assert g["episode_index"] == i and g["episode_length"] == n
        np.testing.assert_array_equal(g["steps"]["step_index"], np.arange(n))
        assert g["episode_id"] == w["episode_id"] and g["invalid"] == w["invalid"]
        for key in ("action", "reward", "discount", "is_first", "is_last", "is_terminal",
                    "language_instruction"):
            np.testing.assert_array_equal(g["steps"][key], w["steps"][key], err_msg=key)
            if key != "language_instruction":  # (the helper stacks strings as fixed-width)
                assert g["steps"][key].dtype == w["steps"][key].dtype, key
        np.testing.assert_array_equal(g["steps"]["observation"]["state"],
                                      w["steps"]["observation"]["state"])
        images = g["steps"]["observation"]["image"]
        assert images.dtype == object and images[0][:4] == b"\x89PNG"  # still encoded
        decoded = np.stack([tf.io.decode_png(x).numpy() for x in images])
        np.testing.assert_array_equal(decoded, w["steps"]["observation"]["image"])


def test_float64_observations_are_exact(cheetah_dir):
    want = list(read_episodes(cheetah_dir))
    got = list(load_dataset(cheetah_dir, keys=["observation", "reward"]).as_numpy_iterator())
    for g, w in zip(got, want):
        assert g["steps"]["observation"].dtype == np.float64
        np.testing.assert_array_equal(g["steps"]["observation"], w["steps"]["observation"])
        np.testing.assert_array_equal(g["steps"]["reward"], w["steps"]["reward"])
        assert "action" not in g["steps"] and "is_first" in g["steps"]


def test_keys_filters_and_min_length(camera_dir):
    ds = load_dataset(camera_dir, keys=["observation/state"])
    (first, *_) = list(ds.take(1).as_numpy_iterator())
    assert set(first["steps"]) == {"observation", "is_first", "is_last", "is_terminal",
                                   "step_index"}
    assert set(first["steps"]["observation"]) == {"state"}
    kept = load_dataset(camera_dir, keys=[], filters=[lambda ep: ep["episode_index"] != 1])
    assert [int(e["episode_index"]) for e in kept.as_numpy_iterator()] == [0, 2]
    assert not list(load_dataset(camera_dir, keys=[], min_length=CAMERA_STEPS + 2))
    assert len(list(load_dataset(camera_dir, keys=[], min_length=CAMERA_STEPS + 1))) == 3
    with pytest.raises(MissingKeyError, match="observation/depth"):
        load_dataset(camera_dir, keys=["observation/depth"])


def test_episode_index_is_stable_across_shards_and_read_order(tmp_path):
    directory = log_camera(str(tmp_path / "sharded"), episodes=4, max_episodes_per_file=1)
    ordered = {int(e["episode_index"]): e["episode_id"]
               for e in load_dataset(directory, keys=[]).as_numpy_iterator()}
    assert sorted(ordered) == [0, 1, 2, 3]
    ds = load_dataset(directory, keys=[], shuffle_files=True, seed=1, num_parallel_reads=2,
                      deterministic=False)
    for _ in range(2):
        seen = {int(e["episode_index"]): e["episode_id"] for e in ds.as_numpy_iterator()}
        assert seen == ordered


def test_invalid_episodes_can_be_dropped(tmp_path):
    directory = str(tmp_path / "cut")
    env = AutoOXEEnvLogger(gym.make("Pendulum-v1", max_episode_steps=5), "cut", directory)
    env.reset(seed=0)
    for _ in range(5):
        env.step(env.action_space.sample())
    env.reset(seed=1)
    env.step(env.action_space.sample())
    env.close()  # the second episode is cut short: invalid
    flags = [bool(e["invalid"]) for e in load_dataset(directory).as_numpy_iterator()]
    assert flags == [False, True]
    assert len(list(load_dataset(directory, drop_invalid=True))) == 1


def test_not_a_dataset_or_no_such_split(tmp_path, camera_dir):
    with pytest.raises(DatasetFormatError, match="not a dataset directory"):
        load_dataset(str(tmp_path))
    with pytest.raises(DatasetFormatError, match="validation"):
        load_dataset(camera_dir, "validation")


def test_keys_holding_slash_nest_as_tfds_nests_them(tmp_path):
    from tests.tools.datasets import make_slash_keys

    directory = make_slash_keys(str(tmp_path / "slash"))
    want = read_tfds(directory)
    got = list(load_dataset(directory, "train").as_numpy_iterator())
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        obs = g["steps"]["observation"]
        assert sorted(obs) == ["cam", "cam/left"] and sorted(obs["cam"]) == ["right"]
        np.testing.assert_array_equal(obs["cam/left"], w["steps"]["observation"]["cam/left"])
        np.testing.assert_array_equal(obs["cam"]["right"],
                                      w["steps"]["observation"]["cam"]["right"])
        assert g["meta/operator"] == w["meta/operator"]
