"""Helpers of the model and step tests: loader-format batches of random values (the real
loader's batches go through the step in tests/openx_train/training/test_step.py), and a short
training run through the real jitted step."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import jax
import numpy as np

from openx_train import models, training

INSTRUCTIONS = (b"put the red block in the left bin", b"put the blue block in the right bin")


def fake_batch(batch_size: int = 4, *, n_obs: int = 2, n_action: int = 3, state_dim: int = 5,
               action_dim: int = 2, cameras: tuple[str, ...] = (), image_size: int = 16,
               goal: bool = False, language: bool = False, num_datasets: int = 1,
               seed: int = 0) -> dict:
    """A batch as ``make_dataloader`` gives it: the first history step and the last chunk
    position padded for every other example."""
    rs = np.random.default_rng(seed)
    pad_mask = np.ones((batch_size, n_obs), bool)
    pad_mask[::2, 0] = n_obs == 1
    action_pad_mask = np.ones((batch_size, n_action), bool)
    action_pad_mask[::2, -1] = n_action == 1
    obs = {"state": rs.normal(size=(batch_size, n_obs, state_dim)).astype(np.float32),
           "pad_mask": pad_mask, "pad_mask_dict": {"state": pad_mask.copy()}}
    for cam in cameras:
        obs[cam] = rs.integers(0, 256, (batch_size, n_obs, image_size, image_size, 3),
                               dtype=np.uint8)
        obs["pad_mask_dict"][cam] = pad_mask.copy()
    batch = {"observation": obs,
             "action": rs.uniform(-1, 1, (batch_size, n_action, action_dim)).astype(np.float32),
             "action_pad_mask": action_pad_mask,
             "dataset_id": rs.integers(0, num_datasets, batch_size).astype(np.int32),
             "episode_index": np.arange(batch_size, dtype=np.int64),
             "step_index": np.zeros(batch_size, np.int32)}
    if goal:
        batch["goal"] = {k: v[:, -1] for k, v in obs.items() if k not in ("pad_mask",
                                                                            "pad_mask_dict")}
    if language:
        batch["language_instruction"] = np.array(
            [INSTRUCTIONS[i % 2] for i in range(batch_size)], object)
    return batch


def tiny_image_config():
    """A small-CNN image policy (width 4, 2 keypoints, trunk 8): quick to compile."""
    config = models.model_config()
    config.image_encoder.kind, config.image_encoder.width = "conv", 4
    config.image_encoder.num_keypoints = 2
    config.trunk.hidden_dims = (8,)
    return config


def compiled_convolutions(jitted, *args) -> list[str]:
    """Where each convolution of ``jitted``'s compiled program for ``args`` came from: the
    op_name of its metadata (with ``/while/body/`` inside a loop)."""
    hlo = jitted.lower(*args).compile().as_text()
    return re.findall(r" convolution\(.*op_name=\"([^\"]*)\"", hlo)


def fit(config, batches: Callable[[int], dict], steps: int, *, learning_rate: float = 3e-3,
        seed: int = 0):
    """Trains a policy of ``config`` for ``steps`` steps on ``batches(i)`` (one device, no
    warmup or weight decay). Returns ``(policy, spec, state, last metrics)``."""
    spec = models.input_spec(config, batches(0))
    policy = models.make_policy(config, spec)
    opt = training.optimizer_config()
    opt.learning_rate, opt.warmup_steps, opt.weight_decay = learning_rate, 0, 0.0
    mesh = training.make_mesh(jax.devices()[:1])
    state = training.put_state(training.create_train_state(
        policy, opt, rng=jax.random.PRNGKey(seed), total_steps=steps), mesh)
    step = training.jit_train_step(mesh)
    metrics = None
    for i in range(steps):
        state, metrics = step(state, training.put_batch(batches(i), spec, mesh))
    return policy, spec, state, metrics


@functools.partial(jax.jit, static_argnums=0)
def _predict(policy, params, inputs, rng):
    return policy.apply({"params": params}, inputs, method=models.Policy.predict_action,
                        rngs={"sample": rng})


def predict(policy, spec, params, batch: dict, *, seed: int = 0) -> np.ndarray:
    """The policy's action chunk for a loader batch (numpy; jitted)."""
    inputs = models.model_inputs(batch, spec, train=False)
    return np.asarray(_predict(policy, params, inputs, jax.random.PRNGKey(seed)))


@functools.partial(jax.jit, static_argnums=0)
def _embed(policy, params, inputs):
    return policy.apply({"params": params}, inputs, method=models.Policy.embed)


def embed(policy, spec, params, batch: dict) -> np.ndarray:
    """The trunk's embedding for a loader batch (numpy; jitted)."""
    return np.asarray(_embed(policy, params, models.model_inputs(batch, spec)))


@functools.partial(jax.jit, static_argnums=0, static_argnames=("train", "reduce"))
def _loss(policy, params, inputs, rng, *, train, reduce):
    dropout_rng, sample_rng = jax.random.split(rng)
    return policy.apply({"params": params}, inputs, train=train, reduce=reduce,
                        method=models.Policy.loss,
                        rngs={"dropout": dropout_rng, "sample": sample_rng})


def loss(policy, spec, params, batch: dict, *, train: bool = False, reduce: bool = False,
         seed: int = 0) -> np.ndarray:
    """Per-example losses (or their masked mean) for a loader batch (numpy; jitted)."""
    return np.asarray(_loss(policy, params, models.model_inputs(batch, spec),
                            jax.random.PRNGKey(seed), train=train, reduce=reduce))


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(policy, params, inputs, rng):
    return jax.value_and_grad(lambda p: _loss(policy, p, inputs, rng, train=True,
                                              reduce=True))(params)


def loss_and_grads(policy, spec, params, batch: dict, *, seed: int = 0):
    """The mean training loss and its gradient for a loader batch (numpy; jitted)."""
    return jax.device_get(_loss_and_grads(policy, params, models.model_inputs(batch, spec),
                                          jax.random.PRNGKey(seed)))
