"""tools/validate_rlds.py and tools/recover_rlds.py as real subprocesses, on a dataset whose
writer was killed with SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from oxe_envlogger.format import layout
from tests.helpers import kill_when_ready
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
    kill_when_ready([sys.executable, "-c", _KILLED_WRITER, directory], cwd=REPO,
                    env={**os.environ, "MUJOCO_GL": "egl"})
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


# Damage: every tool names it; recover salvages it; then every tool works.

@pytest.fixture(scope="module")
def ten(tmp_path_factory):
    """10 W2-like episodes in one shard."""
    return make_w2(str(tmp_path_factory.mktemp("ten") / "w2"), 10, per_file=10)


def _shard(directory):
    info = layout.read_json(os.path.join(directory, layout.DATASET_INFO))
    return layout.shard_paths(directory, info, "train")[0][0]


def _damage(directory, how):
    """Damage as a disk or a careless copy makes it; returns the file a report must name."""
    if how == "no_dataset_info":
        os.unlink(os.path.join(directory, layout.DATASET_INFO))
        return layout.DATASET_INFO
    path = _shard(directory)
    if how == "flipped":  # three bytes in the middle of the shard
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            b = f.read(3)
            f.seek(-3, 1)
            f.write(bytes(x ^ 0xFF for x in b))
    else:  # the last five bytes cut
        os.truncate(path, os.path.getsize(path) - 5)
    return os.path.basename(path)


def _tfds_summary(directory):
    return subprocess.run([sys.executable, "-m", "oxe_envlogger.datasets.tfds_summary", directory],
                          capture_output=True, text=True, cwd=REPO, timeout=300, check=False,
                          env={**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"})


def _runs(directory, out, episode):
    return {"validate": run_tool("validate_rlds", directory),
            "inspect": run_tool("inspect_rlds", directory),
            "inspect --episode": run_tool("inspect_rlds", directory, f"--episode={episode}"),
            "reshard": run_tool("reshard_rlds", f"--rlds_dirs={directory}",
                                f"--output_rlds={out}"),
            "tfds_summary": _tfds_summary(directory)}


@pytest.mark.parametrize("how", ["flipped", "truncated", "no_dataset_info"])
def test_every_tool_reports_damage_and_recover_repairs_it(ten, tmp_path, how):
    directory = shutil.copytree(ten, str(tmp_path / "w2"))
    named = _damage(directory, how)
    for tool, res in _runs(directory, str(tmp_path / "out"), 9).items():  # the last one
        text = res.stdout + res.stderr
        assert res.returncode == 1, (tool, text[-3000:])
        assert "Traceback" not in text and named in text, (tool, text[-3000:])
        if how != "no_dataset_info":
            assert "recover_rlds.py" in text, (tool, text[-3000:])
    rec = run_tool("recover_rlds", directory)
    assert rec.returncode == 0, rec.stderr[-3000:]
    report = json.loads(rec.stdout)
    if how == "no_dataset_info":
        assert report["rebuilt"] == [layout.DATASET_INFO]
    else:
        assert report["episodes"] == 9 and report["salvaged_shards"][0]["shard"] == named
        assert os.path.isfile(os.path.join(directory, layout.QUARANTINE, named))
    for tool, res in _runs(directory, str(tmp_path / "out2"), 8).items():
        assert res.returncode == 0, (tool, (res.stdout + res.stderr)[-3000:])
    assert json.loads(run_tool("inspect_rlds", "--json", directory).stdout)["episodes"] == \
        (10 if how == "no_dataset_info" else 9)


def test_recover_names_what_it_cannot_rebuild(ten, tmp_path):
    directory = shutil.copytree(ten, str(tmp_path / "w2"))
    os.unlink(os.path.join(directory, layout.DATASET_INFO))
    os.unlink(os.path.join(directory, layout.FEATURES))
    res = run_tool("recover_rlds", directory)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "features.json is missing" in res.stderr and "dataset_info.json" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


# Output closed early (| head) and paths that are no dataset directory.

def _closed_stdout(tool, *args):
    """Runs a tool whose stdout is a pipe nobody reads any more (as ``| head`` leaves it)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([sys.executable, os.path.join(REPO, "tools", f"{tool}.py"), *args],
                              stdout=w, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              timeout=300, check=False,
                              env={**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"})
    finally:
        os.close(w)


@pytest.mark.parametrize("tool, args", [("validate_rlds", ()), ("validate_rlds", ("--json",)),
                                        ("inspect_rlds", ()), ("inspect_rlds", ("--json",)),
                                        ("recover_rlds", ())])
def test_piped_into_head_ends_quietly(ten, tool, args):
    res = _closed_stdout(tool, *args, ten)
    assert res.returncode == 141, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr[-3000:]


def test_validate_into_head(ten):
    res = subprocess.run(f"{sys.executable} tools/validate_rlds.py {' '.join([ten] * 300)} | head -1",
                         shell=True, capture_output=True, text=True, cwd=REPO, timeout=300,
                         check=False, env={**os.environ, "PYTHONPATH": REPO})
    assert res.stdout == f"OK: {ten}\n" and res.stderr == "", res.stderr[-3000:]


def test_a_file_or_a_missing_path_is_a_one_line_error(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("not a dataset")
    missing = str(tmp_path / "missing")
    for path, message in ((str(file), "a file, not a dataset directory"),
                          (missing, "no such directory")):
        runs = {"inspect": run_tool("inspect_rlds", path),
                "recover": run_tool("recover_rlds", path),
                "reshard": run_tool("reshard_rlds", f"--rlds_dirs={path}",
                                    f"--output_rlds={tmp_path / 'out'}"),
                "tfds_summary": _tfds_summary(path)}
        for tool, res in runs.items():
            assert res.returncode == 1 and "Traceback" not in res.stderr, (tool, res.stderr)
            assert res.stderr.strip().splitlines() == [f"error: {path}: {message}"], (tool,
                                                                                      res.stderr)
        res = run_tool("validate_rlds", path)
        assert res.returncode == 1 and f"ERROR [metadata] {path}: {message}" in res.stdout
    res = run_tool("reshard_rlds", f"--rlds_dirs={tmp_path}", f"--output_rlds={file}")
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        f"error: {file} exists and is not a directory"]
