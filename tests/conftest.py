"""Shared fixtures: a fresh dataset directory per test, quiet TensorFlow, offscreen MuJoCo."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest


@pytest.fixture
def dataset_dir(tmp_path):
    """A directory path (not yet created) for one test's dataset."""
    return str(tmp_path / "dataset")
