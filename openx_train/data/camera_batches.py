"""The camera half of ``make_dataloader``: a ``tf.data`` pipeline that takes the index
batches of :mod:`openx_train.data.sampler` (which frames, which goals), gathers windows and
chunks with ``ops.gather_frames`` (the same arithmetic as the numpy state-only batches, see
:mod:`openx_train.data.frames`), reads the image bytes by range after the shuffle, then
decodes, crops, resizes and colour-jitters each sample. Imported only when a loader has
cameras (it loads TensorFlow).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from openx_train.data import ops
from openx_train.data.config import LoaderConfig
from openx_train.data.image_index import RangeReader
from openx_train.data.sampler import IndexBatch

_FETCH_CHUNK = 16  # samples whose image bytes are read in one call


def index_dataset(index_batches: Callable[[], Iterator[IndexBatch]], batch_size: int | None
                  ) -> tf.data.Dataset:
    """The sampler's batches as a dataset of ``(number, dataset ids, rows, valid, domain
    ids, goal uniforms)`` (``batch_size``: the static batch size, or None when the last batch
    of a validation pass may be smaller)."""
    def gen():
        for ib in index_batches():
            goal = ib.goal_uniform if ib.goal_uniform is not None else np.zeros(len(ib.rows))
            yield ib.number, ib.dataset_ids, ib.rows, ib.valid, ib.domain_ids, goal

    vector = [batch_size]
    return tf.data.Dataset.from_generator(gen, output_signature=(
        tf.TensorSpec([], tf.int64), tf.TensorSpec(vector, tf.int32),
        tf.TensorSpec(vector, tf.int64), tf.TensorSpec(vector, tf.bool),
        tf.TensorSpec(vector, tf.int32), tf.TensorSpec(vector, tf.float64)))


def _tf_table(table: Mapping[str, Any]) -> dict[str, Any]:
    """The loader's numpy step table as constants."""
    out: dict[str, Any] = {k: tf.constant(v) for k, v in table.items()
                           if k not in ("images", "state", "language") and v is not None}
    out["state"] = None if table["state"] is None else tf.constant(table["state"], tf.float32)
    out["language"] = (None if table["language"] is None
                       else tf.constant(table["language"], tf.string))
    out["images"] = {k: tf.constant(v, tf.int64) for k, v in table["images"].items()}
    return out


def camera_batches(indices: tf.data.Dataset, table: Mapping[str, Any], files: Sequence[str],
                   tables: Sequence[Any], config: LoaderConfig, *, train: bool
                   ) -> tf.data.Dataset:
    """Batches of decoded, augmented frames (see ``make_dataloader``) from the index dataset
    (:func:`index_dataset`) and the loader's numpy table and step tables."""
    table = _tf_table(table)
    cameras = tables[0].resolved.cameras
    present = {cam.name: tf.constant([any(c.name == cam.name and c.key is not None
                                          for c in t.resolved.cameras) for t in tables])
               for cam in cameras}
    has_state = table["state"] is not None
    seed = tf.constant([config.seed, 0xA06], tf.int64)
    reader = RangeReader(files)
    augment = config.augment if train else None
    # Frame sizes per dataset and camera, when every one is known: crops are drawn per batch.
    hw = [[c.source_shape[:2] if c.source_shape else (1, 1) for c in t.resolved.cameras]
          for t in tables]
    known = all(c.source_shape and min(c.source_shape) > 0
                for t in tables for c in t.resolved.cameras if c.key is not None)
    source_hw = tf.constant(hw, tf.int32) if cameras and known else None

    def gather(b, ids, rows, valid, domain_ids, goal_uniform):
        s_aug = tf.random.experimental.stateless_fold_in(seed, b)
        n = tf.shape(rows)[0]
        uniform = goal_uniform if config.goal_relabeling else None
        out = ops.gather_frames(table, rows, tf.gather(table["episode_start"], rows),
                                tf.gather(table["episode_length"], rows), n_obs=config.n_obs,
                                n_action=config.n_action, goal_uniform=uniform,
                                final_action_is_padding=config.drop_final_step)
        obs = out["observation"]
        mask_dict = {}
        if has_state:
            mask_dict["state"] = obs["pad_mask"]
        for cam in cameras:
            mask_dict[cam.name] = tf.logical_and(obs["pad_mask"],
                                                 tf.gather(present[cam.name], ids)[:, None])
        obs["pad_mask_dict"] = mask_dict
        out["dataset_id"] = ids
        out["domain_id"] = domain_ids
        out["episode_index"] = tf.gather(table["episode_index"], rows)
        out["row"] = rows
        out["valid"] = valid
        if cameras and augment is not None:
            # Drawn for the whole batch at once: [B, cameras, ...].
            seeds = tf.reshape(tf.random.experimental.stateless_split(
                s_aug, n * len(cameras)), [n, len(cameras), 2])
            params = ops.sample_augmentation(seeds, augment)
            if source_hw is not None and augment.crop_scale is not None:
                params["crop_pixels"] = ops.crop_pixels(params["crop"], tf.gather(source_hw, ids))
            out["_augment"] = params
        return out

    par = tf.data.AUTOTUNE if config.num_parallel_calls == -1 else config.num_parallel_calls
    # Batches keep their order (epochs stay whole; validation is in order). With cameras and
    # deterministic=False, a sample may move to a neighbouring batch if its decoding is slow.
    deterministic = config.deterministic or not train
    ds = indices.map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if cameras:
        sources = _camera_sources(tables)
        ds = ds.rebatch(_FETCH_CHUNK).map(lambda x: _fetch_images(x, cameras, reader),
                                           num_parallel_calls=2, deterministic=True)
        ds = ds.unbatch().map(
            lambda x: _decode_sample(x, cameras, sources, augment, config),
            num_parallel_calls=par, deterministic=deterministic)
        ds = ds.batch(config.batch_size, drop_remainder=train or config.remainder != "partial")
    options = tf.data.Options()
    options.deterministic = deterministic
    options.experimental_optimization.map_parallelization = True
    return ds.prefetch(config.prefetch).with_options(options)


