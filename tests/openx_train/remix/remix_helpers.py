"""Helpers of the Re-Mix step tests: a tiny policy, batches with domain ids, and Re-Mix states
built on the real train state."""

from __future__ import annotations

import jax
import numpy as np

from openx_train import models, training
from openx_train.remix import RemixOptions, create_remix_state
from tests.openx_train.model_helpers import fake_batch

OPTIONS = RemixOptions(eta=1.0, smoothing=0.05)


def tiny_config(*, head: str = "mse", dropout: float = 0.0):
    config = models.model_config()
    config.head.kind = head
    config.head.hidden_dim, config.head.num_blocks, config.head.diffusion_steps = 32, 1, 5
    config.head.num_bins = 8
    config.trunk.hidden_dims, config.trunk.dropout = (32, 32), dropout
    return config


def domain_batch(batch_size: int, num_domains: int, *, seed: int, absent: tuple[int, ...] = (),
                 **options) -> dict:
    """A loader-format batch whose examples have random domains, none of ``absent``."""
    batch = fake_batch(batch_size, seed=seed, **options)
    rs = np.random.default_rng(seed + 1000)
    present = [d for d in range(num_domains) if d not in absent]
    batch["domain_id"] = rs.choice(present, batch_size).astype(np.int32)
    return batch


def make_state(config, batch, a0, *, mesh, seed: int = 0, reference_seed: int = 1,
               options: RemixOptions = OPTIONS,
               learning_rate: float = 1e-3, reference_params=None):
    """(spec, policy, Re-Mix state on the mesh, reference params on the mesh)."""
    spec = models.input_spec(config, batch)
    policy = models.make_policy(config, spec)
    opt = training.optimizer_config()
    opt.warmup_steps, opt.learning_rate = 0, learning_rate
    proxy = training.create_train_state(policy, opt, rng=jax.random.PRNGKey(seed),
                                        total_steps=1000)
    if reference_params is None:
        reference_params = models.init_params(policy, jax.random.PRNGKey(reference_seed))
    state = create_remix_state(proxy, a0, reference_policy=policy, options=options)
    return (spec, policy, training.put_state(state, mesh),
            training.put_state(reference_params, mesh))
