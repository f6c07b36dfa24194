"""Pure TensorFlow ops of the pipeline: image decoding, resizing and augmentation, and the
index arithmetic, normalization and frame gathering of :mod:`openx_train.data.frames` on
TensorFlow tensors (``ops.gather_frames`` is ``frames.gather_frames`` with ``xp=ops.TF``).

Every op works eagerly and inside ``tf.data`` (the tests run both), and every random op is
stateless: it takes a ``seed`` (int tensor of shape [2]) so that a pipeline is reproducible
whatever order its parallel stages finish in. Step alignment: see :mod:`openx_train.data.frames`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from openx_train.data import frames as frames_lib
from openx_train.data.config import AugmentConfig
from openx_train.data.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Index arithmetic, normalization and frames: the functions of :mod:`openx_train.data.frames`
# on TensorFlow tensors (inside tf.data graphs too).


def _cast(x: Any, dtype: Any) -> tf.Tensor:
    return tf.cast(x, dtype)


TF = frames_lib.ArrayModule(
    name="tensorflow",
    asarray=tf.convert_to_tensor,
    cast=_cast,
    arange=lambda start, stop, dtype: tf.range(start, stop, dtype=dtype),
    maximum=tf.maximum,
    minimum=tf.minimum,
    clip=tf.clip_by_value,
    floor=tf.floor,
    take=tf.gather,
    concat=lambda parts: tf.concat(parts, axis=-1),
    flatten_rows=lambda x: tf.reshape(x, [tf.shape(x)[0], -1]),
    length=lambda x: tf.shape(x)[0],
    zeros_like=tf.zeros_like,
    empty_strings=lambda n: tf.fill([n], ""),
)
history_indices = functools.partial(frames_lib.history_indices, xp=TF)
chunk_indices = functools.partial(frames_lib.chunk_indices, xp=TF)
goal_indices = functools.partial(frames_lib.goal_indices, xp=TF)
normalize = functools.partial(frames_lib.normalize, xp=TF)
unnormalize = functools.partial(frames_lib.unnormalize, xp=TF)
gather_frames = functools.partial(frames_lib.gather_frames, xp=TF)
normalization_params = frames_lib.normalization_params


def mix64(x: tf.Tensor) -> tf.Tensor:
    """A 64-bit integer hash (the splitmix64 finalizer), elementwise on uint64."""
    x = tf.cast(x, tf.uint64) if x.dtype != tf.uint64 else x

    def shift_xor(v, n):
        return tf.bitwise.bitwise_xor(v, tf.bitwise.right_shift(v, tf.constant(n, tf.uint64)))

    z = shift_xor(x, 30) * tf.constant(0xBF58476D1CE4E5B9, tf.uint64)
    z = shift_xor(z, 27) * tf.constant(0x94D049BB133111EB, tf.uint64)
    return shift_xor(z, 31)


# ---------------------------------------------------------------------------------------------
# Images


def decode_frames(frames: tf.Tensor, *, raw_shape: tuple[int, ...] | None = None,
                  num_frames: int | None = None) -> tf.Tensor:
    """Encoded frames ``[n]`` (PNG/JPEG strings, or raw uint8 bytes of ``raw_shape``) to uint8
    ``[n, H, W, 3]``. uint8 pixels ``[n, H, W, C]`` pass through (as 3 channels)."""
    if frames.dtype == tf.uint8:
        pixels = frames
    else:
        n = num_frames if num_frames is not None else frames.shape[0]
        if n is None:
            raise ConfigError("decode_frames: the number of frames must be static")
        if raw_shape is not None:
            pixels = tf.reshape(tf.io.decode_raw(frames, tf.uint8), [n, *raw_shape])
        else:
            pixels = tf.stack([tf.io.decode_image(frames[i], channels=3, expand_animations=False)
                               for i in range(n)])
    channels = pixels.shape[-1]
    if channels == 1:
        pixels = tf.tile(pixels, [1, 1, 1, 3])
    elif channels == 4:
        pixels = pixels[..., :3]
    return pixels


def hash_uniform(seed: tf.Tensor, k: int) -> tf.Tensor:
    """``k`` uniforms in [0, 1) per seed, from a hash of the seed: float32 ``[..., k]`` for an
    int ``[..., 2]`` seed. Vectorized and stateless: one draw per row, whatever the batch."""
    s = tf.bitcast(tf.cast(seed, tf.int64), tf.uint64)
    golden = tf.constant(0x9E3779B97F4A7C15, tf.uint64)
    h = mix64(tf.bitwise.bitwise_xor(mix64(tf.bitwise.bitwise_xor(s[..., 0], golden)),
                                     s[..., 1]))
    cols = mix64(h[..., None] + tf.constant(np.arange(1, k + 1, dtype=np.uint64)) * golden)
    return tf.cast(tf.bitwise.right_shift(cols, tf.constant(40, tf.uint64)), tf.float32) \
        / float(1 << 24)


def sample_augmentation(seed: tf.Tensor, augment: AugmentConfig) -> dict[str, tf.Tensor]:
    """Draws augmentation parameters for every seed of int ``[..., 2]`` (vectorized).

    Returns:
      ``{"crop": [..., 4]`` (``u_y, u_x`` uniforms placing the crop, ``h, w`` its size as
      fractions of the image), ``"color": [..., 3, 3]`` (saturation and hue as an RGB matrix),
      ``"contrast": [...]``, ``"brightness": [...]`` (in 0..255 units)``}``, float32.
    """
    u = hash_uniform(seed, 8)
    ones, zeros = tf.ones_like(u[..., 0]), tf.zeros_like(u[..., 0])

    def between(col, lo, hi):
        return lo + (hi - lo) * u[..., col]

    if augment.crop_scale is not None:
        area = between(0, *augment.crop_scale)
        r = tf.exp(between(1, float(np.log(augment.crop_ratio[0])),
                           float(np.log(augment.crop_ratio[1]))))
        crop = tf.stack([u[..., 2], u[..., 3], tf.minimum(tf.sqrt(area / r), 1.0),
                         tf.minimum(tf.sqrt(area * r), 1.0)], axis=-1)
    else:
        crop = tf.stack([zeros, zeros, ones, ones], axis=-1)
    return {
        "crop": crop,
        "color": color_matrix(
            between(6, *augment.saturation) if augment.saturation is not None else ones,
            between(7, -augment.hue, augment.hue) if augment.hue else zeros),
        "contrast": between(5, *augment.contrast) if augment.contrast is not None else ones,
        "brightness": between(4, -augment.brightness, augment.brightness) * 255.0
        if augment.brightness else zeros,
    }


def crop_pixels(crop: tf.Tensor, image_hw: tf.Tensor) -> tf.Tensor:
    """Crops ``[..., 4]`` (``u_y, u_x, h, w`` fractions, see :func:`sample_augmentation`) in
    pixels of images of ``image_hw`` (``[..., 2]``): int32 ``[..., 4]`` = ``[y, x, h, w]``."""
    hw = tf.cast(image_hw, tf.float32)
    size = tf.clip_by_value(tf.round(crop[..., 2:] * hw), 1.0, hw)
    corner = tf.minimum(tf.floor(crop[..., :2] * (hw - size + 1.0)), hw - size)
    return tf.cast(tf.concat([corner, size], -1), tf.int32)


def resize_frames(pixels: tf.Tensor, size: tuple[int, int], crop: tf.Tensor | None = None
                  ) -> tf.Tensor:
    """uint8 ``[n, H, W, 3]`` to float32 ``[n, h, w, 3]`` in 0..255: the ``crop``
    (``[y, x, h, w]`` pixels, the same for every frame) or the whole image, resized bilinearly
    (half-pixel centres; a 2x reduction averages 2x2 blocks)."""
    if crop is not None:
        pixels = tf.slice(pixels, tf.stack([0, crop[0], crop[1], 0]),
                          tf.stack([-1, crop[2], crop[3], -1]))
    elif pixels.shape[1:3] == tuple(size):
        return tf.cast(pixels, tf.float32)
    return tf.raw_ops.ResizeBilinear(images=pixels, size=list(size), half_pixel_centers=True)


# RGB <-> YIQ: Y is the luma; I and Q span the chroma plane, where saturation is a scale and hue
# a rotation.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                        [0.595716, -0.274453, -0.321263],
                        [0.211456, -0.522591, 0.311135]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def _batched_matmul(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """``a @ b`` for ``[..., 3, 3]`` stacks with both operands broadcast explicitly: TensorFlow
    2.21's oneDNN BatchMatMul corrupts memory when it broadcasts inside tf.data (seen with a
    ``[3, 3] @ [B, C, 3, 3]`` product in a parallel map)."""
    shape = tf.broadcast_dynamic_shape(tf.shape(a), tf.shape(b))
    flat = tf.concat([[-1], shape[-2:]], 0)
    out = tf.reshape(tf.broadcast_to(a, shape), flat) @ tf.reshape(tf.broadcast_to(b, shape), flat)
    return tf.reshape(out, shape)


def color_matrix(saturation: tf.Tensor, hue: tf.Tensor) -> tf.Tensor:
    """RGB matrices ``[..., 3, 3]`` that scale the chroma by ``saturation`` and rotate the hue
    by ``hue`` turns (in YIQ): ``rgb_out = M @ rgb_in``."""
    theta = 2.0 * np.pi * tf.cast(hue, tf.float32)
    s = tf.cast(saturation, tf.float32)
    c, si = s * tf.cos(theta), s * tf.sin(theta)
    one, zero = tf.ones_like(c), tf.zeros_like(c)
    rot = tf.stack([tf.stack([one, zero, zero], -1), tf.stack([zero, c, -si], -1),
                    tf.stack([zero, si, c], -1)], -2)
    return _batched_matmul(_batched_matmul(tf.constant(_YIQ_TO_RGB, tf.float32), rot),
                           tf.constant(_RGB_TO_YIQ, tf.float32))


def color_jitter(images: tf.Tensor, params: Mapping[str, tf.Tensor]) -> tf.Tensor:
    """Brightness, contrast, saturation and hue of float ``[n, h, w, 3]`` images in 0..255 (one
    draw, ``params`` from :func:`sample_augmentation`, for all ``n`` frames), clipped to 0..255.

    Brightness adds ``brightness``; contrast scales the distance to each frame's per-channel
    mean; saturation scales and hue rotates the chroma. All four compose into one affine map
    ``A @ rgb + b`` per frame, applied in one matrix product.
    """
    contrast = params["contrast"]
    matrix = tf.transpose(params["color"])  # pixels are rows: x @ M^T
    shape = tf.shape(images)
    flat = tf.reshape(images, [shape[0], -1, 3])
    mean = tf.reduce_mean(flat, axis=1)  # [n, 3]
    offset = ((1.0 - contrast) * mean + params["brightness"]) @ matrix  # [n, 3]
    # Plain 2-D products (see _batched_matmul for why not a broadcasting one).
    out = tf.reshape(tf.reshape(flat, [-1, 3]) @ (contrast * matrix), tf.shape(flat))
    out = out + offset[:, None, :]
    return tf.reshape(tf.clip_by_value(out, 0.0, 255.0), shape)


def preprocess_frames(
    frames: tf.Tensor,
    size: tuple[int, int],
    *,
    augment: AugmentConfig | None = None,
    seed: tf.Tensor | None = None,
    params: Mapping[str, tf.Tensor] | None = None,
    raw_shape: tuple[int, ...] | None = None,
    num_frames: int | None = None,
    dtype: str = "uint8",
) -> tf.Tensor:
    """Decodes, crops/resizes and colour-jitters one camera's window of frames.

    Args:
      frames: ``[n]`` encoded frames (or raw bytes, or uint8 pixels ``[n, H, W, C]``).
      size: output ``(height, width)``.
      augment: augmentation (one crop and one colour draw for all ``n`` frames); None: resize.
      seed: int ``[2]``: draws the augmentation (with ``augment``).
      params: augmentation parameters already drawn (:func:`sample_augmentation`), instead of
        ``seed``; with ``"crop_pixels"`` (:func:`crop_pixels`) when the frame size is known.
      raw_shape: the ``(H, W, C)`` of raw-bytes frames.
      num_frames: ``n`` when the frames' static shape does not say it.
      dtype: ``"uint8"`` or ``"float32"`` (in [0, 1]).

    Returns:
      ``[n, h, w, 3]`` images.

    Raises:
      ConfigError: for augmentation without ``seed`` or ``params``.
    """
    pixels = decode_frames(frames, raw_shape=raw_shape, num_frames=num_frames)
    if augment is not None and params is None:
        if seed is None:
            raise ConfigError("preprocess_frames: augmentation needs a seed or params")
        params = sample_augmentation(seed, augment)
    images = crop_and_resize(pixels, size, augment=augment, params=params)
    if has_jitter(augment):
        (out,) = jitter_windows([images], [params], dtype=dtype)
        return out
    return finish(images, dtype=dtype)


def has_jitter(augment: AugmentConfig | None) -> bool:
    """Whether ``augment`` changes colours."""
    return augment is not None and bool(augment.brightness or augment.contrast is not None
                                        or augment.saturation is not None or augment.hue)


def crop_and_resize(pixels: tf.Tensor, size: tuple[int, int], *,
                    augment: AugmentConfig | None = None,
                    params: Mapping[str, tf.Tensor] | None = None) -> tf.Tensor:
    """The geometric half of :func:`preprocess_frames`: uint8 ``[n, H, W, 3]`` to ``[n, h, w,
    3]``, cropped when ``augment`` says so. Returns the uint8 pixels themselves when nothing
    changes them (same size, no crop), float32 in 0..255 otherwise."""
    crop = None
    if augment is not None and augment.crop_scale is not None:
        crop = params.get("crop_pixels")
        if crop is None:
            crop = crop_pixels(params["crop"], tf.shape(pixels)[1:3])
    if crop is None and pixels.shape[1:3] == tuple(size):
        return pixels
    return resize_frames(pixels, size, crop)


def finish(images: tf.Tensor, *, dtype: str = "uint8") -> tf.Tensor:
    """uint8 or float32 ``[..., 3]`` pixels in 0..255 to the output ``dtype``: uint8 (rounded)
    or float32 in [0, 1]."""
    if images.dtype == tf.uint8:
        return images if dtype == "uint8" else tf.cast(images, tf.float32) / 255.0
    return _to_output(images, dtype == "uint8")


def jitter_windows(windows: list[tf.Tensor], params: list[Mapping[str, tf.Tensor]], *,
                   dtype: str = "uint8") -> list[tf.Tensor]:
    """:func:`color_jitter` and :func:`finish` of several windows (a sample's cameras), each
    with its own parameters, in one XLA computation: its passes over the pixels fuse into one
    loop, several times cheaper than the ops one by one, and one launch serves every camera
    (a launch costs about as much as a small window's pixels)."""
    windows = [tf.cast(w, tf.float32) for w in windows]
    flat = [tf.stack([p["contrast"], p["brightness"]]) for p in params]
    colors = [p["color"] for p in params]
    return list(_jitter_xla(windows, colors, flat, to_uint8=dtype == "uint8"))


def _to_output(images: tf.Tensor, to_uint8: bool) -> tf.Tensor:
    if to_uint8:
        # Values are within 0..255 (bilinear weights are convex, jitter clips): +0.5 rounds.
        return tf.cast(images + 0.5, tf.uint8)
    return images / 255.0


@tf.function(jit_compile=True, reduce_retracing=True)
def _jitter_xla(windows, colors, factors, *, to_uint8: bool):
    return [_to_output(color_jitter(w, {"color": c, "contrast": f[0], "brightness": f[1]}),
                       to_uint8) for w, c, f in zip(windows, colors, factors)]
