"""run_gym.py as a real subprocess: dataset clashes as one-line errors, the per-step progress
bar, rendering at the logged size (reproducibly), and the scripted Reacher expert logged and read
back with tfds."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from oxe_envlogger.format import reader
from tests.helpers import read_tfds
from tests.tools.datasets import REPO


def run_gym(*args: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, MUJOCO_GL="egl", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, os.path.join(REPO, "run_gym.py"), *args],
                          capture_output=True, text=True, timeout=600, cwd=str(cwd), env=env,
                          check=False)


def _error_lines(res: subprocess.CompletedProcess) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("error:")]


def _assert_one_line_error(res: subprocess.CompletedProcess, *parts: str) -> str:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = _error_lines(res)
    assert len(lines) == 1, res.stderr[-3000:]
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


CARTPOLE = ("--env_name=CartPole-v1", "--policy=scripted", "--num_episodes=2",
            "--max_episode_steps=20", "--enable_envlogger")


def test_another_dataset_name_in_the_directory_is_a_one_line_error(tmp_path):
    out = tmp_path / "logs" / "cart"
    res = run_gym(*CARTPOLE, f"--output_dir={out}", "--dataset_name=mine", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_gym(*CARTPOLE, f"--output_dir={out}", cwd=tmp_path)  # default name cart_pole_v1
    _assert_one_line_error(res, str(out), "'mine'", "'cart_pole_v1'", "--overwrite",
                           "--output_dir", "--dataset_name=mine")
    assert len(read_tfds(str(out))) == 2  # the refused run changed nothing
    # Each way out the message names works.
    res = run_gym(*CARTPOLE, f"--output_dir={out}", "--dataset_name=mine", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(read_tfds(str(out))) == 4  # appended
    res = run_gym(*CARTPOLE, f"--output_dir={tmp_path / 'other'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_gym(*CARTPOLE, f"--output_dir={out}", "--overwrite", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(read_tfds(str(out))) == 2


def test_other_features_in_the_directory_are_a_one_line_error(tmp_path):
    out = tmp_path / "d"
    res = run_gym(*CARTPOLE, f"--output_dir={out}", "--dataset_name=d", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_gym("--env_name=Pendulum-v1", "--num_episodes=1", "--max_episode_steps=5",
                  "--enable_envlogger", f"--output_dir={out}", "--dataset_name=d", cwd=tmp_path)
    _assert_one_line_error(res, str(out), "other features", "steps/action",
                           "steps/observation", "--overwrite", "--output_dir")
    # A language instruction for a dataset logged without one is the same kind of clash.
    res = run_gym(*CARTPOLE, f"--output_dir={out}", "--dataset_name=d",
                  "--language_instruction=balance", cwd=tmp_path)
    _assert_one_line_error(res, "language_instruction", str(out), "--overwrite")
    episodes = read_tfds(str(out))
    assert len(episodes) == 2 and "language_instruction" not in episodes[0]["steps"]


def test_default_directory_and_progress_in_steps(tmp_path):
    res = run_gym(*CARTPOLE, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(read_tfds(str(tmp_path / "logs" / "cart_pole_v1"))) == 2
    bar = res.stderr.replace("\r", "\n")
    assert "40/40" in bar and "step/s" in bar and "ms/step" in bar and "episode 2/2" in bar
    assert "2 episodes, mean return 20.00 ± 0.00 (95% interval)" in res.stdout


def test_render_uses_the_logged_size_and_a_shadow_map_to_match(tmp_path):
    code = ("import sys; import run_gym; from absl import flags\n"
            "flags.FLAGS(sys.argv)\n"
            "env = run_gym.make_env()\n"
            "print('image', env.observation_space['image'].shape)\n"
            "print('shadow', env.unwrapped.model.vis.quality.shadowsize)\n")
    sizes = {}
    for args in ([], ["--image_size=256"], ["--image_size=1024"], ["--shadow_size=2048"]):
        res = subprocess.run(
            [sys.executable, "-c", code, "--env_name=Reacher-v5", "--render", *args],
            capture_output=True, text=True, timeout=300, cwd=REPO, check=False,
            env=dict(os.environ, PYTHONPATH=REPO, MUJOCO_GL="egl"))
        assert res.returncode == 0, res.stderr[-3000:]
        sizes[" ".join(args)] = res.stdout.split()
    assert sizes[""] == ["image", "(128,", "128,", "3)", "shadow", "1024"]
    assert sizes["--image_size=256"][-1] == "2048"
    assert sizes["--image_size=1024"][-1] == "4096"  # never above the model's own
    assert sizes["--shadow_size=2048"][-1] == "2048"


@pytest.mark.slow
def test_rendered_images_follow_from_the_seed(tmp_path):
    """Two runs with the same --seed log the same camera images (MuJoCo's tracking camera keeps
    its offset from the first frame the wrapper renders, which was unseeded)."""
    images = []
    for run in ("a", "b"):
        res = run_gym("--env_name=HalfCheetah-v5", "--render", "--image_size=32",
                      "--num_episodes=1", "--max_episode_steps=4", "--enable_envlogger",
                      f"--output_dir={tmp_path / run}", "--seed=3", cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        (episode,) = reader.read_episodes(str(tmp_path / run), "train")
        images.append(episode["steps"]["observation"]["image"])
    assert images[0].shape == (5, 32, 32, 3) and images[0].std() > 0
    np.testing.assert_array_equal(images[0], images[1])


@pytest.mark.slow
def test_scripted_reacher_logged_and_read_back_with_tfds(tmp_path):
    import gymnasium as gym

    from oxe_envlogger.envs import make_policy

    out = tmp_path / "reacher"
    # float64 stored exactly: the expert's actions are recomputed from the logged observations.
    res = run_gym("--env_name=Reacher-v5", "--policy=scripted", "--num_episodes=6",
                  "--enable_envlogger", f"--output_dir={out}", "--seed=100", "--float64=exact",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    episodes = read_tfds(str(out))
    assert episodes[0]["steps"]["observation"].dtype == np.float64
    assert len(episodes) == 6
    expert = make_policy("scripted", gym.make("Reacher-v5"))
    returns = []
    for episode in episodes:
        steps = episode["steps"]
        assert len(steps["action"]) == 51 and not steps["is_terminal"].any()
        # What was logged is the expert's behaviour: its action from each logged observation.
        want = np.stack([expert(o) for o in steps["observation"][:-1]])
        np.testing.assert_array_equal(steps["action"][:-1], want)
        returns.append(steps["reward"][:-1].sum())
    mean = float(np.mean(returns))
    assert f"6 episodes, mean return {mean:.2f}" in res.stdout
    assert mean > -12  # the expert averages about -3.5 (sd 1.3); random actions about -43
