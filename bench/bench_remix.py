"""Issue 14's step benchmark: the Re-Mix step (``openx_train.remix.jit_remix_step``: the proxy's
loss in train mode, the frozen reference's in eval mode, the domain-weight update and one AdamW
update of the proxy) over the BC step (``openx_train.training.jit_train_step``) at the same
config, each on one device-resident batch, no loader. Prints one JSON line.

Config (the issue's): state MLP 512x512x512, discretized head with 48 gaussian bins, batch 256;
W1 shapes (HalfCheetah state 17, action 6), history 1, chunk 1 as the robomimic configs, 8
domains. The two steps are timed alternately in the same process, ``--reps`` times
``--steps`` steps each (short repetitions, so that a burst of load from elsewhere on a shared
machine falls on few of them); the figure is the median of the per-repetition ratios of step
times (target <= 1.3), with the quartiles of those ratios. Usage::

    python bench/bench_remix.py [--reps 21] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BATCH, STATE_DIM, ACTION_DIM, DOMAINS = 256, 17, 6, 8


def _batch():
    import numpy as np

    rs = np.random.default_rng(0)
    mask = np.ones((BATCH, 1), bool)
    return {"observation": {"state": rs.normal(size=(BATCH, 1, STATE_DIM)).astype(np.float32),
                            "pad_mask": mask, "pad_mask_dict": {"state": mask}},
            "action": rs.uniform(-1, 1, (BATCH, 1, ACTION_DIM)).astype(np.float32),
            "action_pad_mask": np.ones((BATCH, 1), bool),
            "dataset_id": np.zeros(BATCH, np.int32),
            "domain_id": rs.integers(0, DOMAINS, BATCH).astype(np.int32)}


def _time(fn, state, steps):
    import jax

    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = fn(state)
    jax.block_until_ready(metrics)
    return state, (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    import jax
    import numpy as np

    from openx_train import models, training
    from openx_train.remix import create_remix_state, jit_remix_step, put_remix_batch

    config = models.model_config()
    config.head.kind, config.head.num_bins, config.head.bin_type = "discrete", 48, "gaussian"
    batch = _batch()
    spec = models.input_spec(config, batch)
    policy = models.make_policy(config, spec)
    mesh = training.make_mesh(jax.devices()[:1])

    def fresh(seed):
        return training.create_train_state(policy, training.optimizer_config(),
                                           rng=jax.random.PRNGKey(seed), total_steps=10**6)

    bc_state = training.put_state(fresh(0), mesh)
    bc_step = training.jit_train_step(mesh)
    bc_batch = training.put_batch(batch, spec, mesh)
    remix_state = training.put_state(
        create_remix_state(fresh(0), np.full(DOMAINS, 1 / DOMAINS), reference_policy=policy),
        mesh)
    reference = training.put_state(models.init_params(policy, jax.random.PRNGKey(1)), mesh)
    remix_step = jit_remix_step(mesh)
    remix_batch = put_remix_batch(batch, spec, mesh, num_domains=DOMAINS)

    def run_bc(s):
        return bc_step(s, bc_batch)

    def run_remix(s):
        return remix_step(s, reference, remix_batch)

    bc_state, _ = _time(run_bc, bc_state, 10)  # compile and warm up
    remix_state, _ = _time(run_remix, remix_state, 10)
    rows = []
    for _ in range(args.reps):
        bc_state, bc = _time(run_bc, bc_state, args.steps)
        remix_state, remix = _time(run_remix, remix_state, args.steps)
        rows.append((bc, remix))
    out = {
        "bench": "remix_step",
        "config": {"batch": BATCH, "state": STATE_DIM, "action": ACTION_DIM, "n_obs": 1,
                   "n_action": 1, "trunk": [512, 512, 512], "head": "discrete 48 gaussian bins",
                   "domains": DOMAINS, "steps_per_rep": args.steps, "reps": args.reps},
        "bc_step_ms": round(1e3 * statistics.median(r[0] for r in rows), 3),
        "remix_step_ms": round(1e3 * statistics.median(r[1] for r in rows), 3),
        "remix_over_bc": round(statistics.median(r[1] / r[0] for r in rows), 3),
        "remix_over_bc_quartiles": [round(float(q), 3) for q in np.percentile(
            [r[1] / r[0] for r in rows], [25, 75])],
        "target": "remix_over_bc <= 1.3",
        "cpus": os.cpu_count(), "device": str(jax.devices()[0].device_kind),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
