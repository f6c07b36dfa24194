"""Action heads: from the trunk's embedding ``[B, E]`` to an action chunk ``[B, n_action, A]``
(normalized actions).

Every head has the same two methods:

* ``loss(x, action, train=...)``: the loss of each chunk position, ``[B, n_action]``, averaged
  over the action dimensions. Masking is the policy's job (it zeroes padded actions before they
  reach a head, and weighs positions by ``action_pad_mask``).
* ``predict(x, train=..., temperature=None)``: an action chunk. The sampling heads draw from the
  ``"sample"`` rng stream.

and says whether its loss draws noise (``loss_draws_noise``: the diffusion head's does; the
others' losses are functions of the embedding and the action alone).

Heads: :class:`ContinuousHead` (``"mse"``, ``"l1"``), :class:`DiscreteHead` (per-dimension bins,
cross-entropy; argmax or temperature sampling) and :class:`DiffusionHead` (DDPM, MLP-ResNet
denoiser, cosine schedule, K steps).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from openx_train.models.layers import MLPResNetBlock, activation, dense_init


class ContinuousHead(nn.Module):
    """A linear read-out of the chunk, trained with a squared (``"mse"``) or absolute
    (``"l1"``) error."""

    n_action: int
    action_dim: int
    loss_type: str = "mse"
    loss_draws_noise: ClassVar[bool] = False

    def setup(self):
        self.out = nn.Dense(self.n_action * self.action_dim, kernel_init=dense_init)

    def _mean(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.out(x).reshape(x.shape[0], self.n_action, self.action_dim)

    def loss(self, x: jnp.ndarray, action: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        del train
        error = self._mean(x) - action
        error = jnp.square(error) if self.loss_type == "mse" else jnp.abs(error)
        return jnp.mean(error, axis=-1)

    def predict(self, x: jnp.ndarray, *, train: bool = False,
                temperature: float | None = None) -> jnp.ndarray:
        del train, temperature
        return self._mean(x)


def bin_edges(num_bins: int, *, bin_type: str = "uniform",
              action_range: tuple[float, float] = (-1.0, 1.0), std: float = 1.0) -> np.ndarray:
    """Edges of the bins of one action dimension, ``[num_bins + 1]`` from ``low`` to ``high``.

    Args:
      num_bins: number of bins.
      bin_type: ``"uniform"`` (equal widths) or ``"gaussian"`` (equal mass under a normal of
        standard deviation ``std`` truncated to the range: narrow bins near 0).
      action_range: ``(low, high)``; values outside fall in the end bins.
      std: the gaussian's standard deviation.

    Returns:
      float32 edges, strictly increasing.
    """
    lo, hi = action_range
    if bin_type == "uniform":
        edges = np.linspace(lo, hi, num_bins + 1)
    else:
        normal = NormalDist(0.0, std)
        mass = np.linspace(normal.cdf(lo), normal.cdf(hi), num_bins + 1)
        edges = np.array([lo, *(normal.inv_cdf(float(p)) for p in mass[1:-1]), hi])
    return edges.astype(np.float32)


def encode_bins(action: jnp.ndarray, edges: jnp.ndarray) -> jnp.ndarray:
    """The bin of each value (int32, same shape): ``i`` where ``edges[i] <= a < edges[i+1]``;
    values outside the range go to the end bins."""
    inner = jnp.asarray(edges)[1:-1]
    # Every value against every inner edge at once: a few dozen edges, and no while loop (the
    # default binary search is one, a nest of small programs inside the step on XLA's CPU).
    return jnp.searchsorted(inner, action, side="right", method="compare_all").astype(jnp.int32)


def decode_bins(index: jnp.ndarray, edges: jnp.ndarray) -> jnp.ndarray:
    """The centre of each bin: within half a bin width of every value of the bin."""
    edges = jnp.asarray(edges)
    return ((edges[:-1] + edges[1:]) / 2.0)[index]


class DiscreteHead(nn.Module):
    """Each action dimension of each chunk position as a categorical over ``num_bins`` bins,
    trained with cross-entropy; predicts the most likely bin's centre (``temperature == 0``)
    or samples the logits divided by the temperature."""

    n_action: int
    action_dim: int
    num_bins: int = 48
    bin_type: str = "uniform"
    action_range: tuple[float, float] = (-1.0, 1.0)
    bin_std: float = 1.0
    temperature: float = 0.0
    loss_draws_noise: ClassVar[bool] = False

    def setup(self):
        self.out = nn.Dense(self.n_action * self.action_dim * self.num_bins,
                            kernel_init=dense_init)
        self.edges = bin_edges(self.num_bins, bin_type=self.bin_type,
                               action_range=self.action_range, std=self.bin_std)

    def logits(self, x: jnp.ndarray) -> jnp.ndarray:
        """``[B, n_action, A, num_bins]``."""
        return self.out(x).reshape(x.shape[0], self.n_action, self.action_dim, self.num_bins)

    def loss(self, x: jnp.ndarray, action: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        del train
        logits = self.logits(x)
        labels = encode_bins(action, self.edges)
        picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - picked
        return jnp.mean(nll, axis=-1)

    def predict(self, x: jnp.ndarray, *, train: bool = False,
                temperature: float | None = None) -> jnp.ndarray:
        del train
        logits = self.logits(x)
        temperature = self.temperature if temperature is None else temperature
        if temperature == 0:
            index = jnp.argmax(logits, axis=-1)
        else:
            index = jax.random.categorical(self.make_rng("sample"), logits / temperature)
        return decode_bins(index, self.edges)


def cosine_beta_schedule(steps: int, s: float = 0.008) -> np.ndarray:
    """The cosine noise schedule (Nichol & Dhariwal, 2021) for ``steps`` steps: float32
    ``betas [steps]``, clipped at 0.999."""
    t = np.linspace(0, steps, steps + 1) / steps
    alphas_cumprod = np.cos((t + s) / (1 + s) * np.pi / 2) ** 2
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return np.clip(betas, 0.0, 0.999).astype(np.float32)


def timestep_embedding(t: jnp.ndarray, features: int) -> jnp.ndarray:
    """Sinusoidal embedding of integer steps ``[B]`` to ``[B, features]``."""
    half = features // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half) / max(half - 1, 1))
    angles = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class Denoiser(nn.Module):
    """MLP-ResNet noise predictor: ``(condition, noisy chunk, step) -> noise``."""

    out_dim: int
    hidden_dim: int = 256
    num_blocks: int = 3
    time_dim: int = 32
    dropout: float = 0.0

    @nn.compact
    def __call__(self, cond: jnp.ndarray, noisy: jnp.ndarray, t: jnp.ndarray, *,
                 train: bool = False) -> jnp.ndarray:
        temb = timestep_embedding(t, self.time_dim)
        temb = nn.Dense(2 * self.time_dim, kernel_init=dense_init)(temb)
        temb = nn.Dense(self.time_dim, kernel_init=dense_init)(nn.swish(temb))
        x = jnp.concatenate([cond, noisy, temb], axis=-1)
        x = nn.Dense(self.hidden_dim, kernel_init=dense_init)(x)
        for _ in range(self.num_blocks):
            x = MLPResNetBlock(self.hidden_dim, "swish", self.dropout)(x, train=train)
        x = activation("swish")(x)
        return nn.Dense(self.out_dim, kernel_init=dense_init)(x)


class DiffusionHead(nn.Module):
    """DDPM over the flattened chunk: trained to predict the noise added at a uniformly drawn
    step (one per example), sampled by K ancestral steps from pure noise, each step's estimate
    of the clean chunk clipped to ``action_range`` (``clip_sample``)."""

    n_action: int
    action_dim: int
    steps: int = 20
    hidden_dim: int = 256
    num_blocks: int = 3
    time_dim: int = 32
    dropout: float = 0.0
    action_range: tuple[float, float] = (-1.0, 1.0)
    clip_sample: bool = True
    loss_draws_noise: ClassVar[bool] = True  # a noise level and the noise per example

    def setup(self):
        self.denoiser = Denoiser(self.n_action * self.action_dim, self.hidden_dim,
                                 self.num_blocks, self.time_dim, self.dropout)
        betas = cosine_beta_schedule(self.steps)
        self.betas = betas
        self.alphas_cumprod = np.cumprod(1.0 - betas).astype(np.float32)

    def loss(self, x: jnp.ndarray, action: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        b = x.shape[0]
        t_key, noise_key = jax.random.split(self.make_rng("sample"))
        t = jax.random.randint(t_key, (b,), 0, self.steps)
        noise = jax.random.normal(noise_key, action.shape, jnp.float32)
        abar = jnp.asarray(self.alphas_cumprod)[t][:, None, None]
        noisy = jnp.sqrt(abar) * action + jnp.sqrt(1.0 - abar) * noise
        eps = self.denoiser(x, noisy.reshape(b, -1), t, train=train)
        return jnp.mean(jnp.square(eps.reshape(action.shape) - noise), axis=-1)

    def predict(self, x: jnp.ndarray, *, train: bool = False,
                temperature: float | None = None) -> jnp.ndarray:
        del temperature
        b = x.shape[0]
        size = self.n_action * self.action_dim
        betas = jnp.asarray(self.betas)
        abar = jnp.asarray(self.alphas_cumprod)
        abar_prev = jnp.concatenate([jnp.ones((1,), jnp.float32), abar[:-1]])
        lo, hi = self.action_range
        init_key, loop_key = jax.random.split(self.make_rng("sample"))
        noise = jax.random.normal(loop_key, (self.steps, b, size), jnp.float32)

        def step(i, sample):
            t = self.steps - 1 - i
            eps = self.denoiser(x, sample, jnp.full((b,), t), train=train)
            x0 = (sample - jnp.sqrt(1.0 - abar[t]) * eps) / jnp.sqrt(abar[t])
            if self.clip_sample:
                x0 = jnp.clip(x0, lo, hi)
            mean = (jnp.sqrt(abar_prev[t]) * betas[t] * x0
                    + jnp.sqrt(1.0 - betas[t]) * (1.0 - abar_prev[t]) * sample) / (1.0 - abar[t])
            variance = betas[t] * (1.0 - abar_prev[t]) / (1.0 - abar[t])
            return mean + jnp.sqrt(variance) * noise[i]  # variance is 0 at the last step

        sample = jax.random.normal(init_key, (b, size), jnp.float32)
        sample = jax.lax.fori_loop(0, self.steps, step, sample)
        return sample.reshape(b, self.n_action, self.action_dim)
