"""Runs Re-Mix steps of a tiny policy on a one-device mesh and on an 8-device mesh, the same
batches, and saves what each learns (run by test_step.py in a subprocess, since the device count
is fixed when JAX starts).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m \
        tests.openx_train.remix.sharded_step OUT.npz
"""

from __future__ import annotations

import sys

import jax
import numpy as np

from openx_train import training
from openx_train.remix import RemixOptions, jit_remix_step, put_remix_batch
from tests.openx_train.remix.remix_helpers import domain_batch, make_state, tiny_config

K, B, STEPS = 5, 32, 6


def run(devices) -> dict[str, np.ndarray]:
    config = tiny_config(head="discrete", dropout=0.1)
    batches = [domain_batch(B, K, seed=s, absent=(4,) if s % 2 else ()) for s in range(STEPS)]
    mesh = training.make_mesh(devices)
    spec, _, state, ref = make_state(config, batches[0], np.array([0.3, 0.3, 0.2, 0.1, 0.1]),
                                     mesh=mesh, options=RemixOptions(eta=1.0, smoothing=0.05))
    step = jit_remix_step(mesh)
    alpha, average, loss = [], [], []
    for batch in batches:
        state, metrics = step(state, ref, put_remix_batch(batch, spec, mesh, num_domains=K))
        alpha.append(np.asarray(metrics["alpha"]))
        average.append(np.asarray(state.weights.average_alpha))
        loss.append(np.asarray(metrics["loss"]))
    params = np.concatenate([np.ravel(x) for x in jax.tree.leaves(
        jax.device_get(state.params))])
    return {"alpha": np.stack(alpha), "average": np.stack(average), "loss": np.stack(loss),
            "params": params}


def main(out: str) -> None:
    devices = jax.devices()
    assert len(devices) == 8, devices
    results = {}
    for name, devs in (("one", devices[:1]), ("eight", devices)):
        for key, value in run(devs).items():
            results[f"{name}/{key}"] = value
    np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1])
