"""Action heads: bins round-trip, every head overfits a tiny dataset, and the diffusion head
keeps both modes of a two-mode action distribution that an MSE head averages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openx_train.models import bin_edges, decode_bins, encode_bins, model_config
from openx_train.models.heads import DiscreteHead, cosine_beta_schedule
from tests.openx_train.model_helpers import fake_batch, fit, predict


@pytest.mark.parametrize("bin_type", ["uniform", "gaussian"])
@pytest.mark.parametrize("action_range", [(-1.0, 1.0), (-3.0, 2.0)])
def test_bins_round_trip_within_half_a_bin(bin_type, action_range):
    edges = bin_edges(48, bin_type=bin_type, action_range=action_range, std=0.7)
    assert edges.shape == (49,) and np.all(np.diff(edges) > 0)
    np.testing.assert_allclose(edges[[0, -1]], action_range, rtol=1e-6)
    values = np.concatenate([np.random.default_rng(0).uniform(*action_range, 10000),
                             edges[:-1], [action_range[1]]]).astype(np.float32)
    index = np.asarray(encode_bins(values, edges))
    assert index.min() >= 0 and index.max() <= 47
    half = np.diff(edges)[index] / 2
    assert np.all(np.abs(np.asarray(decode_bins(index, edges)) - values) <= half * (1 + 1e-5))
    # values outside the range fall in the end bins
    np.testing.assert_array_equal(encode_bins(np.array([-10.0, 10.0]), edges), [0, 47])


@pytest.mark.parametrize("bin_type", ["uniform", "gaussian"])
def test_bins_on_edges_and_outside_and_the_loss_without_a_while_loop(bin_type):
    edges = bin_edges(48, bin_type=bin_type)
    rs = np.random.default_rng(1)
    values = np.concatenate([edges, np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf),
                             [-np.inf, np.inf, -3.0, 3.0],
                             rs.uniform(-1.5, 1.5, 500)]).astype(np.float32)
    # XLA's CPU backend flushes subnormals to zero (the one below an edge at 0 is one)
    values = values[(values == 0) | (np.abs(values) >= np.finfo(np.float32).tiny)][:640]
    expected = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, 47)
    # edges[i] <= a < edges[i+1]: a value on an edge opens its bin, the last edge the last bin
    assert all(edges[i] <= v < edges[i + 1] for v, i in zip(values, expected)
               if edges[0] <= v < edges[-1])
    np.testing.assert_array_equal(encode_bins(values, edges), expected)
    np.testing.assert_array_equal(encode_bins(values.reshape(4, -1, 2), edges),
                                  expected.reshape(4, -1, 2))
    # the cross-entropy and its gradient, against log_softmax at the label
    head = DiscreteHead(1, 2, num_bins=48, bin_type=bin_type)
    x = jnp.asarray(rs.normal(size=(values.size // 2, 8)).astype(np.float32))
    action = values[: values.size // 2 * 2].reshape(-1, 1, 2)
    params = head.init(jax.random.PRNGKey(0), x, action, method=DiscreteHead.loss)

    def loss(p):
        return jnp.sum(head.apply(p, x, action, method=DiscreteHead.loss))

    def reference(p):
        logits = head.apply(p, x, method=DiscreteHead.logits)
        labels = jax.nn.one_hot(expected[: action.size].reshape(action.shape), 48)
        return -jnp.sum(jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * labels, -1), -1))

    np.testing.assert_allclose(loss(params), reference(params), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 jax.grad(loss)(params), jax.grad(reference)(params))
    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    assert " while(" not in hlo


def test_gaussian_bins_are_narrow_near_zero():
    edges = bin_edges(20, bin_type="gaussian", action_range=(-1, 1), std=0.5)
    widths = np.diff(edges)
    assert widths[9] < widths[0] / 2
    np.testing.assert_allclose(widths, widths[::-1], rtol=1e-4)  # symmetric


def test_cosine_schedule():
    betas = cosine_beta_schedule(20)
    assert betas.shape == (20,) and np.all(np.diff(betas) > 0)
    assert 0 < betas[0] < 0.01 and betas[-1] == pytest.approx(0.999)


def test_discrete_head_samples_with_temperature():
    head = DiscreteHead(1, 1, num_bins=4)
    x = jnp.ones((2000, 3))
    params = head.init(jax.random.PRNGKey(0), x, method=DiscreteHead.logits)
    argmax = head.apply(params, x, method=DiscreteHead.predict)
    assert len(np.unique(np.asarray(argmax))) == 1
    sampled = head.apply(params, x, temperature=5.0, method=DiscreteHead.predict,
                         rngs={"sample": jax.random.PRNGKey(1)})
    assert set(np.unique(np.asarray(sampled))) == {-0.75, -0.25, 0.25, 0.75}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mse", "l1", "discrete", "diffusion"])
def test_every_head_overfits_a_tiny_dataset(kind):
    tiny = fake_batch(16, n_obs=2, n_action=2, state_dim=4, action_dim=2, seed=3)
    tiny["action"] *= 0.9
    config = model_config()
    config.head.kind = kind
    config.trunk.hidden_dims = (128, 128)
    config.head.num_bins = 32
    config.head.hidden_dim, config.head.num_blocks = 128, 2
    # the diffusion head learns a noise model at every step of its schedule: it needs longer
    policy, spec, state, _ = fit(config, lambda i: tiny, 1000 if kind == "diffusion" else 300)
    error = np.abs(predict(policy, spec, state.params, tiny) - tiny["action"])
    error = error[tiny["action_pad_mask"]]
    if kind == "discrete":  # the bin centre: within half a bin (2 / 32 / 2) of the target
        assert error.max() <= 1 / 32 + 1e-5
    elif kind == "diffusion":
        assert error.mean() < 0.03 and error.max() < 0.15
    else:
        assert error.max() < 0.01


def _two_modes(i: int) -> dict:
    rs = np.random.default_rng(i)
    return {"observation": {"state": np.zeros((256, 1, 1), np.float32),
                            "pad_mask": np.ones((256, 1), bool)},
            "action": rs.choice([-0.5, 0.5], (256, 1, 1)).astype(np.float32),
            "action_pad_mask": np.ones((256, 1), bool)}


@pytest.mark.slow
def test_diffusion_recovers_both_modes_that_mse_averages():
    samples = {}
    for kind in ("mse", "diffusion"):
        config = model_config()
        config.head.kind = kind
        config.trunk.hidden_dims = (64,)
        config.head.hidden_dim, config.head.num_blocks = 64, 2
        policy, spec, state, _ = fit(config, _two_modes, 800)
        batch = _two_modes(0)
        samples[kind] = predict(policy, spec, state.params, batch, seed=7).ravel()
    assert np.all(np.abs(samples["mse"]) < 0.05)  # the average of the modes
    a = samples["diffusion"]
    near_plus, near_minus = np.mean(np.abs(a - 0.5) < 0.15), np.mean(np.abs(a + 0.5) < 0.15)
    assert near_plus > 0.3 and near_minus > 0.3 and near_plus + near_minus > 0.9


def test_every_head_kind_has_a_module_and_only_diffusion_draws_noise_in_its_loss():
    from openx_train.models.config import HEAD_KINDS
    from openx_train.models.policy import HEAD_MODULES

    assert set(HEAD_MODULES) == set(HEAD_KINDS)
    assert {k for k, m in HEAD_MODULES.items() if m.loss_draws_noise} == {"diffusion"}
