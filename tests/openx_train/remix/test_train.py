"""The Re-Mix run on the real path: the operators' Reacher-v5 data logged by our SDK (tiny),
a reference trained by the BC loop, then ``train_remix`` and ``tools/train_remix.py``: the run
directory (alpha files, mixture weights, plot, per-domain metrics), resuming, the refusal of a
mismatched reference, two processes with jax.distributed, and ``train_bc.py --weights
--data_budget``."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from openx_train import run as run_lib
from openx_train.data import ConfigError, load_mixture_weights
from openx_train.experiments import operators as ops
from openx_train.remix import load_kept_episodes, read_alpha_history
from openx_train.remix.final import apply_weights_and_budget
from openx_train.remix.train import logged_history, train_remix
from openx_train.training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))
TRAIN_REMIX = os.path.join(ROOT, "tools", "train_remix.py")
TRAIN_BC = os.path.join(ROOT, "tools", "train_bc.py")
CONFIG = os.path.join(ROOT, "openx_train", "configs", "remix", "reacher_operators.py")
OPERATORS = sorted(o.name for o in ops.operators("tiny"))


@pytest.fixture(scope="module")
def operators_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("operators")
    ops.run_collection(path, size="tiny", seed=0)
    return os.fspath(path / ops.DATA_DIR)


def small_config(data: str, **overrides):
    from openx_train.configs.remix.reacher_operators import get_config

    config = get_config()
    config.data.datasets = [{"path": data}]
    config.data.val_fraction = 0.2
    config.model.trunk.hidden_dims = (32, 32)
    config.optimizer.warmup_steps = 2
    config.batch_size = 32
    config.steps = 16
    config.log_freq = config.val_freq = config.save_freq = 8
    config.compilation_cache = "none"
    for k, v in overrides.items():
        target = config
        *parents, leaf = k.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = v
    return config


@pytest.fixture(scope="module")
def reference_dir(operators_dir, tmp_path_factory) -> str:
    path = os.fspath(tmp_path_factory.mktemp("ref"))
    loop.train(small_config(operators_dir), path)
    return path


def _env():
    return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
                PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _cli(tool, *args):
    """The command line of ``tool`` at the small config; ``args`` come last, so they win."""
    return [sys.executable, tool, f"--config={CONFIG}", "--config.compilation_cache=none",
            "--config.model.trunk.hidden_dims=(32, 32)", "--config.batch_size=32",
            "--config.optimizer.warmup_steps=2", "--config.data.val_fraction=0.2", *args]


def test_train_remix_writes_the_run_and_resumes(operators_dir, reference_dir, tmp_path):
    path = os.fspath(tmp_path / "remix")
    # decay_steps fixed: the learning rates of the first 16 steps do not depend on the run's
    # length, so a run extended to 24 steps can be compared with one of 24 steps straight
    fixed = {"optimizer.decay_steps": 100}
    result = train_remix(small_config(operators_dir, **fixed), reference_dir, path)
    assert result["step"] == 16 and result["domains"] == OPERATORS
    # alpha files at 0 (a0) and every save_freq, the average is the mean of the updates
    history = read_alpha_history(path)
    assert history.steps.tolist() == [0, 8, 16]
    assert history.domains == tuple(OPERATORS)
    np.testing.assert_allclose(history.alpha.sum(axis=1), 1, atol=1e-6)
    info = run_lib.read_run(path)
    a0 = np.asarray(info.extra["remix"]["initial_weights"])
    np.testing.assert_allclose(history.alpha[0], a0, rtol=1e-6)
    assert np.abs(history.alpha[-1] - a0).max() > 1e-4  # the weights moved
    # a0 is each operator's share of the training frames (the default)
    frames = {d["name"]: d["frames"] for d in info.to_json()["datasets"]}
    assert sum(frames.values()) > 0 and abs(a0.sum() - 1) < 1e-6
    weights = load_mixture_weights(os.path.join(path, "mixture_weights.json"))
    assert list(weights) == OPERATORS
    np.testing.assert_allclose([weights[d] for d in OPERATORS], result["average_alpha"],
                               rtol=1e-6)
    np.testing.assert_allclose(result["average_alpha"], history.average_alpha[-1], rtol=1e-6)
    assert os.path.getsize(os.path.join(path, "weights.png")) > 1000
    logged = logged_history(path, OPERATORS)  # what weights.png draws: every logged step
    assert logged.steps.tolist() == [0, 8, 16]
    np.testing.assert_allclose(logged.alpha, history.alpha, rtol=1e-5)
    # the run directory: kind remix, the reference named, statistics the reference's
    assert info.kind == "remix" and info.extra["reference"] == os.path.abspath(reference_dir)
    ref = run_lib.read_run(reference_dir)
    assert info.datasets[0].statistics.to_json() == ref.datasets[0].statistics.to_json()
    assert info.domain_names == tuple(OPERATORS)
    # per-domain curves in metrics.csv (and the same values in TensorBoard)
    with open(os.path.join(path, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    for d in OPERATORS:
        assert f"alpha/{d}" in rows[-1] and f"average_alpha/{d}" in rows[-1]
    assert any(k.startswith("excess/") and rows[-1][k] for k in rows[-1])
    assert float(rows[-1][f"alpha/{OPERATORS[0]}"]) == pytest.approx(
        history.alpha[-1][0], rel=1e-5)
    assert os.listdir(os.path.join(path, "tensorboard"))

    # Rerun with more steps: resumes at 16 (weights and average restored) and ends as a run
    # of 24 steps straight.
    more = train_remix(small_config(operators_dir, steps=24, **fixed), reference_dir, path)
    straight = train_remix(small_config(operators_dir, steps=24, **fixed), reference_dir,
                           os.fspath(tmp_path / "straight"))
    assert more["step"] == 24
    np.testing.assert_allclose(more["average_alpha"], straight["average_alpha"], rtol=1e-6)
    np.testing.assert_allclose(more["alpha"], straight["alpha"], rtol=1e-6)
    assert read_alpha_history(path).steps.tolist() == [0, 8, 16, 24]


def test_cached_reference_losses_learn_the_weights_of_the_reference_in_the_step(
        operators_dir, reference_dir, tmp_path):
    # The reference's losses computed once per training frame (remix.cache_reference='on'),
    # and resumed (the cache is computed again, not saved): the weights and parameters of a
    # run whose step runs the reference ('off').
    fixed = {"optimizer.decay_steps": 100}
    cached_path = os.fspath(tmp_path / "cached")
    first = train_remix(small_config(operators_dir, **{"remix.cache_reference": "on"}, **fixed),
                        reference_dir, cached_path)
    assert first["reference_cached"] and first["step"] == 16
    cached = train_remix(small_config(operators_dir, steps=24, **fixed,
                                      **{"remix.cache_reference": "on"}),
                         reference_dir, cached_path)
    computed_path = os.fspath(tmp_path / "computed")
    computed = train_remix(small_config(operators_dir, steps=24, **fixed,
                                        **{"remix.cache_reference": "off"}),
                           reference_dir, computed_path)
    assert cached["reference_cached"] and not computed["reference_cached"]
    assert np.abs(np.asarray(computed["alpha"]) - first["alpha"]).max() > 1e-5  # moved on
    np.testing.assert_allclose(cached["alpha"], computed["alpha"], rtol=1e-5)
    np.testing.assert_allclose(cached["average_alpha"], computed["average_alpha"], rtol=1e-5)
    np.testing.assert_allclose(cached["reference_loss"], computed["reference_loss"], rtol=1e-5)
    params = [run_lib.restore_params(p, "latest", local=True)[0]
              for p in (cached_path, computed_path)]
    import jax

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *params)


def test_a_head_whose_loss_draws_noise_computes_the_reference_in_the_step(operators_dir,
                                                                          tmp_path):
    diffusion = {"model.head.kind": "diffusion", "model.head.hidden_dim": 16,
                 "model.head.num_blocks": 1, "steps": 8}
    reference = os.fspath(tmp_path / "ref")
    loop.train(small_config(operators_dir, **diffusion), reference)
    auto = train_remix(small_config(operators_dir, **diffusion), reference,
                       os.fspath(tmp_path / "auto"))
    assert not auto["reference_cached"] and np.isfinite(auto["loss"])
    with pytest.raises(ConfigError, match="cache_reference='on': the reference's loss of a "
                                          "sample is not a function of its frame here: the "
                                          "diffusion head's loss draws noise"):
        train_remix(small_config(operators_dir, **diffusion, **{"remix.cache_reference": "on"}),
                    reference, os.fspath(tmp_path / "on"))


def test_a_mismatched_reference_is_refused_listing_the_differences(operators_dir,
                                                                   reference_dir, tmp_path):
    config = small_config(operators_dir)
    config.model.head.num_bins = 32
    config.model.head.bin_type = "uniform"
    with pytest.raises(ConfigError) as info:
        train_remix(config, reference_dir, os.fspath(tmp_path / "bad"))
    message = str(info.value)
    assert "model.head.num_bins: the reference 48, this config 32" in message
    assert "model.head.bin_type: the reference 'gaussian', this config 'uniform'" in message
    assert not os.path.exists(tmp_path / "bad" / "checkpoints")
    # another normalization of the action
    config = small_config(operators_dir)
    structure = loop.dataset_configs(config)[0].structure.to_json()
    structure["action_normalization"] = "bounds"
    config.data.datasets = [{"path": operators_dir, "structure": structure}]
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.structure\.action_normalization"):
        train_remix(config, reference_dir, os.fspath(tmp_path / "bad2"))
    # another input (two observations) is found once the loader gives the spec
    config = small_config(operators_dir)
    config.data.loader.n_obs = 2
    with pytest.raises(ConfigError, match=r"input_spec"):
        train_remix(config, reference_dir, os.fspath(tmp_path / "bad3"))


def test_the_cli_with_data_and_overrides(operators_dir, reference_dir, tmp_path):
    path = tmp_path / "cli"
    p = subprocess.run(_cli(TRAIN_REMIX, f"--reference={reference_dir}", f"--path={path}",
                            f"--data={operators_dir}", "--config.steps=8",
                            "--config.log_freq=4", "--config.save_freq=4",
                            "--config.val_freq=8", "--config.remix.eta=1.0"),
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = _last_json(p.stdout)
    assert out["step"] == 8 and out["domains"] == OPERATORS
    assert sorted(os.listdir(path)) >= ["alpha_0.json", "alpha_4.json", "alpha_8.json"]
    config = run_lib.read_config(path)
    assert config["remix"]["eta"] == 1.0
    assert os.path.exists(path / "mixture_weights.json")


def test_final_bc_with_weights_and_a_data_budget(operators_dir, reference_dir, tmp_path):
    weights = {d: (0.5 if d.startswith("better") else 0.5 / 6) for d in OPERATORS}
    from openx_train.data import save_mixture_weights

    wfile = os.fspath(tmp_path / "w.json")
    save_mixture_weights(wfile, weights)
    path = tmp_path / "final"
    # No validation hold-out: it follows the logged episode ids, random at each collection,
    # and on this tiny data it can take every episode of a domain the weights name (an error).
    p = subprocess.run(_cli(TRAIN_BC, f"--path={path}", f"--data={operators_dir}",
                            f"--weights={wfile}", "--data_budget=0.25", "--config.steps=8",
                            "--config.log_freq=8", "--config.save_freq=8",
                            "--config.val_freq=8", "--config.data.val_fraction=0"),
                       capture_output=True, text=True, env=_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    kept = load_kept_episodes(path / "kept_episodes.json")
    info = run_lib.read_run(path)
    assert set(kept) == {info.datasets[0].name}
    with open(path / "kept_episodes.json") as f:
        record = json.load(f)
    total, kept_frames = record["frames"]["total"], record["frames"]["kept"]
    assert info.datasets[0].frames == kept_frames < total  # trained on the kept frames only
    # each domain within half an episode of its target (at least one episode each)
    assert abs(kept_frames - 0.25 * total) <= len(OPERATORS) * 50
    domains = {d["name"]: d for d in record["domains"]}
    total_w = sum(weights.values())
    for d, w in weights.items():  # the budget was split by the given weights
        assert domains[d]["weight"] == pytest.approx(w / total_w)
    assert domains["better_1"]["target"] > 2 * domains["worse_1"]["target"]
    config = run_lib.read_config(path)
    assert config["data"]["loader"]["weights"] == wfile
    assert sorted(config["data"]["datasets"][0]["episodes"]) == sorted(
        next(iter(kept.values())))
    # the same flags choose the same episodes
    again = small_config(operators_dir, **{"data.val_fraction": 0.0})
    again, selection = apply_weights_and_budget(again, os.fspath(tmp_path / "again"),
                                                weights=wfile, data_budget=0.25)
    assert selection.per_dataset() == kept


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.slow
def test_two_processes_learn_the_one_process_weights(tmp_path):
    """The Re-Mix step as two jax.distributed processes (gloo), each feeding its half of the
    same global batches, learns the one-process weights and parameters."""
    module = "tests.openx_train.remix.distributed_step"
    env = dict(_env(), XLA_FLAGS="--xla_backend_optimization_level=0")
    one = subprocess.run([sys.executable, "-m", module, str(tmp_path / "one.npz"), "1", "0",
                          "none"], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    address = _free_address()
    procs = [subprocess.Popen([sys.executable, "-m", module, str(tmp_path / f"two{i}.npz"), "2",
                               str(i), address], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in (0, 1)]
    _wait(procs)
    r1 = np.load(tmp_path / "one.npz")
    for i in (0, 1):
        r2 = np.load(tmp_path / f"two{i}.npz")
        assert int(r2["processes"]) == 2 and int(r1["processes"]) == 1
        np.testing.assert_allclose(r2["alpha"], r1["alpha"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(r2["average"], r1["average"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(r2["loss"], r1["loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r2["params"], r1["params"], rtol=1e-5, atol=1e-6)
    assert np.abs(r1["alpha"][-1] - r1["alpha"][0]).max() > 1e-3  # the weights moved


def _wait(procs) -> list[str]:
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
    return [out for out, _ in outs]


@pytest.mark.slow
def test_the_cli_as_two_processes(operators_dir, reference_dir, tmp_path):
    """tools/train_remix.py as two jax.distributed processes: every process reads the
    reference, both end with the same weights and process 0 writes the run's files. (The
    loader gives each process its own draws of domains, so the global batches are not those of
    one process with a batch twice as large: the weights are close to the one-process run's,
    not equal; the exact comparison is the step's, above.) The reference's losses are cached
    (each process computes every frame's, on its own device)."""
    args = ("--config.steps=8", "--config.log_freq=8", "--config.save_freq=8",
            "--config.val_freq=8", "--config.remix.cache_reference=on",
            f"--reference={reference_dir}", f"--data={operators_dir}")
    single = subprocess.run(_cli(TRAIN_REMIX, f"--path={tmp_path / 'one'}", *args),
                            capture_output=True, text=True, env=_env(), timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    address = _free_address()
    procs = [subprocess.Popen(
        _cli(TRAIN_REMIX, f"--path={tmp_path / 'two'}", *args, "--num_processes=2",
             f"--process_id={i}", f"--coordinator_address={address}"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()) for i in (0, 1)]
    outs = [_last_json(out) for out in _wait(procs)]
    assert outs[0]["reference_cached"] and outs[1]["reference_cached"]
    assert outs[0]["alpha"] == outs[1]["alpha"]
    assert outs[0]["average_alpha"] == outs[1]["average_alpha"]
    one = _last_json(single.stdout)
    np.testing.assert_allclose(outs[0]["average_alpha"], one["average_alpha"], atol=5e-3)
    assert outs[0]["weights_file"] and outs[1]["weights_file"] is None
    w2 = load_mixture_weights(tmp_path / "two" / "mixture_weights.json")
    np.testing.assert_allclose([w2[d] for d in OPERATORS], outs[0]["average_alpha"], rtol=1e-6)


def test_the_config_file_and_the_bridge_setting():
    from openx_train.configs.remix.reacher_operators import get_config
    from openx_train.remix.train import remix_options

    robomimic, bridge = remix_options(get_config()), remix_options(get_config("bridge"))
    assert (robomimic.eta, robomimic.smoothing) == (0.2, 5e-2)
    assert (bridge.eta, bridge.smoothing) == (1.0, 5e-3)
    config = get_config()
    assert (config.model.head.kind, config.model.head.num_bins,
            config.model.head.bin_type) == ("discrete", 48, "gaussian")
    config.remix.absent = "drop"
    with pytest.raises(ConfigError, match=r"remix.absent: expected one of \['keep', "
                       r"'zero_excess'\], given 'drop'"):
        remix_options(config)
    config.remix.absent = "keep"
    config.remix.smoothing = 2.0
    with pytest.raises(ConfigError, match="smoothing: expected in"):
        remix_options(config)
