"""The policy: one train step for every encoder x head, masks that really mask (padded actions
and padded history steps change nothing), the input spec, and config errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openx_train import models, training
from openx_train.models import (
    InputSpec,
    InputSpecError,
    ModelConfigError,
    init_params,
    input_spec,
    make_policy,
    model_config,
    model_inputs,
)
from tests.openx_train.model_helpers import embed, fake_batch, loss, loss_and_grads, predict

HEADS = ("mse", "l1", "discrete", "diffusion")


def _config(encoder: str, head: str):
    """Small models exercising every encoder and task option."""
    c = model_config()
    c.head.kind = head
    c.head.num_bins, c.head.hidden_dim, c.head.num_blocks, c.head.diffusion_steps = 8, 32, 1, 4
    c.trunk.hidden_dims = (32, 32)
    c.trunk.dropout = 0.1
    c.image_encoder.width, c.image_encoder.num_keypoints = 8, 4
    data = {"cameras": ()}
    if encoder == "state_mlp":
        c.state_encoder.hidden_dims, c.state_encoder.dropout = (16,), 0.1
        c.task.language, c.task.conditioning = "tokens", "film"
        data.update(language=True)
    elif encoder == "conv":
        c.image_encoder.kind, c.image_encoder.film = "conv", True
        c.history, c.task.goal = "mix", True
        c.task.language = "tokens"
        data.update(cameras=("image", "wrist"), goal=True, language=True)
    elif encoder == "resnet18":
        c.image_encoder.kind, c.image_encoder.pooling = "resnet18", "spatial_softmax"
        c.task.goal = True
        data.update(cameras=("image",), goal=True, image_size=32)
    else:  # resnet34, one encoder shared by both cameras, small stem, average pooling
        c.image_encoder.kind, c.image_encoder.stem = "resnet34", "small"
        c.image_encoder.pooling, c.image_encoder.shared = "avg", True
        c.history = "mix"
        data.update(cameras=("image", "wrist"), image_size=16)
    return c, fake_batch(4, num_datasets=2, **data)


SLOW = pytest.mark.slow
# The image encoders' steps take 10-30 s each to compile on 2 CPUs: one stays in the fast set.
CASES = [("state_mlp", h) for h in HEADS] + [("conv", "mse")] + [
    pytest.param(e, h, marks=SLOW) for e in ("conv", "resnet18", "resnet34") for h in HEADS
    if (e, h) != ("conv", "mse")]


@pytest.mark.parametrize(("encoder", "head"), CASES)
def test_one_train_step_for_every_encoder_and_head(encoder, head):
    config, batch = _config(encoder, head)
    spec = input_spec(config, batch)
    policy = make_policy(config, spec)
    mesh = training.make_mesh(jax.devices()[:1])
    opt = training.optimizer_config()
    opt.warmup_steps = 0
    state = training.put_state(training.create_train_state(
        policy, opt, rng=jax.random.PRNGKey(0), total_steps=10, num_datasets=2), mesh)
    before = jax.device_get(state.params)
    state, metrics = training.jit_train_step(mesh)(state, training.put_batch(batch, spec, mesh))
    metrics = jax.device_get(metrics)
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert metrics["dataset_loss"].shape == (2,) and metrics["dataset_count"].sum() == 4
    assert int(state.step) == 1
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before,
                           jax.device_get(state.params))
    assert any(jax.tree.leaves(changed))
    chunk = predict(policy, spec, state.params, batch)
    assert chunk.shape == (4, 3, 2) and np.all(np.isfinite(chunk))


@pytest.mark.parametrize("head", HEADS)
def test_padded_actions_change_no_gradient(head):
    config, batch = _config("state_mlp", head)
    spec = input_spec(config, batch)
    policy = make_policy(config, spec)
    params = init_params(policy, jax.random.PRNGKey(0))
    loss, grads = loss_and_grads(policy, spec, params, batch)
    padded = ~batch["action_pad_mask"]
    assert padded.any()
    for junk in (7.0, np.nan, np.inf):
        changed = dict(batch, action=batch["action"].copy())
        changed["action"][padded] = junk
        loss2, grads2 = loss_and_grads(policy, spec, params, changed)
        assert loss2 == loss
        jax.tree.map(np.testing.assert_array_equal, grads2, grads)
    # a real action does change the gradient
    changed = dict(batch, action=batch["action"].copy())
    changed["action"][batch["action_pad_mask"]] += 0.5
    _, grads3 = loss_and_grads(policy, spec, params, changed)
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, grads3, grads)))


@pytest.mark.parametrize("history", ["stack", "mix"])
def test_padded_history_steps_change_nothing(history):
    config = model_config()
    config.history = history
    config.trunk.hidden_dims = (32,)
    config.state_encoder.hidden_dims = (16,)
    config.image_encoder.kind, config.image_encoder.width = "conv", 8
    batch = fake_batch(4, n_obs=3, cameras=("image",))
    batch["observation"]["pad_mask"][1, :2] = False  # two padded steps
    for mask in batch["observation"]["pad_mask_dict"].values():
        mask[:] = batch["observation"]["pad_mask"]
    spec = input_spec(config, batch)
    policy = make_policy(config, spec)
    params = init_params(policy, jax.random.PRNGKey(0))
    out = embed(policy, spec, params, batch)
    padded = ~batch["observation"]["pad_mask"]
    changed = jax.tree.map(np.copy, batch)
    changed["observation"]["state"][padded] = 1e6
    changed["observation"]["image"][padded] = 255 - changed["observation"]["image"][padded]
    np.testing.assert_array_equal(embed(policy, spec, params, changed), out)
    # a real history step does change the output
    changed["observation"]["state"][~padded] += 1.0
    assert not np.array_equal(embed(policy, spec, params, changed), out)


def test_a_missing_camera_contributes_nothing():
    config = model_config()
    config.image_encoder.kind, config.image_encoder.width = "conv", 8
    config.trunk.hidden_dims = (32,)
    batch = fake_batch(4, n_obs=1, cameras=("image", "wrist"))
    batch["observation"]["pad_mask_dict"]["wrist"][2] = False  # example 2 lacks the wrist camera
    spec = input_spec(config, batch)
    policy = make_policy(config, spec)
    params = init_params(policy, jax.random.PRNGKey(0))
    out = embed(policy, spec, params, batch)
    changed = jax.tree.map(np.copy, batch)
    changed["observation"]["wrist"][2] = 0
    np.testing.assert_array_equal(embed(policy, spec, params, changed), out)


def test_language_reaches_the_embedding_and_the_example_mask_is_honoured():
    config, batch = _config("state_mlp", "mse")
    config.trunk.dropout = config.state_encoder.dropout = 0.0
    spec = input_spec(config, batch)
    policy = make_policy(config, spec)
    # FiLM starts as the identity: give it weights so the instruction matters
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 if "FiLM" in jax.tree_util.keystr(p) else x,
        init_params(policy, jax.random.PRNGKey(0)))
    swapped = dict(batch, language_instruction=batch["language_instruction"][::-1])
    assert not np.allclose(embed(policy, spec, params, batch),
                           embed(policy, spec, params, swapped))

    def mean_loss(b):
        return float(loss(policy, spec, params, b, reduce=True))

    per_example = loss(policy, spec, params, batch)
    masked = dict(batch, example_mask=np.array([True, True, False, True]))
    assert mean_loss(masked) == pytest.approx(per_example[[0, 1, 3]].mean(), rel=1e-6)
    junk = jax.tree.map(np.copy, masked)
    junk["observation"]["state"][2] = 1e9
    assert mean_loss(junk) == mean_loss(masked)


def test_precomputed_language_embeddings():
    config = model_config()
    config.task.language, config.trunk.hidden_dims = "embedding", (16,)
    batch = fake_batch(4)
    batch["language_embedding"] = np.random.default_rng(0).normal(size=(4, 12)).astype(
        np.float32)
    spec = input_spec(config, batch)
    assert spec.language == "embedding" and spec.get("language_embedding").shape == (12,)
    policy = make_policy(config, spec)
    params = init_params(policy, jax.random.PRNGKey(0))
    changed = dict(batch, language_embedding=batch["language_embedding"][::-1])
    assert not np.allclose(embed(policy, spec, params, batch),
                           embed(policy, spec, params, changed))


def test_input_spec_round_trips_and_rebuilds_the_same_policy():
    config, batch = _config("conv", "discrete")
    spec = input_spec(config, batch)
    assert spec.observation_keys == ("image", "state", "wrist")
    assert spec.goal_keys == ("image", "state", "wrist")
    assert (spec.n_obs, spec.n_action, spec.action_dim, spec.language) == (2, 3, 2, "tokens")
    assert spec.get("observation/image") == models.ArraySpec((2, 16, 16, 3), "uint8")
    text = json.dumps(spec.to_json())
    again = InputSpec.from_json(json.loads(text))
    assert again == spec and hash(again) == hash(spec)
    policy = make_policy(config, spec)
    params = init_params(policy, jax.random.PRNGKey(0))
    rebuilt = make_policy(json.loads(json.dumps(config.to_dict())), again)
    assert rebuilt == policy
    np.testing.assert_array_equal(loss(rebuilt, again, params, batch),
                                  loss(policy, spec, params, batch))
    # the spec's zeros batch has the shapes of a real one
    zeros = spec.zeros(2)
    assert zeros["observation"]["image"].shape == (2, 2, 16, 16, 3)
    assert zeros["action_pad_mask"].all() and zeros["language_tokens"].dtype == np.int32


def test_model_inputs_keeps_only_what_the_policy_reads():
    config = model_config()
    config.observation_keys = ("state",)
    batch = fake_batch(4, cameras=("image",), language=True)
    spec = input_spec(config, batch)
    inputs = model_inputs(batch, spec)
    assert sorted(inputs) == ["action", "action_pad_mask", "dataset_id", "observation"]
    assert sorted(inputs["observation"]) == ["pad_mask", "pad_mask_dict", "state"]
    assert sorted(model_inputs(batch, spec, train=False)) == ["observation"]


def test_batch_errors_name_the_key():
    config = model_config()
    batch = fake_batch(4)
    spec = input_spec(config, batch)
    wrong = jax.tree.map(np.copy, batch)
    wrong["observation"]["state"] = wrong["observation"]["state"][..., :3]
    with pytest.raises(InputSpecError, match=r"batch observation/state: expected float32 "
                                             r"\['B', 2, 5\], given float32 \[4, 2, 3\]"):
        model_inputs(wrong, spec)
    del wrong["observation"]["state"]
    with pytest.raises(InputSpecError, match="batch observation/state: missing"):
        model_inputs(wrong, spec)
    config.observation_keys = ("image",)
    with pytest.raises(InputSpecError, match=r"\['image'\] are not in the batch's observation"):
        input_spec(config, batch)
    config.observation_keys = ()
    config.task.goal = True
    with pytest.raises(InputSpecError, match="goal_relabeling"):
        input_spec(config, batch)
    config.task.goal, config.task.language = False, "tokens"
    with pytest.raises(InputSpecError, match="no language_instruction"):
        input_spec(config, batch)
    with pytest.raises(InputSpecError, match="input spec: expected"):
        InputSpec.from_json({"inputs": 3})


@pytest.mark.parametrize(("field", "value", "message"), [
    ("head.kind", "gauss", r"model.head.kind: expected one of \('mse', 'l1', 'discrete', "
                           r"'diffusion'\), given 'gauss'"),
    ("trunk.hidden_dims", (64, 0), r"model.trunk.hidden_dims: expected a sequence of ints"),
    ("head.action_range", (1.0, -1.0), r"model.head.action_range: expected \(low, high\)"),
    ("trunk.dropout", 1.5, r"model.trunk.dropout: expected a float in \[0, 1\)"),
    ("head.num_bins", 1, r"model.head.num_bins: expected an int >= 2"),
])
def test_config_errors_name_the_field(field, value, message):
    config = model_config().to_dict()
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(ModelConfigError, match=message):
        models.resolve_model_config(config)


def test_unknown_config_fields_are_refused_and_partial_configs_filled():
    with pytest.raises(ModelConfigError, match=r"model.trunk.hiden_dims: unknown field; "
                                               r"expected one of \['dropout', 'hidden_dims'"):
        models.resolve_model_config({"trunk": {"hiden_dims": (3,)}})
    resolved = models.resolve_model_config({"head": {"kind": "mse"}})
    assert resolved.head.kind == "mse" and resolved.trunk.hidden_dims == (512, 512, 512)
    batch = fake_batch(2, language=True)
    config = {"task": {"language": "tokens", "conditioning": "film"},
              "trunk": {"hidden_dims": ()}}
    with pytest.raises(ModelConfigError, match=r"'film' needs trunk\.hidden_dims"):
        make_policy(config, input_spec(config, batch))


def test_float_images_are_accepted():
    config = model_config()
    config.image_encoder.kind, config.image_encoder.width = "conv", 8
    config.trunk.hidden_dims = (8,)
    batch = fake_batch(2, n_obs=1, cameras=("image",))
    as_float = jax.tree.map(np.copy, batch)
    as_float["observation"]["image"] = batch["observation"]["image"].astype(np.float32) / 255
    uint8_spec, float_spec = input_spec(config, batch), input_spec(config, as_float)
    assert float_spec.get("observation/image").dtype == "float32"
    policy = make_policy(config, uint8_spec)
    params = init_params(policy, jax.random.PRNGKey(0))
    np.testing.assert_allclose(
        embed(make_policy(config, float_spec), float_spec, params, as_float),
        embed(policy, uint8_spec, params, batch), rtol=1e-5, atol=1e-5)
    assert jnp.asarray(as_float["observation"]["image"]).dtype == jnp.float32
