"""Pure TensorFlow ops of the pipeline: index arithmetic for windows, chunks and goals,
normalization, frame gathering, image decoding, resizing and augmentation.

Every op works eagerly and inside ``tf.data`` (the tests run both), and every random op is
stateless: it takes a ``seed`` (int tensor of shape [2]) so that a pipeline is reproducible
whatever order its parallel stages finish in.

Step alignment (RLDS, as the logger writes it): an episode of ``L`` RLDS steps holds ``L - 1``
actions and a final step whose action is padding. Frame ``t`` (``0 <= t <= L - 2``) sees the
observations ``t - n_obs + 1 .. t`` (indices before 0 repeat step 0 and are masked) and the
actions ``t .. t + n_action - 1`` (indices past ``L - 2`` repeat the last action and are masked).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from openx_train.data.config import AugmentConfig, Normalization
from openx_train.data.errors import ConfigError

_EPS = 1e-8

# ---------------------------------------------------------------------------------------------
# Index arithmetic


def history_indices(step_index: tf.Tensor, n_obs: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Indices of the history window ``t - n_obs + 1 .. t`` of each step.

    Args:
      step_index: int tensor ``[...]`` of steps ``t`` within their episode.
      n_obs: window length (>= 1).

    Returns:
      ``(indices, mask)``, both ``[..., n_obs]``: indices clamped at 0 (the first observation
      repeats), and True where the index is a real step (``t - k >= 0``).
    """
    t = tf.convert_to_tensor(step_index)
    offsets = tf.range(-(n_obs - 1), 1, dtype=t.dtype)
    idx = t[..., None] + offsets
    return tf.maximum(idx, 0), idx >= 0


def chunk_indices(step_index: tf.Tensor, num_actions: tf.Tensor, n_action: int
                  ) -> tuple[tf.Tensor, tf.Tensor]:
    """Indices of the action chunk ``t .. t + n_action - 1`` of each step.

    Args:
      step_index: int tensor ``[...]`` of steps ``t``.
      num_actions: int tensor broadcastable to ``step_index``: the number of real actions of the
        episode (``L - 1`` when the final step's action is padding).
      n_action: chunk length (>= 1).

    Returns:
      ``(indices, mask)``, both ``[..., n_action]``: indices clamped to ``num_actions - 1`` (the
      last real action repeats), and True where the index is a real action.
    """
    t = tf.convert_to_tensor(step_index)
    n = tf.cast(num_actions, t.dtype)[..., None]
    idx = t[..., None] + tf.range(n_action, dtype=t.dtype)
    return tf.clip_by_value(idx, 0, tf.maximum(n - 1, 0)), idx < n


def goal_indices(step_index: tf.Tensor, episode_length: tf.Tensor, uniform: tf.Tensor
                 ) -> tf.Tensor:
    """A goal step drawn uniformly from the future of each step: ``t + 1 .. L - 1``.

    Args:
      step_index: int tensor ``[...]`` of steps ``t``.
      episode_length: int tensor broadcastable to it: ``L``, the episode's RLDS steps.
      uniform: float tensor like ``step_index`` of draws in ``[0, 1)``.

    Returns:
      int tensor like ``step_index``; ``L - 1`` where ``t`` has no future step.
    """
    t = tf.convert_to_tensor(step_index)
    last = tf.cast(episode_length, t.dtype) - 1
    span = tf.maximum(last - t, 1)
    offset = tf.cast(tf.floor(tf.cast(uniform, tf.float64) * tf.cast(span, tf.float64)), t.dtype)
    return tf.minimum(t + 1 + tf.minimum(offset, span - 1), last)


def mix64(x: tf.Tensor) -> tf.Tensor:
    """A 64-bit integer hash (the splitmix64 finalizer), elementwise on uint64."""
    x = tf.cast(x, tf.uint64) if x.dtype != tf.uint64 else x

    def shift_xor(v, n):
        return tf.bitwise.bitwise_xor(v, tf.bitwise.right_shift(v, tf.constant(n, tf.uint64)))

    z = shift_xor(x, 30) * tf.constant(0xBF58476D1CE4E5B9, tf.uint64)
    z = shift_xor(z, 27) * tf.constant(0x94D049BB133111EB, tf.uint64)
    return shift_xor(z, 31)


def permute_indices(position: tf.Tensor, size: tf.Tensor, *, seed: int, stream: tf.Tensor,
                    epoch: tf.Tensor) -> tf.Tensor:
    """Element ``position`` of a random permutation of ``[0, size)``, one permutation per
    ``(seed, stream, epoch)``; elementwise on int64 vectors, stateless, holding no memory.

    ``RandomIndexShuffle`` mixes poorly when its seed has little entropy (small integers), so
    the three seed words are hashed first.
    """
    position = tf.cast(position, tf.int64)
    golden = tf.constant(0x9E3779B97F4A7C15, tf.uint64)
    s0 = mix64(tf.fill(tf.shape(position), tf.constant(seed, tf.int64)) + 1)
    s0 = tf.bitwise.bitwise_xor(s0, golden)
    s1 = mix64(tf.bitwise.bitwise_xor(s0, tf.cast(stream, tf.uint64)))
    s2 = mix64(tf.bitwise.bitwise_xor(s1, tf.cast(epoch, tf.uint64)) + golden)
    seeds = tf.bitcast(tf.stack([s0, s1, s2], axis=-1), tf.int64)
    size = tf.cast(size, tf.int64) + tf.zeros_like(position)
    return tf.raw_ops.RandomIndexShuffle(index=position, seed=seeds, max_index=size - 1, rounds=8)


# ---------------------------------------------------------------------------------------------
# Normalization


