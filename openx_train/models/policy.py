"""The policy: encoders, task conditioning, trunk and action head composed from a config.

::

    spec = input_spec(config.model, loader_batch)       # what the policy consumes
    policy = make_policy(config.model, spec)
    params = init_params(policy, jax.random.PRNGKey(0))
    batch = model_inputs(loader_batch, spec)            # host: select keys, tokenize language
    losses = policy.apply({"params": params}, batch, train=True, method=Policy.loss,
                          rngs={"dropout": k1, "sample": k2})                  # [B]
    chunk = policy.apply({"params": params}, batch, method=Policy.predict_action,
                         rngs={"sample": k3})                                  # [B, n_action, A]

The forward pass, per example: each observation key's history window is encoded step by step
(padded steps cannot reach the output) and combined (stacked with its pad mask, or mixed over
the valid steps); the task (goal observation features and the instruction's embedding) is
appended to the trunk's input or FiLMs its layers (and optionally the image encoders' stages);
the trunk (an MLP) gives an embedding from which the head predicts the normalized action chunk.

rng streams: ``"dropout"`` (training only) and ``"sample"`` (the diffusion head's noise in
training and sampling; the discrete head's temperature sampling).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from openx_train.models.config import resolve_model_config
from openx_train.models.encoders import (
    ImageEncoder,
    TemporalMix,
    VectorEncoder,
    encode_window,
    stack_window,
)
from openx_train.models.errors import ModelConfigError
from openx_train.models.heads import ContinuousHead, DiffusionHead, DiscreteHead
from openx_train.models.language import TextEncoder
from openx_train.models.layers import MLP
from openx_train.models.spec import (
    ACTION,
    ACTION_PAD_MASK,
    EXAMPLE_MASK,
    LANGUAGE_EMBEDDING,
    LANGUAGE_TOKENS,
    PAD_MASK,
    PAD_MASK_DICT,
    InputSpec,
)


def example_weights(batch: dict[str, Any]) -> jnp.ndarray:
    """Which examples count in a mean: float ``[B]``, 1 where the example has at least one real
    action and its ``example_mask`` (when the batch has one) is True."""
    weights = jnp.any(batch[ACTION_PAD_MASK], axis=-1)
    if EXAMPLE_MASK in batch:
        weights = jnp.logical_and(weights, batch[EXAMPLE_MASK])
    return weights.astype(jnp.float32)


def masked_mean(values: jnp.ndarray, weights: jnp.ndarray) -> jnp.ndarray:
    """``sum(values * weights) / sum(weights)`` (0 when no weight); masked-out values never
    reach the sum, even when they are not finite."""
    total = jnp.sum(jnp.where(weights > 0, values * weights, 0.0))
    return total / jnp.maximum(jnp.sum(weights), 1e-8)


#: The head module of each ``head.kind``.
HEAD_MODULES = {"mse": ContinuousHead, "l1": ContinuousHead, "discrete": DiscreteHead,
                "diffusion": DiffusionHead}


def _head(config: ml_collections.FrozenConfigDict, spec: InputSpec) -> nn.Module:
    h = config.head
    n, a = spec.n_action, spec.action_dim
    module = HEAD_MODULES[h.kind]
    if module is ContinuousHead:
        return ContinuousHead(n, a, loss_type=h.kind)
    if module is DiscreteHead:
        return DiscreteHead(n, a, num_bins=h.num_bins, bin_type=h.bin_type,
                            action_range=tuple(h.action_range), bin_std=float(h.bin_std),
                            temperature=float(h.temperature))
    return DiffusionHead(n, a, steps=h.diffusion_steps, hidden_dim=h.hidden_dim,
                         num_blocks=h.num_blocks, time_dim=h.time_dim, dropout=float(h.dropout),
                         action_range=tuple(h.action_range), clip_sample=h.clip_sample)


class Policy(nn.Module):
    """A BC policy. Build it with :func:`make_policy`.

    Attributes:
      config: the resolved model config (:func:`~openx_train.models.config.resolve_model_config`).
      spec: the inputs it consumes (:class:`~openx_train.models.spec.InputSpec`).
    """

    config: ml_collections.FrozenConfigDict
    spec: InputSpec

    def setup(self):
        c, spec = self.config, self.spec
        paths = ([f"observation/{k}" for k in spec.observation_keys]
                 + [f"goal/{k}" for k in spec.goal_keys])
        images = [p for p in paths if spec.is_image(p)]
        encoders = {}
        if images and c.image_encoder.shared:
            self.image_encoder = self._image_encoder()
        else:
            encoders.update({p.replace("/", "_"): self._image_encoder() for p in images})
        se = c.state_encoder
        encoders.update({
            p.replace("/", "_"): VectorEncoder(tuple(se.hidden_dims), c.activation,
                                               se.layer_norm, float(se.dropout))
            for p in paths if p not in images})
        self.encoders = encoders
        if c.history == "mix":
            self.mixers = {k: TemporalMix() for k in spec.observation_keys}
        if spec.language == "tokens":
            self.text_encoder = TextEncoder(spec.vocab_size, c.task.embedding_dim)
        elif spec.language == "embedding":
            self.text_encoder = nn.Dense(c.task.embedding_dim)
        self.trunk = MLP(tuple(c.trunk.hidden_dims), c.activation, c.trunk.layer_norm,
                         float(c.trunk.dropout))
        self.head = _head(c, spec)

    def _image_encoder(self) -> ImageEncoder:
        ie = self.config.image_encoder
        return ImageEncoder(ie.kind, ie.stem, ie.width, ie.pooling, ie.num_keypoints, ie.film)

    def _encoder(self, path: str) -> nn.Module:
        if self.spec.is_image(path) and self.config.image_encoder.shared:
            return self.image_encoder
        return self.encoders[path.replace("/", "_")]

    def task_embedding(self, batch: dict[str, Any], *, train: bool = False
                       ) -> jnp.ndarray | None:
        """The task: goal features and the instruction's embedding, ``[B, E]``; None when the
        policy has no task inputs."""
        parts = [self._encoder(f"goal/{k}")(batch["goal"][k], train=train)
                 for k in self.spec.goal_keys]
        if self.spec.language == "tokens":
            parts.append(self.text_encoder(batch[LANGUAGE_TOKENS]))
        elif self.spec.language == "embedding":
            parts.append(self.text_encoder(batch[LANGUAGE_EMBEDDING].astype(jnp.float32)))
        return jnp.concatenate(parts, axis=-1) if parts else None

    def embed(self, batch: dict[str, Any], *, train: bool = False) -> jnp.ndarray:
        """The trunk's embedding of the observation window and the task, ``[B, H]``."""
        c = self.config
        task = self.task_embedding(batch, train=train)
        obs = batch["observation"]
        features = []
        for key in self.spec.observation_keys:
            path = f"observation/{key}"
            mask = obs.get(PAD_MASK_DICT, {}).get(key, obs[PAD_MASK])
            image = self.spec.is_image(path)
            cond = task if image and c.image_encoder.film else None
            f = encode_window(self._encoder(path), obs[key], mask, cond=cond, train=train)
            features.append(stack_window(f, mask) if c.history == "stack"
                            else self.mixers[key](f, mask))
        x = jnp.concatenate(features, axis=-1)
        film = task is not None and c.task.conditioning == "film"
        if task is not None and not film:
            x = jnp.concatenate([x, task], axis=-1)
        return self.trunk(x, task if film else None, train=train)

    def deterministic_loss(self) -> bool:
        """Whether :meth:`loss` in eval mode (``train=False``: no dropout) is a function of the
        parameters and the batch alone, drawing nothing from the ``"sample"`` stream: False for
        a head whose loss draws noise (diffusion). Needs no parameters."""
        return not HEAD_MODULES[self.config.head.kind].loss_draws_noise

    def loss(self, batch: dict[str, Any], *, train: bool = False, reduce: bool = False
             ) -> jnp.ndarray:
        """The loss of each example, or their masked mean.

        An example's loss is the mean of the head's loss over its real chunk positions
        (``action_pad_mask``); padded actions are replaced by zeros before anything sees them,
        so they change neither the loss nor its gradient.

        Args:
          batch: model inputs with ``action`` and ``action_pad_mask`` (and optionally
            ``example_mask``), see :func:`~openx_train.models.spec.model_inputs`.
          train: dropout on (needs the ``"dropout"`` rng when the config has dropout).
          reduce: return the mean over the examples that count (:func:`example_weights`)
            instead of ``[B]``.

        Returns:
          float32 ``[B]`` (0 for an example without real actions), or a scalar.
        """
        mask = batch[ACTION_PAD_MASK]
        action = jnp.where(mask[..., None], batch[ACTION].astype(jnp.float32), 0.0)
        per_position = self.head.loss(self.embed(batch, train=train), action, train=train)
        per_position = jnp.where(mask, per_position, 0.0)
        count = jnp.sum(mask.astype(jnp.float32), axis=-1)
        per_example = jnp.sum(per_position, axis=-1) / jnp.maximum(count, 1.0)
        if not reduce:
            return per_example
        return masked_mean(per_example, example_weights(batch))

    def predict_action(self, batch: dict[str, Any], *, train: bool = False,
                       temperature: float | None = None) -> jnp.ndarray:
        """An action chunk (normalized), ``[B, n_action, A]``.

        Args:
          batch: the model inputs (observation, and goal or language as the spec has them).
          train: dropout on.
          temperature: overrides the discrete head's ``temperature`` (a Python float: static).

        Returns:
          float32 ``[B, n_action, A]``.
        """
        return self.head.predict(self.embed(batch, train=train), train=train,
                                 temperature=temperature)

    def __call__(self, batch: dict[str, Any], *, train: bool = False) -> jnp.ndarray:
        """The per-example loss; ``init`` runs this so that every head parameter exists."""
        return self.loss(batch, train=train)


