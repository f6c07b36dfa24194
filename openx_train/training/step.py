"""The BC train step and the validation step: module-level pure functions, jitted once per mesh
with explicit shardings (and the state donated in training).

Metrics stay on the device; fetch them at log intervals only::

    train_step = jit_train_step(mesh)
    state, metrics = train_step(state, batch)   # batch from put_batch

Train metrics: ``loss`` (the masked mean of the per-example losses), ``grad_norm`` (before
clipping), ``learning_rate`` (of this update), ``dataset_loss`` ``[num_datasets]`` (each
dataset's mean loss in the batch, 0 where it has no example) and ``dataset_count``
``[num_datasets]`` (its examples that count, to weigh ``dataset_loss`` across steps).

Eval metrics (per batch; combine with :func:`combine_eval_metrics`): ``loss``, ``count``,
``dataset_loss``, ``dataset_count``. Examples whose ``example_mask`` is False (padding of a last
partial validation batch) or that have no real action count for nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from openx_train.models.policy import Policy, example_weights, masked_mean
from openx_train.models.spec import DATASET_ID
from openx_train.training.sharding import batch_sharding, replicated_sharding
from openx_train.training.state import TrainState

# Eval draws (the diffusion head's noise) from one fixed key, so that validation losses of
# different steps are comparable; fold_in takes uint32 data.
_EVAL_STREAM = 0xFFFFFFFF


def _dataset_metrics(per_example: jnp.ndarray, weights: jnp.ndarray, batch: Mapping[str, Any],
                     num_datasets: int) -> dict[str, jnp.ndarray]:
    ids = batch.get(DATASET_ID)
    if ids is None:
        ids = jnp.zeros(per_example.shape, jnp.int32)
    onehot = jax.nn.one_hot(ids, num_datasets, dtype=jnp.float32) * weights[:, None]
    count = jnp.sum(onehot, axis=0)
    total = jnp.sum(jnp.where(onehot > 0, onehot * per_example[:, None], 0.0), axis=0)
    return {"dataset_loss": total / jnp.maximum(count, 1.0), "dataset_count": count}


def train_step(state: TrainState, batch: Mapping[str, Any]
               ) -> tuple[TrainState, dict[str, jnp.ndarray]]:
    """One AdamW update on one batch.

    Args:
      state: the train state (donated by :func:`jit_train_step`).
      batch: model inputs with the training targets (:func:`~openx_train.training.put_batch`).

    Returns:
      ``(new_state, metrics)``.
    """
    dropout_rng, sample_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
    weights = example_weights(batch)

    def loss_fn(params):
        per_example = state.policy.apply(
            {"params": params}, batch, train=True, method=Policy.loss,
            rngs={"dropout": dropout_rng, "sample": sample_rng})
        return masked_mean(per_example, weights), per_example

    (loss, per_example), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if state.ema_decay is not None:
        ema_params = optax.incremental_update(params, state.ema_params, 1.0 - state.ema_decay)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "learning_rate": jnp.asarray(state.schedule(state.step), jnp.float32),
               **_dataset_metrics(per_example, weights, batch, state.num_datasets)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema_params)
    return new_state, metrics


def eval_step(state: TrainState, batch: Mapping[str, Any]) -> dict[str, jnp.ndarray]:
    """The validation loss of one batch (dropout off; the EMA parameters when kept).

    Args:
      state: the train state (not donated).
      batch: model inputs with the training targets, optionally ``example_mask`` (bool
        ``[B]``, False for padding examples).

    Returns:
      ``loss`` (mean over the examples that count), ``count`` (how many count),
      ``dataset_loss`` and ``dataset_count`` (``[num_datasets]``).
    """
    params = state.params if state.ema_params is None else state.ema_params
    per_example = state.policy.apply(
        {"params": params}, batch, train=False, method=Policy.loss,
        rngs={"sample": jax.random.fold_in(state.rng, _EVAL_STREAM)})
    weights = example_weights(batch)
    return {"loss": masked_mean(per_example, weights), "count": jnp.sum(weights),
            **_dataset_metrics(per_example, weights, batch, state.num_datasets)}


def run_block(step_fn: Callable[[Any, Mapping[str, Any]], tuple[Any, Any]], state: Any,
              batches: Mapping[str, Any], *, unroll: bool = False) -> tuple[Any, Any]:
    """``step_fn`` over a stacked block of batches (``[K, B, ...]``), inside a jitted function:
    a ``lax.scan`` over the block, or with ``unroll`` straight-line code (a Python loop over the
    block: no XLA while loop, see :func:`~openx_train.training.loop.needs_unrolled_block`;
    ``scan(unroll=True)`` would keep a block of one batch a while loop).

    Args:
      step_fn: ``(state, batch) -> (state, metrics)``.
      state: the state before the block.
      batches: the block, every leaf stacked on a leading axis.
      unroll: unroll the block.

    Returns:
      The state after the block and the metrics stacked ``[K, ...]``.
    """
    if not unroll:
        return jax.lax.scan(step_fn, state, batches)
    metrics = []
    for i in range(jax.tree.leaves(batches)[0].shape[0]):
        state, m = step_fn(state, jax.tree.map(lambda x, i=i: x[i], batches))
        metrics.append(m)
    return state, jax.tree.map(lambda *xs: jnp.stack(xs), *metrics)


def jit_train_step(mesh: Mesh) -> Callable[[TrainState, Mapping[str, Any]],
                                           tuple[TrainState, dict[str, jnp.ndarray]]]:
    """:func:`train_step` jitted for ``mesh``: state replicated and donated, batch split along
    the ``batch`` axis, metrics replicated. Call it once per run and reuse it: it compiles
    once per state structure and batch shapes."""
    replicated = replicated_sharding(mesh)
    return jax.jit(train_step, in_shardings=(replicated, batch_sharding(mesh)),
                   out_shardings=(replicated, replicated), donate_argnums=0)


def jit_eval_step(mesh: Mesh) -> Callable[[TrainState, Mapping[str, Any]],
                                          dict[str, jnp.ndarray]]:
    """:func:`eval_step` jitted for ``mesh`` (nothing donated)."""
    replicated = replicated_sharding(mesh)
    return jax.jit(eval_step, in_shardings=(replicated, batch_sharding(mesh)),
                   out_shardings=replicated)


def combine_eval_metrics(metrics: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The validation loss over several batches, each weighed by the examples that count
    (fetches the values from the device: call it once per validation).

    Args:
      metrics: :func:`eval_step` results.

    Returns:
      ``loss`` (float), ``count`` (float), ``dataset_loss`` and ``dataset_count`` (numpy
      ``[num_datasets]``); ``loss`` is NaN when no example counted.
    """
    metrics = jax.device_get(list(metrics))
    count = float(sum(m["count"] for m in metrics))
    total = float(sum(m["loss"] * m["count"] for m in metrics))
    d_count = np.sum([m["dataset_count"] for m in metrics], axis=0)
    d_total = np.sum([m["dataset_loss"] * m["dataset_count"] for m in metrics], axis=0)
    return {"loss": total / count if count else float("nan"), "count": count,
            "dataset_loss": d_total / np.maximum(d_count, 1.0), "dataset_count": d_count}
