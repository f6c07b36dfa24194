"""W5 of WORKLOADS.md: the real training loop (``tools/train_bc.py``: loader, block step,
metrics, checkpoints) against the same jitted step on one device-resident batch. Prints one
JSON line.

State BC (``openx_train/configs/bc/reacher_state.py``: MLP 512x512x512, batch 256, one
observation, one action) on 100 scripted Reacher-v5 episodes logged by our SDK, per head
(``--heads``, default MSE, the config's, and the 48-bin discretized head the OpenX figures
are for):

* ``loop_steps_per_s``: the loop's steps/s (median over its log intervals after the first,
  median of ``--reps`` runs), and ``over_bare_step``: that over the bare jitted step
  (``jit_train_step``, one call per step) on one device-resident batch, measured between the
  runs in this process; ``over_bare_block``: over the loop's own jitted block step (K=8 steps
  per call through ``lax.scan``) on a device-resident block, which is what the loop adds to
  its step (loading, transfer, metrics, checkpoint).
* ``data_wait_share``: the share of the loop's time spent waiting for the next block (reading,
  model inputs, transfer), median over intervals and runs.
* ``first_step_s``: from starting the command to the end of the first step, with a cold and a
  warm persistent compilation cache (the warm run is a rerun on a fresh path).
* ``peak_rss_mb``: the command's peak resident memory.
* ``over_first_head``: the loop's steps/s over the first head's (``--heads``), the heads run
  alternately in every repetition (median of the per-repetition ratios).

For scale (issue 13): the OpenX/Re-Mix trainer's ``train_bc.py`` was once measured here at
about 21 steps/s (48-bin head), 38 s to its first step and about 1 GB (``over_openx_21_per_s``
divides by that figure). ``bench/bench_openx_baseline.py`` runs their trainer beside ours in
one run: use its ratios, not this constant, to compare.

Image BC (``--only image``): ResNet-18 (width 64, spatial softmax, one per camera), 2 cameras at
128x128, history 2, chunk 4, batch 64, MSE head, augmentation on, on 20 episodes of the
synthetic camera env logged by our SDK at 128x128: the loop's steps/s and data wait share over
its log intervals after ``--image_warmup`` steps (median of the intervals, median of
``--image_reps`` runs), and ``over_bare_step``: that over the same jitted step (the loop's
``jit_block_step``, one batch a call, as the loop runs image policies) on one device-resident
batch from the real loader, timed in this process after the runs. Each step is about 0.8
teraflop by XLA's count (256 frames through ResNet-18, forward and backward): seconds to
minutes a step on 2 CPUs, depending on the host and its load.

Usage::

    python bench/bench_train_loop.py [--reps 3] [--steps 1600] [--heads mse,discrete]
        [--only state,image] [--image_reps 3] [--image_warmup 4] [--image_steps 16]
        [--image_log_freq 4]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TRAIN_BC = os.path.join(ROOT, "tools", "train_bc.py")
STATE_CONFIG = os.path.join(ROOT, "openx_train", "configs", "bc", "reacher_state.py")
CAMERA_CONFIG = os.path.join(ROOT, "openx_train", "configs", "bc", "synthetic_camera.py")


def log_reacher(directory: str, episodes: int) -> str:
    if os.path.exists(os.path.join(directory, "dataset_info.json")):
        return directory
    import gymnasium as gym

    from oxe_envlogger import AutoOXEEnvLogger
    from oxe_envlogger.envs import make_policy, run_episodes

    env = gym.make("Reacher-v5")
    with AutoOXEEnvLogger(env, "reacher", directory) as logged:
        run_episodes(logged, episodes, policy=make_policy("scripted", env), seed=0)
    return directory


def log_camera(directory: str, episodes: int) -> str:
    if os.path.exists(os.path.join(directory, "dataset_info.json")):
        return directory
    import gymnasium as gym

    from oxe_envlogger import AutoOXEEnvLogger
    from oxe_envlogger.envs import ENV_ID, make_policy, run_episodes

    env = gym.make(ENV_ID, image_size=128, wrist_size=128, max_episode_steps=40)
    with AutoOXEEnvLogger(env, "camera", directory) as logged:
        run_episodes(logged, episodes, policy=make_policy("scripted", env), seed=0)
    return directory


def train_bc_command(config: str, path: str, data: str, overrides: list[str],
                     cache: str) -> list[str]:
    """The ``tools/train_bc.py`` command line for ``config`` on ``data``, writing ``path``."""
    return [sys.executable, TRAIN_BC, f"--config={config}", f"--path={path}",
            f"--data={data}", f"--config.compilation_cache={cache}", *overrides]


def run_cli(config: str, path: str, data: str, overrides: list[str], cache: str) -> dict:
    """Runs tools/train_bc.py on a fresh ``path``; returns its JSON result with
    ``command_to_first_step_s`` and the metrics rows."""
    shutil.rmtree(path, ignore_errors=True)
    cmd = train_bc_command(config, path, data, overrides, cache)
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"train_bc failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["command_to_first_step_s"] = result["first_step_unix"] - t0
    with open(os.path.join(path, "metrics.csv")) as f:
        result["rows"] = list(csv.DictReader(f))
    return result


def bare_rates(head: str, steps: int, block: int = 8) -> tuple[float, float]:
    """Steps/s of the jitted step and of the loop's block step on device-resident data, for
    the reacher config's model with ``head`` (Reacher shapes: state 10, action 2)."""
    import jax
    import numpy as np

    from openx_train import models, training
    from openx_train.configs.bc import reacher_state
    from openx_train.training import loop

    config = reacher_state.get_config()
    config.model.head.kind = head
    rs = np.random.default_rng(0)
    b = config.batch_size
    batch = {"observation": {"state": rs.normal(size=(b, 1, 10)).astype(np.float32),
                             "pad_mask": np.ones((b, 1), bool),
                             "pad_mask_dict": {"state": np.ones((b, 1), bool)}},
             "action": rs.uniform(-1, 1, (b, 1, 2)).astype(np.float32),
             "action_pad_mask": np.ones((b, 1), bool), "dataset_id": np.zeros(b, np.int32)}
    spec = models.input_spec(config.model, batch)
    policy = models.make_policy(config.model, spec)
    mesh = training.make_mesh()

    def fresh():
        return training.put_state(training.create_train_state(
            policy, config.optimizer, rng=jax.random.PRNGKey(0), total_steps=10**6), mesh)

    step = training.jit_train_step(mesh)
    state = fresh()
    device = training.put_batch(batch, spec, mesh)
    for _ in range(20):
        state, metrics = step(state, device)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, device)
    jax.block_until_ready(metrics)
    single = steps / (time.perf_counter() - t0)

    block_step = loop.jit_block_step(mesh, unroll=loop.needs_unrolled_block(spec))
    state = fresh()
    stacked = loop.put_block({k: (np.stack([v] * block) if not isinstance(v, dict) else
                                  jax.tree.map(lambda x: np.stack([x] * block), v))
                              for k, v in batch.items()}, spec, mesh)
    for _ in range(3):
        state, metrics = block_step(state, stacked)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps // block):
        state, metrics = block_step(state, stacked)
    jax.block_until_ready(metrics)
    blocked = (steps // block) * block / (time.perf_counter() - t0)
    return single, blocked


def _interval_figures(rows: list[dict]) -> tuple[float, float]:
    rows = [r for r in rows if r.get("steps_per_sec")][1:]  # the first holds the compile
    return (statistics.median(float(r["steps_per_sec"]) for r in rows),
            statistics.median(float(r["data_wait_share"]) for r in rows))


def peak_rss_mb(config: str, path: str, data: str, overrides: list[str], cache: str) -> float:
    """The command's peak resident memory (ru_maxrss of the child, from wait4)."""
    shutil.rmtree(path, ignore_errors=True)
    cmd = train_bc_command(config, path, data, overrides, cache)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError("train_bc failed (peak RSS run)")
    return usage.ru_maxrss / 1024.0


def _head_overrides(head: str, steps: int, log_freq: int = 200) -> tuple[list[str], list[str]]:
    """The long run's and the short warm-cache run's flags for ``head``."""
    # decay_steps fixed: the short warm-cache run compiles the same program.
    common = [f"--config.log_freq={log_freq}", "--config.val_freq=0",
              f"--config.optimizer.decay_steps={steps}", f"--config.model.head.kind={head}"]
    return ([f"--config.steps={steps}", f"--config.save_freq={steps}", *common],
            ["--config.steps=16", "--config.save_freq=16", *common])


def bench_state(work: str, *, reps: int, steps: int, heads: list[str]) -> dict:
    data = log_reacher(os.path.join(work, "reacher100"), 100)
    runs: dict[str, dict[str, list[float]]] = {
        h: {k: [] for k in ("loop", "wait", "single", "block", "cold", "warm")} for h in heads}
    # The heads alternate within each repetition, so that they see the same load on a
    # shared machine; over_first_head compares them repetition by repetition.
    for r in range(reps):
        for head in heads:
            overrides, short = _head_overrides(head, steps)
            got = runs[head]
            cache = os.path.join(work, f"xla_{head}_{r}")
            shutil.rmtree(cache, ignore_errors=True)  # cold
            res = run_cli(STATE_CONFIG, os.path.join(work, f"run_{head}_{r}"), data, overrides,
                          cache)
            rate, wait = _interval_figures(res["rows"])
            got["loop"].append(rate)
            got["wait"].append(wait)
            got["cold"].append(res["command_to_first_step_s"])
            again = run_cli(STATE_CONFIG, os.path.join(work, f"run_{head}_{r}_warm"), data,
                            short, cache)
            got["warm"].append(again["command_to_first_step_s"])
            single, blocked = bare_rates(head, 400)
            got["single"].append(single)
            got["block"].append(blocked)
    out: dict = {}
    first = runs[heads[0]]["loop"]
    for head in heads:
        got = runs[head]
        loops = got["loop"]
        rss = peak_rss_mb(STATE_CONFIG, os.path.join(work, f"run_{head}_rss"), data,
                          _head_overrides(head, steps)[0], os.path.join(work, f"xla_{head}_0"))
        out[head] = {
            "loop_steps_per_s": round(statistics.median(loops), 1),
            "bare_step_per_s": round(statistics.median(got["single"]), 1),
            "bare_block_per_s": round(statistics.median(got["block"]), 1),
            "over_bare_step": round(statistics.median(
                a / b for a, b in zip(loops, got["single"])), 3),
            "over_bare_block": round(statistics.median(
                a / b for a, b in zip(loops, got["block"])), 3),
            "over_first_head": round(statistics.median(a / b for a, b in zip(loops, first)), 3),
            "data_wait_share": round(statistics.median(got["wait"]), 4),
            "first_step_s_cold_cache": round(statistics.median(got["cold"]), 2),
            "first_step_s_warm_cache": round(statistics.median(got["warm"]), 2),
            "peak_rss_mb": round(rss, 1),
            "over_openx_21_per_s": round(statistics.median(loops) / 21.0, 2),
        }
    return {"config": {"batch": 256, "trunk": [512, 512, 512], "n_obs": 1, "n_action": 1,
                       "data": "Reacher-v5, 100 scripted episodes", "steps_per_run": steps,
                       "reps": reps}, "heads": out}


# The image config on the camera config: ResNet-18 per camera (spatial softmax, 64
# keypoints), 2 cameras at 128x128, history 2, chunk 4, batch 64, no language, one batch a call.
IMAGE_OVERRIDES = {
    "batch_size": 64, "data.loader.n_obs": 2, "data.loader.n_action": 4,
    "data.structure.images.image.size": (128, 128),
    "data.structure.images.image_wrist.size": (128, 128),
    "model.image_encoder.kind": "resnet18", "model.image_encoder.width": 64,
    "model.image_encoder.num_keypoints": 64, "model.task.language": "none",
    "optimizer.warmup_steps": 1, "steps_per_call": 1, "val_freq": 0,
}


def _set(config, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        config = config[p]
    config[leaf] = value


def image_bare_times(data: str, cache: str, steps: int) -> list[float]:
    """Seconds per call of the loop's own jitted step (``jit_block_step``, one batch a call
    as the loop runs it) on one device-resident block from the real loader, same config (the
    persistent compilation cache of the CLI run makes its compile a cache hit)."""
    from bench.bench_train import time_calls
    from openx_train.configs.bc import synthetic_camera
    from openx_train.training import loop

    config = synthetic_camera.get_config()
    for k, v in IMAGE_OVERRIDES.items():
        _set(config, k, v)
    config.data.datasets = [{"path": data}]
    config.steps = 10**6
    loop.enable_compilation_cache(cache)
    setup = loop.build(config, block=1)
    device = loop.put_block(next(setup.batches), setup.spec, setup.mesh)
    step = loop.jit_block_step(setup.mesh, unroll=loop.needs_unrolled_block(setup.spec))
    return time_calls(step, setup.state, device, steps)[1]


def bench_image(work: str, *, reps: int, warmup: int, steps: int, log_freq: int) -> dict:
    """The real loop (tools/train_bc.py) at the image config, ``warmup`` steps then ``steps``
    timed in intervals of ``log_freq``, ``reps`` runs; then the same jitted step on one
    device-resident batch, ``steps`` calls per rep, in this process."""
    data = log_camera(os.path.join(work, "camera128"), 20)
    total = warmup + steps
    overrides = [f"--config.{k}={v}" for k, v in IMAGE_OVERRIDES.items()] + [
        f"--config.steps={total}", f"--config.log_freq={log_freq}",
        f"--config.save_freq={total}", f"--config.optimizer.decay_steps={total}"]
    cache = os.path.join(work, "xla_image")
    shutil.rmtree(cache, ignore_errors=True)
    rates, waits, firsts, intervals = [], [], [], []
    for r in range(reps):
        res = run_cli(CAMERA_CONFIG, os.path.join(work, f"run_image_{r}"), data, overrides,
                      cache)
        timed = [row for row in res["rows"]  # the first interval holds the compile
                 if row.get("steps_per_sec") and int(row["step"]) > warmup]
        intervals.append([round(float(row["steps_per_sec"]), 4) for row in timed])
        rates.append(statistics.median(float(row["steps_per_sec"]) for row in timed))
        waits.append(statistics.median(float(row["data_wait_share"]) for row in timed))
        firsts.append(res["command_to_first_step_s"])
    bare = image_bare_times(data, cache, steps * reps)
    bare_rate = 1.0 / statistics.median(bare)
    loop_rate = statistics.median(rates)
    return {"config": {"batch": 64, "cameras": 2, "image": 128, "n_obs": 2, "n_action": 4,
                       "encoder": "resnet18 width 64, spatial softmax 64 kp, one per camera",
                       "head": "mse", "trunk": [256, 256], "augment": True,
                       "warmup_steps": warmup, "timed_steps": steps, "log_freq": log_freq,
                       "reps": reps},
            "loop_steps_per_s": round(loop_rate, 4),
            "loop_s_per_step": round(1.0 / loop_rate, 2),
            "loop_intervals_steps_per_s": intervals,
            "data_wait_share": round(statistics.median(waits), 4),
            "bare_step_per_s": round(bare_rate, 4),
            "bare_s_per_step": [round(t, 2) for t in bare],
            "over_bare_step": round(loop_rate / bare_rate, 3),
            "first_step_s_cold_cache": round(firsts[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--heads", default="mse,discrete")
    parser.add_argument("--only", default="state", help="comma-separated: state, image")
    parser.add_argument("--image_reps", type=int, default=3)
    parser.add_argument("--image_warmup", type=int, default=4)
    parser.add_argument("--image_steps", type=int, default=16, help="timed steps per rep")
    parser.add_argument("--image_log_freq", type=int, default=4)
    parser.add_argument("--work", default=None, help="Where to log the data and write runs "
                        "(default: a temporary directory).")
    args = parser.parse_args()
    only = set(args.only.split(","))
    work = args.work or tempfile.mkdtemp(prefix="bench_train_loop_")
    os.makedirs(work, exist_ok=True)
    out = {"bench": "train_loop", "workload": "W5: tools/train_bc.py against its jitted step",
           "cpus": os.cpu_count()}
    if "state" in only:
        out["state"] = bench_state(work, reps=args.reps, steps=args.steps,
                                   heads=args.heads.split(","))
    if "image" in only:
        out["image"] = bench_image(work, reps=args.image_reps, warmup=args.image_warmup,
                                   steps=args.image_steps, log_freq=args.image_log_freq)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