def make_policy(config: Any, spec: InputSpec) -> Policy:
    """A policy for this model config and input spec.

    Args:
      config: ``config.model`` (any subset of :func:`~openx_train.models.config.model_config`).
      spec: from :func:`~openx_train.models.spec.input_spec` (or ``InputSpec.from_json``).

    Returns:
      The :class:`Policy` module (hashable: usable as a static jit argument).

    Raises:
      ModelConfigError: for an invalid config, or a task that would not reach the trunk.
    """
    config = resolve_model_config(config)
    has_task = bool(spec.goal_keys) or spec.language != "none"
    if (has_task and config.task.conditioning == "film" and not config.trunk.hidden_dims
            and not config.image_encoder.film):
        raise ModelConfigError("model.task.conditioning: 'film' needs trunk.hidden_dims (the "
                               "layers it modulates); given () and image_encoder.film False")
    return Policy(config, spec)


@functools.partial(jax.jit, static_argnums=0)
def _init(policy: Policy, rng: jax.Array) -> Any:
    params_rng, sample_rng, dropout_rng = jax.random.split(rng, 3)
    variables = policy.init({"params": params_rng, "sample": sample_rng,
                             "dropout": dropout_rng}, policy.spec.zeros(1), train=False)
    return variables["params"]


def init_params(policy: Policy, rng: jax.Array) -> Any:
    """Fresh parameters of ``policy`` (one jitted init on a batch of zeros).

    Args:
      policy: from :func:`make_policy`.
      rng: a PRNG key.

    Returns:
      The ``params`` collection (a pytree of float32 arrays).
    """
    return _init(policy, rng)
