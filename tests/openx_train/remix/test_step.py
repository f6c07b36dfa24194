"""The Re-Mix train step on a tiny policy: the weights, the proxy objective and the proxy's
update against a numpy transcription of the issue's rules 2-5; weights that move toward the
domain whose excess is higher; traced once; the same run on an 8-device mesh as on one device;
batch checks."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from openx_train import models, training
from openx_train.data import ConfigError
from openx_train.models import InputSpecError, Policy
from openx_train.remix import (
    RemixOptions,
    create_remix_state,
    jit_remix_block_step,
    jit_remix_step,
    put_remix_batch,
    remix_inputs,
)
from openx_train.remix import step as step_module
from tests.openx_train.model_helpers import compiled_convolutions, fit, tiny_image_config
from tests.openx_train.remix.remix_helpers import domain_batch, make_state, tiny_config
from tests.openx_train.remix.test_weights import numpy_objective, numpy_update

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))))
K = 4


def _losses(policy, params, batch, spec):
    inputs = models.model_inputs(batch, spec)
    return np.asarray(policy.apply({"params": params}, inputs, method=Policy.loss),
                      np.float64)


def test_the_step_follows_the_numpy_rules():
    """Three steps on batches where one domain is absent from the second: the weights, their
    average, the objective and the proxy's parameters are those of rules 2-5 in numpy (the
    MSE head has no randomness and dropout is off, so the losses are recomputed outside)."""
    config = tiny_config()
    batches = [domain_batch(16, K, seed=s, absent=(2,) if s == 1 else ()) for s in range(3)]
    a0 = np.array([0.4, 0.3, 0.2, 0.1])
    options = RemixOptions(eta=2.0, smoothing=0.1)
    mesh = training.make_mesh(jax.devices()[:1])
    spec, policy, state, ref = make_state(config, batches[0], a0, mesh=mesh, options=options)
    ref_host = jax.device_get(ref)
    step = jit_remix_step(mesh)
    alpha, average = a0.copy(), a0.copy()
    for t, batch in enumerate(batches):
        params = jax.device_get(state.params)
        opt_state = jax.device_get(state.opt_state)
        excess = _losses(policy, params, batch, spec) - _losses(policy, ref_host, batch, spec)
        ids, valid = batch["domain_id"], np.ones(len(excess), bool)
        alpha = numpy_update(excess, ids, valid, alpha, a0, options.eta, options.smoothing)
        average = average + (alpha - average) / (t + 1)
        expected_loss = numpy_objective(excess, ids, valid, alpha)

        # The proxy's update: AdamW on the gradient of rule 5's objective with alpha fixed.
        inputs = models.model_inputs(batch, spec)
        counts = np.bincount(ids, minlength=K)
        coef = jnp.asarray(alpha[ids] / counts[ids], jnp.float32)

        def objective(p, inputs=inputs, coef=coef):
            return jnp.sum(coef * policy.apply({"params": p}, inputs, method=Policy.loss))

        grads = jax.grad(objective)(params)
        updates, _ = state.tx.update(grads, opt_state, params)
        expected_params = optax.apply_updates(params, updates)

        state, metrics = step(state, ref, put_remix_batch(batch, spec, mesh, num_domains=K))
        np.testing.assert_allclose(metrics["alpha"], alpha, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(state.weights.alpha, alpha, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(state.weights.average_alpha, average, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(metrics["domain_count"], counts)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     jax.device_get(state.params), expected_params)
        assert int(state.step) == t + 1
    assert abs(float(np.sum(state.weights.alpha)) - 1) < 1e-6
    assert float(metrics["grad_norm"]) > 0


def _learnable_and_noise(seed: int, learnable: int, batch_size: int = 64) -> dict:
    """Two domains: in ``learnable`` the action is a fixed linear function of the last state;
    in the other it is uniform noise, which no policy can predict."""
    batch = domain_batch(batch_size, 2, seed=seed, n_obs=1, n_action=1)
    rs = np.random.default_rng(seed)
    state = batch["observation"]["state"][:, -1]
    w = np.random.default_rng(99).normal(size=(state.shape[-1], 2)) / 3
    target = np.tanh(state @ w)
    noise = rs.uniform(-1, 1, target.shape)
    ids = batch["domain_id"]
    batch["action"] = np.where((ids == learnable)[:, None], target, noise)[:, None].astype(
        np.float32)
    batch["action_pad_mask"][:] = True
    return batch


@pytest.mark.parametrize("learnable", [0, 1])
def test_weights_move_toward_the_domain_with_higher_excess(learnable):
    """A reference trained on both domains learned the learnable one; a fresh proxy's excess
    is higher there than on the noise (which the reference could not learn), so that domain
    gains weight, whichever its id, and its average weight ends above its initial one."""
    config = tiny_config()
    _, _, ref_state, _ = fit(config, lambda i: _learnable_and_noise(i, learnable), 300,
                             learning_rate=3e-3)
    batches = [_learnable_and_noise(1000 + i, learnable) for i in range(15)]
    mesh = training.make_mesh(jax.devices()[:1])
    a0 = np.array([0.5, 0.5])
    spec, _, state, ref = make_state(config, batches[0], a0, mesh=mesh,
                                     reference_params=jax.device_get(ref_state.params),
                                     options=RemixOptions(eta=0.5, smoothing=0.05))
    step = jit_remix_step(mesh)
    excess = []
    for batch in batches:
        state, metrics = step(state, ref, put_remix_batch(batch, spec, mesh))
        excess.append(np.asarray(metrics["domain_excess"]))
    alpha, average = np.asarray(state.weights.alpha), np.asarray(state.weights.average_alpha)
    other = 1 - learnable
    assert np.mean(excess, axis=0)[learnable] > np.mean(excess, axis=0)[other]
    assert alpha[learnable] > 0.6 and average[learnable] > 0.5, (alpha, average)
    assert alpha[other] >= 0.05 * 0.5 - 1e-7  # the smoothing floor c * a0


def test_the_step_is_traced_once(monkeypatch):
    traces = []
    real = step_module.remix_step

    def counting(state, ref, batch):
        traces.append(1)
        return real(state, ref, batch)

    monkeypatch.setattr(step_module, "remix_step", counting)
    config = tiny_config(head="diffusion", dropout=0.1)
    batch = domain_batch(8, K, seed=0)
    mesh = training.make_mesh(jax.devices()[:1])
    spec, _, state, ref = make_state(config, batch, np.full(K, 0.25), mesh=mesh)
    step = step_module.jit_remix_step(mesh)
    for s in range(4):
        state, metrics = step(state, ref, put_remix_batch(domain_batch(8, K, seed=s), spec,
                                                          mesh))
    assert len(traces) == 1 and int(state.step) == 4
    assert np.isfinite(float(metrics["loss"]))
    # the reference's parameters are not donated: still usable
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(ref))


def test_eight_devices_learn_the_one_device_weights(tmp_path):
    out = tmp_path / "sharded.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 "
               "--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "tests.openx_train.remix.sharded_step",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = np.load(out)
    np.testing.assert_allclose(r["eight/alpha"], r["one/alpha"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r["eight/average"], r["one/average"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r["eight/loss"], r["one/loss"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(r["eight/params"], r["one/params"], rtol=1e-4, atol=1e-5)
    # the weights did move (the comparison is not of two untouched a0)
    assert np.abs(r["one/alpha"][-1] - r["one/alpha"][0]).max() > 1e-3


def test_batch_checks():
    config = tiny_config()
    batch = domain_batch(8, K, seed=0)
    mesh = training.make_mesh(jax.devices()[:1])
    spec, _, _, _ = make_state(config, batch, np.full(K, 0.25), mesh=mesh)
    missing = dict(batch)
    del missing["domain_id"]
    with pytest.raises(InputSpecError, match="domain_id: missing"):
        put_remix_batch(missing, spec, mesh)
    with pytest.raises(InputSpecError, match=r"domain_id: expected ids in \[0, 3\), given"):
        put_remix_batch(batch | {"domain_id": np.full(8, 3, np.int32)}, spec, mesh,
                        num_domains=3)
    valid = np.arange(8) < 6
    host = put_remix_batch(batch | {"valid": valid}, spec, mesh)
    np.testing.assert_array_equal(host["example_mask"], valid)


def test_a_reference_with_other_inputs_is_refused():
    config = tiny_config()
    batch = domain_batch(8, K, seed=0)
    spec = models.input_spec(config, batch)
    policy = models.make_policy(config, spec)
    other_batch = domain_batch(8, K, seed=0, state_dim=7)
    other = models.make_policy(config, models.input_spec(config, other_batch))
    proxy = training.create_train_state(policy, training.optimizer_config(),
                                        rng=jax.random.PRNGKey(0), total_steps=10**4)
    with pytest.raises(ConfigError, match=r"remix reference: expected the proxy's input spec"):
        create_remix_state(proxy, np.full(K, 0.25), reference_policy=other)


def _twin_states():
    """Four batches, the mesh, the spec and policy, two identical fresh Re-Mix states (discrete
    head, dropout) and the reference's parameters."""
    config = tiny_config(head="discrete", dropout=0.1)
    batches = [domain_batch(8, K, seed=s) for s in range(4)]
    mesh = training.make_mesh(jax.devices()[:1])
    spec, policy, a, ref = make_state(config, batches[0], np.full(K, 0.25), mesh=mesh)
    _, _, b, _ = make_state(config, batches[0], np.full(K, 0.25), mesh=mesh)
    return batches, mesh, spec, policy, a, b, ref