def _fetch_images(out: dict[str, Any], cameras, reader: RangeReader) -> dict[str, Any]:
    """Replaces the image references of a chunk of samples by the encoded bytes (one read call
    per chunk: fewer Python calls than per sample, less memory than per batch)."""
    refs = [out["observation"][c.name] for c in cameras]  # [b, n_obs, 3]
    if "goal" in out:
        refs += [out["goal"][c.name][:, None] for c in cameras]  # [b, 1, 3]
    widths = [r.shape[1] for r in refs]
    data = tf.numpy_function(reader, [tf.concat(refs, axis=1)], tf.string, stateful=False)
    data.set_shape([None, sum(widths)])
    parts = tf.split(data, widths, axis=1)
    for c, part in zip(cameras, parts[: len(cameras)]):
        out["observation"][c.name] = part
    if "goal" in out:
        for c, part in zip(cameras, parts[len(cameras):]):
            out["goal"][c.name] = part[:, 0]
    return out


@dataclasses.dataclass(frozen=True)
class _Source:
    static_shape: tuple[int, ...] | None  # (H, W, C) when every dataset agrees and none is raw
    raw_shapes: tf.Tensor | None  # int32 [K, 3]: (H, W, C) of raw images per dataset
    raw: tf.Tensor | None  # bool [K]
    always_present: bool  # every dataset has this camera


def _camera_sources(tables: Sequence[Any]) -> dict[str, _Source]:
    out = {}
    for i, cam in enumerate(tables[0].resolved.cameras):
        srcs = [t.resolved.cameras[i] for t in tables]
        shapes = {s.source_shape for s in srcs if s.key is not None}
        any_raw = any(s.raw for s in srcs if s.key is not None)
        static = next(iter(shapes)) if len(shapes) == 1 and not any_raw else None
        if static is not None and static[-1] != 3:
            static = None
        raw_shapes = raw = None
        if any_raw:
            raw_shapes = tf.constant([s.source_shape if s.raw else (1, 1, 1) for s in srcs],
                                     tf.int32)
            raw = tf.constant([s.raw and s.key is not None for s in srcs])
        out[cam.name] = _Source(static, raw_shapes, raw,
                                all(s.key is not None for s in srcs))
    return out


def _decode_window(frames: tf.Tensor, dataset_id: tf.Tensor, source: _Source) -> tf.Tensor:
    """Encoded or raw frames ``[n]`` to uint8 ``[n, H, W, 3]``."""
    n = frames.shape[0]

    def encoded():
        pixels = tf.stack([tf.io.decode_image(frames[i], channels=3, expand_animations=False)
                           for i in range(n)])
        if source.static_shape is not None:
            pixels = tf.ensure_shape(pixels, [n, *source.static_shape])
        return pixels

    if source.raw is None:
        return encoded()

    def raw():
        shape = source.raw_shapes[dataset_id]
        pixels = tf.reshape(tf.io.decode_raw(frames, tf.uint8), tf.concat([[n], shape], 0))
        return tf.cond(shape[2] == 1, lambda: tf.tile(pixels, [1, 1, 1, 3]),
                       lambda: pixels[..., :3])

    return tf.cond(source.raw[dataset_id], raw, encoded)


def _decode_sample(x: dict[str, Any], cameras, sources: Mapping[str, _Source], augment,
                   config: LoaderConfig) -> dict[str, Any]:
    """Decodes, crops, resizes and colour-jitters one sample's frames."""
    params = x.pop("_augment", None)
    n_obs = config.n_obs
    has_goal = "goal" in x
    n = n_obs + int(has_goal)
    jitter = ops.has_jitter(augment)
    windows, window_params = [], []
    for i, cam in enumerate(cameras):
        frames = x["observation"][cam.name]
        if has_goal:
            frames = tf.concat([frames, x["goal"][cam.name][None]], axis=0)
        cam_params = None if params is None else {k: v[i] for k, v in params.items()}

        def process(frames=frames, source=sources[cam.name], cam=cam, cam_params=cam_params):
            pixels = _decode_window(frames, x["dataset_id"], source)
            return ops.crop_and_resize(pixels, cam.size, augment=augment, params=cam_params)

        if sources[cam.name].always_present:
            images = process()  # uint8 when untouched (same size, no crop), else float32
        else:
            images = tf.cond(tf.reduce_any(x["observation"]["pad_mask_dict"][cam.name]),
                             lambda process=process: tf.cast(process(), tf.float32),
                             lambda cam=cam: tf.zeros([n, *cam.size, 3], tf.float32))
        windows.append(tf.ensure_shape(images, [n, *cam.size, 3]))
        window_params.append(cam_params)
    if jitter:
        windows = ops.jitter_windows(windows, window_params, dtype=config.image_dtype)
        for w, cam in zip(range(len(windows)), cameras):
            if not sources[cam.name].always_present:  # a missing camera stays black
                present = tf.reduce_any(x["observation"]["pad_mask_dict"][cam.name])
                windows[w] = windows[w] * tf.cast(present, windows[w].dtype)
    else:
        windows = [ops.finish(w, dtype=config.image_dtype) for w in windows]
    for cam, images in zip(cameras, windows):
        x["observation"][cam.name] = images[:n_obs]
        if has_goal:
            x["goal"][cam.name] = images[n_obs]
    return x
