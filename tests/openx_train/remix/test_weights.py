"""The Re-Mix domain-weight update, its average and the proxy objective against a plain numpy
transcription of the issue's rules 3-5, on hand-made per-example losses; their invariants; and
the sharded update (8 CPU devices) against one device."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openx_train.data import ConfigError, save_mixture_weights
from openx_train.remix import (
    BRIDGE,
    RemixOptions,
    domain_statistics,
    init_weights,
    initial_weights,
    proxy_objective,
    update_domain_weights,
    update_weights,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))

# Hand-made per-example losses of a batch of 8 over K = 5 domains.
PROXY = np.array([2.0, 1.5, 0.5, 3.0, 0.2, 1.0, 0.7, 0.4], np.float32)
REF = np.array([1.0, 2.0, 0.5, 1.0, 0.9, 0.3, 1.2, 0.1], np.float32)
IDS = np.array([0, 0, 0, 1, 2, 1, 2, 3], np.int32)
VALID = np.array([True] * 7 + [False])
# excess = [1.0, -0.5, 0.0, 2.0, -0.7, 0.7, -0.5, 0.3]: domain 0 has one positive, one negative
# and one zero excess; domain 1 two positives; domain 2 only negative excess; domain 3's only
# example is invalid and domain 4 has none: both are absent.
K = 5


def numpy_update(excess, ids, valid, alpha, a0, eta, c, absent="keep"):
    """Rules 3 and 4 of issue 14, one example at a time; absent domains as documented."""
    k = len(alpha)
    positive_sum, positive_count, count = np.zeros(k), np.zeros(k), np.zeros(k)
    for e, d, v in zip(excess, ids, valid):
        if not v:
            continue
        count[d] += 1
        if e > 0:
            positive_sum[d] += e
            positive_count[d] += 1
    ebar = positive_sum / np.maximum(positive_count, 1)
    alpha = np.asarray(alpha, np.float64)
    if absent == "zero_excess" or (count > 0).all():
        a = alpha * np.exp(eta * ebar)
        a = a / a.sum()
        return (1 - c) * a + c * a0
    present = count > 0
    if not present.any():
        return alpha.copy()
    a = alpha.copy()
    factor = alpha[present] * np.exp(eta * ebar[present])
    mass = 1 - alpha[~present].sum()
    a[present] = c * a0[present] + (mass - c * a0[present].sum()) * factor / factor.sum()
    return a


def numpy_objective(excess, ids, valid, alpha):
    """Rule 5: sum_i a_i * mean over the valid examples x of domain i of e(x)."""
    total = 0.0
    for d in range(len(alpha)):
        e = excess[(ids == d) & valid]
        if len(e):
            total += alpha[d] * e.mean()
    return total


def _random_batch(rng, k, b=32, absent=(), negative=()):
    ids = rng.integers(0, k, b).astype(np.int32)
    for d in absent:
        ids[ids == d] = next(x for x in range(k) if x not in absent)
    excess = rng.normal(0.2, 1.0, b).astype(np.float32)
    for d in negative:
        excess[ids == d] = -np.abs(excess[ids == d])
    return excess, ids, rng.random(b) > 0.15


def test_statistics_and_update_of_a_hand_made_batch():
    excess = PROXY - REF
    stats = domain_statistics(excess, IDS, K, valid=VALID)
    np.testing.assert_allclose(stats.positive_sum, [1.0, 2.7, 0, 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(stats.positive_count, [1, 2, 0, 0, 0])  # 0.0 is not positive
    np.testing.assert_array_equal(stats.count, [3, 2, 2, 0, 0])
    np.testing.assert_allclose(stats.excess_sum, [0.5, 2.7, -1.2, 0, 0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stats.positive_mean(), [1.0, 1.35, 0, 0, 0], rtol=1e-6)
    a0 = np.array([0.4, 0.2, 0.2, 0.1, 0.1])
    alpha = np.array([0.3, 0.3, 0.2, 0.05, 0.15])
    eta, c = 0.2, 0.05
    new = np.asarray(update_domain_weights(stats, jnp.asarray(alpha, jnp.float32),
                                           jnp.asarray(a0, jnp.float32),
                                           RemixOptions(eta=eta, smoothing=c)))
    # By hand: domains 3 and 4 keep 0.05 and 0.15; 0, 1, 2 share 0.8.
    f = alpha[:3] * np.exp(eta * np.array([1.0, 1.35, 0.0]))
    by_hand = np.concatenate([c * a0[:3] + (0.8 - c * 0.8) * f / f.sum(), [0.05, 0.15]])
    np.testing.assert_allclose(new, by_hand, rtol=1e-6)
    np.testing.assert_allclose(new, numpy_update(excess, IDS, VALID, alpha, a0, eta, c),
                               rtol=1e-6)
    assert new[3] == np.float32(0.05) and new[4] == np.float32(0.15)  # exactly unchanged
    assert new[1] > alpha[1] and new[2] < alpha[2]
    assert new.sum() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("absent", ["keep", "zero_excess"])
@pytest.mark.parametrize("options", [(0.2, 5e-2), (1.0, 5e-3), (3.0, 0.5)])
def test_update_matches_the_numpy_rules_over_many_steps(absent, options):
    eta, c = options
    rng = np.random.default_rng(1)
    k = 6
    a0 = rng.dirichlet(np.ones(k))
    weights = init_weights(a0)
    alpha = a0.copy()
    rule = RemixOptions(eta=eta, smoothing=c, absent=absent)
    step = jax.jit(update_weights, static_argnums=3)
    alphas = []
    for t in range(40):
        absent_now = [5] if t % 2 else [2, 5]
        excess, ids, valid = _random_batch(rng, k, absent=absent_now, negative=[1])
        stats = domain_statistics(excess, ids, k, valid=valid)
        weights = step(weights, stats, t, rule)
        alpha = numpy_update(excess, ids, valid, alpha, a0, eta, c, absent)
        alphas.append(alpha)
        np.testing.assert_allclose(weights.alpha, alpha, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(weights.average_alpha, np.mean(alphas, axis=0), rtol=2e-5)
    if absent == "keep":
        assert float(weights.alpha[5]) == pytest.approx(a0[5], rel=1e-6)  # never in a batch
    else:
        assert float(weights.alpha[5]) < a0[5]  # the released rule pushes it down


def test_every_domain_present_is_rule_4_literally():
    rng = np.random.default_rng(2)
    a0 = np.array([0.1, 0.2, 0.3, 0.4])
    alpha = np.array([0.25, 0.25, 0.3, 0.2])
    excess = rng.normal(0, 1, 64).astype(np.float32)
    ids = np.tile(np.arange(4, dtype=np.int32), 16)
    ebar = np.array([np.maximum(excess[ids == d], 0).sum() / max((excess[ids == d] > 0).sum(), 1)
                     for d in range(4)])
    a = alpha * np.exp(0.2 * ebar)
    a = a / a.sum()
    a = (1 - 0.05) * a + 0.05 * a0
    for absent in ("keep", "zero_excess"):
        new = update_domain_weights(domain_statistics(excess, ids, 4), jnp.asarray(alpha),
                                    jnp.asarray(a0), RemixOptions(absent=absent))
        np.testing.assert_allclose(new, a, rtol=1e-6)


def test_absent_domains_keep_their_weight_and_the_neutral_factor():
    """'Unchanged' = the weight of an absent domain is kept to the bit: rule 4's multiplicative
    update and normalization with each absent domain multiplied by the present domains'
    alpha-weighted mean factor, then the smoothing within the present domains (each its floor
    c * a0_i, the rest of their mass m - c * a0(P) by the updated weights)."""
    rng = np.random.default_rng(3)
    a0 = np.array([0.3, 0.3, 0.2, 0.2])
    alpha = np.array([0.4, 0.1, 0.3, 0.2], np.float32)
    excess = rng.normal(0.5, 1, 16).astype(np.float32)
    ids = np.array([0, 1] * 8, np.int32)  # domains 2 and 3 absent
    stats = domain_statistics(excess, ids, 4)
    new = np.asarray(update_domain_weights(stats, jnp.asarray(alpha), jnp.asarray(a0, jnp.float32),
                                           RemixOptions(eta=1.0, smoothing=0.1)))
    assert new[2] == alpha[2] and new[3] == alpha[3]
    factor = np.exp(1.0 * np.asarray(stats.positive_mean(), np.float64))
    mean_factor = (alpha[:2] * factor[:2]).sum() / alpha[:2].sum()
    a = alpha * np.concatenate([factor[:2], [mean_factor, mean_factor]])
    a = a / a.sum()
    np.testing.assert_allclose(a[2:], alpha[2:], rtol=1e-6)  # the renormalization keeps them
    mass = a[:2].sum()  # = 1 - alpha[2] - alpha[3]
    smoothed = 0.1 * a0[:2] + (mass - 0.1 * a0[:2].sum()) * a[:2] / mass
    np.testing.assert_allclose(new[:2], smoothed, rtol=1e-6)
    # No valid example at all: nothing moves.
    none = domain_statistics(excess, ids, 4, valid=np.zeros(16, bool))
    np.testing.assert_array_equal(update_domain_weights(none, jnp.asarray(alpha),
                                                        jnp.asarray(a0, jnp.float32)), alpha)


@pytest.mark.parametrize("absent", ["keep", "zero_excess"])
def test_weights_stay_on_the_simplex_above_the_smoothing_bound(absent):
    """Over many adversarial steps (huge excess in one domain, domains coming and going, all
    negative ones), every weight stays >= c * a0_i and they sum to 1; no overflow."""
    rng = np.random.default_rng(4)
    k, c = 8, 0.05
    a0 = rng.dirichlet(np.ones(k) * 0.5)
    weights = init_weights(a0)
    rule = RemixOptions(eta=1.0, smoothing=c, absent=absent)
    step = jax.jit(update_weights, static_argnums=3)
    for t in range(300):
        excess, ids, valid = _random_batch(rng, k, b=16, negative=[3, 4])
        excess[ids == 0] = 500.0  # exp(500) overflows float32 in a literal implementation
        weights = step(weights, domain_statistics(excess, ids, k, valid=valid), t, rule)
        alpha = np.asarray(weights.alpha)
        assert np.all(np.isfinite(alpha))
        assert alpha.sum() == pytest.approx(1.0, abs=1e-5)
        assert np.all(alpha >= c * a0 * (1 - 1e-5)), (t, alpha, c * a0)
    # Domain 0 takes everything the others do not keep as their floor.
    np.testing.assert_allclose(alpha[1:], c * a0[1:], rtol=1e-3)


def test_identical_domains_keep_their_initial_weights():
    rng = np.random.default_rng(5)
    a0 = np.array([0.5, 0.3, 0.15, 0.05])
    weights = init_weights(a0)
    for t in range(50):
        e = rng.normal(0.3, 1.0, 8).astype(np.float32)
        excess = np.tile(e, 4)  # every domain sees the same losses
        ids = np.repeat(np.arange(4, dtype=np.int32), 8)
        weights = update_weights(weights, domain_statistics(excess, ids, 4), t, BRIDGE)
    np.testing.assert_allclose(weights.alpha, a0, rtol=1e-5)
    np.testing.assert_allclose(weights.average_alpha, a0, rtol=1e-5)


def test_a_domain_with_higher_excess_gains_weight():
    rng = np.random.default_rng(6)
    a0 = np.full(4, 0.25)
    weights = init_weights(a0)
    history = []
    for t in range(30):
        ids = rng.integers(0, 4, 64).astype(np.int32)
        excess = rng.normal(0.1, 0.2, 64).astype(np.float32)
        excess[ids == 2] += 0.5  # domain 2: the proxy lags the reference most there
        weights = update_weights(weights, domain_statistics(excess, ids, 4), t)
        history.append(float(weights.alpha[2]))
    assert all(b > a for a, b in itertools.pairwise(history))
    assert history[-1] > 0.5 and np.all(np.delete(np.asarray(weights.alpha), 2) < 0.25)
    assert float(weights.average_alpha[2]) == pytest.approx(np.mean(history), rel=1e-5)


def test_the_average_is_the_mean_of_the_updated_weights():
    rng = np.random.default_rng(7)
    weights = init_weights([0.6, 0.4])
    seen = []
    for t in range(5):
        excess = rng.normal(0, 1, 8).astype(np.float32)
        ids = np.array([0, 1] * 4, np.int32)
        weights = update_weights(weights, domain_statistics(excess, ids, 2), t)
        seen.append(np.asarray(weights.alpha))
        if t == 0:  # abar + (a - abar) / 1: the first updated weights, a0 not part of it
            np.testing.assert_array_equal(weights.average_alpha, weights.alpha)
        np.testing.assert_allclose(weights.average_alpha, np.mean(seen, axis=0), rtol=1e-6)
    np.testing.assert_array_equal(weights.initial_alpha, np.float32([0.6, 0.4]))


def test_proxy_objective_and_its_gradient():
    excess = jnp.asarray(PROXY - REF)
    alpha = jnp.asarray([0.3, 0.3, 0.2, 0.1, 0.1])
    value = proxy_objective(excess, IDS, alpha, valid=VALID)
    expected = numpy_objective(PROXY - REF, IDS, VALID, np.asarray(alpha))
    # = 0.3 * (1.0 - 0.5 + 0.0) / 3 + 0.3 * (2.0 + 0.7) / 2 + 0.2 * (-0.7 - 0.5) / 2
    assert expected == pytest.approx(0.3 * 0.5 / 3 + 0.3 * 1.35 - 0.2 * 0.6)
    assert float(value) == pytest.approx(expected, rel=1e-6)
    grad_e, grad_a = jax.grad(lambda e, a: proxy_objective(e, IDS, a, valid=VALID),
                              argnums=(0, 1))(excess, alpha)
    counts = np.array([3, 2, 2, 0, 0])
    np.testing.assert_allclose(grad_e, [0.1, 0.1, 0.1, 0.15, 0.1, 0.15, 0.1, 0.0], rtol=1e-6)
    assert np.all(np.asarray(grad_a) == 0)  # the weights are constants of the proxy's loss
    # With the counts of a larger (global) batch, this shard's part of the objective.
    part = proxy_objective(excess, IDS, alpha, valid=VALID, counts=2 * counts)
    assert float(part) == pytest.approx(expected / 2, rel=1e-6)
    assert float(proxy_objective(excess, IDS, alpha, valid=np.zeros(8, bool))) == 0.0


def test_initial_weights_and_options(tmp_path):
    names, frames = ["a", "b", "c"], [100, 300, 600]
    np.testing.assert_allclose(initial_weights(names, frames), [0.1, 0.3, 0.6])  # frame share
    np.testing.assert_allclose(initial_weights(names, frames, "uniform"), [1 / 3] * 3)
    np.testing.assert_allclose(initial_weights(names, frames, {"a": 1, "b": 1, "c": 2}),
                               [0.25, 0.25, 0.5])
    save_mixture_weights(tmp_path / "w.json", {"a": 2, "b": 1, "c": 1})
    np.testing.assert_allclose(initial_weights(names, frames, str(tmp_path / "w.json")),
                               [0.5, 0.25, 0.25])
    with pytest.raises(ConfigError, match=r"no weight for domains \['c'\]"):
        initial_weights(names, frames, {"a": 1, "b": 1})
    with pytest.raises(ConfigError, match="summing to 1"):
        init_weights([0.5, 0.6])
    with pytest.raises(ConfigError, match="smoothing: expected in"):
        RemixOptions(smoothing=1.5)
    with pytest.raises(ConfigError, match="absent: expected one of"):
        RemixOptions(absent="skip")
    assert (BRIDGE.eta, BRIDGE.smoothing) == (1.0, 5e-3)
    assert (RemixOptions().eta, RemixOptions().smoothing) == (0.2, 5e-2)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dyadic", "normal"])
def test_sharded_batches_learn_the_single_device_weights(tmp_path, kind):
    """8 CPU devices, a batch sharded over them: by jit over global arrays (implicit reduction)
    and by shard_map with psum of the statistics (explicit), 12 steps with domains absent,
    all-negative and invalid examples. With sums exact in float32 (dyadic excess), the reduced
    statistics are bitwise those of one device; the weights then differ only by the rounding of
    the replicated arithmetic, which XLA compiles differently in each program (a few ulp)."""
    out = tmp_path / "out.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-m", "tests.openx_train.remix.sharded_weights",
                           str(out), kind], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = np.load(out)
    for mode in ("jit", "shard_map"):
        if kind == "dyadic":
            np.testing.assert_array_equal(r[f"{mode}/stats"], r["single/stats"])
        else:
            np.testing.assert_allclose(r[f"{mode}/stats"], r["single/stats"], rtol=1e-6,
                                       atol=1e-6)
        for what in ("alpha", "average", "loss", "grad"):
            np.testing.assert_allclose(r[f"{mode}/{what}"], r[f"single/{what}"], rtol=0,
                                       atol=5e-7, err_msg=f"{mode}/{what}")
    alpha = r["single/alpha"]
    assert np.abs(alpha[-1] - alpha[0]).max() > 0.05  # the weights did move
    assert alpha[-1][5] == pytest.approx(0.05, rel=1e-6)  # the domain never seen kept a0
