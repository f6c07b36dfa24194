"""W5 of WORKLOADS.md: the training data loader. Prints one JSON line per figure set.

* ``loader_images`` (W2 at full size, cameras resized to 128x128 with augmentation, history 2,
  action chunk 4, batch 256): frames per second delivered by the loader over frames per second
  of a pure decode of the same encoded frames (``tf.io.decode_image`` in a parallel ``tf.data``
  map), measured alternately in the same process. Target >= 0.8.
* ``loader_state`` (W1, HalfCheetah state, same windows): the time a JAX MLP BC step
  (512x512x512, batch 256, Adam) waits for the next batch, over the step's compute time, in a
  loop that pulls each batch from the loader. Target <= 0.1.
* ``loader_memory``: peak resident memory of a process that builds the loader over 100k W2 frames
  (the 10 W2 episodes listed 50 times) and draws batches from a shuffle over all of them.
  Target <= 2 GiB.

Each ratio is the median of ``--reps`` repetitions. Usage::

    python bench/bench_loader.py [--workdir DIR] [--reps 3] [--only images,state,memory]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import loader_data

BATCH, N_OBS, N_ACTION, IMAGE = 256, 2, 4, 128


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _peak_rss_gib() -> float:
    # VmHWM, not getrusage's ru_maxrss: Linux carries the parent's high-water mark at fork
    # into an exec'd child's ru_maxrss, which would count the benchmark's own process.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def _camera_structure():
    from openx_train.data import Camera, Structure

    return Structure(state=("observation/state",),
                     images={"image_primary": Camera("observation/image", IMAGE),
                             "image_wrist": Camera("observation/wrist_image", IMAGE)})


def bench_images(w2: str, reps: int, batches: int) -> dict:
    import tensorflow as tf

    from openx_train.data import AugmentConfig, DatasetConfig, LoaderConfig, make_dataloader
    from oxe_envlogger import read_episodes

    loaders = {}
    for name, augment in (("resize", None), ("augment", AugmentConfig())):
        config = LoaderConfig(batch_size=BATCH, n_obs=N_OBS, n_action=N_ACTION, seed=0,
                              augment=augment)
        loaders[name] = make_dataloader(DatasetConfig(w2, _camera_structure()), config)
    main, wrist = [], []
    for ep in read_episodes(w2, decode_images=False, keys={"observation/image",
                                                           "observation/wrist_image"}):
        main.extend(ep["steps"]["observation"]["image"][:-1])
        wrist.extend(ep["steps"]["observation"]["wrist_image"][:-1])
    decode = tf.data.Dataset.from_tensor_slices((main, wrist)).repeat().map(
        lambda a, b: (tf.io.decode_image(a, 3, expand_animations=False),
                      tf.io.decode_image(b, 3, expand_animations=False)),
        num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH).prefetch(2)
    frames_per_rep = batches * BATCH * N_OBS

    def rate(iterable, frames_per_batch: int) -> float:
        iterator = iter(iterable)
        for _ in range(3):  # start-up: tracing, autotuning, the first reads
            next(iterator)
        count = -(-frames_per_rep // frames_per_batch)
        start = time.perf_counter()
        for _ in range(count):
            next(iterator)
        elapsed = time.perf_counter() - start
        del iterator
        gc.collect()
        return count * frames_per_batch / elapsed

    runs = [("decode", lambda: rate(decode, BATCH))] + [
        (name, lambda loader=loader: rate(loader, BATCH * N_OBS))
        for name, loader in loaders.items()]
    rows = []
    for rep in range(reps):  # rotate the order: the machine's load drifts
        order = runs[rep % len(runs):] + runs[: rep % len(runs)]
        got = {name: fn() for name, fn in order}
        rows.append({"decode_frames_per_s": got["decode"],
                     "loader_frames_per_s": got["resize"],
                     "loader_augment_frames_per_s": got["augment"],
                     "ratio": got["resize"] / got["decode"],
                     "ratio_augment": got["augment"] / got["decode"]})

    def med(key):
        return statistics.median(r[key] for r in rows)

    return {
        "bench": "loader_images", "workload": "W5 over W2 (10 x 200 steps, PNG 256/128 px)",
        "figure": "loader frames/s over pure decode frames/s of the same frames",
        "ratio_loader_over_decode": round(med("ratio"), 3), "target": ">= 0.8",
        "ratio_with_augmentation": round(med("ratio_augment"), 3),
        "loader_frames_per_s": round(med("loader_frames_per_s"), 1),
        "loader_augment_frames_per_s": round(med("loader_augment_frames_per_s"), 1),
        "decode_frames_per_s": round(med("decode_frames_per_s"), 1),
        "loader_batches_per_s": round(med("loader_frames_per_s") / (BATCH * N_OBS), 3),
        "frame": "one image (256x256) + one wrist image (128x128), PNG",
        "config": {"batch": BATCH, "n_obs": N_OBS, "n_action": N_ACTION, "image": IMAGE,
                   "shuffle": "whole dataset", "decode": "tf.io.decode_image",
                   "augment (ratio_with_augmentation)":
                       "random resized crop + brightness/contrast/saturation/hue"},
        "reps": [{k: round(v, 3) for k, v in r.items()} for r in rows],
        "cpus": os.cpu_count(),
    }


def _mlp_step():
    import jax
    import jax.numpy as jnp
    import optax

    sizes = [N_OBS * 17, 512, 512, 512, N_ACTION * 6]
    key = jax.random.PRNGKey(0)
    params = []
    for a, b in itertools.pairwise(sizes):
        key, sub = jax.random.split(key)
        params.append((jax.random.normal(sub, (a, b)) * (1.0 / a) ** 0.5, jnp.zeros(b)))
    tx = optax.adam(1e-3)

    def loss_fn(params, obs, action, mask):
        x = obs.reshape(obs.shape[0], -1)
        for i, (w, b) in enumerate(params):
            x = x @ w + b
            if i < len(params) - 1:
                x = jax.nn.relu(x)
        err = ((x.reshape(action.shape) - action) ** 2).mean(-1)
        return (err * mask).sum() / jnp.maximum(mask.sum(), 1)

    @jax.jit
    def step(state, obs, action, mask):
        params, opt = state
        loss, grads = jax.value_and_grad(loss_fn)(params, obs, action, mask)
        updates, opt = tx.update(grads, opt, params)
        return (optax.apply_updates(params, updates), opt), loss

    return step, (params, tx.init(params))


def bench_state(w1: str, reps: int, steps: int) -> dict:
    from openx_train.data import DatasetConfig, LoaderConfig, Structure, make_dataloader

    config = LoaderConfig(batch_size=BATCH, n_obs=N_OBS, n_action=N_ACTION, seed=0)
    loader = make_dataloader(DatasetConfig(w1, Structure(state=("observation",))), config)
    step, state = _mlp_step()
    fixed = next(iter(loader))
    args = (fixed["observation"]["state"], fixed["action"], fixed["action_pad_mask"])
    for _ in range(20):
        state, loss = step(state, *args)
    loss.block_until_ready()

    rows = []
    for _ in range(reps):
        compute = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, loss = step(state, *args)
            loss.block_until_ready()
            compute.append(time.perf_counter() - t0)
        it = iter(loader)
        next(it)
        wait = busy = 0.0
        for _ in range(steps):
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            state, loss = step(state, batch["observation"]["state"], batch["action"],
                               batch["action_pad_mask"])
            loss.block_until_ready()
            t2 = time.perf_counter()
            wait += t1 - t0
            busy += t2 - t1
        del it
        it = iter(loader)
        next(it)
        t0 = time.perf_counter()
        for _ in range(steps):
            next(it)
        alone = steps / (time.perf_counter() - t0)
        del it
        rows.append({"step_ms_no_data": 1e3 * statistics.median(compute),
                     "step_ms_in_loop": 1e3 * busy / steps, "wait_ms": 1e3 * wait / steps,
                     "wait_over_step": wait / busy, "loader_batches_per_s_alone": alone})
    return {
        "bench": "loader_state", "workload": "W5 over W1 (HalfCheetah-v5, 20 x 1000 steps)",
        "figure": "time waiting for the next batch over the train step's time",
        "wait_over_step": round(statistics.median(r["wait_over_step"] for r in rows), 4),
        "target": "<= 0.1",
        "step_ms": round(statistics.median(r["step_ms_in_loop"] for r in rows), 3),
        "step_ms_no_data": round(statistics.median(r["step_ms_no_data"] for r in rows), 3),
        "loader_batches_per_s_alone": round(statistics.median(
            r["loader_batches_per_s_alone"] for r in rows), 1),
        "config": {"batch": BATCH, "n_obs": N_OBS, "n_action": N_ACTION,
                   "mlp": [512, 512, 512], "optimizer": "adam", "steps_per_rep": steps},
        "reps": [{k: round(v, 4) for k, v in r.items()} for r in rows],
        "cpus": os.cpu_count(),
    }


def memory_child(directory: str, batches: int) -> dict:
    """Runs in its own process: builds the loader over ``directory`` and draws batches."""
    from openx_train.data import DatasetConfig, LoaderConfig, make_dataloader

    rss_import = _rss_gib()
    config = LoaderConfig(batch_size=BATCH, n_obs=N_OBS, n_action=N_ACTION, seed=0)
    t0 = time.perf_counter()
    loader = make_dataloader(DatasetConfig(directory, _camera_structure()), config)
    build_s = time.perf_counter() - t0
    rss_built = _rss_gib()
    it = iter(loader)
    seen = set()
    for _ in range(batches):
        b = next(it)
        seen.update(zip(b["episode_index"].tolist(), b["step_index"].tolist()))
    return {"rss_after_import_gib": rss_import, "rss_after_build_gib": rss_built,
            "peak_rss_gib": _peak_rss_gib(), "frames": sum(loader.num_frames),
            "episodes": sum(loader.num_episodes), "build_s": build_s,
            "distinct_frames_drawn": len(seen), "batches": batches}


def bench_memory(w2: str, workdir: str, batches: int) -> dict:
    big = loader_data.replicate(w2, os.path.join(workdir, "w2x50"), 50)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", big,
                          "--batches", str(batches)], check=True, capture_output=True,
                         text=True)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    # What a shuffle buffer of encoded windows (n_obs frames of both cameras) would hold.
    per_frame = sum(os.path.getsize(os.path.join(w2, f)) for f in os.listdir(w2)
                    if ".tfrecord" in f) / 2010
    return {
        "bench": "loader_memory", "workload": "W5 over 100k W2 frames (10 episodes x 50)",
        "figure": "peak resident memory of the loader process (GiB)",
        "peak_rss_gib": round(child["peak_rss_gib"], 3), "target": "<= 2",
        "rss_after_import_gib": round(child["rss_after_import_gib"], 3),
        "rss_after_build_gib": round(child["rss_after_build_gib"], 3),
        "frames": child["frames"], "episodes": child["episodes"],
        "build_s": round(child["build_s"], 1), "batches_drawn": child["batches"],
        "distinct_frames_drawn": child["distinct_frames_drawn"],
        "encoded_window_buffer_gib_for_comparison": round(
            child["frames"] * per_frame * N_OBS / 2**30, 1),
        "config": {"batch": BATCH, "n_obs": N_OBS, "n_action": N_ACTION, "image": IMAGE},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="where the datasets are (re)used")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", default="images,state,memory")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.batches)))
        return
    only = set(args.only.split(","))
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_loader_")
        args.workdir = tmp.name
    try:
        w2 = loader_data.make_w2(os.path.join(args.workdir, "w2"))
        if "images" in only:
            print(json.dumps(bench_images(w2, args.reps, args.batches)), flush=True)
        if "state" in only:
            w1 = loader_data.make_w1(os.path.join(args.workdir, "w1"))
            print(json.dumps(bench_state(w1, args.reps, args.steps)), flush=True)
        if "memory" in only:
            print(json.dumps(bench_memory(w2, args.workdir, 20)), flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
