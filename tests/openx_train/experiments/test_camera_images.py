"""The cameras experiment: the hidden-object wrapper, the logged data, the two configs, and a
tiny run of the whole path (slow)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from openx_train.experiments import camera_images as exp
from oxe_envlogger import read_episodes


def test_the_logged_state_hides_the_objects_and_the_expert_still_succeeds(tmp_path):
    env = exp.make_env(image_size=32, wrist_size=16)
    obs, _ = env.reset(seed=3)
    assert np.all(obs["state"][exp.HIDDEN] == 0)
    assert np.any(env.unwrapped._state[exp.HIDDEN] != 0)  # the env itself has them
    data = os.fspath(tmp_path / "data")
    expert = exp.collect(data, 3)
    assert expert["episodes"] == 3 and expert["success_rate"] == 1.0
    episodes = list(read_episodes(data))
    assert len(episodes) == 3
    for episode in episodes:
        state = np.asarray(episode["steps"]["observation"]["state"])
        assert np.all(state[:, exp.HIDDEN] == 0) and np.any(state[:, :3] != 0)
    assert exp.collect(data, 3) == expert  # reused, not logged again
    assert len(list(read_episodes(data))) == 3


def test_the_no_camera_config_reads_no_images(tmp_path):
    with_cams = exp.config("d", cameras=True, steps=10, seed=1)
    without = exp.config("d", cameras=False, steps=10, seed=1)
    assert set(with_cams.data.structure["images"]) == {"image", "image_wrist"}
    assert "images" not in without.data.structure
    assert without.data.structure["language"] == "language_instruction"
    assert without.model.to_dict() == with_cams.model.to_dict()  # the same model otherwise
    assert without.steps == 10 and without.seed == 1
    assert without.data.datasets[0]["path"] == "d"


@pytest.mark.slow
def test_a_tiny_run_writes_results_and_a_figure(tmp_path):
    path = os.fspath(tmp_path / "exp")
    results = exp.run(path, episodes=4, steps=8, eval_episodes=2)
    for name in ("cameras", "no_cameras"):
        assert results[name]["num_episodes"] == 2
        assert 0.0 <= results[name]["success_rate"] <= 1.0
    with open(os.path.join(path, "results.json")) as f:
        assert json.load(f)["expert"]["episodes"] == 4
    assert os.path.getsize(os.path.join(path, "results.png")) > 0
    assert os.path.getsize(os.path.join(path, "cameras.mp4")) > 0