def normalization_params(stats: Any, mode: Normalization | str, *, key: str = ""
                         ) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(shift, scale, clip)`` with ``normalized = (x - shift) / scale``, float32 arrays.

    ``stats`` is a :class:`~openx_train.data.statistics.KeyStatistics`. Dimensions without
    spread (or with non-finite statistics) get scale 1, so that the inverse is exact.
    """
    mode = Normalization.parse(mode, key=key)
    if mode is Normalization.NONE:
        return np.zeros(()), np.ones(()), False
    if mode is Normalization.GAUSSIAN:
        shift, scale = np.asarray(stats.mean), np.asarray(stats.std)
    else:
        lo, hi = ((stats.min, stats.max) if mode is Normalization.BOUNDS
                  else (stats.quantile("q01"), stats.quantile("q99")))
        lo, hi = np.asarray(lo), np.asarray(hi)
        shift, scale = (lo + hi) / 2.0, (hi - lo) / 2.0
    ok = np.isfinite(shift) & np.isfinite(scale)
    shift = np.where(ok, shift, 0.0)
    scale = np.where(ok & (scale > _EPS), scale, 1.0)
    return shift.astype(np.float32), scale.astype(np.float32), mode is Normalization.BOUNDS_Q99


def normalize(x: Any, stats: Any, mode: Normalization | str, *, key: str = "") -> tf.Tensor:
    """Normalizes ``x`` (``[..., *shape]``, any float or int dtype) to float32.

    Args:
      x: values shaped like the statistics (with leading axes).
      stats: their :class:`~openx_train.data.statistics.KeyStatistics`.
      mode: ``none``, ``gaussian``, ``bounds`` or ``bounds_q99`` (clipped to [-1, 1]).
      key: the key, for error messages.
    """
    shift, scale, clip = normalization_params(stats, mode, key=key)
    y = (tf.cast(x, tf.float32) - shift) / scale
    return tf.clip_by_value(y, -1.0, 1.0) if clip else y


def unnormalize(y: Any, stats: Any, mode: Normalization | str, *, key: str = "") -> tf.Tensor:
    """The inverse of :func:`normalize` (exact except where ``bounds_q99`` clipped)."""
    shift, scale, _ = normalization_params(stats, mode, key=key)
    return tf.cast(y, tf.float32) * scale + shift


# ---------------------------------------------------------------------------------------------
# Frames


def gather_frames(
    table: Mapping[str, Any],
    rows: tf.Tensor,
    episode_start: tf.Tensor,
    episode_length: tf.Tensor,
    *,
    n_obs: int,
    n_action: int,
    goal_uniform: tf.Tensor | None = None,
    final_action_is_padding: bool = True,
) -> dict[str, Any]:
    """Training frames gathered from a table of steps: windows, chunks, masks and goals.

    The same function standardizes one episode (the table is the episode, ``rows`` are its
    steps, ``episode_start`` is 0) and a batch drawn from many episodes (the table holds every
    step of a dataset and ``rows`` index into it).

    Args:
      table: ``{"state": [S, D], "action": [S, A], "images": {name: [S, ...]},
        "language": [S]}``; ``state``, ``images`` and ``language`` are optional. Images may be
        encoded strings, byte-range references or pixels: they are only gathered.
      rows: int64 ``[B]`` table rows of the frames.
      episode_start: int64 ``[B]``: the table row of each frame's episode's first step.
      episode_length: int ``[B]``: each frame's episode's number of RLDS steps.
      n_obs: history window.
      n_action: action chunk.
      goal_uniform: float ``[B]`` draws in [0, 1) for goal relabelling; None: no goal.
      final_action_is_padding: the final step's action is not an action (RLDS).

    Returns:
      ``{"observation": {"state": [B, n_obs, D], <image name>: [B, n_obs, ...],
      "pad_mask": bool [B, n_obs]}, "action": [B, n_action, A], "action_pad_mask":
      bool [B, n_action], "step_index": int32 [B], "language_instruction": [B] (with
      language), "goal": {"state": [B, D], <image name>: [B, ...]} and "goal_step_index":
      int32 [B] (with goals)}``.
    """
    rows = tf.cast(rows, tf.int64)
    start = tf.cast(episode_start, tf.int64)
    length = tf.cast(episode_length, tf.int64)
    t = rows - start
    hist, hist_mask = history_indices(t, n_obs)
    num_actions = length - 1 if final_action_is_padding else length
    chunk, chunk_mask = chunk_indices(t, num_actions, n_action)
    hist_rows = start[:, None] + hist
    obs: dict[str, Any] = {"pad_mask": hist_mask}
    if table.get("state") is not None:
        obs["state"] = tf.gather(table["state"], hist_rows)
    for name, column in table.get("images", {}).items():
        obs[name] = tf.gather(column, hist_rows)
    out: dict[str, Any] = {
        "observation": obs,
        "action": tf.gather(table["action"], start[:, None] + chunk),
        "action_pad_mask": chunk_mask,
        "step_index": tf.cast(t, tf.int32),
    }
    if table.get("language") is not None:
        out["language_instruction"] = tf.gather(table["language"], rows)
    if goal_uniform is not None:
        goal = goal_indices(t, length, goal_uniform)
        goal_rows = start + goal
        goal_obs: dict[str, Any] = {}
        if table.get("state") is not None:
            goal_obs["state"] = tf.gather(table["state"], goal_rows)
        for name, column in table.get("images", {}).items():
            goal_obs[name] = tf.gather(column, goal_rows)
        out["goal"] = goal_obs
        out["goal_step_index"] = tf.cast(goal, tf.int32)
    return out


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
