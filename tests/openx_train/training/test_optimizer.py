"""The optimizer: AdamW decays kernels only, the warmup-cosine schedule, global-norm clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from openx_train.models import ModelConfigError, init_params, input_spec, make_policy
from openx_train.models import model_config as make_model_config
from openx_train.training import make_optimizer, optimizer_config, weight_decay_mask
from tests.openx_train.model_helpers import fake_batch


def _params():
    """Parameters of a policy with every kind of leaf: Dense and Conv kernels, biases,
    LayerNorm and GroupNorm scales, an embedding table, a learned temperature."""
    config = make_model_config()
    config.image_encoder.kind, config.image_encoder.width = "conv", 8
    config.task.language, config.history = "tokens", "mix"
    config.trunk.hidden_dims = (16,)
    batch = fake_batch(2, cameras=("image",), language=True)
    return init_params(make_policy(config, input_spec(config, batch)), jax.random.PRNGKey(0))


def test_weight_decay_applies_to_kernels_only():
    params = _params()
    opt = optimizer_config()
    opt.learning_rate, opt.warmup_steps, opt.weight_decay = 0.1, 0, 0.5
    tx, _ = make_optimizer(opt, total_steps=100)
    zero = jax.tree.map(jnp.zeros_like, params)
    new = jax.jit(lambda p: optax.apply_updates(p, tx.update(zero, tx.init(p), p)[0]))(params)
    names = {}
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        names.setdefault(path[-1].key, []).append(path)
    assert {"kernel", "bias", "scale", "embedding", "log_temperature", "position"} <= set(names)
    flat_new = dict(jax.tree_util.tree_leaves_with_path(new))
    for path, old in jax.tree_util.tree_leaves_with_path(params):
        if path[-1].key == "kernel":  # decayed by lr * weight_decay
            np.testing.assert_allclose(flat_new[path], old * (1 - 0.1 * 0.5), rtol=1e-6,
                                       atol=1e-8)
        else:
            np.testing.assert_array_equal(flat_new[path], old, err_msg=jax.tree_util.keystr(path))
    mask = weight_decay_mask(params)
    assert sum(jax.tree.leaves(mask)) == len(names["kernel"])


def test_warmup_cosine_schedule():
    opt = optimizer_config()
    opt.learning_rate, opt.init_learning_rate, opt.end_learning_rate = 1e-3, 1e-5, 1e-6
    opt.warmup_steps = 10
    _, schedule = make_optimizer(opt, total_steps=110)
    lrs = np.array([schedule(i) for i in range(111)])
    assert lrs[0] == pytest.approx(1e-5, rel=1e-5) and lrs[10] == pytest.approx(1e-3, rel=1e-5)
    assert lrs[110] == pytest.approx(1e-6, rel=1e-5)
    assert lrs[60] == pytest.approx((1e-3 + 1e-6) / 2, rel=1e-5)
    assert np.all(np.diff(lrs[:11]) > 0) and np.all(np.diff(lrs[10:]) < 0)
    opt.decay_steps = 20  # overrides the run's length
    _, schedule = make_optimizer(opt, total_steps=110)
    assert schedule(20) == pytest.approx(1e-6, rel=1e-5)


def test_gradients_are_clipped_by_global_norm():
    params = {"a": {"kernel": jnp.ones((3, 2))}, "b": {"bias": jnp.ones(4)}}
    grads = {"a": {"kernel": jnp.full((3, 2), 30.0)}, "b": {"bias": jnp.full(4, -40.0)}}
    norm = float(optax.global_norm(grads))
    opt = optimizer_config()
    opt.warmup_steps, opt.clip_gradient, opt.b1 = 0, 2.0, 0.0
    tx, _ = make_optimizer(opt, total_steps=10)
    clipped = jax.tree.map(lambda g: g * 2.0 / norm, grads)
    opt.clip_gradient = 0.0
    plain, _ = make_optimizer(opt, total_steps=10)
    a, _ = tx.update(grads, tx.init(params), params)
    b, _ = plain.update(clipped, plain.init(params), params)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), a, b)


def test_optimizer_config_errors():
    with pytest.raises(ModelConfigError, match=r"optimizer: unknown fields \['lr'\]"):
        make_optimizer({"lr": 1e-3}, total_steps=10)
    with pytest.raises(ModelConfigError, match="decay_steps: expected an int > warmup_steps"):
        make_optimizer({"warmup_steps": 100}, total_steps=50)
    with pytest.raises(ModelConfigError, match=r"optimizer\.ema_decay"):
        make_optimizer({"ema_decay": 1.5}, total_steps=50)
    with pytest.raises(ModelConfigError, match=r"optimizer.b2: expected a float in \[0, 1\)"):
        make_optimizer({"b2": 1.0}, total_steps=50)
