"""The reference's losses computed once per training frame (openx_train.remix.reference_cache):
when that is valid, the setting, and the cached losses against the reference's losses of real
training batches of a logged dataset."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from openx_train import models
from openx_train.data import (
    AugmentConfig,
    ConfigError,
    DatasetConfig,
    LoaderConfig,
    Structure,
    make_dataloader,
)
from openx_train.models import Policy
from openx_train.remix import REFERENCE_LOSS, cache_refusal, reference_losses
from openx_train.remix.reference_cache import use_cache, with_reference_losses
from tests.openx_train.model_helpers import fake_batch
from tests.openx_train.remix.remix_helpers import tiny_config

STATE = Structure(state=("observation",), action=("action",), action_normalization="bounds")


def _policy(head: str, batch):
    config = tiny_config(head=head, dropout=0.1)
    spec = models.input_spec(config, batch)
    return models.make_policy(config, spec), spec


def test_the_cache_is_refused_where_a_sample_is_not_a_function_of_its_frame():
    state_batch = fake_batch(4)
    plain = LoaderConfig()
    for head in ("mse", "l1", "discrete"):
        policy, spec = _policy(head, state_batch)
        assert cache_refusal(policy, plain, spec) is None  # dropout is off in eval mode
        assert cache_refusal(policy, LoaderConfig(augment=AugmentConfig()), spec) is None
    policy, spec = _policy("diffusion", state_batch)
    assert cache_refusal(policy, plain, spec) == "the diffusion head's loss draws noise"
    policy, spec = _policy("discrete", state_batch)
    assert "goal_relabeling" in cache_refusal(policy, LoaderConfig(goal_relabeling=True), spec)
    image_batch = fake_batch(4, cameras=("image",), image_size=8)
    config = tiny_config(head="discrete")
    config.image_encoder.kind, config.image_encoder.width = "conv", 4
    spec = models.input_spec(config, image_batch)
    policy = models.make_policy(config, spec)
    assert "augment" in cache_refusal(policy, LoaderConfig(augment=AugmentConfig()), spec)
    assert cache_refusal(policy, LoaderConfig(augment=None), spec) is None


def test_the_setting():
    assert use_cache("auto", None, samples=100, frames=100)
    assert not use_cache("auto", None, samples=99, frames=100)  # less than one epoch
    assert use_cache("on", None, samples=1, frames=100)
    assert not use_cache("off", None, samples=10**6, frames=100)
    assert not use_cache("auto", "why", samples=10**6, frames=100)
    with pytest.raises(ConfigError, match=r"cache_reference='on': .* here: why"):
        use_cache("on", "why", samples=1, frames=100)
    with pytest.raises(ConfigError, match=r"cache_reference: expected one of \['auto', 'on', "
                                          r"'off'\], given 'yes'"):
        use_cache("yes", None, samples=1, frames=100)


@pytest.mark.parametrize("head", ["discrete", "mse"])
def test_cached_losses_are_the_references_losses_of_training_batches(cheetah_dir, head):
    config = LoaderConfig(batch_size=16, n_obs=2, n_action=3, seed=1, augment=None)
    loader = make_dataloader(DatasetConfig(cheetah_dir, STATE), config)
    it = iter(loader)
    batches = [next(it) for _ in range(5)]
    policy, spec = _policy(head, batches[0])
    params = models.init_params(policy, jax.random.PRNGKey(3))
    assert cache_refusal(policy, config, spec) is None
    cache = reference_losses(policy, params, loader.frame_pass(), spec)
    assert np.isfinite(cache).sum() == sum(loader.num_frames)
    loss = jax.jit(lambda p, b: policy.apply({"params": p}, b, train=False, method=Policy.loss))
    for batch in batches:
        expected = loss(params, models.model_inputs(batch, spec))
        given = with_reference_losses(batch, cache)[REFERENCE_LOSS]
        assert given.dtype == np.float32 and given.shape == (16,)
        np.testing.assert_allclose(given, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="frame pass gave rows below"):
        with_reference_losses({**batches[0], "row": batches[0]["row"] + len(cache)}, cache)
