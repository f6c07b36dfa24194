"""Small building blocks shared by the encoders, the trunk and the heads."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "relu": nn.relu, "gelu": nn.gelu, "swish": nn.swish, "tanh": jnp.tanh}

#: Glorot-uniform kernels, as the OpenX and Octo MLPs.
dense_init = nn.initializers.xavier_uniform()
_lecun_normal = nn.initializers.lecun_normal()


def conv_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """LeCun-normal conv kernels (flax's default) drawn as a ``[kh * kw * in, out]`` matrix
    and reshaped: the same distribution (the fan-in is the same), but XLA on the CPU takes
    seconds to compile random bits of some small 4-D shapes (``[3, 3, 8, 16]``: about 6 s,
    once per kernel shape), and well under one for the matrix."""
    return _lecun_normal(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)


def activation(name: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """The activation function called ``name`` (see ``config.ACTIVATIONS``)."""
    return _ACTIVATIONS[name]


class FiLM(nn.Module):
    """Feature-wise linear modulation: ``x * (1 + gamma(c)) + beta(c)``.

    Both projections start at zero, so a freshly initialized FiLM layer is the identity and the
    conditioning is learned from there. ``x`` is ``[B, ..., C]``, ``cond`` is ``[B, E]``.
    """

    @nn.compact
    def __call__(self, x: jnp.ndarray, cond: jnp.ndarray) -> jnp.ndarray:
        scale_shift = nn.Dense(2 * x.shape[-1], kernel_init=nn.initializers.zeros)(cond)
        gamma, beta = jnp.split(scale_shift, 2, axis=-1)
        expand = (slice(None),) + (None,) * (x.ndim - 2)
        return x * (1.0 + gamma[expand]) + beta[expand]


class MLP(nn.Module):
    """Dense layers, each followed by LayerNorm (optional), FiLM (with ``cond``), the
    activation and dropout. The last layer is activated too: heads add their own output layer.

    Attributes:
      hidden_dims: widths of the layers; () returns the input unchanged.
      activation: activation name.
      layer_norm: LayerNorm after each Dense.
      dropout: dropout rate after each layer (when ``train``).
    """

    hidden_dims: tuple[int, ...]
    activation: str = "relu"
    layer_norm: bool = False
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, cond: jnp.ndarray | None = None, *,
                 train: bool = False) -> jnp.ndarray:
        act = activation(self.activation)
        for width in self.hidden_dims:
            x = nn.Dense(width, kernel_init=dense_init)(x)
            if self.layer_norm:
                x = nn.LayerNorm()(x)
            if cond is not None:
                x = FiLM()(x, cond)
            x = act(x)
            if self.dropout > 0:
                x = nn.Dropout(self.dropout)(x, deterministic=not train)
        return x


class MLPResNetBlock(nn.Module):
    """Pre-norm residual MLP block: ``x + Dense(act(Dense_4h(LayerNorm(dropout(x)))))``."""

    features: int
    activation: str = "swish"
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        residual = x
        if self.dropout > 0:
            x = nn.Dropout(self.dropout)(x, deterministic=not train)
        x = nn.LayerNorm()(x)
        x = nn.Dense(4 * self.features, kernel_init=dense_init)(x)
        x = activation(self.activation)(x)
        x = nn.Dense(self.features, kernel_init=dense_init)(x)
        return residual + x
