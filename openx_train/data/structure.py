"""A :class:`~openx_train.data.config.Structure` resolved against a dataset's keys, and the
selection of an episode's (or an observation's) columns by it: state and action keys
normalized and concatenated, cameras, language.

The selection is written once against an array module (``xp``, see
:mod:`openx_train.data.frames`): numpy for the loader's step tables and the state-only policy,
TensorFlow (``ops.TF``) inside ``standardize_dataset`` and for camera policies. This module
never imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from openx_train.data import frames
from openx_train.data.config import LANGUAGE_KEY, Camera, Normalization, Structure
from openx_train.data.errors import ConfigError, MissingKeyError
from openx_train.data.frames import NUMPY, ArrayModule
from openx_train.data.leaves import is_image_leaf, step_leaves
from oxe_envlogger.format import reader
from oxe_envlogger.format.specs import Leaf


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


def _normalized_concat(steps: Mapping[str, Any], keys, structure: Structure,
                       statistics: Any, xp: ArrayModule) -> Any:
    parts = []
    for key, _ in keys:
        x = reader.get_path(steps, key)
        mode = structure.normalization_of(key)
        if mode is not Normalization.NONE:
            if statistics is None:
                raise ConfigError(f"normalization {mode.value!r} of {key!r} needs statistics")
            x = frames.normalize(x, statistics[key], mode, key=key, xp=xp)
        parts.append(xp.flatten_rows(xp.cast(x, "float32")))
    return xp.concat(parts) if parts else None


def select_observation(steps: Mapping[str, Any], resolved: ResolvedStructure, *,
                       statistics: Any = None, xp: ArrayModule = NUMPY) -> dict[str, Any]:
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
      xp: the array module of ``steps`` (numpy, or ``ops.TF`` for tensors).
    """
    images = {}
    for cam in resolved.cameras:
        if cam.key is None:
            images[cam.name] = xp.empty_strings(xp.length(steps["is_first"]))
        else:
            images[cam.name] = reader.get_path(steps, cam.key)
    return {"state": _normalized_concat(steps, resolved.state, resolved.structure, statistics,
                                        xp),
            "images": images}


def select_structure(steps: Mapping[str, Any], resolved: ResolvedStructure, *,
                     statistics: Any = None, xp: ArrayModule = NUMPY) -> dict[str, Any]:
    """One episode's steps to a table of ``[T, ...]`` columns: ``state`` and ``action``
    (normalized, concatenated, float32), ``images`` (as loaded), ``language``.

    Missing cameras become empty strings (masked in ``pad_mask_dict``)."""
    s = resolved.structure
    table = select_observation(steps, resolved, statistics=statistics, xp=xp)
    table["action"] = _normalized_concat(steps, resolved.action, s, statistics, xp)
    table["language"] = None
    if resolved.language is not None:
        table["language"] = reader.get_path(steps, resolved.language)
    elif s.language is not None and s.language != "auto":
        table["language"] = xp.empty_strings(xp.length(steps["is_first"]))
    return table


def pad_mask_dict(pad_mask: Any, resolved: ResolvedStructure, *, xp: ArrayModule = NUMPY
                  ) -> dict[str, Any]:
    """Per observation key, the pad mask of its window: ``pad_mask`` for the state and each
    camera the dataset has, all False for a camera it lacks."""
    out = {}
    if resolved.state:
        out["state"] = pad_mask
    for cam in resolved.cameras:
        out[cam.name] = pad_mask if cam.key is not None else xp.zeros_like(pad_mask)
    return out


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

