"""The jitted train and eval steps: traced once, deterministic by step number, per-dataset and
masked metrics, EMA, the same loss on an 8-device mesh as on one device, and real loader
batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from openx_train import models, training
from openx_train.data import Camera, DatasetConfig, LoaderConfig, Structure, make_dataloader
from openx_train.models import input_spec, make_policy, model_config, model_inputs
from openx_train.training import step as step_module
from tests.openx_train.model_helpers import fake_batch, loss

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))


def _setup(head="mse", *, dropout=0.0, num_datasets=1, ema_decay=None, batch_size=8,
           devices=None, warmup_steps=2, learning_rate=3e-4, **batch_options):
    config = model_config()
    config.head.kind = head
    config.head.hidden_dim, config.head.num_blocks, config.head.diffusion_steps = 32, 1, 5
    config.trunk.hidden_dims, config.trunk.dropout = (32, 32), dropout
    batch = fake_batch(batch_size, num_datasets=num_datasets, **batch_options)
    spec = input_spec(config, batch)
    policy = make_policy(config, spec)
    opt = training.optimizer_config()
    opt.warmup_steps, opt.ema_decay, opt.learning_rate = warmup_steps, ema_decay, learning_rate
    mesh = training.make_mesh(devices or jax.devices()[:1])
    state = training.create_train_state(policy, opt, rng=jax.random.PRNGKey(0), total_steps=1000,
                                        num_datasets=num_datasets)
    return spec, policy, mesh, training.put_state(state, mesh), batch


def _batches(n, batch_size=8, **options):
    return [fake_batch(batch_size, seed=i + 1, **options) for i in range(n)]


def test_the_steps_are_traced_once(monkeypatch):
    traces = {"train": 0, "eval": 0}
    real_train, real_eval = step_module.train_step, step_module.eval_step

    def train(state, batch):
        traces["train"] += 1
        return real_train(state, batch)

    def evaluate(state, batch):
        traces["eval"] += 1
        return real_eval(state, batch)

    monkeypatch.setattr(step_module, "train_step", train)
    monkeypatch.setattr(step_module, "eval_step", evaluate)
    spec, _, mesh, state, _ = _setup("diffusion", dropout=0.1)
    step, eval_step = training.jit_train_step(mesh), training.jit_eval_step(mesh)
    for batch in _batches(5):
        state, _ = step(state, training.put_batch(batch, spec, mesh))
        eval_step(state, training.put_batch(batch, spec, mesh))
    assert traces == {"train": 1, "eval": 1} and int(state.step) == 5


def test_steps_draw_by_step_number_so_a_restored_state_continues_identically():
    spec, _, mesh, state, _ = _setup("diffusion", dropout=0.2)
    step = training.jit_train_step(mesh)
    batches = [training.put_batch(b, spec, mesh) for b in _batches(4)]
    start = jax.device_get(state)  # the step donates the state it is given
    straight = state
    for b in batches:
        straight, _ = step(straight, b)
    resumed = training.put_state(start, mesh)
    for b in batches[:2]:
        resumed, _ = step(resumed, b)
    # as a checkpoint would: leaves to the host and back into a fresh state
    host = jax.device_get(resumed)
    _, _, _, fresh, _ = _setup("diffusion", dropout=0.2)
    resumed = training.put_state(fresh.replace(step=host.step, params=host.params,
                                               opt_state=host.opt_state, rng=host.rng), mesh)
    for b in batches[2:]:
        resumed, _ = step(resumed, b)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params),
                 jax.device_get(straight.params))


def test_metrics_loss_per_dataset_and_learning_rate():
    spec, policy, mesh, state, batch = _setup(num_datasets=3)
    batch["dataset_id"] = np.array([0, 2, 2, 0, 2, 2, 0, 2], np.int32)
    per_example = loss(policy, spec, state.params, batch, train=True)
    new, metrics = training.jit_train_step(mesh)(state, training.put_batch(batch, spec, mesh))
    m = jax.device_get(metrics)
    assert m["loss"] == pytest.approx(per_example.mean(), rel=1e-5)
    np.testing.assert_allclose(m["dataset_loss"], [per_example[[0, 3, 6]].mean(), 0.0,
                                                   per_example[[1, 2, 4, 5, 7]].mean()],
                               rtol=1e-5)
    np.testing.assert_array_equal(m["dataset_count"], [3, 0, 5])
    assert m["learning_rate"] == pytest.approx(float(state.schedule(0)))
    _, m2 = training.jit_train_step(mesh)(new, training.put_batch(batch, spec, mesh))
    assert float(m2["learning_rate"]) == pytest.approx(float(new.schedule(1)))
    assert float(new.schedule(1)) > 0
    assert m["grad_norm"] > 0


def test_the_loss_goes_down():
    spec, _, mesh, state, batch = _setup("discrete", warmup_steps=0, learning_rate=3e-3)
    step = training.jit_train_step(mesh)
    device_batch = training.put_batch(batch, spec, mesh)
    losses = []
    for _ in range(30):
        state, metrics = step(state, device_batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses


def test_eval_ignores_padding_examples_and_combines_batches():
    spec, policy, mesh, state, batch = _setup(num_datasets=2)
    eval_step = training.jit_eval_step(mesh)
    batch["example_mask"] = np.array([True] * 5 + [False] * 3)
    per_example = loss(policy, spec, state.params, batch)
    m = jax.device_get(eval_step(state, training.put_batch(batch, spec, mesh)))
    assert m["count"] == 5 and m["loss"] == pytest.approx(per_example[:5].mean(), rel=1e-5)
    junk = jax.tree.map(np.copy, batch)
    junk["observation"]["state"][5:] = 1e9
    junk["action"][5:] = np.nan
    m_junk = jax.device_get(eval_step(state, training.put_batch(junk, spec, mesh)))
    jax.tree.map(np.testing.assert_array_equal, m_junk, m)
    full = fake_batch(8, num_datasets=2, seed=9)
    m_full = eval_step(state, training.put_batch(full, spec, mesh))
    combined = training.combine_eval_metrics([m, m_full])
    per_full = loss(policy, spec, state.params, full)
    assert combined["count"] == 13
    assert combined["loss"] == pytest.approx(
        (per_example[:5].sum() + per_full.sum()) / 13, rel=1e-5)
    ids = np.concatenate([batch["dataset_id"][:5], full["dataset_id"]])
    losses = np.concatenate([per_example[:5], per_full])
    np.testing.assert_allclose(combined["dataset_loss"],
                               [losses[ids == k].mean() for k in range(2)], rtol=1e-5)


def test_ema_params_follow_the_params_and_are_used_for_eval():
    spec, _, mesh, state, batch = _setup(ema_decay=0.75, warmup_steps=0)
    device_batch = training.put_batch(batch, spec, mesh)
    before = jax.device_get(state.params)
    new, _ = training.jit_train_step(mesh)(state, device_batch)
    after, ema = jax.device_get(new.params), jax.device_get(new.ema_params)
    jax.tree.map(lambda e, b, a: np.testing.assert_allclose(e, 0.75 * b + 0.25 * a, rtol=1e-5,
                                                            atol=1e-7), ema, before, after)
    eval_ema = jax.device_get(training.jit_eval_step(mesh)(new, device_batch))
    plain = jax.device_get(training.jit_eval_step(mesh)(new.replace(ema_params=None),
                                                        device_batch))
    swapped = jax.device_get(training.jit_eval_step(mesh)(
        new.replace(params=new.ema_params, ema_params=None), device_batch))
    assert eval_ema["loss"] == swapped["loss"] != plain["loss"]


_MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {root!r})
    from openx_train import models, training
    from tests.openx_train.training.test_step import _batches, _setup

    out = {{"devices": jax.device_count()}}
    for n in (1, 8):
        spec, _, mesh, state, _ = _setup("diffusion", dropout=0.1, num_datasets=2,
                                         batch_size=16, devices=jax.devices()[:n])
        step = training.jit_train_step(mesh)
        losses = []
        for batch in _batches(3, batch_size=16, num_datasets=2):
            state, metrics = step(state, training.put_batch(batch, spec, mesh))
            losses.append(jax.device_get(metrics["loss"]).item())
        out[n] = {{"losses": losses,
                  "dataset_loss": jax.device_get(metrics["dataset_loss"]).tolist(),
                  "params": [np.asarray(x).ravel()[:50].tolist()
                             for x in jax.tree.leaves(jax.device_get(state.params))]}}
        if n == 8:
            kernel = state.params["trunk"]["Dense_0"]["kernel"]
            action = training.put_batch(batch, spec, mesh)["action"]
            out["sharding"] = [kernel.is_fully_replicated, len(kernel.sharding.device_set),
                               list(action.sharding.shard_shape(action.shape))]
            try:
                training.put_batch(_batches(1, batch_size=12)[0], spec, mesh)
            except models.InputSpecError as e:
                out["error"] = str(e)
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_eight_devices_give_the_loss_of_one_at_the_same_global_batch():
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", _MESH_SCRIPT.format(root=ROOT)], env=env,
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    # the state on all 8 devices, 2 of the batch's 16 examples on each
    assert out["devices"] == 8 and out["sharding"] == [True, 8, [2, 3, 2]]
    assert out["error"] == "batch size: expected a multiple of this process's 8 devices, given 12"
    one, eight = out["1"], out["8"]
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
    np.testing.assert_allclose(eight["dataset_loss"], one["dataset_loss"], rtol=1e-5)
    for a, b in zip(eight["params"], one["params"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # and this process (one device) agrees with the subprocess's one-device run
    spec, _, mesh, state, _ = _setup("diffusion", dropout=0.1, num_datasets=2, batch_size=16)
    step = training.jit_train_step(mesh)
    for batch, expected in zip(_batches(3, batch_size=16, num_datasets=2), one["losses"]):
        state, metrics = step(state, training.put_batch(batch, spec, mesh))
        assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)


STATE = Structure(state=("observation",), action=("action",), action_normalization="bounds")


def _real_step(loader, config):
    batch = next(iter(loader))
    spec = input_spec(config, batch)
    policy = make_policy(config, spec)
    mesh = training.make_mesh()
    opt = training.optimizer_config()
    opt.warmup_steps = 0
    state = training.put_state(training.create_train_state(
        policy, opt, rng=jax.random.PRNGKey(0), total_steps=10,
        num_datasets=len(loader.names)), mesh)
    step = training.jit_train_step(mesh)
    for _, batch in zip(range(3), loader):
        state, metrics = step(state, training.put_batch(batch, spec, mesh))
    return spec, jax.device_get(metrics)


@pytest.mark.slow
def test_real_state_batches_from_the_loader_go_through_the_step(cheetah_dir):
    loader = make_dataloader(DatasetConfig(cheetah_dir, STATE),
                             LoaderConfig(batch_size=16, n_obs=2, n_action=4, seed=0))
    config = model_config()
    config.trunk.hidden_dims = (64, 64)
    spec, metrics = _real_step(loader, config)
    assert spec.observation_keys == ("state",) and spec.action.shape == (4, 6)
    assert np.isfinite(metrics["loss"]) and metrics["dataset_count"].tolist() == [16.0]


@pytest.mark.slow
def test_real_camera_batches_with_language_and_goals_go_through_the_step(camera_dir):
    from tests.openx_train.conftest import CAMERA_IMAGE, CAMERA_WRIST

    structure = Structure(state=("observation/state",),
                          images={"image": Camera("observation/image", CAMERA_IMAGE),
                                  "wrist": Camera("observation/wrist_image", CAMERA_WRIST)},
                          action=("action",), action_normalization="bounds")
    loader = make_dataloader(DatasetConfig(camera_dir, structure),
                             LoaderConfig(batch_size=4, n_obs=2, n_action=2,
                                          goal_relabeling=True, seed=0))
    config = model_config()
    config.head.kind = "diffusion"
    config.image_encoder.kind, config.image_encoder.width = "conv", 8
    config.task.goal, config.task.language, config.task.conditioning = True, "tokens", "film"
    config.trunk.hidden_dims = (32,)
    spec, metrics = _real_step(loader, config)
    assert spec.observation_keys == ("image", "state", "wrist")
    assert spec.get("observation/image").shape == (2, CAMERA_IMAGE, CAMERA_IMAGE, 3)
    assert spec.language == "tokens" and spec.goal_keys == ("image", "state", "wrist")
    assert np.isfinite(metrics["loss"])
    tokens = model_inputs(next(iter(loader)), spec)["language_tokens"]
    assert tokens.shape == (4, 16) and (tokens[:, 0] > 0).all()
    assert models.tokenize([b"put"], vocab_size=4096, max_tokens=1)[0, 0] > 0
