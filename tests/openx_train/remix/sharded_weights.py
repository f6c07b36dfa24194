"""Runs Re-Mix weight updates on one device and sharded over an 8-device CPU mesh, and saves
what each gives (run by test_weights.py in a subprocess, since the device count is fixed when
JAX starts).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m \
        tests.openx_train.remix.sharded_weights OUT.npz {dyadic|normal}

Three ways, the same batches: ``single`` (every array on one device), ``jit`` (``jax.jit`` over
global arrays sharded on a ``batch`` mesh: the reduction is implicit, as in the trainer's step)
and ``shard_map`` (per-device statistics and objectives summed with ``jax.lax.psum``: the
explicit reduction).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from openx_train.remix import (
    RemixOptions,
    domain_statistics,
    init_weights,
    proxy_objective,
    update_weights,
)

K, B, STEPS = 6, 64, 12
OPTIONS = RemixOptions(eta=0.5, smoothing=0.05)


def batches(kind: str):
    rng = np.random.default_rng(0)
    for t in range(STEPS):
        ids = rng.integers(0, K - 1, B).astype(np.int32)  # domain K-1 never comes
        if t % 3 == 0:
            ids[ids == 2] = 3  # domain 2 absent from every third batch
        if kind == "dyadic":
            # Multiples of 1/8 of small size: every sum is exact in float32, in any order, so
            # the sharded results must equal the single device's bit for bit.
            excess = rng.integers(-16, 17, B).astype(np.float32) / 8
        else:
            excess = rng.normal(0.1, 1.0, B).astype(np.float32)
        excess[ids == 1] = -np.abs(excess[ids == 1]) - 0.125  # domain 1: all negative
        valid = rng.random(B) > 0.1
        yield excess, ids, valid


def step(weights, t, excess, ids, valid):
    stats = domain_statistics(excess, ids, K, valid=valid)
    new = update_weights(weights, stats, t, OPTIONS)

    def objective(e):
        return proxy_objective(e, ids, new.alpha, valid=valid, counts=stats.count)

    loss, grad = jax.value_and_grad(objective)(excess)
    return new, loss, grad, stats


def local_step(weights, t, excess, ids, valid):
    stats = jax.lax.psum(domain_statistics(excess, ids, K, valid=valid), "batch")
    new = update_weights(weights, stats, t, OPTIONS)

    def objective(e):
        return proxy_objective(e, ids, new.alpha, valid=valid, counts=stats.count)

    loss, grad = jax.value_and_grad(objective)(excess)
    return new, jax.lax.psum(loss, "batch"), grad, stats


def main(out: str, kind: str) -> None:
    devices = jax.devices()
    assert len(devices) == 8, devices
    mesh = Mesh(np.array(devices), ("batch",))
    sharded = NamedSharding(mesh, PartitionSpec("batch"))
    replicated = NamedSharding(mesh, PartitionSpec())
    a0 = np.array([0.3, 0.25, 0.2, 0.1, 0.1, 0.05])
    runs = {
        "single": (jax.jit(step), lambda x: jax.device_put(x, devices[0]),
                   lambda x: jax.device_put(x, devices[0])),
        "jit": (jax.jit(step), lambda x: jax.device_put(x, sharded),
                lambda x: jax.device_put(x, replicated)),
        "shard_map": (jax.jit(jax.shard_map(
            local_step, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(),
                                             PartitionSpec("batch"), PartitionSpec("batch"),
                                             PartitionSpec("batch")),
            out_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec("batch"),
                       PartitionSpec()))),
            lambda x: jax.device_put(x, sharded), lambda x: jax.device_put(x, replicated)),
    }
    results = {}
    for name, (fn, put_batch, put_state) in runs.items():
        weights = jax.tree.map(put_state, init_weights(a0))
        alphas, averages, losses, grads, stats = [], [], [], [], []
        for t, (excess, ids, valid) in enumerate(batches(kind)):
            weights, loss, grad, batch_stats = fn(weights, put_state(jnp.int32(t)), put_batch(excess),
                                     put_batch(ids), put_batch(valid))
            if name != "single":
                assert len(grad.sharding.device_set) == 8, grad.sharding
            alphas.append(np.asarray(weights.alpha))
            averages.append(np.asarray(weights.average_alpha))
            losses.append(np.asarray(loss))
            grads.append(np.asarray(grad))
            stats.append(np.stack([np.asarray(x) for x in batch_stats]))
        for what, values in (("alpha", alphas), ("average", averages), ("loss", losses),
                             ("grad", grads), ("stats", stats)):
            results[f"{name}/{what}"] = np.stack(values)
    np.savez(out, **results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
