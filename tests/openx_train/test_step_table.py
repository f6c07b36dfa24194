"""The loader's step tables, read in numpy (``oxe_envlogger.format.reader``), against the same
columns built by the tf.data path (``load_dataset`` + ``select_structure`` on tensors)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from openx_train.data import Camera, DatasetConfig, LoaderConfig, Structure, ops
from openx_train.data.image_index import RangeReader
from openx_train.data.loader import build_step_table
from openx_train.data.loading import load_dataset
from openx_train.data.structure import select_structure

STATE = Structure(state=("observation",), action=("action",), action_normalization="bounds",
                  state_normalization="gaussian")
CAMERA = Structure(state=("observation/state",), action=("action",),
                   images={"image": Camera("observation/image", (16, 16)),
                           "image_wrist": Camera("observation/wrist_image", (16, 16))},
                   language="auto", state_normalization="bounds_q99")


def _tf_reference(cfg: DatasetConfig, table) -> list[dict]:
    """Per episode, the columns the tf.data path builds, images loaded (encoded)."""
    resolved = table.resolved
    no_images = dataclasses.replace(resolved, cameras=())
    keys = resolved.load_keys(images=True)
    out = []
    for ep in load_dataset(cfg.path, cfg.split, keys=keys, filters=cfg.filters,
                           min_length=2).as_numpy_iterator():
        steps = tf.nest.map_structure(tf.constant, ep["steps"])
        cols = select_structure(steps, no_images, statistics=table.statistics, xp=ops.TF)
        out.append({"index": ep["episode_index"], "length": ep["episode_length"],
                    "id": ep["episode_id"].decode(), "steps": ep["steps"],
                    **{k: None if v is None else np.asarray(v) for k, v in cols.items()
                       if k != "images"}})
    return out


@pytest.mark.parametrize("which", ["state", "camera"])
def test_numpy_step_table_equals_the_tf_built_one(which, cheetah_dir, camera_dir):
    if which == "state":
        cfg = DatasetConfig(cheetah_dir, STATE)
    else:  # a filter returning a TensorFlow bool still works on numpy episodes
        cfg = DatasetConfig(camera_dir, CAMERA,
                            filters=[lambda ep: tf.not_equal(ep["episode_index"], 1)])
    table = build_step_table(cfg, LoaderConfig())
    ref = _tf_reference(cfg, table)
    assert table.num_episodes == len(ref) == (3 if which == "state" else 2)
    assert table.episode_ids == tuple(r["id"] for r in ref)
    lengths = np.array([r["length"] for r in ref])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    np.testing.assert_array_equal(table.episode_length, np.repeat(lengths, lengths))
    np.testing.assert_array_equal(table.episode_start, np.repeat(starts, lengths))
    np.testing.assert_array_equal(table.episode_index,
                                  np.repeat([r["index"] for r in ref], lengths))
    for column in ("state", "action", "language"):
        want = [r[column] for r in ref]
        got = getattr(table, column)
        if want[0] is None:
            assert got is None, column
            continue
        want = np.concatenate(want)
        assert got.dtype == want.dtype and got.shape == want.shape, column
        np.testing.assert_array_equal(got, want, err_msg=column)  # bit for bit
    if which == "camera":
        assert table.language[0].startswith(b"put the")
        reader = RangeReader(table.files)
        for cam in table.resolved.cameras:
            logged = np.concatenate([r["steps"]["observation"][cam.key.split("/")[1]]
                                     for r in ref])
            refs = table.images[cam.name]
            assert [reader.read(*map(int, r)) for r in refs] == list(logged)
