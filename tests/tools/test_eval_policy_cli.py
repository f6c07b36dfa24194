"""tools/eval_policy.py as a real subprocess on a real env: a run directory's policy rolled out
in Reacher-v5 sub-env processes, its JSON line, video and RLDS log; the same episodes as the
library function in one process; one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

from openx_train import models
from openx_train.data import Structure
from tests.helpers import read_tfds
from tests.openx_train.test_inference import _write_run, log_one_episode, one_batch
from tests.tools.datasets import REPO

run = pytest.importorskip("openx_train.run")


def eval_policy(*args: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, MUJOCO_GL="egl", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "eval_policy.py"), *args],
                          capture_output=True, text=True, timeout=600, cwd=str(cwd), env=env,
                          check=False)


@pytest.fixture(scope="module")
def reacher_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval_cli")
    path = os.fspath(base / "reacher")
    log_one_episode(gym.make("Reacher-v5", max_episode_steps=12), path, "reacher")
    structure = Structure(state=("observation",), action=("action",))
    loader, batch = one_batch(path, structure, batch_size=4, n_obs=2, n_action=2)
    config = models.model_config()
    config.trunk.hidden_dims = (32,)
    spec = models.input_spec(config, batch)
    _write_run(base / "run", path, spec, models.make_policy(config, spec),
               [("reacher", structure, loader.statistics["reacher"])], config)
    return os.fspath(base / "run")


@pytest.mark.slow
def test_eval_policy_reacher(reacher_run, tmp_path):
    from openx_train.inference import evaluate_run

    res = eval_policy(f"--path={reacher_run}", "--env_name=Reacher-v5", "--num_episodes=3",
                      "--num_envs=2", "--max_episode_steps=6", "--seed=5", "--exec_horizon=1",
                      "--video=video.gif", "--log_dir=logs/eval", "--output=full.json",
                      "--baselines=scripted,random", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    line = json.loads(res.stdout.strip().splitlines()[-1])
    assert line["num_episodes"] == 3 and line["length_mean"] == 6.0
    assert line["success_rate"] is None  # Reacher reports no success
    assert line["return_ci95"] > 0 and np.isfinite(line["return_mean"])
    assert line["checkpoint_step"] == 0 and line["dataset"] == "reacher"
    assert "eval" in res.stderr  # the progress bar
    base = line["baselines"]
    assert base["scripted"]["return_mean"] > base["random"]["return_mean"]
    assert "scripted expert" in res.stdout and "random actions" in res.stdout
    assert os.path.getsize(tmp_path / "video.gif") > 0
    episodes = read_tfds(os.fspath(tmp_path / "logs" / "eval"))
    assert len(episodes) == 3
    assert all(len(e["steps"]["action"]) == 7 for e in episodes)
    # The same episodes, in one process with one sub-env.
    full = json.loads((tmp_path / "full.json").read_text())
    again = evaluate_run(reacher_run, "Reacher-v5", num_episodes=3, num_envs=1, seed=5,
                         max_episode_steps=6, exec_horizon=1, vectorization="sync")
    np.testing.assert_allclose([e["return"] for e in again["episodes"]],
                               [e["return"] for e in full["episodes"]], rtol=1e-6)


def test_eval_policy_errors_are_one_line(tmp_path):
    res = eval_policy(f"--path={tmp_path / 'no_run'}", "--env_name=Reacher-v5", cwd=tmp_path)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "no_run" in errors[0] and "train_bc.py" in errors[0]
