"""The train state: one pytree holding everything that changes during training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from openx_train.models.policy import Policy, init_params
from openx_train.training.optimizer import ema_decay, make_optimizer


@flax.struct.dataclass
class TrainState:
    """Parameters, optimizer state and the step's randomness, plus the static parts the step
    needs (not pytree leaves: they are part of the jit cache key, never donated or saved).

    Attributes:
      step: int32 scalar: the number of updates applied.
      params: the policy's parameters.
      opt_state: the optimizer's state.
      rng: uint32 ``[2]`` base key; step ``t`` draws from ``fold_in(rng, t)``, so a resumed
        run draws what an uninterrupted one does.
      ema_params: exponential moving average of ``params``, or None.
      policy: the :class:`~openx_train.models.Policy` module (static).
      tx: the optax optimizer (static).
      schedule: step -> learning rate (static).
      ema_decay: the EMA's decay, or None (static).
      num_datasets: datasets of the mixture, for the per-dataset metrics (static).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    ema_params: Any
    policy: Policy = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
    schedule: Callable[[Any], Any] = flax.struct.field(pytree_node=False)
    ema_decay: float | None = flax.struct.field(pytree_node=False)
    num_datasets: int = flax.struct.field(pytree_node=False)


def create_train_state(policy: Policy, optimizer: Any, *, rng: jax.Array, total_steps: int,
                       num_datasets: int = 1, params: Any = None) -> TrainState:
    """A fresh train state at step 0.

    Args:
      policy: from :func:`~openx_train.models.make_policy`.
      optimizer: ``config.optimizer`` (see :mod:`openx_train.training.optimizer`).
      rng: a PRNG key (``jax.random.PRNGKey(seed)``); split into the init key and the state's
        base key.
      total_steps: the run's steps (the learning-rate schedule's default length).
      num_datasets: datasets of the mixture (``len(loader.names)``).
      params: initial parameters; default: :func:`~openx_train.models.init_params`.

    Returns:
      The state, on the default device (place it with
      :func:`~openx_train.training.put_state`).

    Raises:
      ModelConfigError: for an invalid optimizer config.
    """
    if num_datasets < 1:
        raise ValueError(f"create_train_state num_datasets: expected >= 1, given "
                         f"{num_datasets!r}")
    tx, schedule = make_optimizer(optimizer, total_steps=total_steps)
    decay = ema_decay(optimizer)
    init_rng, state_rng = jax.random.split(rng)
    if params is None:
        params = init_params(policy, init_rng)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng,
        ema_params=None if decay is None else jax.tree.map(jnp.copy, params),
        policy=policy, tx=tx, schedule=schedule, ema_decay=decay, num_datasets=num_datasets)
