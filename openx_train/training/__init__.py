"""Training a policy: the train state, the optimizer, and the jitted, sharded steps.

::

    from openx_train import models, training

    mesh = training.make_mesh()
    spec = models.input_spec(config.model, first_batch)
    policy = models.make_policy(config.model, spec)
    state = training.create_train_state(policy, config.optimizer, rng=jax.random.PRNGKey(0),
                                        total_steps=config.steps,
                                        num_datasets=len(loader.names))
    state = training.put_state(state, mesh)
    step = training.jit_train_step(mesh)
    for batch in loader:
        state, metrics = step(state, training.put_batch(batch, spec, mesh))
"""

from openx_train.training.optimizer import make_optimizer, optimizer_config, weight_decay_mask
from openx_train.training.sharding import (
    BATCH_AXIS,
    batch_sharding,
    make_mesh,
    put_batch,
    put_state,
    replicated_sharding,
)
from openx_train.training.state import TrainState, create_train_state
from openx_train.training.step import (
    combine_eval_metrics,
    eval_step,
    jit_eval_step,
    jit_train_step,
    run_block,
    train_step,
)

__all__ = [
    "BATCH_AXIS",
    "TrainState",
    "batch_sharding",
    "combine_eval_metrics",
    "create_train_state",
    "eval_step",
    "jit_eval_step",
    "jit_train_step",
    "make_mesh",
    "make_optimizer",
    "optimizer_config",
    "put_batch",
    "put_state",
    "replicated_sharding",
    "run_block",
    "train_step",
    "weight_decay_mask",
]
