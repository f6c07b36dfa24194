"""Re-Mix's domain weights: the update (issue 14, rules 3 and 4), their running average and the
proxy objective (rule 5), as pure JAX functions.

A step of the Re-Mix loop, given the per-example excess loss ``e = loss_proxy - loss_ref`` of
its batch::

    stats = domain_statistics(e, batch["domain_id"], K, valid=batch["valid"])
    weights = update_weights(weights, stats, state.step, options)      # no gradient here
    loss = proxy_objective(e, batch["domain_id"], weights.alpha, valid=batch["valid"],
                           counts=stats.count)                         # the proxy's loss

``domain_statistics`` gives per-domain sums and counts; they add across devices and processes,
so a sharded step reduces them before the update. Under ``jax.jit`` over global arrays sharded
on a ``batch`` mesh (the trainer's step, one process or many) the sums are global already;
inside ``shard_map``, ``jax.lax.psum(stats, "batch")`` makes them so, and the proxy objective of
each shard, computed with the global ``counts``, sums (``psum``) to the global objective. Either
way N devices or processes learn the weights one device learns at the same global batch.

The update, for K domains, weights ``a`` (on the simplex), initial weights ``a0``, step size
``eta`` and smoothing ``c``:

* ``ebar_i = sum_{x in i} max(e(x), 0) / max(1, #{x in i: e(x) > 0})``: the mean over the
  examples with positive excess only (rule 3). Examples whose ``valid`` is False count nowhere.
* Rule 4: ``a_i <- a_i exp(eta ebar_i)``, normalized to sum 1, then
  ``a <- (1 - c) a + c a0`` (smoothing pulls toward ``a0``, not toward uniform).

Domains absent from a batch (no valid example of theirs in it) are left unchanged by that step:
their weights keep their exact values, and the present domains share the rest of the mass,
``m = 1 - sum_{absent} a_j``. For a present domain i::

    a_i <- c a0_i + (m - c a0(P)) a_i exp(eta ebar_i) / sum_{j present} a_j exp(eta ebar_j)

with ``a0(P)`` the initial weight of the present domains. When every domain is present
(``m = 1``, ``a0(P) = 1``) this is rule 4 exactly. Read as rule 4 in two halves: the
multiplicative update and normalization give each absent domain the present domains'
``a``-weighted mean factor ``sum_P a_j exp(eta ebar_j) / m`` (the neutral choice: it gains or
loses nothing against the others on average, and so keeps its weight); the smoothing then acts
on the present domains only, giving each its floor ``c a0_i`` and sharing the rest of their
mass, ``m - c a0(P)``, by the updated weights, as rule 4 shares ``1 - c``. Every weight stays at
or above ``c a0_i`` (it starts at ``a0_i``, and a present domain's update keeps it so because
``m >= c a0(P)``), and the weights sum to 1.

The released code (jhejna/openx ``scripts/train_doremi.py``) treats an absent domain as one with
no positive excess (``ebar = 0``): its factor is 1, but the renormalization and the smoothing
move it, so whenever another domain has positive excess an absent domain loses weight, and rare
domains (absent from most small batches) are pushed down for being rare. It is available as
``RemixOptions(absent="zero_excess")``.

The running average is ``abar <- abar + (a - abar) / (t + 1)`` with ``t`` the number of updates
made before this one, so after T updates ``abar`` is the mean of the T updated weights (the
initial weights are not part of it), as in the released code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from openx_train.data.config import MixtureWeights
from openx_train.data.errors import ConfigError
from openx_train.data.mixture import resolve_mixture_weights

#: ``RemixOptions.absent`` values.
ABSENT_RULES = ("keep", "zero_excess")


@dataclasses.dataclass(frozen=True)
class RemixOptions:
    """How the domain weights move (hashable: a static argument of a jitted step).

    Attributes:
      eta: step size of the multiplicative update (the robomimic configs' 0.2; Bridge 1.0).
      smoothing: ``c``, the share of ``a0`` mixed in after each update (robomimic 5e-2;
        Bridge 5e-3).
      absent: ``"keep"``: a domain with no valid example in the batch keeps its weight (the
        issue's rule, see the module docstring); ``"zero_excess"``: it is updated as a domain
        with no positive excess (the released code).
    """

    eta: float = 0.2
    smoothing: float = 5e-2
    absent: str = "keep"

    def __post_init__(self):
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ConfigError(f"remix eta: expected a finite number >= 0, given {self.eta!r}")
        if not 0.0 <= self.smoothing <= 1.0:
            raise ConfigError(f"remix smoothing: expected in [0, 1], given {self.smoothing!r}")
        if self.absent not in ABSENT_RULES:
            raise ConfigError(f"remix absent: expected one of {list(ABSENT_RULES)}, given "
                              f"{self.absent!r}")


#: The Bridge setting of the Re-Mix paper.
BRIDGE = RemixOptions(eta=1.0, smoothing=5e-3)


class DomainStats(NamedTuple):
    """Per-domain sums over a batch (each ``[K]``, the excess's dtype). Every field adds across
    shards of a batch, so ``jax.lax.psum(stats, axis)`` (or a sum over processes) gives the
    statistics of the whole batch.

    Attributes:
      positive_sum: sum of ``max(e, 0)`` over the domain's valid examples.
      positive_count: number of its valid examples with ``e > 0``.
      excess_sum: sum of ``e`` over its valid examples.
      count: number of its valid examples.
    """

    positive_sum: jax.Array
    positive_count: jax.Array
    excess_sum: jax.Array
    count: jax.Array

    def positive_mean(self) -> jax.Array:
        """``ebar``: mean positive excess over the examples that have one (0 where none)."""
        return self.positive_sum / jnp.maximum(self.positive_count, 1)

    def mean_excess(self) -> jax.Array:
        """Mean excess over the domain's valid examples (0 where none): a metric."""
        return self.excess_sum / jnp.maximum(self.count, 1)


@flax.struct.dataclass
class RemixWeights:
    """The domain weights a Re-Mix train state carries (float32 ``[K]`` each).

    Attributes:
      alpha: the current weights.
      average_alpha: the mean of the weights after each update so far (the run's output).
      initial_alpha: ``a0``, the target of the smoothing.
    """

    alpha: jax.Array
    average_alpha: jax.Array
    initial_alpha: jax.Array


def initial_weights(names: Sequence[str], frames: Sequence[int],
                    weights: MixtureWeights = "size") -> np.ndarray:
    """``a0``: each domain's share of frames (``"size"``, the default), ``"uniform"``, or given
    (a sequence aligned with ``names``, a ``{name: weight}`` mapping or a weights file),
    normalized to sum 1.

    Args:
      names: the domain names (``DataLoader.domain_names``).
      frames: their training frames (``DataLoader.domain_frames``).
      weights: how to weight them (see above).

    Returns:
      float64 ``[K]`` on the simplex.

    Raises:
      ConfigError: for unknown modes, missing names, negative or all-zero weights.
    """
    return resolve_mixture_weights(weights, list(names), list(frames), kind="domain")


def init_weights(initial: Sequence[float] | np.ndarray) -> RemixWeights:
    """The weights before the first update: ``alpha = average_alpha = initial``.

    Raises:
      ConfigError: when ``initial`` is not a vector of non-negative weights summing to 1.
    """
    a0 = np.asarray(initial, np.float64)
    if a0.ndim != 1 or not len(a0) or not np.all(np.isfinite(a0)) or np.any(a0 < 0) or \
            abs(a0.sum() - 1.0) > 1e-6:
        raise ConfigError(f"remix initial weights: expected non-negative weights summing to 1, "
                          f"given {a0.tolist()}")
    a0 = jnp.asarray(a0 / a0.sum(), jnp.float32)
    return RemixWeights(alpha=a0, average_alpha=a0, initial_alpha=a0)


def domain_statistics(excess: jax.Array, domain_ids: jax.Array, num_domains: int, *,
                      valid: jax.Array | None = None) -> DomainStats:
    """Per-domain sums of a batch's (or a shard's) excess loss.

    Args:
      excess: ``[B]`` per-example excess loss ``loss_proxy - loss_ref``.
      domain_ids: int ``[B]`` domain of each example; ids outside ``[0, num_domains)`` count
        nowhere (a jitted function cannot raise: check ids where they are made).
      num_domains: K.
      valid: optional bool ``[B]``; examples marked False (the loader's padding rows) count
        nowhere.

    Returns:
      :class:`DomainStats` of ``[K]`` arrays (sum them across shards before the update).
    """
    excess = jnp.asarray(excess)
    member = jax.nn.one_hot(domain_ids, num_domains, dtype=jnp.bool_)  # [B, K]
    if valid is not None:
        member = member & jnp.asarray(valid, jnp.bool_)[:, None]
    # Masked sums rather than a one-hot matmul: an accelerator may run float32 matmuls at
    # reduced precision (TF32), and these sums set the weights.
    e = jnp.where(member, excess[:, None], 0)
    positive = jnp.maximum(e, 0)
    dtype = e.dtype
    return DomainStats(positive_sum=positive.sum(axis=0),
                       positive_count=(positive > 0).sum(axis=0).astype(dtype),
                       excess_sum=e.sum(axis=0),
                       count=member.sum(axis=0).astype(dtype))


def update_domain_weights(stats: DomainStats, alpha: jax.Array, initial_alpha: jax.Array,
                          options: RemixOptions = RemixOptions()) -> jax.Array:
    """One update of the domain weights (rules 3 and 4; see the module docstring for the
    exact rule, absent domains included).

    Args:
      stats: the batch's :class:`DomainStats`, already summed over every shard of the batch.
      alpha: ``[K]`` current weights (on the simplex, each at least ``smoothing * a0_i``, as
        every update from ``a0`` keeps them).
      initial_alpha: ``[K]`` ``a0`` (on the simplex).
      options: ``eta``, ``smoothing`` and the rule for absent domains.

    Returns:
      ``[K]`` the new weights. With no valid example in the batch, ``alpha`` unchanged.
    """
    c = options.smoothing
    if options.absent == "keep":
        present = stats.count > 0
    else:
        present = jnp.ones(alpha.shape, jnp.bool_)
    ebar = stats.positive_mean()
    # a_i exp(eta ebar_i) / sum_j a_j exp(eta ebar_j) over the present domains, from the logs so
    # that a large eta * ebar cannot overflow.
    live = present & (alpha > 0)
    logits = jnp.where(live, jnp.log(jnp.where(live, alpha, 1)) + options.eta * ebar, -jnp.inf)
    top = jnp.where(live.any(), jnp.max(logits), 0)
    factor = jnp.where(live, jnp.exp(logits - top), 0)
    share = factor / jnp.maximum(factor.sum(), jnp.finfo(factor.dtype).tiny)
    mass = 1 - jnp.where(present, 0, alpha).sum()
    a0_mass = jnp.where(present, initial_alpha, 0).sum()
    new = jnp.where(present, c * initial_alpha + (mass - c * a0_mass) * share, alpha)
    return jnp.where(live.any(), new, alpha)


def update_average(average_alpha: jax.Array, alpha: jax.Array, step: jax.Array | int
                   ) -> jax.Array:
    """``abar + (a - abar) / (t + 1)``: ``t`` the number of updates before this one (0 for the
    first, which makes ``abar`` the first updated weights)."""
    t = jnp.asarray(step, alpha.dtype)
    return average_alpha + (alpha - average_alpha) / (t + 1)


def update_weights(weights: RemixWeights, stats: DomainStats, step: jax.Array | int,
                   options: RemixOptions = RemixOptions()) -> RemixWeights:
    """The weights and their average after one step (``step``: updates made before it).

    Args:
      weights: the current :class:`RemixWeights`.
      stats: the batch's :class:`DomainStats`, summed over every shard.
      step: the number of updates made so far (the train state's step before this one).
      options: the update's :class:`RemixOptions`.

    Returns:
      The new :class:`RemixWeights`.
    """
    alpha = update_domain_weights(stats, weights.alpha, weights.initial_alpha, options)
    return weights.replace(alpha=alpha,
                           average_alpha=update_average(weights.average_alpha, alpha, step))


def proxy_objective(excess: jax.Array, domain_ids: jax.Array, alpha: jax.Array, *,
                    valid: jax.Array | None = None, counts: jax.Array | None = None
                    ) -> jax.Array:
    """The proxy's loss ``sum_i a_i * mean_{x in i} e(x)`` (rule 5): the unclipped excess,
    weighted by the domain weights (the weights after this step's update, as the released
    code), which get no gradient.

    Args:
      excess: ``[B]`` per-example excess loss (its gradient reaches the proxy).
      domain_ids: int ``[B]`` domain of each example (outside ``[0, K)``: counted nowhere).
      alpha: ``[K]`` domain weights (treated as constants).
      valid: optional bool ``[B]``: examples marked False count nowhere.
      counts: ``[K]`` valid examples per domain in the whole batch (``DomainStats.count``
        after the cross-shard sum); default: those of this batch. A shard's objective with the
        global counts, summed over the shards, is the global objective.

    Returns:
      A scalar. A domain with no example contributes 0.
    """
    excess = jnp.asarray(excess)
    alpha = jax.lax.stop_gradient(jnp.asarray(alpha))
    member = jax.nn.one_hot(domain_ids, alpha.shape[0], dtype=jnp.bool_)
    if valid is not None:
        member = member & jnp.asarray(valid, jnp.bool_)[:, None]
    if counts is None:
        counts = member.sum(axis=0)
    counts = jax.lax.stop_gradient(jnp.asarray(counts, excess.dtype))
    sums = jnp.where(member, excess[:, None], 0).sum(axis=0)
    return jnp.sum(alpha * sums / jnp.maximum(counts, 1))
