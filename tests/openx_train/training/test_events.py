"""TensorBoard event files written without TensorFlow, read back with TensorFlow's reader."""

from __future__ import annotations

import os

import pytest
import tensorflow as tf

from openx_train.training.events import FILE_VERSION, EventWriter


def test_event_files_read_back_with_tensorflow(tmp_path):
    writer = EventWriter(tmp_path / "tb")
    writer.scalars(8, {"loss": 0.5, "learning_rate": 3e-4})
    writer.scalars(16, {"loss": 0.25})
    writer.scalars(20000, {"val_loss": 1.5})
    writer.close()
    (name,) = os.listdir(tmp_path / "tb")
    assert "tfevents" in name
    events = list(tf.compat.v1.train.summary_iterator(os.fspath(tmp_path / "tb" / name)))
    assert events[0].file_version == FILE_VERSION and events[0].wall_time > 0
    got = [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value]
    assert got == [(8, "loss", 0.5), (8, "learning_rate", pytest.approx(3e-4)),
                   (16, "loss", 0.25), (20000, "val_loss", 1.5)]
    assert all(e.wall_time >= events[0].wall_time for e in events)
