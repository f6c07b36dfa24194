"""The training loop on the real path: Reacher-v5 logged by our SDK, trained through
``loop.train`` and ``tools/train_bc.py``: the run directory, resuming to the bit (in process,
after SIGKILL of the real CLI), SIGTERM, two processes with jax.distributed, config overrides,
``--data`` and clear errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import gymnasium as gym
import jax
import numpy as np
import pytest

from openx_train import run
from openx_train.data import DatasetConfig, LoaderConfig, Structure, make_dataloader
from openx_train.training import loop
from oxe_envlogger import AutoOXEEnvLogger
from oxe_envlogger.envs import make_policy, run_episodes
from tests.openx_train.model_helpers import compiled_convolutions, fake_batch, tiny_image_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
TRAIN_BC = os.path.join(ROOT, "tools", "train_bc.py")
CONFIG = os.path.join(ROOT, "openx_train", "configs", "bc", "reacher_state.py")


def log_reacher(directory: str, *, episodes: int = 8, seed: int = 0) -> str:
    env = gym.make("Reacher-v5")
    with AutoOXEEnvLogger(env, "reacher", directory) as logged:
        run_episodes(logged, episodes, policy=make_policy("scripted", env), seed=seed)
    return directory


@pytest.fixture(scope="module")
def reacher_dir(tmp_path_factory) -> str:
    return log_reacher(os.fspath(tmp_path_factory.mktemp("data") / "reacher"))


def small_config(data: str, **overrides):
    config = loop.train_config()
    config.data.datasets = [{"path": data}]
    config.data.val_fraction = 0.25
    config.model.head.kind = "mse"
    config.model.trunk.hidden_dims = (32, 32)
    config.optimizer.warmup_steps = 4
    config.batch_size = 32
    config.steps = 24
    config.log_freq = config.val_freq = config.save_freq = 8
    config.deterministic = True
    config.compilation_cache = "none"
    for k, v in overrides.items():
        target = config
        *parents, leaf = k.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = v
    return config


def _params(path, which="latest"):
    return run.restore_params(path, which, ema=False)


def _assert_bitwise(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and la
    for x, y in zip(la, lb):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_loader_start_batch_continues_the_stream(reacher_dir):
    ds = DatasetConfig(reacher_dir, Structure(state=("observation",)))
    full = make_dataloader(ds, LoaderConfig(batch_size=16, deterministic=True))
    batches = [b for _, b in zip(range(5), full)]
    later = make_dataloader(ds, LoaderConfig(batch_size=16, deterministic=True, start_batch=3))
    resumed = [b for _, b in zip(range(2), later)]
    for a, b in zip(batches[3:], resumed):
        np.testing.assert_array_equal(a["observation"]["state"], b["observation"]["state"])
        np.testing.assert_array_equal(a["action"], b["action"])
    assert not np.array_equal(batches[0]["action"], resumed[0]["action"])


def test_train_writes_the_run_directory_and_resumes_to_the_bit(reacher_dir, tmp_path):
    config = small_config(reacher_dir)
    result = loop.train(config, tmp_path / "a")
    assert result["step"] == 24 and result["stopped_by"] is None
    assert np.isfinite(result["loss"]) and np.isfinite(result["val_loss"])
    assert 0 <= result["data_wait_share"] <= 1 and result["steps_per_sec"] > 0

    a = tmp_path / "a"
    assert {"config.json", "run.json", "checkpoints", "metrics.csv", "tensorboard"} <= set(
        os.listdir(a))
    info = run.read_run(a)
    assert info.kind == "bc" and info.names == ("reacher",)
    ds = info.dataset("reacher")
    assert ds.path == os.path.abspath(reacher_dir) and ds.frames > 0 and 0 < ds.episodes < 8
    assert ds.structure.action == ("action",) and "action" in ds.statistics
    assert info.input_spec.n_obs == 1 and info.input_spec.action_dim == 2
    saved = run.read_config(a)
    assert saved.steps == 24 and saved.data.datasets[0]["structure"]["action"] == ["action"]
    with open(a / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [8, 16, 24]
    for key in ("loss", "val_loss", "grad_norm", "learning_rate", "steps_per_sec",
                "data_wait_share"):
        assert all(np.isfinite(float(r[key])) for r in rows), key
    assert float(rows[-1]["loss"]) == pytest.approx(result["loss"])
    # TensorBoard events, readable without the tensorboard package.
    import tensorflow as tf

    events = os.listdir(a / "tensorboard")
    tags = {v.tag for e in tf.compat.v1.train.summary_iterator(
        os.fspath(a / "tensorboard" / events[0])) for v in e.summary.value}
    assert {"loss", "val_loss", "grad_norm", "learning_rate"} <= tags
    # Checkpoints: the last 3 kept (keep=3) plus the best by validation loss.
    ckpt_steps = sorted(int(s) for s in os.listdir(a / "checkpoints") if s.isdigit())
    assert ckpt_steps == [8, 16, 24]
    _, best = run.restore_params(a, "best")
    assert best == int(min(rows, key=lambda r: float(r["val_loss"]))["step"])
    final, step = _params(a)
    assert step == 24

    # The same config stopped at step 8, then rerun to 24 on the same path: the same bits.
    stopped = small_config(reacher_dir)
    loop.train(stopped, tmp_path / "c")
    # Simulate a stop at step 8: a run that only has the checkpoint of step 8.
    for s in (16, 24):
        shutil.rmtree(tmp_path / "c" / "checkpoints" / str(s))
    resumed = loop.train(small_config(reacher_dir), tmp_path / "c")
    assert resumed["step"] == 24
    _assert_bitwise(_params(tmp_path / "c")[0], final)
    with open(tmp_path / "c" / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [8, 16, 24]  # not repeated


def test_config_errors_name_the_field(reacher_dir, tmp_path):
    with pytest.raises(loop.TrainConfigError, match=r"data\.loader: unknown fields \['n_obz'\]"):
        loop.train(small_config(reacher_dir, **{"data.loader": {"n_obz": 2}}), tmp_path / "x")
    with pytest.raises(loop.TrainConfigError, match=r"data\.datasets\[0\]\.path: no such"):
        loop.train(small_config(os.fspath(tmp_path / "missing")), tmp_path / "y")
    config = small_config(reacher_dir)
    config.data.datasets = [{"path": reacher_dir, "weight": 2}]
    with pytest.raises(loop.TrainConfigError, match=r"data\.datasets\[0\]: unknown fields "
                                                    r"\['weight'\]"):
        loop.train(config, tmp_path / "z")
    config = small_config(reacher_dir)
    config.data.loader.augment_options.bogus = 1
    with pytest.raises(loop.TrainConfigError, match=r"augment_options: unknown fields "
                                                    r"\['bogus'\]"):
        loop.loader_config(config)
    config.data.loader.augment = False  # a bool, as configs set it (None too)
    assert loop.loader_config(config).augment is None
    config = small_config(reacher_dir)
    config.data.datasets = []
    with pytest.raises(loop.TrainConfigError, match="--data"):
        loop.train(config, tmp_path / "w")
    config = small_config(reacher_dir, batch_size=33)
    config.distributed.num_processes = 1
    assert loop.block_size(config, 0) == 8
    config.log_freq = 12
    assert loop.block_size(config, 0) == 4 and loop.block_size(config, 6) == 2


def test_summarize_weighs_dataset_losses_by_count():
    metrics = [{"loss": np.array([1.0, 3.0]), "learning_rate": np.array([0.1, 0.2]),
                "dataset_loss": np.array([[1.0, 0.0], [2.0, 4.0]]),
                "dataset_count": np.array([[2.0, 0.0], [1.0, 3.0]])}]
    out = loop.summarize(metrics, ["a", "b"])
    assert out["loss"] == 2.0 and out["learning_rate"] == 0.2
    assert out["loss/a"] == pytest.approx(4.0 / 3.0) and out["loss/b"] == 4.0


# ------------------------------------------------------------------ the CLI, real processes

def _cli(path, data, *extra, env=None):
    return [sys.executable, TRAIN_BC, f"--config={CONFIG}", f"--path={path}", f"--data={data}",
            "--config.model.trunk.hidden_dims=(32,32)", "--config.batch_size=32",
            "--config.compilation_cache=none", "--config.data.val_fraction=0.25",
            "--config.optimizer.warmup_steps=4", *extra]


def _env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_cli_overrides_data_and_bad_keys(reacher_dir, tmp_path):
    p = subprocess.run(_cli(tmp_path / "r", reacher_dir, "--config.steps=16",
                            "--config.log_freq=8", "--config.save_freq=8",
                            "--config.val_freq=8"),
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    result = _last_json(p.stdout)
    assert result["step"] == 16
    saved = run.read_config(tmp_path / "r")
    assert saved.batch_size == 32 and tuple(saved.model.trunk.hidden_dims) == (32, 32)
    assert [d["path"] for d in saved.data.datasets] == [os.path.abspath(reacher_dir)]
    assert "train:" in p.stderr  # the progress bar
    p = subprocess.run(_cli(tmp_path / "s", reacher_dir, "--config.stepz=3"),
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert p.returncode != 0 and "stepz" in p.stderr


def _wait_for_checkpoint(path, proc, minimum: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = os.path.join(path, "checkpoints")
        steps = [int(s) for s in os.listdir(d) if s.isdigit()] if os.path.isdir(d) else []
        if steps and max(steps) >= minimum:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


@pytest.mark.slow
def test_sigkill_then_rerun_ends_with_the_uninterrupted_parameters(reacher_dir, tmp_path):
    args = ("--config.steps=400", "--config.save_freq=40", "--config.val_freq=200",
            "--config.log_freq=40")
    ref = subprocess.run(_cli(tmp_path / "ref", reacher_dir, *args), capture_output=True,
                         text=True, env=_env(), timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]

    path = tmp_path / "killed"
    proc = subprocess.Popen(_cli(path, reacher_dir, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _wait_for_checkpoint(path, proc, 40)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    steps = [int(s) for s in os.listdir(path / "checkpoints") if s.isdigit()]
    assert max(steps) < 400, "killed too late to test anything"
    again = subprocess.run(_cli(path, reacher_dir, *args), capture_output=True, text=True,
                           env=_env(), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed" in again.stderr
    _assert_bitwise(_params(path)[0], _params(tmp_path / "ref")[0])
    assert _params(path)[1] == 400


@pytest.mark.slow
def test_sigterm_saves_then_exits_cleanly(reacher_dir, tmp_path):
    path = tmp_path / "term"
    proc = subprocess.Popen(_cli(path, reacher_dir, "--config.steps=100000",
                                 "--config.save_freq=40", "--config.log_freq=40",
                                 "--config.val_freq=0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    try:
        _wait_for_checkpoint(path, proc, 40)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    result = _last_json(out)
    assert result["stopped_by"] == "SIGTERM" and 40 <= result["step"] < 100000
    assert _params(path)[1] == result["step"]  # saved where it stopped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_single_process_loss(reacher_dir, tmp_path):
    args = ("--config.steps=8", "--config.log_freq=8", "--config.save_freq=8",
            "--config.val_freq=8", "--config.data.val_fraction=0.25")
    single = subprocess.run(_cli(tmp_path / "one", reacher_dir, *args), capture_output=True,
                            text=True, env=_env(), timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(
        _cli(tmp_path / "two", reacher_dir, *args, "--num_processes=2", f"--process_id={i}",
             f"--coordinator_address={address}"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()) for i in (0, 1)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=600))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    one = _last_json(single.stdout)
    two = [_last_json(out) for out, _ in outs]
    # The same global batch of 32 (16 per process, the frames of the one-process batch):
    # the same mean loss over the 8 steps and the same validation loss, to float rounding.
    for t in two:
        assert t["loss"] == pytest.approx(one["loss"], rel=1e-4)
        assert t["val_loss"] == pytest.approx(one["val_loss"], rel=1e-4)
    assert run.read_run(tmp_path / "two").names == ("reacher",)


def test_eval_fn_runs_on_the_checkpoint_saved_at_its_step(reacher_dir, tmp_path):
    calls = []

    def eval_fn(state, step):
        params, saved = run.restore_params(tmp_path / "e", step, ema=False)
        assert saved == step == int(state.step)
        _assert_bitwise(params, jax.device_get(state.params))
        calls.append(step)
        return {"return_mean": -float(step)}

    config = small_config(reacher_dir, eval_freq=16, save_freq=0, val_freq=0)
    loop.train(config, tmp_path / "e", eval_fn=eval_fn)
    assert calls == [16, 24]
    with open(tmp_path / "e" / "metrics.csv") as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f)}
    assert float(rows[16]["eval/return_mean"]) == -16.0 and rows[8]["eval/return_mean"] == ""


def test_images_and_language_train_in_blocks(camera_dir, tmp_path):
    from openx_train.configs.bc import synthetic_camera

    config = synthetic_camera.get_config()
    config.data.datasets = [{"path": camera_dir}]
    config.data.val_fraction = 0.0
    for cam in ("image", "image_wrist"):
        config.data.structure["images"][cam]["size"] = [16, 16]
    config.model.image_encoder.width = 8
    config.model.image_encoder.num_keypoints = 4
    config.model.trunk.hidden_dims = (16,)
    config.optimizer.warmup_steps = 1
    config.batch_size, config.steps, config.steps_per_call = 4, 4, 2
    config.log_freq = config.save_freq = 2
    config.compilation_cache = "none"
    result = loop.train(config, tmp_path / "cam")
    assert result["step"] == 4 and np.isfinite(result["loss"])
    info = run.read_run(tmp_path / "cam")
    assert info.input_spec.language == "tokens"
    assert info.input_spec.get("observation/image").shape == (1, 16, 16, 3)
    assert set(info.dataset().structure.images) == {"image", "image_wrist"}


def _image_block(k: int, b: int = 4):
    from openx_train import models, training

    batch = fake_batch(b, n_obs=1, n_action=1, state_dim=3, cameras=("image",), image_size=8)
    config = tiny_image_config()
    spec = models.input_spec(config, batch)
    mesh = training.make_mesh()
    state = training.put_state(training.create_train_state(
        models.make_policy(config, spec), training.optimizer_config(),
        rng=jax.random.PRNGKey(0), total_steps=10**6), mesh)
    block = loop.put_block(jax.tree.map(lambda x: np.stack([x] * k), batch), spec, mesh)
    return spec, mesh, state, block


@pytest.mark.parametrize("k", [1, 2])
def test_image_block_step_is_unrolled_on_cpu_with_the_rolled_values(k):
    # XLA's CPU backend leaves the backward convolutions of a while-loop body in layouts its
    # Eigen convolution cannot take (a naive loop: 23 s a step at 64/32 px in a rolled scan, 1 s
    # alone; bench/bench_train.py --only block), so an image block step is unrolled on CPU:
    # no convolution inside a while loop, and the same values as the rolled scan.
    import dataclasses

    spec, mesh, state, block = _image_block(k)
    assert loop.needs_unrolled_block(spec) == (jax.default_backend() == "cpu")
    state_only = dataclasses.replace(spec, inputs=tuple(
        (p, s) for p, s in spec.inputs if "image" not in p))
    assert not loop.needs_unrolled_block(state_only)
    rolled, unrolled = (loop.jit_block_step(mesh, unroll=u) for u in (False, True))

    def convolutions(step):
        return compiled_convolutions(step, state, block)

    assert len(convolutions(rolled)) >= 6  # 3 forward, their input and weight gradients
    assert all("/while/body/" in name for name in convolutions(rolled))
    assert len(convolutions(unrolled)) >= 3  # XLA may turn a 1x1 one into a dot
    assert not any("/while/" in name for name in convolutions(unrolled))
    state_r, metrics_r = rolled(jax.tree.map(np.array, state), block)
    state_u, metrics_u = unrolled(state, block)
    assert metrics_u["loss"].shape == (k,)
    np.testing.assert_allclose(metrics_u["loss"], metrics_r["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 state_u.params, state_r.params)


def test_prefetch_keeps_order_raises_where_the_stream_failed_and_stops():
    import threading

    made = []

    def put(x):
        made.append(x)
        return x * 10

    with loop.Prefetch(iter(range(50)), put, depth=3) as p:
        assert [next(p) for _ in range(50)] == [x * 10 for x in range(50)]
        with pytest.raises(StopIteration):
            next(p)
        with pytest.raises(StopIteration):  # ended for good
            next(p)

    def failing():
        yield 1
        yield 2
        raise ValueError("episode 7: bad block")

    p = loop.Prefetch(failing(), put, depth=2)
    assert next(p) == 10 and next(p) == 20
    with pytest.raises(ValueError, match="episode 7"):
        next(p)
    p.close()

    # An endless stream, closed while the thread waits on a full queue: it stops having made
    # at most depth + 1 blocks ahead of the one taken.
    made.clear()
    endless = loop.Prefetch(iter(range(10**9)), put, depth=2)
    assert next(endless) == 0
    time.sleep(0.3)
    endless.close()
    assert len(made) <= 4
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())

    inline = loop.Prefetch(iter(range(3)), put, depth=0)  # no thread: made when asked for
    made.clear()
    assert next(inline) == 0 and made == [0]
