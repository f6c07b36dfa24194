"""The gymnasium side of specs: spaces to specs, samples to spaces, declarations to specs.

The on-disk rules (features, value checks) live in :mod:`oxe_envlogger.format.specs`, which imports
no gymnasium; this module maps gymnasium spaces (and the other ways a logger's user declares a
feature) onto them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np

from oxe_envlogger.errors import UnsupportedSpaceError
from oxe_envlogger.format.codecs import ImageCodec
from oxe_envlogger.format.specs import (
    TEXT_CHARSET,
    TEXT_MAX_LENGTH,
    Group,
    Leaf,
    Spec,
    check_float64_storage,
    image,
    is_image_shape,
    join,
    spec_from_features_json,
    tensor,
    text,
    with_bounds,
)


def space_to_spec(
    space: gym.Space,
    *,
    path: str = "",
    image_codec: str | ImageCodec = "png",
    image_codecs: Mapping[str, str | ImageCodec] | None = None,
    float64: str = "float32",
) -> Spec:
    """Maps a gymnasium space to a spec.

    Args:
      space: Box (any dtype and shape), Discrete, MultiDiscrete, MultiBinary, Text, Dict, Tuple.
      path: key path of ``space`` in the step, used for codec lookup and error messages.
      image_codec: codec of every uint8 HxWx{1,3,4} Box not named in ``image_codecs``.
      image_codecs: per key path codecs, e.g. ``{"observation/wrist_image": "jpeg:90"}``.
      float64: how float64 Boxes are stored (see :func:`tensor`).

    Returns:
      The spec.

    Raises:
      UnsupportedSpaceError: for a space with no RLDS feature, naming its key path.
    """
    return _space_to_spec(space, path, image_codec, dict(image_codecs or {}),
                          check_float64_storage(float64))


def _space_to_spec(space, path, image_codec, image_codecs, float64) -> Spec:
    spaces = gym.spaces
    if isinstance(space, spaces.Dict):
        return Group({k: _space_to_spec(s, join(path, k), image_codec, image_codecs, float64)
                      for k, s in space.spaces.items()}, "dict")
    if isinstance(space, spaces.Tuple):
        return Group({str(i): _space_to_spec(s, join(path, str(i)), image_codec, image_codecs,
                                             float64)
                      for i, s in enumerate(space.spaces)}, "tuple")
    if isinstance(space, spaces.Box):
        shape, dtype = tuple(space.shape), np.dtype(space.dtype)
        codec = image_codecs.get(path)
        if codec is not None or is_image_shape(shape, dtype):
            if not is_image_shape(shape, dtype):
                raise UnsupportedSpaceError(
                    f"{path}: a codec was given but the space is {space}, not a uint8 (H, W, C) image")
            return image(shape, codec if codec is not None else image_codec)
        return with_bounds(tensor(shape, dtype, float64=float64), space.low, space.high)
    if isinstance(space, spaces.Discrete):
        return with_bounds(tensor((), space.dtype), space.start, space.start + space.n - 1)
    if isinstance(space, spaces.MultiDiscrete):
        return with_bounds(tensor(tuple(space.nvec.shape), space.dtype), space.start,
                           space.start + space.nvec - 1)
    if isinstance(space, spaces.MultiBinary):
        return with_bounds(tensor(tuple(space.shape), space.dtype), 0, 1)
    if isinstance(space, spaces.Text):
        return text()
    raise UnsupportedSpaceError(
        f"{path or '<root>'}: gymnasium space {space!r} has no RLDS feature; supported are Box, "
        "Discrete, MultiDiscrete, MultiBinary, Text, Dict and Tuple")


def get_gym_space(sample: Any, *, _path: str = "") -> gym.Space:
    """Builds a gymnasium space that describes ``sample``.

    Nested dicts become ``Dict``, tuples ``Tuple``, numeric and bool arrays and Python or numpy
    scalars ``Box`` of the same dtype and shape (uint8 HxWx{1,3,4} arrays are images), strings
    ``Text``. ``None`` (no type to infer) and arrays of strings or objects have no space.

    Raises:
      UnsupportedSpaceError: for a value with no space, naming its key path.
    """
    spaces = gym.spaces
    if isinstance(sample, Mapping):
        for k in sample:
            if not isinstance(k, str):
                raise UnsupportedSpaceError(f"{_path or '<root>'}: dict keys must be str, given {k!r}")
        return spaces.Dict({k: get_gym_space(v, _path=join(_path, k)) for k, v in sample.items()})
    if isinstance(sample, tuple):
        return spaces.Tuple([get_gym_space(v, _path=join(_path, str(i)))
                             for i, v in enumerate(sample)])
    if isinstance(sample, (str, bytes, np.str_, np.bytes_)):
        return spaces.Text(max_length=TEXT_MAX_LENGTH, min_length=0, charset=TEXT_CHARSET)
    where = _path or "<root>"
    if sample is None:
        decl = "float"
        for key in reversed(where.split("/")):
            decl = f"{{{key!r}: {decl}}}"
        raise UnsupportedSpaceError(
            f"{where}: None has no feature (no type can be inferred from it); declare the "
            f"type (the observation or action space; for metadata e.g. step_metadata_info="
            f"{decl}) and log a sentinel where there is no value (NaN, -1, \"\"): a metadata "
            "key never set holds zeros or an empty string")
    if isinstance(sample, bool):
        arr = np.asarray(sample, dtype=np.bool_)
    elif isinstance(sample, int):
        arr = np.asarray(sample, dtype=np.int64)
    elif isinstance(sample, float):
        arr = np.asarray(sample, dtype=np.float64)
    else:
        try:
            arr = np.asarray(sample)
        except Exception as e:  # ragged lists and the like
            raise UnsupportedSpaceError(
                f"{where}: cannot make a space from {type(sample).__name__}: {e}") from e
    if arr.dtype.kind not in "biuf":
        hint = ""
        if arr.dtype.kind in "US":
            hint = ("; for strings log a tuple of str (stored as keys '0', '1', ..., always as "
                    "many) or one str (e.g. json.dumps of the list)")
        raise UnsupportedSpaceError(
            f"{where}: cannot make a space from {type(sample).__name__} with dtype "
            f"{arr.dtype}: supported are dicts with str keys, tuples, str, bool, int, float "
            f"and numeric or bool arrays{hint}")
    return _box_for(arr)


def _box_for(arr: np.ndarray) -> gym.spaces.Box:
    dtype = arr.dtype
    if dtype.kind == "b":
        return gym.spaces.Box(0, 1, arr.shape, dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return gym.spaces.Box(info.min, info.max, arr.shape, dtype)
    return gym.spaces.Box(-np.inf, np.inf, arr.shape, dtype)


# ---------------------------------------------------------------------------------------------
# Declarations: spaces, tfds FeatureConnectors, numpy dtypes, python types -> specs


def declaration_to_spec(decl: Any, *, path: str,
                        image_codec: str | ImageCodec = "png",
                        image_codecs: Mapping[str, str | ImageCodec] | None = None,
                        float64: str = "float32") -> Spec:
    """Reads one declared feature: a spec, a gymnasium space, a tfds FeatureConnector, a numpy
    dtype or type (a scalar tensor), ``str`` (text), ``bool``, ``int`` or ``float``, or a dict
    of those. ``float64`` (see :func:`tensor`) applies to spaces, dtypes and ``float``; a spec
    or FeatureConnector keeps the encoding it declares."""
    if isinstance(decl, (Leaf, Group)):
        return decl
    if isinstance(decl, gym.Space):
        return space_to_spec(decl, path=path, image_codec=image_codec, image_codecs=image_codecs,
                             float64=float64)
    if isinstance(decl, Mapping):
        return Group({k: declaration_to_spec(v, path=join(path, k), image_codec=image_codec,
                                             image_codecs=image_codecs, float64=float64)
                      for k, v in decl.items()})
    if decl in (str, bytes):
        return text()
    if decl is bool:
        return tensor((), np.bool_)
    if decl is int:
        return tensor((), np.int64)
    if decl is float:
        return tensor((), np.float64, float64=float64)
    if hasattr(decl, "to_proto") and type(decl).__module__.startswith("tensorflow_datasets"):
        from google.protobuf import json_format

        return spec_from_features_json(json_format.MessageToDict(decl.to_proto()), path=path)
    try:
        return tensor((), np.dtype(decl), float64=float64)
    except (TypeError, UnsupportedSpaceError) as e:
        raise UnsupportedSpaceError(
            f"{path}: cannot read the declaration {decl!r}; give a gymnasium space, a tfds "
            "FeatureConnector, a numpy dtype, str, bool, int, float or a dict of those") from e
