"""The Re-Mix train step: one update of the proxy policy and of the domain weights, as a
module-level pure function jitted once per mesh (state donated, batch split along the ``batch``
axis, the reference's parameters replicated and never donated).

::

    state = create_remix_state(proxy_train_state, initial_alpha, reference_policy=ref_policy,
                               options=RemixOptions(eta=0.2, smoothing=0.05))  # a TrainState
    state = training.put_state(state, mesh)
    reference_params = training.put_state(reference_params, mesh)
    step = jit_remix_step(mesh)
    for batch in loader:
        state, metrics = step(state, reference_params, put_remix_batch(batch, spec, mesh))

Each step, for the global batch (issue 14, rules 2-5):

* the per-example losses of the proxy (train mode: dropout on) and of the reference (eval mode,
  its parameters frozen: they get no gradient and are an argument, not part of the state); both
  draw the head's noise (the diffusion head's) from the same key, so that noise cancels in
  their difference. A batch may carry the reference's losses (``reference_loss``, float32
  ``[B]``): then the step uses them and runs no reference forward pass. They are the same
  numbers when the reference's loss is a function of the frame (a head whose loss draws no
  noise, inputs without random goals or augmentation), which is when the Re-Mix run computes
  them once per training frame
  (:func:`~openx_train.remix.reference_cache.reference_losses`, ``remix.cache_reference``);
* the excess ``e = loss_proxy - loss_ref`` of every example that counts (a real action, and
  ``example_mask`` True when the batch has one);
* the per-domain statistics of ``e`` (:func:`~openx_train.remix.domain_statistics`); the
  step is jitted over global arrays sharded on the batch mesh, so these sums are over the whole
  global batch whatever the number of devices or processes, and N processes learn the weights
  one process learns at the same global batch;
* the weight update and its running average (:func:`~openx_train.remix.update_weights`), kept in
  the state;
* the proxy's loss ``sum_i a_i mean_{x in i} e(x)`` with the updated weights (no gradient to
  them), and one AdamW update of the proxy (the optimizer of BC).

Metrics (on the device; fetch them at log intervals): ``loss`` (the proxy objective),
``proxy_loss`` and ``reference_loss`` (masked means), ``excess`` (their difference),
``grad_norm``, ``learning_rate``, and per domain (``[K]``): ``alpha``, ``average_alpha``,
``domain_excess`` (mean excess of the domain's examples in the batch, 0 where none),
``domain_positive_excess`` (``ebar``, rule 3) and ``domain_count`` (its examples that count).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from openx_train.data.errors import ConfigError
from openx_train.models.errors import InputSpecError
from openx_train.models.policy import Policy, example_weights, masked_mean
from openx_train.models.spec import EXAMPLE_MASK, InputSpec, model_inputs
from openx_train.remix.weights import (
    RemixOptions,
    RemixWeights,
    domain_statistics,
    init_weights,
    proxy_objective,
    update_weights,
)
from openx_train.training.sharding import BATCH_AXIS, batch_sharding, replicated_sharding
from openx_train.training.state import TrainState
from openx_train.training.step import run_block

#: The batch key of each example's domain (``DataLoader.domain_names`` index).
DOMAIN_ID = "domain_id"
#: The batch key of the reference's per-example losses, when they were computed ahead.
REFERENCE_LOSS = "reference_loss"


@flax.struct.dataclass
class RemixState(TrainState):
    """The Re-Mix train state: the proxy policy's train state (every
    :class:`~openx_train.training.TrainState` field: ``step`` is the number of Re-Mix updates
    made) plus the domain weights, one pytree saved and restored whole, and the static parts of
    the step. The weights are the field ``extra`` (what :mod:`openx_train.run`'s checkpointer
    saves besides a train state's fields); :attr:`weights` names it.

    Attributes:
      extra: :class:`~openx_train.remix.RemixWeights` (``alpha``, ``average_alpha``,
        ``initial_alpha``).
      reference_policy: the reference's policy module (static; its parameters are an argument
        of the step).
      options: the update's :class:`~openx_train.remix.RemixOptions` (static).
    """

    extra: RemixWeights
    reference_policy: Policy = flax.struct.field(pytree_node=False)
    options: RemixOptions = flax.struct.field(pytree_node=False)

    @property
    def weights(self) -> RemixWeights:
        """The domain weights (``extra``)."""
        return self.extra

    @property
    def num_domains(self) -> int:
        """K, the number of domains."""
        return int(self.extra.alpha.shape[0])


def create_remix_state(proxy: TrainState, initial_alpha: Sequence[float] | np.ndarray, *,
                       reference_policy: Policy,
                       options: RemixOptions | None = None) -> RemixState:
    """A Re-Mix state before its first update.

    Args:
      proxy: a fresh train state of the proxy policy
        (:func:`~openx_train.training.create_train_state`).
      initial_alpha: ``a0``, ``[K]`` on the simplex
        (:func:`~openx_train.remix.initial_weights`).
      reference_policy: the reference's policy module (the same inputs as the proxy's).
      options: eta, smoothing and the rule for absent domains (default:
        ``RemixOptions()``, the robomimic setting).

    Returns:
      The state, on the default device (place it with
      :func:`~openx_train.training.put_state`).

    Raises:
      ConfigError: for initial weights that are not on the simplex, or a reference whose
        input spec differs from the proxy's.
    """
    if reference_policy.spec != proxy.policy.spec:
        raise ConfigError(f"remix reference: expected the proxy's input spec "
                          f"{proxy.policy.spec.to_json()}, given {reference_policy.spec.to_json()}")
    # init_weights gives one array for all three fields: separate buffers, since the step
    # donates the state and a buffer cannot be donated twice.
    weights = jax.tree.map(lambda x: np.array(x, copy=True), init_weights(initial_alpha))
    fields = {f.name: getattr(proxy, f.name) for f in dataclasses.fields(TrainState)}
    return RemixState(**fields, extra=weights, reference_policy=reference_policy,
                      options=options if options is not None else RemixOptions())


def _masked_sum(values: jax.Array, member: jax.Array) -> jax.Array:
    return jnp.where(member, values[:, None], 0.0).sum(axis=0)


def remix_step(state: RemixState, reference_params: Any, batch: Mapping[str, Any]
               ) -> tuple[RemixState, dict[str, jax.Array]]:
    """One Re-Mix step on one (global) batch: the domain weights, then the proxy.

    Args:
      state: the :class:`RemixState` (donated by :func:`jit_remix_step`).
      reference_params: the reference policy's parameters (frozen; not donated; unused when
        the batch carries ``reference_loss``).
      batch: model inputs with the training targets and ``domain_id``, optionally
        ``reference_loss`` (:func:`put_remix_batch`).

    Returns:
      ``(new_state, metrics)`` (see the module docstring).
    """
    k = state.num_domains
    dropout_rng, sample_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
    weights = example_weights(batch)
    valid = weights > 0
    ids = batch[DOMAIN_ID]
    if REFERENCE_LOSS in batch:
        reference_loss = jax.lax.stop_gradient(batch[REFERENCE_LOSS])
    else:
        reference_loss = jax.lax.stop_gradient(state.reference_policy.apply(
            {"params": reference_params}, batch, train=False, method=Policy.loss,
            rngs={"sample": sample_rng}))

    def loss_fn(params):
        proxy_loss = state.policy.apply(
            {"params": params}, batch, train=True, method=Policy.loss,
            rngs={"dropout": dropout_rng, "sample": sample_rng})
        excess = proxy_loss - reference_loss
        stats = domain_statistics(jax.lax.stop_gradient(excess), ids, k, valid=valid)
        new_weights = update_weights(state.weights, stats, state.step, state.options)
        objective = proxy_objective(excess, ids, new_weights.alpha, valid=valid,
                                    counts=stats.count)
        return objective, (proxy_loss, stats, new_weights)

    (objective, (proxy_loss, stats, new_weights)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if state.ema_decay is not None:
        ema_params = optax.incremental_update(params, state.ema_params, 1.0 - state.ema_decay)
    proxy_mean = masked_mean(proxy_loss, weights)
    reference_mean = masked_mean(reference_loss, weights)
    metrics = {
        "loss": objective, "proxy_loss": proxy_mean, "reference_loss": reference_mean,
        "excess": proxy_mean - reference_mean, "grad_norm": optax.global_norm(grads),
        "learning_rate": jnp.asarray(state.schedule(state.step), jnp.float32),
        "alpha": new_weights.alpha, "average_alpha": new_weights.average_alpha,
        "domain_excess": stats.mean_excess(), "domain_positive_excess": stats.positive_mean(),
        "domain_count": stats.count,
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema_params, extra=new_weights), metrics


def jit_remix_step(mesh: Mesh) -> Callable[[RemixState, Any, Mapping[str, Any]],
                                           tuple[RemixState, dict[str, jax.Array]]]:
    """:func:`remix_step` jitted for ``mesh``: the state replicated and donated, the
    reference's parameters replicated, the batch split along the ``batch`` axis, the metrics
    replicated. Call it once per run: it compiles once per state structure and batch shapes."""
    replicated = replicated_sharding(mesh)
    return jax.jit(remix_step, in_shardings=(replicated, replicated, batch_sharding(mesh)),
                   out_shardings=(replicated, replicated), donate_argnums=0)


def remix_block_step(state: RemixState, reference_params: Any, batches: Mapping[str, Any],
                     *, unroll: bool = False) -> tuple[RemixState, dict[str, jax.Array]]:
    """:func:`remix_step` over a stacked block of batches (``[block, B, ...]``) with
    ``lax.scan``, or unrolled (:func:`~openx_train.training.run_block`); the metrics come
    stacked ``[block, ...]``."""
    return run_block(lambda s, b: remix_step(s, reference_params, b), state, batches,
                     unroll=unroll)


def jit_remix_block_step(mesh: Mesh, *, unroll: bool = False
                         ) -> Callable[[RemixState, Any, Mapping[str, Any]],
                                       tuple[RemixState, dict[str, jax.Array]]]:
    """:func:`remix_block_step` jitted for ``mesh`` (the training loop's block of batches per
    call, one transfer per block): state replicated and donated, reference parameters
    replicated, batches split along their second axis. ``unroll`` as the BC loop's block step
    (:func:`~openx_train.training.loop.needs_unrolled_block`: image policies on CPU, whose
    backward convolutions XLA's CPU backend runs far slower inside a while loop)."""
    replicated = replicated_sharding(mesh)
    blocks = NamedSharding(mesh, PartitionSpec(None, BATCH_AXIS))
    return jax.jit(functools.partial(remix_block_step, unroll=unroll),
                   in_shardings=(replicated, replicated, blocks),
                   out_shardings=(replicated, replicated), donate_argnums=0)


def remix_inputs(batch: Mapping[str, Any], spec: InputSpec, *, num_domains: int | None = None
                 ) -> dict[str, Any]:
    """A loader batch's model inputs with the training targets and ``domain_id`` (numpy, on
    the host), and ``reference_loss`` when the batch has it; the loader's ``valid`` becomes
    ``example_mask`` when the batch has no mask.

    Args:
      batch: a loader batch (numpy).
      spec: the policy's input spec.
      num_domains: K, to check every ``domain_id`` is in ``[0, K)`` (a jitted step cannot).

    Returns:
      Nested dicts of numpy arrays.

    Raises:
      InputSpecError: for a batch that does not fit the spec, has no ``domain_id`` or one out
        of range, or a ``reference_loss`` that is not one float per example.
    """
    host = model_inputs(batch, spec, train=True)
    size = len(np.asarray(host["action"]))
    if DOMAIN_ID not in batch:
        raise InputSpecError(f"batch {DOMAIN_ID}: missing; expected int32 [{size}] (a loader "
                             "batch has it)")
    ids = np.asarray(batch[DOMAIN_ID])
    if ids.shape != (size,):
        raise InputSpecError(f"batch {DOMAIN_ID}: expected shape [{size}], given "
                             f"{list(ids.shape)}")
    if num_domains is not None and size and (ids.min() < 0 or ids.max() >= num_domains):
        raise InputSpecError(f"batch {DOMAIN_ID}: expected ids in [0, {num_domains}), given "
                             f"[{ids.min()}, {ids.max()}]")
    host[DOMAIN_ID] = ids.astype(np.int32, copy=False)
    if REFERENCE_LOSS in batch:
        losses = np.asarray(batch[REFERENCE_LOSS])
        if losses.shape != (size,) or not np.issubdtype(losses.dtype, np.floating):
            raise InputSpecError(f"batch {REFERENCE_LOSS}: expected float32 [{size}], given "
                                 f"{losses.dtype.name} {list(losses.shape)}")
        host[REFERENCE_LOSS] = losses.astype(np.float32, copy=False)
    if EXAMPLE_MASK not in host and "valid" in batch:
        host[EXAMPLE_MASK] = np.asarray(batch["valid"], np.bool_)
    return host


def put_remix_batch(batch: Mapping[str, Any], spec: InputSpec, mesh: Mesh, *,
                    num_domains: int | None = None) -> dict[str, Any]:
    """:func:`remix_inputs` as global device arrays split over the mesh (each process passes
    its own share of the global batch, as :func:`~openx_train.training.put_batch`).

    Args:
      batch: this process's loader batch (numpy).
      spec: the policy's input spec.
      mesh: from :func:`~openx_train.training.make_mesh`.
      num_domains: K, to check the domain ids.

    Returns:
      Nested dicts of ``jax.Array`` sharded along the batch axis.

    Raises:
      InputSpecError: for a batch that does not fit the spec, has no ``domain_id`` or one out
        of range, or whose size the process's devices do not divide.
    """
    host = remix_inputs(batch, spec, num_domains=num_domains)
    size = len(host[DOMAIN_ID])
    local = len(mesh.local_devices)
    if size % local:
        raise InputSpecError(f"batch size: expected a multiple of this process's {local} "
                             f"devices, given {size}")
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(host, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), host)
