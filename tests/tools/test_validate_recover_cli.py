"""tools/validate_rlds.py and tools/recover_rlds.py as real subprocesses, on a dataset whose
writer was killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from oxe_envlogger import layout
from tests.tools.datasets import REPO, make_w2, run_tool

_KILLED_WRITER = """
import os, sys, time
import gymnasium as gym
import oxe_envlogger.envs
from oxe_envlogger import AutoOXEEnvLogger
env = AutoOXEEnvLogger(gym.make("oxe_envlogger/SyntheticCamera-v0", image_size=32, wrist_size=16,
                                 max_episode_steps=6), "w2", sys.argv[1])
env.action_space.seed(0)
for ep in range(3):
    env.reset(seed=ep)
    done = False
    while not done:
        _, _, term, trunc, _ = env.step(env.action_space.sample())
        done = term or trunc
env.reset(seed=3)  # the third episode is handed to the writer
deadline = time.time() + 60
while env.writer_stats["episodes"] < 3 and time.time() < deadline:
    time.sleep(0.01)
print("ready", flush=True)
time.sleep(600)
"""


def test_validate_and_recover_a_killed_writer(tmp_path):
    directory = str(tmp_path / "crashed")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, directory], cwd=REPO,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "MUJOCO_GL": "egl"})
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = run_tool("validate_rlds", directory)
    assert before.returncode == 1, before.stdout
    assert "FAILED" in before.stdout and "dead writer" in before.stdout
    assert "recover_rlds.py" in before.stdout
    rec = run_tool("recover_rlds", directory)
    assert rec.returncode == 0, rec.stderr[-2000:]
    report = json.loads(rec.stdout.strip().splitlines()[-1])
    assert report["episodes"] == 3 and report["directory"] == directory
    after = run_tool("validate_rlds", "--json", directory)
    assert after.returncode == 0, after.stdout
    result = json.loads(after.stdout)
    assert result["ok"] and result["episodes"] == 3
    again = run_tool("recover_rlds", directory)  # idempotent
    assert json.loads(again.stdout)["episodes"] == 0


def test_validate_exit_codes(tmp_path):
    good = make_w2(str(tmp_path / "good"), 2)
    bad = str(tmp_path / "bad")
    make_w2(bad, 2)
    info = layout.read_json(os.path.join(bad, layout.DATASET_INFO))
    path = layout.shard_paths(bad, info, "train")[0][0]
    os.truncate(path, os.path.getsize(path) - 7)
    assert run_tool("validate_rlds", good).returncode == 0
    res = run_tool("validate_rlds", good, bad)
    assert res.returncode == 1
    assert f"OK: {good}" in res.stdout and f"FAILED: {bad}" in res.stdout
    assert "truncated record" in res.stdout
    # --strict fails on warnings: a missing statistics.json is one
    os.unlink(os.path.join(good, layout.STATISTICS))
    assert run_tool("validate_rlds", good).returncode == 0
    assert run_tool("validate_rlds", "--strict", good).returncode == 1
    usage = run_tool("validate_rlds")
    assert usage.returncode != 0 and "usage" in usage.stderr.lower()


def test_tools_start_without_tensorflow(tmp_path):
    """The tools' import path stays TF-free (checked by poisoning the import)."""
    good = make_w2(str(tmp_path / "good"), 1)
    poison = tmp_path / "poison"
    (poison / "tensorflow").mkdir(parents=True)
    (poison / "tensorflow" / "__init__.py").write_text("raise RuntimeError('tensorflow imported')")
    env = {"PYTHONPATH": f"{poison}{os.pathsep}{REPO}"}
    assert run_tool("validate_rlds", good, env=env).returncode == 0
    res = run_tool("reshard_rlds", f"--rlds_dirs={good}", f"--output_rlds={tmp_path / 'o'}",
                   env=env)
    assert res.returncode == 0, res.stderr[-2000:]
