"""Observation encoders: an MLP for state vectors, ResNet-18/34 or a small CNN for images, and
the history combinators.

Every encoder works on one step of one example at a time (GroupNorm and LayerNorm, never
BatchNorm), so an example's features never depend on another example or another step. Padded
history steps are zeroed before the encoder and their features zeroed after it, so padded values
cannot reach the output; the history is then stacked (with the pad mask as extra features) or
mixed by a learned softmax over the valid steps only.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from openx_train.models.layers import MLP, FiLM, conv_init

_conv = functools.partial(nn.Conv, kernel_init=conv_init)


def _groups(channels: int) -> int:
    """GroupNorm groups: about 16 channels a group, a divisor of ``channels``."""
    g = max(1, channels // 16)
    while channels % g:
        g -= 1
    return g


def _norm(channels: int, **kwargs) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=_groups(channels), epsilon=1e-5, **kwargs)


class SpatialSoftmax(nn.Module):
    """Keypoints: a 1x1 conv to ``num_keypoints`` maps, a softmax over positions (with a learned
    temperature) and each map's expected (x, y) in [-1, 1]. ``[N, H, W, C]`` to
    ``[N, 2 * num_keypoints]``."""

    num_keypoints: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = _conv(self.num_keypoints, (1, 1), name="keypoints")(x)
        n, h, w, k = x.shape
        log_temperature = self.param("log_temperature", nn.initializers.zeros, ())
        attention = jax.nn.softmax(x.reshape(n, h * w, k) * jnp.exp(-log_temperature), axis=1)
        ys, xs = jnp.meshgrid(jnp.linspace(-1.0, 1.0, h), jnp.linspace(-1.0, 1.0, w),
                              indexing="ij")
        grid = jnp.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1)  # [H*W, 2]
        expected = jnp.einsum("npk,pc->nkc", attention, grid)
        return expected.reshape(n, 2 * k)


class ResNetBlock(nn.Module):
    """Basic ResNet block (two 3x3 convs) with GroupNorm; the second norm starts at zero so
    each block starts as the identity."""

    filters: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        residual = x
        y = _conv(self.filters, (3, 3), self.strides, use_bias=False)(x)
        y = nn.relu(_norm(self.filters)(y))
        y = _conv(self.filters, (3, 3), use_bias=False)(y)
        y = _norm(self.filters, scale_init=nn.initializers.zeros)(y)
        if residual.shape != y.shape:
            residual = _conv(self.filters, (1, 1), self.strides, use_bias=False,
                               name="conv_proj")(residual)
            residual = _norm(self.filters, name="norm_proj")(residual)
        return nn.relu(residual + y)


_STAGES = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


class ImageEncoder(nn.Module):
    """Images ``[N, H, W, C]`` (uint8 in 0..255 or float in 0..1) to features ``[N, F]``.

    Attributes:
      kind: ``"resnet18"``, ``"resnet34"`` or ``"conv"`` (three 3x3 convs, strides 1, 2, 2).
      stem: resnet stem: ``"imagenet"`` (7x7/2 conv and 3x3/2 max pool) or ``"small"``
        (3x3/1 conv).
      width: filters of the first stage (doubled at each later stage).
      pooling: ``"spatial_softmax"`` or ``"avg"``.
      num_keypoints: spatial softmax keypoints.
      film: FiLM each stage's output with ``cond``.
    """

    kind: str = "resnet18"
    stem: str = "imagenet"
    width: int = 64
    pooling: str = "spatial_softmax"
    num_keypoints: int = 64
    film: bool = False

    @nn.compact
    def __call__(self, images: jnp.ndarray, cond: jnp.ndarray | None = None, *,
                 train: bool = False) -> jnp.ndarray:
        del train  # no dropout or batch statistics in the encoder
        x = images.astype(jnp.float32)
        x = x * (2.0 / 255.0) - 1.0 if images.dtype == jnp.uint8 else 2.0 * x - 1.0
        film = cond is not None and self.film
        if self.kind == "conv":
            for filters, strides in ((self.width, 1), (2 * self.width, 2),
                                     (2 * self.width, 2)):
                x = _conv(filters, (3, 3), strides, use_bias=False)(x)
                x = nn.relu(_norm(filters)(x))
                if film:
                    x = FiLM()(x, cond)
        else:
            if self.stem == "imagenet":
                x = _conv(self.width, (7, 7), 2, padding=[(3, 3), (3, 3)], use_bias=False,
                            name="conv_init")(x)
                x = nn.relu(_norm(self.width, name="norm_init")(x))
                x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
            else:
                x = _conv(self.width, (3, 3), 1, use_bias=False, name="conv_init")(x)
                x = nn.relu(_norm(self.width, name="norm_init")(x))
            for i, blocks in enumerate(_STAGES[self.kind]):
                for j in range(blocks):
                    x = ResNetBlock(self.width * 2**i, strides=2 if i > 0 and j == 0 else 1)(x)
                if film:
                    x = FiLM()(x, cond)
        if self.pooling == "avg":
            return jnp.mean(x, axis=(1, 2))
        return SpatialSoftmax(self.num_keypoints)(x)


class TemporalMix(nn.Module):
    """A learned mix of a history window: ``sum_t w_t f_t`` with ``w`` a softmax, over the valid
    steps only, of a learned per-position logit plus a content score. ``[B, T, F]`` and mask
    ``[B, T]`` to ``[B, F]``; an all-padded window gives zeros."""

    @nn.compact
    def __call__(self, features: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
        position = self.param("position", nn.initializers.zeros, (features.shape[1],))
        logits = position + nn.Dense(1)(features)[..., 0]
        logits = jnp.where(mask, logits, -1e30)
        weights = jax.nn.softmax(logits, axis=-1) * mask
        return jnp.einsum("bt,btf->bf", weights, features)


def encode_window(encoder: nn.Module, window: jnp.ndarray, mask: jnp.ndarray, *,
                  cond: jnp.ndarray | None, train: bool) -> jnp.ndarray:
    """Encodes each step of ``[B, T, ...]`` with ``encoder`` (one call on ``[B*T, ...]``):
    padded steps are zeroed before and their features after.

    Returns:
      ``[B, T, F]``.
    """
    b, t = window.shape[:2]
    keep = mask.reshape(b, t, *(1,) * (window.ndim - 2))
    x = jnp.where(keep, window, jnp.zeros((), window.dtype))
    x = x.reshape(b * t, *window.shape[2:])
    if cond is not None:
        cond = jnp.repeat(cond, t, axis=0)
    features = encoder(x, cond, train=train)
    features = features.reshape(b, t, -1)
    return jnp.where(mask[..., None], features, 0.0)


def stack_window(features: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """``[B, T, F]`` (padded steps zero) and mask ``[B, T]`` to ``[B, T * F + T]``: the steps
    side by side and the mask, so the model can tell a padded step from a zero feature."""
    b = features.shape[0]
    return jnp.concatenate([features.reshape(b, -1), mask.astype(features.dtype)], axis=-1)


class VectorEncoder(nn.Module):
    """A state vector ``[N, D]`` through an MLP (LayerNorm, dropout); identity without layers."""

    hidden_dims: tuple[int, ...] = ()
    activation: str = "relu"
    layer_norm: bool = True
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, cond: jnp.ndarray | None = None, *,
                 train: bool = False) -> jnp.ndarray:
        del cond  # conditioning enters the trunk
        x = x.reshape(x.shape[0], math.prod(x.shape[1:])).astype(jnp.float32)
        return MLP(self.hidden_dims, self.activation, self.layer_norm, self.dropout)(
            x, train=train)