def test_a_block_of_steps_is_the_steps_one_by_one():
    batches, mesh, spec, _, one, block, ref = _twin_states()
    step = jit_remix_step(mesh)
    for b in batches:
        one, _ = step(one, ref, put_remix_batch(b, spec, mesh))
    host = [remix_inputs(b, spec) for b in batches]
    stacked = jax.tree.map(lambda *x: np.stack(x), *host)
    block, metrics = jit_remix_block_step(mesh)(block, ref, stacked)
    assert metrics["alpha"].shape == (4, K) and int(block.step) == 4
    np.testing.assert_allclose(block.weights.alpha, one.weights.alpha, rtol=1e-6)
    np.testing.assert_allclose(block.weights.average_alpha, one.weights.average_alpha,
                               rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.device_get(block.params), jax.device_get(one.params))


def test_given_the_reference_losses_the_step_learns_the_same_without_the_reference():
    # The batch carries the reference's eval-mode losses (as the Re-Mix run's cache gives
    # them): the step uses them and never the reference's parameters (NaN here), and learns
    # what the step that runs the reference learns.
    batches, mesh, spec, policy, computed, given, ref = _twin_states()
    nan_ref = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), ref)
    step = jit_remix_step(mesh)
    ref_host = jax.device_get(ref)
    for b in batches:
        losses = _losses(policy, ref_host, b, spec).astype(np.float32)
        computed, m_computed = step(computed, ref, put_remix_batch(b, spec, mesh))
        given, m_given = step(given, nan_ref, put_remix_batch(
            b | {step_module.REFERENCE_LOSS: losses}, spec, mesh))
        for key in ("loss", "reference_loss", "alpha", "domain_positive_excess"):
            np.testing.assert_allclose(m_given[key], m_computed[key], rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(given.weights.alpha) - 0.25).max() > 1e-4  # they moved
    np.testing.assert_allclose(given.weights.average_alpha, computed.weights.average_alpha,
                               rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(given.params), jax.device_get(computed.params))
    with pytest.raises(InputSpecError, match=r"reference_loss: expected float32 \[8\], given"):
        put_remix_batch(batches[0] | {step_module.REFERENCE_LOSS: np.zeros(7, np.float32)},
                        spec, mesh)


