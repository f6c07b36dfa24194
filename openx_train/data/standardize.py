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

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from openx_train.data import ops
from openx_train.data.config import LANGUAGE_KEY, Camera, Normalization, Structure
from openx_train.data.errors import ConfigError, MissingKeyError
from openx_train.data.loading import is_image_leaf, step_leaves
from oxe_envlogger.format import reader
from oxe_envlogger.format.specs import Leaf, is_image_shape


@dataclasses.dataclass(frozen=True)
class CameraSource:
    """A camera of a structure resolved against one dataset."""

    name: str
    key: str | None
    size: tuple[int, int]
    source_shape: tuple[int, ...] | None  # (H, W, C) as logged
    raw: bool  # stored as raw uint8 bytes rather than PNG/JPEG


@dataclasses.dataclass(frozen=True)
class ResolvedStructure:
    """A structure checked against a dataset's keys.

    Attributes:
      structure: the structure.
      state: ``(key, shape)`` of each state key.
      action: ``(key, shape)`` of each action key.
      cameras: one :class:`CameraSource` per camera, in the structure's order.
      language: the language key, or None.
    """

    structure: Structure
    state: tuple[tuple[str, tuple[int, ...]], ...]
    action: tuple[tuple[str, tuple[int, ...]], ...]
    cameras: tuple[CameraSource, ...]
    language: str | None

    @property
    def state_dim(self) -> int:
        return int(sum(int(np.prod(s, dtype=np.int64)) for _, s in self.state))

    @property
    def action_dim(self) -> int:
        return int(sum(int(np.prod(s, dtype=np.int64)) for _, s in self.action))

    def load_keys(self, *, images: bool) -> list[str]:
        """The step keys to load for this structure."""
        keys = [k for k, _ in (*self.state, *self.action)]
        if self.language:
            keys.append(self.language)
        if images:
            keys.extend(c.key for c in self.cameras if c.key is not None)
        return keys


def _numeric(leaves: Mapping[str, Leaf], key: str, role: str) -> tuple[int, ...]:
    if key not in leaves:
        numeric = sorted(k for k, v in leaves.items()
                         if v.kind == "tensor" and not is_image_leaf(v))
        raise MissingKeyError(f"structure {role}: no step key {key!r}; numeric keys of the "
                              f"dataset: {numeric}")
    leaf = leaves[key]
    if leaf.kind != "tensor" or is_image_leaf(leaf) or leaf.dtype.kind not in "biuf":
        raise ConfigError(f"structure {role} {key!r}: expected a numeric tensor, given "
                          f"{leaf.describe()}")
    return leaf.shape


def resolve_structure(structure: Structure, leaves: Mapping[str, Leaf]) -> ResolvedStructure:
    """Checks a structure against a dataset's step leaves (``loading.step_leaves``).

    Raises:
      MissingKeyError: for a key the dataset lacks (listing the keys it has).
      ConfigError: for a key of the wrong kind (e.g. an image as state).
    """
    state = tuple((k, _numeric(leaves, k, "state")) for k in structure.state)
    action = tuple((k, _numeric(leaves, k, "action")) for k in structure.action)
    cameras = []
    for name, cam in structure.images.items():
        if cam.key is None:
            cameras.append(CameraSource(name, None, cam.size, None, False))
            continue
        leaf = leaves.get(cam.key)
        if leaf is None:
            images = sorted(k for k, v in leaves.items() if is_image_leaf(v))
            raise MissingKeyError(f"structure images[{name!r}]: no step key {cam.key!r}; image "
                                  f"keys of the dataset: {images}")
        if not is_image_leaf(leaf):
            raise ConfigError(f"structure images[{name!r}] {cam.key!r}: expected uint8 images "
                              f"(H, W, 1|3|4), given {leaf.describe()}")
        cameras.append(CameraSource(name, cam.key, cam.size, tuple(leaf.shape),
                                    leaf.kind == "tensor"))
    language = structure.language
    if language == "auto":
        leaf = leaves.get(LANGUAGE_KEY)
        language = LANGUAGE_KEY if leaf is not None and leaf.kind == "text" else None
    elif language is not None:
        leaf = leaves.get(language)
        if leaf is None or leaf.kind != "text":
            texts = sorted(k for k, v in leaves.items() if v.kind == "text")
            raise MissingKeyError(f"structure language: expected a text step key, given "
                                  f"{language!r}; text keys of the dataset: {texts}")
    return ResolvedStructure(structure, state, action, tuple(cameras), language)


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


def _flat(x: tf.Tensor) -> tf.Tensor:
    n = tf.shape(x)[0]
    return tf.reshape(x, [n, -1])


