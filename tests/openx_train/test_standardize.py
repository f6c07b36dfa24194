"""standardize_dataset and flatten_dataset on small hand-made episodes, element by element."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from openx_train.data import (
    Camera,
    ConfigError,
    MissingKeyError,
    Structure,
    flatten_dataset,
    standardize_dataset,
)
from openx_train.data.statistics import KeyStatistics

LENGTHS = (2, 4, 6)  # RLDS steps: 1, 3 and 5 actions


def _episode(index: int, length: int) -> dict:
    t = np.arange(length)
    action = (100 * index + t + 1).astype(np.float32)[:, None]
    action[-1] = 0.0  # the final step's action is padding, as the logger writes it
    return {
        "steps": {
            "observation": {
                "state": np.stack([1000.0 * index + t, -t], -1).astype(np.float32),
                "image": np.array([f"png:{index}:{i}".encode() for i in t], object),
            },
            "action": action,
            "language_instruction": np.array([f"task {index}".encode()] * length, object),
            "is_first": t == 0, "is_last": t == length - 1, "is_terminal": t == length - 1,
            "step_index": t.astype(np.int32),
        },
        "episode_index": np.int64(index),
        "episode_length": np.int32(length),
    }


def _episodes(lengths=LENGTHS) -> tf.data.Dataset:
    eps = [_episode(i, n) for i, n in enumerate(lengths)]
    spec = tf.nest.map_structure(
        lambda a: tf.TensorSpec((None, *np.shape(a)[1:]) if np.ndim(a) else (),
                                tf.string if np.asarray(a).dtype == object
                                else tf.as_dtype(np.asarray(a).dtype)), eps[0])
    return tf.data.Dataset.from_generator(lambda: iter(eps), output_signature=spec)


STRUCTURE = Structure(state=("observation/state",), action=("action",),
                      images={"image_primary": Camera("observation/image", 8)},
                      state_normalization="none", action_normalization="none")


def test_windows_chunks_and_masks_at_both_episode_ends():
    ds = standardize_dataset(_episodes(), structure=STRUCTURE, n_obs=2, n_action=3)
    episodes = list(ds.as_numpy_iterator())
    assert [len(e["step_index"]) for e in episodes] == [n - 1 for n in LENGTHS]
    e = episodes[2]  # 6 steps, frames t = 0..4, actions 201..205
    obs = e["observation"]
    np.testing.assert_array_equal(obs["pad_mask"], [[False, True]] + [[True, True]] * 4)
    np.testing.assert_array_equal(obs["state"][:, :, 0], [[2000, 2000], [2000, 2001],
                                                          [2001, 2002], [2002, 2003],
                                                          [2003, 2004]])
    np.testing.assert_array_equal(obs["image_primary"][0], [b"png:2:0", b"png:2:0"])
    np.testing.assert_array_equal(obs["image_primary"][4], [b"png:2:3", b"png:2:4"])
    np.testing.assert_array_equal(e["action"][:, :, 0], [[201, 202, 203], [202, 203, 204],
                                                         [203, 204, 205], [204, 205, 205],
                                                         [205, 205, 205]])
    np.testing.assert_array_equal(e["action_pad_mask"], [[True, True, True]] * 3 + [
        [True, True, False], [True, False, False]])
    assert (e["action"] != 0).all()  # the final step's padding action never appears
    np.testing.assert_array_equal(e["step_index"], np.arange(5))
    np.testing.assert_array_equal(e["episode_index"], [2] * 5)
    np.testing.assert_array_equal(e["language_instruction"], [b"task 2"] * 5)
    np.testing.assert_array_equal(obs["pad_mask_dict"]["state"], obs["pad_mask"])
    np.testing.assert_array_equal(obs["pad_mask_dict"]["image_primary"], obs["pad_mask"])
    one = episodes[0]  # 2 steps: a single frame, its window padded, its chunk masked past 1
    np.testing.assert_array_equal(one["observation"]["pad_mask"], [[False, True]])
    np.testing.assert_array_equal(one["action"][0, :, 0], [1, 1, 1])
    np.testing.assert_array_equal(one["action_pad_mask"], [[True, False, False]])


def test_keeping_the_final_step():
    ds = standardize_dataset(_episodes((3,)), structure=STRUCTURE, n_obs=1, n_action=2,
                             drop_final_step=False)
    (e,) = list(ds.as_numpy_iterator())
    np.testing.assert_array_equal(e["step_index"], [0, 1, 2])
    np.testing.assert_array_equal(e["action_pad_mask"], [[True, True], [True, True],
                                                         [True, False]])


def test_goals_are_future_steps_of_the_same_episode_and_redrawn_each_epoch():
    ds = standardize_dataset(_episodes((5, 9, 3)), structure=STRUCTURE, goal_relabeling=True,
                             seed=3).repeat(20)
    draws = {}
    for e in ds.as_numpy_iterator():
        ep = int(e["episode_index"][0])
        length = len(e["step_index"]) + 1
        g = e["goal_step_index"]
        assert (g > e["step_index"]).all() and (g <= length - 1).all()
        np.testing.assert_array_equal(e["goal"]["state"][:, 0], 1000 * ep + g)
        np.testing.assert_array_equal(e["goal"]["image_primary"],
                                      [f"png:{ep}:{i}".encode() for i in g])
        draws.setdefault(ep, []).append(g)
    first = np.stack(draws[1])  # 9 steps: frame 0 has 8 possible goals
    assert len(np.unique(first[:, 0])) > 3


def test_normalization_uses_the_statistics_per_key():
    stats = {"observation/state": KeyStatistics(np.ones(2), np.array([10.0, 0.0]),
                                                np.array([2.0, 1.0]), np.zeros(2),
                                                np.ones(2), {}),
             "action": KeyStatistics(np.ones(1), np.zeros(1), np.ones(1), np.array([0.0]),
                                     np.array([400.0]), {})}
    structure = Structure(state=("observation/state",), action=("action",),
                          normalization={"action": "bounds"})
    (e,) = list(standardize_dataset(_episodes((3,)), structure=structure,
                                    statistics=stats).as_numpy_iterator())
    np.testing.assert_allclose(e["observation"]["state"][:, 0, 0], (np.arange(2) - 10) / 2)
    np.testing.assert_allclose(e["action"][:, 0, 0], (np.arange(1, 3) - 200) / 200)
    with pytest.raises(ConfigError, match="needs statistics"):
        standardize_dataset(_episodes(), structure=structure)


def test_structure_errors_name_the_key():
    bad = Structure(state=("observation/joints",), state_normalization="none",
                    action_normalization="none")
    with pytest.raises(MissingKeyError, match="observation/joints"):
        standardize_dataset(_episodes(), structure=bad)
    with pytest.raises(ConfigError, match="expected a numeric tensor"):
        standardize_dataset(_episodes(), structure=Structure(
            state=("language_instruction",), state_normalization="none",
            action_normalization="none"))


def test_unknown_normalization_keys_are_refused_with_the_valid_ones():
    """Issue 11: a misspelt key was accepted and ignored (the action was normalized by the
    default instead)."""
    with pytest.raises(ConfigError, match=r"\['actoin'\] are not state or action keys.*"
                       r"\['action', 'observation/state'\].*did you mean 'action'"):
        Structure(state=("observation/state",), normalization={"actoin": "bounds"})
    with pytest.raises(ConfigError, match=r"\['observation/image'\]"):
        Structure(images={"image": Camera("observation/image")},
                  normalization={"observation/image": "none", "action": "bounds"})
    ok = Structure(state=("observation/state",), normalization={"action": "bounds",
                                                                "observation/state": "none"})
    assert ok.normalization_of("action").value == "bounds"


def test_flatten_gives_one_frame_per_element():
    ds = standardize_dataset(_episodes(), structure=STRUCTURE, n_obs=2, n_action=2)
    frames = list(flatten_dataset(ds).as_numpy_iterator())
    assert len(frames) == sum(n - 1 for n in LENGTHS)
    assert frames[0]["observation"]["state"].shape == (2, 2)
    assert frames[0]["action"].shape == (2, 1)
    assert [int(f["episode_index"]) for f in frames] == [0, 1, 1, 1, 2, 2, 2, 2, 2]
    steps = list(flatten_dataset(_episodes()).as_numpy_iterator())
    assert len(steps) == sum(LENGTHS)
    assert steps[2]["episode_index"] == 1 and steps[2]["step_index"] == 0
    assert steps[2]["episode_length"] == 4


def test_the_functional_chain_on_logged_camera_data(camera_dir):
    from openx_train.data import compute_dataset_statistics, infer_structure, load_dataset, ops

    structure = infer_structure(camera_dir, image_size=8)
    assert structure.state == ("observation/state",) and structure.action == ("action",)
    assert set(structure.images) == {"image", "image_wrist"}
    stats = compute_dataset_statistics(camera_dir)
    episodes = load_dataset(camera_dir, "train")
    frames = flatten_dataset(standardize_dataset(
        episodes, structure=structure, statistics=stats, n_obs=2, n_action=2))
    frames = frames.map(lambda f: {**f, "observation": {
        **f["observation"], "image": ops.preprocess_frames(f["observation"]["image"], (8, 8))}})
    batch = next(iter(frames.batch(5).as_numpy_iterator()))
    assert batch["observation"]["image"].shape == (5, 2, 8, 8, 3)
    assert batch["observation"]["image_wrist"].dtype == object  # still encoded
    np.testing.assert_array_equal(batch["step_index"], np.arange(5))
    assert batch["language_instruction"][0].startswith(b"put the")
    assert np.abs(batch["observation"]["state"]).max() < 10  # normalized
