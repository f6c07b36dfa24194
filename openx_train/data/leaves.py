"""What a dataset directory holds, from its ``features.json``: the episode spec, the step
leaves, which leaves are images, and key selection. No TensorFlow."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from openx_train.data.errors import DatasetFormatError, MissingKeyError
from oxe_envlogger.errors import OXEEnvLoggerError
from oxe_envlogger.format import reader
from oxe_envlogger.format.specs import Group, Leaf, is_image_shape

PathLike = str | os.PathLike


def read_spec(path: PathLike) -> Group:
    """The episode spec (``features.json``) of a dataset directory.

    Raises:
      DatasetFormatError: when it is missing or uses features the pipeline cannot read.
    """
    try:
        return reader.read_spec(path)
    except FileNotFoundError as e:
        raise DatasetFormatError(str(e)) from None
    except OXEEnvLoggerError as e:
        raise DatasetFormatError(f"{os.fspath(path)}: {e}") from None


def step_leaves(path: PathLike) -> dict[str, Leaf]:
    """``{step key: leaf}`` of a dataset (keys relative to a step, e.g. ``"observation/image"``)."""
    return dict(reader.step_leaves(read_spec(path)))


def is_image_leaf(leaf: Leaf) -> bool:
    """Encoded (PNG/JPEG) images, and raw uint8 HxWxC images stored as bytes."""
    return leaf.kind == "image" or (
        leaf.kind == "tensor" and leaf.encoding == "bytes" and is_image_shape(leaf.shape, leaf.dtype))


def select_keys(leaves: Mapping[str, Leaf], keys: Sequence[str] | None, *, what: str) -> list[str]:
    """The leaf paths named by ``keys`` (exact paths or prefixes such as ``"observation"``).

    Raises:
      MissingKeyError: naming a key that matches nothing, and the keys there are.
    """
    if keys is None:
        return list(leaves)
    out = []
    for key in keys:
        key = key.strip("/")
        found = [p for p in leaves if p == key or p.startswith(key + "/")]
        if not found:
            raise MissingKeyError(f"{what}: no step key {key!r}; the dataset has {sorted(leaves)}")
        out.extend(p for p in found if p not in out)
    return out