def _normalized_concat(steps: Mapping[str, Any], keys, structure: Structure,
                       statistics: Any) -> tf.Tensor:
    parts = []
    for key, _ in keys:
        x = reader.get_path(steps, key)
        mode = structure.normalization_of(key)
        if mode is not Normalization.NONE:
            if statistics is None:
                raise ConfigError(f"normalization {mode.value!r} of {key!r} needs statistics")
            x = ops.normalize(x, statistics[key], mode, key=key)
        parts.append(_flat(tf.cast(x, tf.float32)))
    return tf.concat(parts, axis=-1) if parts else None


def select_observation(steps: Mapping[str, Any], resolved: ResolvedStructure, *,
                       statistics: Any = None) -> dict[str, Any]:
    """The observation part of :func:`select_structure`: ``state`` (the structure's state keys
    normalized, flattened and concatenated, float32 ``[T, D]``, or None) and ``images`` (each
    camera's key as given, ``[T, ...]``; an empty string per step for a camera the dataset
    lacks).

    The loader's step tables and a trained policy's rollout inputs
    (:mod:`openx_train.inference`) both come from this function, so the keys, their order and
    their normalization cannot differ between training and evaluation.

    Args:
      steps: ``[T, ...]`` step columns nested as logged (``{"observation": ...}``; a
        ``"is_first"`` column gives ``T`` when the structure has a missing camera).
      resolved: the structure checked against the dataset.
      statistics: the dataset's statistics (needed for normalized state keys).
    """
    images = {}
    for cam in resolved.cameras:
        if cam.key is None:
            images[cam.name] = tf.fill([tf.shape(steps["is_first"])[0]], "")
        else:
            images[cam.name] = reader.get_path(steps, cam.key)
    return {"state": _normalized_concat(steps, resolved.state, resolved.structure, statistics),
            "images": images}


def select_structure(steps: Mapping[str, Any], resolved: ResolvedStructure, *,
                     statistics: Any = None) -> dict[str, Any]:
    """One episode's steps to a table of ``[T, ...]`` columns: ``state`` and ``action``
    (normalized, concatenated, float32), ``images`` (as loaded), ``language``.

    Missing cameras become empty strings (masked in ``pad_mask_dict``)."""
    s = resolved.structure
    length = tf.shape(steps["is_first"])[0]
    table = select_observation(steps, resolved, statistics=statistics)
    table["action"] = _normalized_concat(steps, resolved.action, s, statistics)
    table["language"] = None
    if resolved.language is not None:
        table["language"] = reader.get_path(steps, resolved.language)
    elif s.language is not None and s.language != "auto":
        table["language"] = tf.fill([length], "")
    return table


def pad_mask_dict(pad_mask: tf.Tensor, resolved: ResolvedStructure) -> dict[str, tf.Tensor]:
    """Per observation key, the pad mask of its window: ``pad_mask`` for the state and each
    camera the dataset has, all False for a camera it lacks."""
    out = {}
    if resolved.state:
        out["state"] = pad_mask
    for cam in resolved.cameras:
        out[cam.name] = pad_mask if cam.key is not None else tf.zeros_like(pad_mask)
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
        table = select_structure(episode["steps"], resolved, statistics=statistics)
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
                                                             resolved)
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


def infer_structure(path: str, *, image_size: int | tuple[int, int] | None = None,
                    **options: Any) -> Structure:
    """A structure that uses everything a dataset logged: every float observation tensor as
    state (in storage order), every observation image as a camera (``observation/image`` is
    ``image``, ``observation/wrist_image`` is ``image_wrist``), every numeric action tensor as
    action.

    Args:
      path: the dataset directory.
      image_size: the cameras' output size; default: as logged.
      **options: other :class:`~openx_train.data.Structure` fields (normalization, ...).

    Raises:
      ConfigError: when the dataset has no numeric action.
    """
    leaves = step_leaves(path)
    state = tuple(k for k, v in leaves.items() if k.split("/")[0] == "observation"
                  and v.kind == "tensor" and v.dtype.kind == "f" and not is_image_leaf(v))
    action = tuple(k for k, v in leaves.items() if k.split("/")[0] == "action"
                   and v.kind == "tensor" and v.dtype.kind in "biuf")
    if not action:
        raise ConfigError(f"{path}: no numeric action key to train on (keys: {sorted(leaves)})")
    images = {}
    for key, leaf in leaves.items():
        if key.split("/")[0] == "observation" and is_image_leaf(leaf):
            base = "_".join(key.split("/")[1:])
            base = base.removesuffix("_image").removeprefix("image_")
            name = "image" if base in ("", "image") else f"image_{base}"
            images[name] = Camera(key, image_size or leaf.shape[:2])
    return Structure(state=state, images=images, action=action, **options)

