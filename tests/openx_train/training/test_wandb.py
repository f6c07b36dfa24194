"""wandb in the training loop, for real: ``tools/train_bc.py --project --name`` in offline mode
writes an offline wandb run whose history (read back with wandb's own reader, ``wandb leet
inspect``) holds the logged metrics at the logged steps; a resumed run logs into the same wandb
run; wandb asked for but not importable gives a warning and the run still trains."""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import subprocess
import sys

import pytest

from openx_train.training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
TRAIN_BC = os.path.join(ROOT, "tools", "train_bc.py")
CONFIG = os.path.join(ROOT, "openx_train", "configs", "bc", "reacher_state.py")
# Any attempt at the network fails at once on a closed local port instead of waiting.
_NO_NETWORK = "http://127.0.0.1:9"


def _train(path, data, *extra, env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, TRAIN_BC, f"--config={CONFIG}", f"--path={path}", f"--data={data}",
           "--config.model.trunk.hidden_dims=(32,32)", "--config.batch_size=32",
           "--config.compilation_cache=none", "--config.data.val_fraction=0.25",
           "--config.optimizer.warmup_steps=4", "--config.optimizer.decay_steps=40",
           "--config.log_freq=8", "--config.save_freq=8", "--config.val_freq=8", *extra]
    # No WANDB_MODE: offline is the loop's own default (--wandb_mode).
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_MODE"},
           "TF_CPP_MIN_LOG_LEVEL": "2", "WANDB_SILENT": "true", "WANDB_BASE_URL": _NO_NETWORK,
           "HTTP_PROXY": _NO_NETWORK, "HTTPS_PROXY": _NO_NETWORK, **(env or {})}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _metrics(path) -> dict[int, dict[str, float]]:
    with open(os.path.join(path, "metrics.csv"), newline="") as f:
        return {int(r["step"]): {k: float(v) for k, v in r.items() if v}
                for r in csv.DictReader(f)}


def _offline_runs(path) -> list[dict]:
    """Each offline wandb run under ``path/wandb`` (oldest first), as read by wandb's own
    reader of the ``.wandb`` transaction log: its run record and its history by step."""
    runs = []
    for log_file in sorted(glob.glob(os.path.join(path, "wandb", "offline-run-*", "*.wandb"))):
        p = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                            log_file], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        records = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
        run = next(r["run"] for r in records if r["type"] == "run")
        history = {r["history"]["step"]["num"]: r["history"]["item"]
                   for r in records if r["type"] == "history"}
        runs.append({"run": run, "history": history})
    return runs


def _assert_history_is_the_csv(history: dict, csv_rows: dict, steps: list[int]) -> None:
    assert sorted(history) == steps
    for step in steps:
        for key in ("loss", "learning_rate", "grad_norm", "val_loss"):
            assert history[step][key] == csv_rows[step][key], (step, key)


def _assert_no_wandb_errors(path) -> None:
    for name in glob.glob(os.path.join(path, "wandb", "**", "*.log"), recursive=True):
        with open(name) as f:
            text = f.read()
        assert '"level":"ERROR"' not in text and " ERROR " not in text, (name, text[-2000:])


@pytest.mark.slow
def test_offline_run_holds_the_logged_history_and_a_resume_continues_it(cheetah_dir,
                                                                      tmp_path):
    path = tmp_path / "run"
    _train(path, cheetah_dir, "--config.steps=24", "--project=oxe-test", "--name=bc-small")
    (first,) = _offline_runs(path)
    with open(path / "wandb" / loop.WANDB_ID_FILE) as f:
        run_id = f.read().strip()
    assert first["run"]["run_id"] == run_id
    assert first["run"]["project"] == "oxe-test" and first["run"]["display_name"] == "bc-small"
    assert first["run"]["config"]["update"]["steps"] == 24
    _assert_history_is_the_csv(first["history"], _metrics(path), [8, 16, 24])

    # Rerunning with more steps resumes at 24 and logs into the same wandb run.
    _train(path, cheetah_dir, "--config.steps=40", "--project=oxe-test", "--name=bc-small")
    runs = _offline_runs(path)
    assert len(runs) == 2 and runs[1]["run"]["run_id"] == run_id
    _assert_history_is_the_csv(runs[1]["history"], _metrics(path), [32, 40])
    _assert_no_wandb_errors(path)


def _unimportable_wandb(directory) -> dict[str, str]:
    """Env vars under which ``import wandb`` raises ImportError, as where it is not installed
    (a module of that name first on the path, raising it)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "wandb.py"), "w") as f:
        f.write("raise ImportError(\"No module named 'wandb'\")\n")
    return {"PYTHONPATH": os.pathsep.join(
        [os.fspath(directory), *filter(None, [os.environ.get("PYTHONPATH")])])}


@pytest.mark.slow
def test_asked_for_but_not_installed_warns_and_trains(cheetah_dir, tmp_path):
    path = tmp_path / "run"
    p = _train(path, cheetah_dir, "--config.steps=16", "--project=oxe-test",
               env=_unimportable_wandb(tmp_path / "no_wandb"))
    assert "wandb is not installed" in p.stderr and "'oxe-test'" in p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["step"] == 16
    assert sorted(_metrics(path)) == [8, 16]
    assert not os.path.exists(path / "wandb")


def test_writer_without_wandb_warns_and_writes_the_csv(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb: ImportError
    with caplog.at_level(logging.WARNING, logger=loop.__name__):
        writer = loop.MetricsWriter(os.fspath(tmp_path), start_step=0,
                                    wandb_config={"project": "p", "mode": "offline"})
    writer.write(8, {"loss": 0.5, "learning_rate": 1e-3})
    writer.close()
    assert any("wandb is not installed" in r.getMessage() for r in caplog.records)
    assert _metrics(tmp_path) == {8: {"step": 8.0, "loss": 0.5, "learning_rate": 1e-3}}
