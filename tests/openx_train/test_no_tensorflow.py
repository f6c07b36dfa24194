"""State-only training and the state-only policy never import TensorFlow: each runs in a fresh
subprocess that reports, at exit, every TensorFlow-family module it imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import gymnasium as gym
import pytest

from oxe_envlogger import AutoOXEEnvLogger
from oxe_envlogger.envs import make_policy, run_episodes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MARK = "IMPORTED_TF_MODULES="
# At exit, the modules of the TensorFlow family that were imported.
REPORT = textwrap.dedent(f"""
    import atexit, json, sys
    atexit.register(lambda: print({MARK!r} + json.dumps(sorted(
        m for m in sys.modules
        if m.split(".")[0] in ("tensorflow", "tensorflow_datasets", "tf_keras", "keras")))))
""")

pytestmark = pytest.mark.slow


def _run(code: str) -> tuple[list[str], str]:
    env = {**os.environ, "PYTHONPATH": ROOT, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-c", REPORT + textwrap.dedent(code)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)][-1]
    return json.loads(line[len(MARK):]), proc.stdout


def _summary(modules: list[str]) -> str:
    return f"{len(modules)} modules of {sorted({m.split('.')[0] for m in modules})}"


@pytest.fixture(scope="module")
def reacher_run(tmp_path_factory) -> tuple[str, str]:
    data = os.fspath(tmp_path_factory.mktemp("data") / "reacher")
    env = gym.make("Reacher-v5")
    with AutoOXEEnvLogger(env, "reacher", data) as logged:
        run_episodes(logged, 6, policy=make_policy("scripted", env), seed=0)
    path = os.fspath(tmp_path_factory.mktemp("runs") / "bc")
    modules, out = _run(f"""
        import runpy
        sys.argv = ["train_bc.py", "--config=openx_train/configs/bc/reacher_state.py",
                    "--path={path}", "--data={data}", "--config.steps=8",
                    "--config.log_freq=4", "--config.val_freq=4", "--config.save_freq=8",
                    "--config.batch_size=32", "--config.model.trunk.hidden_dims=(32,32)",
                    "--config.data.val_fraction=0.2", "--config.compilation_cache=none",
                    "--config.optimizer.warmup_steps=2"]
        runpy.run_path("tools/train_bc.py", run_name="__main__")
    """)
    assert modules == [], f"state-only training imported {_summary(modules)}"
    assert '"step": 8' in out
    return data, path


def test_state_only_training_never_imports_tensorflow(reacher_run):
    _, path = reacher_run
    assert os.listdir(os.path.join(path, "tensorboard"))  # metrics written without TF


def test_state_only_policy_never_imports_tensorflow(reacher_run):
    _, path = reacher_run
    modules, out = _run(f"""
        import gymnasium as gym
        import numpy as np
        from openx_train.inference import load_policy

        policy = load_policy({path!r})
        obs, _ = gym.make("Reacher-v5").reset(seed=0)
        action = policy(np.stack([obs, obs]))
        print("ACTION_SHAPE", np.shape(action))
    """)
    assert modules == [], f"the state-only policy imported {_summary(modules)}"
    assert "ACTION_SHAPE (2, 1, 2)" in out
