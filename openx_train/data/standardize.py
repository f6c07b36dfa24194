"""``standardize_dataset`` and ``flatten_dataset``: episodes in the logged keys to training frames
in the batch format.

``standardize_dataset`` maps each episode of ``load_dataset`` to its frames: a
:class:`~openx_train.data.config.Structure` selects the state, camera, action and language keys;
states and actions are normalized per key with the dataset statistics and concatenated; every
frame gets its history window, action chunk and masks (and optionally a goal), and the final
step (whose action is padding) is dropped. Images stay encoded. ``flatten_dataset`` turns the
episodes into a dataset of frames.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from openx_train.data import ops
from openx_train.data.config import Structure
from openx_train.data.errors import ConfigError
from openx_train.data.structure import (
    CameraSource,
    ResolvedStructure,
    infer_structure,
    pad_mask_dict,
    resolve_structure,
    select_observation,
    select_structure,
)
from oxe_envlogger.format.specs import Leaf, is_image_shape

__all__ = ["CameraSource", "ResolvedStructure", "flatten_dataset", "infer_structure",
           "leaves_from_element_spec", "pad_mask_dict", "resolve_structure",
           "select_observation", "select_structure", "standardize_dataset"]


def leaves_from_element_spec(steps_spec: Mapping[str, Any]) -> dict[str, Leaf]:
    """Step leaves recovered from a loaded dataset's ``element_spec["steps"]`` (for
    :func:`standardize_dataset` on a dataset without its directory)."""
    out = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else k)
            return
        shape = tuple(node.shape[1:])
        if node.dtype == tf.string:
            # Encoded images and text look alike here; the structure says which is which.
            out[prefix] = Leaf("text", (), np.dtype(object))
        elif is_image_shape(shape, node.dtype.as_numpy_dtype):
            out[prefix] = Leaf("tensor", shape, np.dtype(np.uint8), "bytes")
        else:
            out[prefix] = Leaf("tensor", shape, np.dtype(node.dtype.as_numpy_dtype))

    walk(steps_spec, "")
    return out


def standardize_dataset(
    dataset: tf.data.Dataset,
    *,
    structure: Structure,
    statistics: Any = None,
    leaves: Mapping[str, Leaf] | None = None,
    n_obs: int = 1,
    n_action: int = 1,
    goal_relabeling: bool = False,
    drop_final_step: bool = True,
    seed: int = 0,
) -> tf.data.Dataset:
    """Episodes (from :func:`~openx_train.data.load_dataset`) to standardized episodes.

    The parts of an episode split at the logger's ``max_episode_bytes`` are separate episodes
    here (windows and chunks are padded at a split point as at an episode's ends; joining them
    would hold the oversized episode in memory); ``make_dataloader`` joins them.

    Each output element holds the episode's frames (``T - 1`` with ``drop_final_step``)::

        {"observation": {"state": [F, n_obs, D], <camera>: [F, n_obs] encoded,
                         "pad_mask": bool [F, n_obs], "pad_mask_dict": {key: bool [F, n_obs]}},
         "action": [F, n_action, A], "action_pad_mask": bool [F, n_action],
         "language_instruction": [F] (when the structure has language),
         "goal": {"state": [F, D], <camera>: [F]}, "goal_step_index": [F] (with goals),
         "step_index": int32 [F], "episode_index": int64 [F]}

    Args:
      dataset: episodes as ``load_dataset`` gives them (with the structure's keys loaded).
      structure: the keys to use and their normalization.
      statistics: the dataset's :class:`~openx_train.data.DatasetStatistics`; needed unless
        every key's normalization is ``none``.
      leaves: the dataset's step leaves (``loading.step_leaves(path)``), for precise checks;
        default: derived from the dataset's element spec.
      n_obs: history window length.
      n_action: action chunk length.
      goal_relabeling: add a goal drawn uniformly from each frame's future (new each epoch).
      drop_final_step: drop the final step (RLDS: its action is padding).
      seed: seed of the goal draws.

    Raises:
      MissingKeyError, ConfigError: when the structure does not fit the dataset.
    """
    if n_obs < 1 or n_action < 1:
        raise ConfigError(f"standardize_dataset: n_obs and n_action expected >= 1, given "
                          f"{n_obs}, {n_action}")
    if leaves is None:
        leaves = leaves_from_element_spec(dataset.element_spec["steps"])
        # Encoded cameras look like text in an element spec: trust the structure for them.
        leaves = dict(leaves)
        for cam in structure.images.values():
            if cam.key is not None and cam.key in leaves and leaves[cam.key].kind == "text":
                leaves[cam.key] = Leaf("image", (0, 0, 3), np.dtype(np.uint8))
    resolved = resolve_structure(structure, leaves)
    if statistics is None and structure.normalized_keys():
        raise ConfigError(f"standardize_dataset: keys {structure.normalized_keys()} are "
                          "normalized, which needs statistics (compute_dataset_statistics)")

    def standardize(episode: Mapping[str, Any], rng_seed: tf.Tensor) -> dict[str, Any]:
        table = select_structure(episode["steps"], resolved, statistics=statistics, xp=ops.TF)
        length = tf.cast(episode["episode_length"], tf.int64)
        frames = tf.maximum(length - 1, 0) if drop_final_step else length
        rows = tf.range(frames, dtype=tf.int64)
        zeros = tf.zeros_like(rows)
        uniform = None
        if goal_relabeling:
            uniform = tf.random.stateless_uniform(tf.shape(rows), tf.cast(rng_seed, tf.int64))
        out = ops.gather_frames(table, rows, zeros, zeros + length, n_obs=n_obs,
                                n_action=n_action, goal_uniform=uniform,
                                final_action_is_padding=drop_final_step)
        out["observation"]["pad_mask_dict"] = pad_mask_dict(out["observation"]["pad_mask"],
                                                             resolved, xp=ops.TF)
        out["episode_index"] = tf.fill(tf.shape(rows), episode["episode_index"])
        return out

    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
    return tf.data.Dataset.zip(dataset, seeds).map(standardize,
                                                   num_parallel_calls=tf.data.AUTOTUNE)


def flatten_dataset(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Episodes to frames.

    Standardized episodes (every component ``[F, ...]``) are split along the first axis. Loaded
    episodes (``{"steps": ..., <episode fields>}``) give one element per step, with the episode
    fields repeated on each.
    """
    spec = dataset.element_spec
    if isinstance(spec, Mapping) and "steps" in spec:
        def steps_with_episode(episode):
            steps = dict(episode["steps"])
            n = tf.shape(steps["step_index"])[0]
            for key, value in episode.items():
                if key != "steps":
                    steps[key] = tf.nest.map_structure(
                        lambda v: tf.repeat(v[None], n, axis=0), value)
            return steps

        dataset = dataset.map(steps_with_episode, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.unbatch()
