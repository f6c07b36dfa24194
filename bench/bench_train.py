"""W5 of WORKLOADS.md: the bare BC train step (``openx_train.training.jit_train_step``) on one
device-resident batch, no loader. Prints one JSON line.

* State config (W1 shapes: HalfCheetah state 17, action 6; history 2, chunk 4 as W5; batch
  256; MLP trunk 512x512x512): steps/s for the MSE, the 48-bin discretized and the diffusion
  head (20 steps, MLP-ResNet 256x3), and the discretized head at history 1, chunk 1; each as a
  ratio over a hand-written minimal step measured alternately in the same process (the loader
  benchmark's plain-JAX MLP 512x3 at W5's windows, MSE, Adam: no masks, per-dataset metrics,
  clipping or weight decay). The issue's target for the full loop is >= 5x the OpenX trainer's
  21 steps/s at the state config with the 48-bin head.
* ``--only block``: the camera config's small CNN (64/32 px, width 32, batch 64) as the bare
  step and as the loop's block step with the lax.scan rolled and unrolled: seconds per step,
  GFLOP per step (XLA's cost analysis) and GFLOP/s.
* Image config (ResNet-18, spatial softmax, one encoder per camera, 2 cameras of 128x128 uint8,
  history 2, chunk 4, 48-bin head; ``--image_batch``, default 64): steps/s and images/s.

Also the time from building the policy to the end of the first step (init + compile). Each
figure is the median of ``--reps`` repetitions. Usage::

    python bench/bench_train.py [--reps 3] [--steps 100] [--image_steps 3] [--image_batch 64]
        [--only state,image] [--heads mse,diffusion]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_loader

BATCH, N_OBS, N_ACTION, STATE_DIM, ACTION_DIM = 256, 2, 4, 17, 6


def _batch(batch_size: int, *, cameras: tuple[str, ...] = (), size: int = 128,
           n_obs: int = N_OBS, n_action: int = N_ACTION) -> dict:
    import numpy as np

    rs = np.random.default_rng(0)
    mask = np.ones((batch_size, n_obs), bool)
    mask[::4, 0] = n_obs == 1
    obs = {"state": rs.normal(size=(batch_size, n_obs, STATE_DIM)).astype(np.float32),
           "pad_mask": mask, "pad_mask_dict": {"state": mask}}
    for cam in cameras:
        obs[cam] = rs.integers(0, 256, (batch_size, n_obs, size, size, 3), dtype=np.uint8)
        obs["pad_mask_dict"][cam] = mask
    action_mask = np.ones((batch_size, n_action), bool)
    action_mask[::8, -1] = n_action == 1
    return {"observation": obs,
            "action": rs.uniform(-1, 1, (batch_size, n_action, ACTION_DIM)).astype(np.float32),
            "action_pad_mask": action_mask, "dataset_id": np.zeros(batch_size, np.int32)}


def _our_step(config, batch):
    """(jitted step, state, device batch, seconds from building the policy to the end of the
    first step)."""
    import jax

    from openx_train import models, training

    t0 = time.perf_counter()
    spec = models.input_spec(config, batch)
    policy = models.make_policy(config, spec)
    mesh = training.make_mesh()
    state = training.put_state(training.create_train_state(
        policy, training.optimizer_config(), rng=jax.random.PRNGKey(0), total_steps=10**6),
        mesh)
    step = training.jit_train_step(mesh)
    device_batch = training.put_batch(batch, spec, mesh)
    state, metrics = step(state, device_batch)
    jax.block_until_ready(metrics)
    return step, state, device_batch, time.perf_counter() - t0


def _time_ours(step, state, batch, steps):
    import jax

    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return state, steps / (time.perf_counter() - t0)


def time_calls(fn, state, batch, calls: int) -> tuple:
    """``fn(state, batch) -> (state, metrics)`` called once untimed (compile), then ``calls``
    times, each timed to its metrics' completion; returns the state and the seconds per call."""
    import jax

    state, metrics = fn(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        state, metrics = fn(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return state, times


def _time_baseline(step, state, args, steps):
    t0 = time.perf_counter()
    for _ in range(steps):
        state, loss = step(state, *args)
    loss.block_until_ready()
    return state, steps / (time.perf_counter() - t0)


def bench_state(reps: int, steps: int, heads_wanted: set[str] | None = None) -> dict:
    import jax

    from openx_train import models

    batch = _batch(BATCH)
    base_step, base_state = bench_loader._mlp_step()
    base_args = tuple(jax.device_put(x) for x in (batch["observation"]["state"],
                                                  batch["action"], batch["action_pad_mask"]))
    base_state, _ = _time_baseline(base_step, base_state, base_args, 20)
    heads = {}
    # The three heads at W5's windows, and the discretized head at one observation and one
    # action (its output layer, 512 x n_action * 6 * 48, is most of its cost).
    for name, kind, windows in (("mse", "mse", {}), ("discrete", "discrete", {}),
                                ("diffusion", "diffusion", {}),
                                ("discrete_n_obs1_n_action1", "discrete",
                                 {"n_obs": 1, "n_action": 1})):
        if heads_wanted and name not in heads_wanted:
            continue
        config = models.model_config()
        config.head.kind = kind
        step, state, device_batch, first = _our_step(config, _batch(BATCH, **windows))
        state, _ = _time_ours(step, state, device_batch, 20)
        rows = []
        for _ in range(reps):
            state, ours = _time_ours(step, state, device_batch, steps)
            base_state, base = _time_baseline(base_step, base_state, base_args, steps)
            rows.append((ours, base))
        heads[name] = {
            "steps_per_s": round(statistics.median(r[0] for r in rows), 1),
            "over_minimal_step": round(statistics.median(r[0] / r[1] for r in rows), 3),
            "first_step_s": round(first, 2),
        }
    base = statistics.median(r[1] for r in rows)
    return {
        "config": {"batch": BATCH, "n_obs": N_OBS, "n_action": N_ACTION, "state": STATE_DIM,
                   "action": ACTION_DIM, "trunk": [512, 512, 512], "bins": 48,
                   "diffusion": "20 steps, MLP-ResNet 256 x 3 blocks", "steps_per_rep": steps},
        "heads": heads, "minimal_step_per_s": round(base, 1),
        **({"discrete_over_openx_21_per_s": round(heads["discrete"]["steps_per_s"] / 21.0, 2)}
           if "discrete" in heads else {}),
    }


def bench_image(reps: int, steps: int, batch_size: int) -> dict:
    from openx_train import models

    batch = _batch(batch_size, cameras=("image_primary", "image_wrist"))
    config = models.model_config()
    config.image_encoder.kind = "resnet18"
    step, state, device_batch, first = _our_step(config, batch)
    rates = []
    for _ in range(reps):
        state, rate = _time_ours(step, state, device_batch, steps)
        rates.append(rate)
    rate = statistics.median(rates)
    return {"config": {"batch": batch_size, "cameras": 2, "image": 128, "n_obs": N_OBS,
                       "n_action": N_ACTION, "encoder": "resnet18, spatial softmax 64 kp, "
                       "one per camera", "head": "discrete 48 bins", "steps_per_rep": steps},
            "steps_per_s": round(rate, 3), "images_per_s": round(rate * batch_size * 2 * N_OBS),
            "first_step_s": round(first, 2)}


def _camera_batch(batch_size: int, size: int, wrist: int) -> dict:
    import numpy as np

    rs = np.random.default_rng(0)
    mask = np.ones((batch_size, 1), bool)
    obs = {"state": rs.normal(size=(batch_size, 1, 7)).astype(np.float32), "pad_mask": mask,
           "pad_mask_dict": {"state": mask, "image": mask, "image_wrist": mask},
           "image": rs.integers(0, 256, (batch_size, 1, size, size, 3), dtype=np.uint8),
           "image_wrist": rs.integers(0, 256, (batch_size, 1, wrist, wrist, 3), dtype=np.uint8)}
    return {"observation": obs,
            "action": rs.uniform(-1, 1, (batch_size, 1, 7)).astype(np.float32),
            "action_pad_mask": mask, "dataset_id": np.zeros(batch_size, np.int32),
            "language_instruction": np.array([b"pick up the red block"] * batch_size, object)}


def bench_block(reps: int, block: int) -> dict:
    """The camera config's model (configs/bc/synthetic_camera.py at its former 64/32 px and CNN
    width 32) as the bare jitted step, and as the loop's block step of ``block`` batches with
    the lax.scan rolled (the old path) and unrolled (what the loop uses on CPU for images)."""
    import jax
    import numpy as np

    from openx_train import models, training
    from openx_train.configs.bc import synthetic_camera
    from openx_train.training import loop

    config = synthetic_camera.get_config().model
    config.image_encoder.width, config.image_encoder.num_keypoints = 32, 32
    batch = _camera_batch(64, 64, 32)
    spec = models.input_spec(config, batch)
    policy = models.make_policy(config, spec)
    mesh = training.make_mesh()

    def fresh():
        return training.put_state(training.create_train_state(
            policy, training.optimizer_config(), rng=jax.random.PRNGKey(0),
            total_steps=10**6), mesh)

    host_block = jax.tree.map(lambda x: np.stack([x] * block), batch)
    variants = {"step": (training.jit_train_step(mesh), training.put_batch(batch, spec, mesh), 1),
                "block_rolled": (loop.jit_block_step(mesh, unroll=False),
                                 loop.put_block(host_block, spec, mesh), block),
                "block_unrolled": (loop.jit_block_step(mesh, unroll=True),
                                   loop.put_block(host_block, spec, mesh), block)}
    out = {}
    for name, (fn, device_batch, k) in variants.items():
        state = fresh()
        compiled = fn.lower(state, device_batch).compile()
        cost = compiled.cost_analysis()
        cost = (cost[0] if isinstance(cost, list) else cost or {}).get("flops")
        # XLA's cost analysis counts a while loop's body once: the bare step's count is the
        # per-step figure for all three.
        flops = cost if name == "step" else out["step"]["gflop_per_step"] * 1e9 * k
        _, times = time_calls(fn, state, device_batch, reps)
        per_step = statistics.median(times) / k
        out[name] = {"s_per_step": round(per_step, 3),
                     "gflop_per_step": round(flops / 1e9 / k, 2),
                     "gflop_per_s": round(flops / 1e9 / k / per_step, 2)}
    out["unrolled_over_rolled"] = round(out["block_rolled"]["s_per_step"]
                                        / out["block_unrolled"]["s_per_step"], 1)
    out["config"] = {"batch": 64, "image": 64, "wrist": 32, "encoder": "conv width 32, spatial "
                     "softmax 32 kp", "language": "tokens, FiLM", "block": block,
                     "needs_unrolled_block": loop.needs_unrolled_block(spec)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--image_steps", type=int, default=3)
    parser.add_argument("--image_batch", type=int, default=64)
    parser.add_argument("--block", type=int, default=2)
    parser.add_argument("--heads", default="", help="state: comma-separated among mse, "
                        "discrete, diffusion, discrete_n_obs1_n_action1 (default: all)")
    parser.add_argument("--only", default="state,image",
                        help="comma-separated: state, image, block")
    args = parser.parse_args()
    only = set(args.only.split(","))
    out = {"bench": "train_step", "workload": "W5: the jitted BC step on one device-resident "
           "batch (no loader)", "cpus": os.cpu_count()}
    if "state" in only:
        out["state"] = bench_state(args.reps, args.steps,
                                   set(filter(None, args.heads.split(","))))
    if "image" in only:
        out["image"] = bench_image(args.reps, args.image_steps, args.image_batch)
    if "block" in only:
        out["block"] = bench_block(args.reps, args.block)
    import jax

    out["device"] = str(jax.devices()[0].device_kind)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