@pytest.mark.parametrize("k", [1, 2])
def test_the_image_block_step_is_unrolled_on_cpu_with_the_rolled_values(k):
    # As the BC loop's block (tests/openx_train/training/test_loop.py): XLA's CPU backend runs
    # the backward convolutions of a while-loop body in a naive loop, so the training run
    # unrolls an image policy's block on CPU; no convolution inside a while loop, same values.
    from openx_train.training import loop

    batch = domain_batch(4, K, seed=0, n_obs=1, n_action=1, state_dim=3, cameras=("image",),
                         image_size=8)
    mesh = training.make_mesh(jax.devices()[:1])
    spec, _, state, ref = make_state(tiny_image_config(), batch, np.full(K, 0.25), mesh=mesh)
    assert loop.needs_unrolled_block(spec) == (jax.default_backend() == "cpu")
    block = jax.tree.map(lambda x: np.stack([x] * k), remix_inputs(batch, spec))
    rolled, unrolled = (jit_remix_block_step(mesh, unroll=u) for u in (False, True))
    assert len(compiled_convolutions(rolled, state, ref, block)) >= 6
    assert all("/while/body/" in n for n in compiled_convolutions(rolled, state, ref, block))
    in_unrolled = compiled_convolutions(unrolled, state, ref, block)
    assert len(in_unrolled) >= 3 and not any("/while/" in n for n in in_unrolled)
    state_r, metrics_r = rolled(jax.tree.map(np.array, state), ref, block)
    state_u, metrics_u = unrolled(state, ref, block)
    assert metrics_u["alpha"].shape == (k, K)
    np.testing.assert_allclose(metrics_u["loss"], metrics_r["loss"], rtol=1e-5)
    np.testing.assert_allclose(state_u.weights.alpha, state_r.weights.alpha, rtol=1e-5)
    # The spatial softmax is invariant to its keypoints' bias (it shifts every logit of a
    # channel alike): that gradient is rounding noise, which Adam scales to whole steps, so
    # it is left out of the comparison.
    rolled_params = dict(jax.tree_util.tree_flatten_with_path(state_r.params)[0])
    for path, value in jax.tree_util.tree_flatten_with_path(state_u.params)[0]:
        if not jax.tree_util.keystr(path).endswith("['keypoints']['bias']"):
            np.testing.assert_allclose(value, rolled_params[path], rtol=1e-4, atol=1e-6)
