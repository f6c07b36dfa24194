"""Runs Re-Mix steps of a tiny policy as one of N ``jax.distributed`` processes (gloo CPU
collectives), each feeding its share of the same global batches, and saves what it learns (run
by test_train.py: one process, then two, so that N processes are compared with one at the same
global batch).

    python -m tests.openx_train.remix.distributed_step OUT.npz NUM_PROCESSES PROCESS_ID ADDRESS
"""

from __future__ import annotations

import sys

import jax


def main(out: str, num_processes: int, process_id: int, address: str) -> None:
    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(address, num_processes=num_processes, process_id=process_id)
    import numpy as np

    from openx_train import training
    from openx_train.remix import RemixOptions, jit_remix_step, put_remix_batch
    from tests.openx_train.remix.remix_helpers import domain_batch, make_state, tiny_config

    k, b, steps = 5, 32, 6
    config = tiny_config(head="discrete", dropout=0.1)
    batches = [domain_batch(b, k, seed=s, absent=(4,) if s % 2 else ()) for s in range(steps)]
    mesh = training.make_mesh()
    spec, _, state, ref = make_state(config, batches[0], np.array([0.3, 0.3, 0.2, 0.1, 0.1]),
                                     mesh=mesh, options=RemixOptions(eta=1.0, smoothing=0.05))
    step = jit_remix_step(mesh)
    share = b // jax.process_count()
    mine = slice(jax.process_index() * share, (jax.process_index() + 1) * share)
    alpha, average, loss = [], [], []
    for batch in batches:
        local = jax.tree.map(lambda x: x[mine], batch)
        state, metrics = step(state, ref, put_remix_batch(local, spec, mesh, num_domains=k))
        alpha.append(np.asarray(metrics["alpha"]))
        average.append(np.asarray(state.weights.average_alpha))
        loss.append(np.asarray(metrics["loss"]))
    params = np.concatenate([np.ravel(x) for x in jax.tree.leaves(
        jax.device_get(state.params))])
    np.savez(out, alpha=np.stack(alpha), average=np.stack(average), loss=np.stack(loss),
             params=params, processes=jax.process_count())


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
