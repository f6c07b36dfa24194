"""Issue 14's step benchmark: the Re-Mix step (``openx_train.remix.jit_remix_step``: the proxy's
loss in train mode, the frozen reference's in eval mode, the domain-weight update and one AdamW
update of the proxy) over the BC step (``openx_train.training.jit_train_step``) at the same
config, each on one device-resident batch, no loader. Prints one JSON line.

Config (the issue's): state MLP 512x512x512, discretized head with 48 gaussian bins, batch 256;
W1 shapes (HalfCheetah state 17, action 6), history 1, chunk 1 as the robomimic configs, 8
domains. Two Re-Mix steps, as ``tools/train_remix.py`` runs them:

* ``cached`` (what a run uses when the reference's loss is a function of the frame: this
  config, ``remix.cache_reference``): the batch carries the reference's losses, computed once
  per training frame before training; the step runs the proxy only;
* ``in_step``: the step runs the reference's forward pass too (a diffusion head, goals or
  augmented images).

The three steps are timed alternately in the same process, ``--reps`` times ``--steps`` steps
each (short repetitions, so that a burst of load from elsewhere on a shared machine falls on
few of them); each figure is the median of the per-repetition ratios of step times (target <=
1.3), with the quartiles of those ratios. ``cache_pass_ms_per_batch``: the reference's
eval-mode loss of one batch, what the cache costs per ``batch`` training frames, once per run
(``cache_pass_over_bc``: over the BC step).

Usage::

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
    from openx_train.models import Policy
    from openx_train.remix import (
        REFERENCE_LOSS,
        create_remix_state,
        jit_remix_step,
        put_remix_batch,
    )

    config = models.model_config()
    config.head.kind, config.head.num_bins, config.head.bin_type = "discrete", 48, "gaussian"
    batch = _batch()
    spec = models.input_spec(config, batch)
    policy = models.make_policy(config, spec)
    mesh = training.make_mesh(jax.devices()[:1])

    def fresh(seed):
        return training.create_train_state(policy, training.optimizer_config(),
                                           rng=jax.random.PRNGKey(seed), total_steps=10**6)

    def remix_state():
        return training.put_state(create_remix_state(
            fresh(0), np.full(DOMAINS, 1 / DOMAINS), reference_policy=policy), mesh)

    bc_step = training.jit_train_step(mesh)
    bc_batch = training.put_batch(batch, spec, mesh)
    reference = training.put_state(models.init_params(policy, jax.random.PRNGKey(1)), mesh)
    remix_step = jit_remix_step(mesh)
    remix_batch = put_remix_batch(batch, spec, mesh, num_domains=DOMAINS)
    # The cache pass: the reference's eval-mode losses of a batch (tools/train_remix.py runs
    # openx_train.remix.reference_losses over every training frame once).
    reference_loss = jax.jit(lambda p, b: policy.apply({"params": p}, b, train=False,
                                                       method=Policy.loss))
    eval_batch = jax.device_put(models.model_inputs(batch, spec))
    losses = np.asarray(reference_loss(reference, eval_batch))
    cached_batch = put_remix_batch({**batch, REFERENCE_LOSS: losses}, spec, mesh,
                                   num_domains=DOMAINS)

    def cache_pass(_):
        return None, reference_loss(reference, eval_batch)

    steps = {"bc": (lambda s: bc_step(s, bc_batch), training.put_state(fresh(0), mesh)),
             "in_step": (lambda s: remix_step(s, reference, remix_batch), remix_state()),
             "cached": (lambda s: remix_step(s, reference, cached_batch), remix_state()),
             "cache_pass": (cache_pass, None)}
    states = {}
    for name, (fn, state) in steps.items():
        states[name], _ = _time(fn, state, 10)  # compile and warm up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.reps):
        for name, (fn, _) in steps.items():
            states[name], t = _time(fn, states[name], args.steps)
            times[name].append(t)

    def ratio(name):
        return [a / b for a, b in zip(times[name], times["bc"])]

    def quartiles(name):
        return [round(float(q), 3) for q in np.percentile(ratio(name), [25, 75])]

    out = {
        "bench": "remix_step",
        "config": {"batch": BATCH, "state": STATE_DIM, "action": ACTION_DIM, "n_obs": 1,
                   "n_action": 1, "trunk": [512, 512, 512], "head": "discrete 48 gaussian bins",
                   "domains": DOMAINS, "steps_per_rep": args.steps, "reps": args.reps},
        "bc_step_ms": round(1e3 * statistics.median(times["bc"]), 3),
        "remix_step_ms": round(1e3 * statistics.median(times["cached"]), 3),
        "remix_over_bc": round(statistics.median(ratio("cached")), 3),
        "remix_over_bc_quartiles": quartiles("cached"),
        "remix_in_step_ms": round(1e3 * statistics.median(times["in_step"]), 3),
        "remix_in_step_over_bc": round(statistics.median(ratio("in_step")), 3),
        "remix_in_step_over_bc_quartiles": quartiles("in_step"),
        "cache_pass_ms_per_batch": round(1e3 * statistics.median(times["cache_pass"]), 3),
        "cache_pass_over_bc": round(statistics.median(ratio("cache_pass")), 3),
        "target": "remix_over_bc <= 1.3",
        "cpus": os.cpu_count(), "device": str(jax.devices()[0].device_kind),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
