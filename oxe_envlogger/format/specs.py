"""Feature <-> value rules, in one place (the gymnasium side is :mod:`oxe_envlogger.spaces`).

A *spec* is a small tree that says how every logged value is stored:

* :class:`Leaf` is one stored array: a ``tensor`` (any numeric dtype and shape), an ``image``
  (uint8 HxWxC, stored encoded as PNG or JPEG) or ``text`` (a UTF-8 string).
* :class:`Group` nests leaves: a ``dict`` (gymnasium ``Dict``), a ``tuple`` (gymnasium ``Tuple``,
  stored as a dict with keys ``"0"``, ``"1"``, ...) or ``steps`` (the RLDS steps sequence).

Specs come from gymnasium spaces and samples (:mod:`oxe_envlogger.spaces`), from tfds FeatureConnectors or a ``features.json`` (:func:`spec_from_features_json`), and turn into
the ``features.json`` that ``tfds.builder_from_directory`` reads (:func:`spec_to_features_json`).

Values are checked against their leaf by :func:`compile_checker`; a value is accepted only when it
converts to the leaf's dtype without changing any element, otherwise :class:`SpecError` names the
key path, the expected and the given shape and dtype. Nothing here imports TensorFlow or
gymnasium.

float64 is the one deliberate exception, chosen per logger (:data:`FLOAT64_STORAGE`): by
default a float64 leaf is stored as tfds stores a float64 ``Tensor`` (a float list, so rounded to
float32), which every RLDS loader reads as numbers, also one that skips decoding
(``tfds.decode.SkipDecoding()``, as the Open X-Embodiment and Octo pipelines do); ``"exact"``
stores raw float64 bytes, which such a loader receives as ``tf.string``.
"""

from __future__ import annotations

import dataclasses
import string
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import numpy as np

from oxe_envlogger.errors import (
    NonFiniteError,
    OutOfBoundsError,
    SpecError,
    UnknownKeyError,
    UnsupportedSpaceError,
)
from oxe_envlogger.format.codecs import ImageCodec

_TFDS = "tensorflow_datasets.core.features."
_CLS_DICT = _TFDS + "features_dict.FeaturesDict"
_CLS_DATASET = _TFDS + "dataset_feature.Dataset"
_CLS_SEQUENCE = _TFDS + "sequence_feature.Sequence"
_CLS_TENSOR = _TFDS + "tensor_feature.Tensor"
_CLS_SCALAR = _TFDS + "scalar.Scalar"
_CLS_IMAGE = _TFDS + "image_feature.Image"
_CLS_TEXT = _TFDS + "text_feature.Text"
_CLS_CLASS_LABEL = _TFDS + "class_label_feature.ClassLabel"

TEXT_DTYPE = np.dtype(object)
_FLOAT32 = np.dtype(np.float32)
_FLOAT64 = np.dtype(np.float64)
# How float64 values are stored: "float32", a float list (tfds' own storage of a float64 Tensor:
# read as numbers by every loader, rounded to float32), or "exact", raw float64 bytes (tfds
# encoding "bytes": exact, but a string to a loader that skips tfds' decoding).
FLOAT64_STORAGE = ("float32", "exact")
_F32 = struct.Struct("<f")
TEXT_MAX_LENGTH = 1 << 16
TEXT_CHARSET = string.printable

# ---------------------------------------------------------------------------------------------
# The spec tree


@dataclasses.dataclass(frozen=True, eq=False)
class Bounds:
    """The closed range a declared space allows, per element: ``low <= value <= high`` (arrays
    of the leaf's shape). Kept in the spec only, not in ``features.json`` (a tfds feature has no
    bounds): values outside are counted by the writer, or refused with ``strict_bounds``."""

    low: np.ndarray
    high: np.ndarray

    def count_outside(self, values: np.ndarray) -> int:
        """How many elements of ``values`` (any leading axes) lie outside; NaN is not counted
        (it is counted as non-finite)."""
        return int(np.count_nonzero((values < self.low) | (values > self.high)))

    def check(self, value: Any, path: str) -> None:
        """Raises :class:`OutOfBoundsError` for the first element outside, naming its index."""
        arr = np.asarray(value)
        outside = (arr < self.low) | (arr > self.high)
        if not outside.any():
            return
        index = tuple(np.argwhere(outside)[0].tolist())
        low, high = np.broadcast_to(self.low, arr.shape), np.broadcast_to(self.high, arr.shape)
        where = f" at index {list(index)}" if index else ""
        raise OutOfBoundsError(path, f"a value in [{low[index]}, {high[index]}]",
                               f"{arr[index]!r}{where}", "the declared space's bounds; "
                               "strict_bounds=True refuses values outside them")


def bounds(low: Any, high: Any, shape: tuple[int, ...], dtype: Any) -> Bounds | None:
    """The bounds of a space of ``shape`` and ``dtype``; None where they allow every value of
    the dtype (bool, unbounded floats, a full integer range), so that nothing is counted."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iuf":
        return None
    low = np.broadcast_to(np.asarray(low), shape)
    high = np.broadcast_to(np.asarray(high), shape)
    if dtype.kind == "f":
        if np.isneginf(low).all() and np.isposinf(high).all():
            return None
    else:
        info = np.iinfo(dtype)
        if (low <= info.min).all() and (high >= info.max).all():
            return None
    return Bounds(low.copy(), high.copy())


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One stored array (see the module docstring).

    Attributes:
      kind: ``"tensor"``, ``"image"`` or ``"text"``.
      shape: the shape of one value (one step's value inside ``steps``).
      dtype: numpy dtype of the value; ``object`` for text.
      encoding: tfds tensor encoding: ``"none"`` (float/int64 lists; a float64 leaf's values
        are then rounded to float32) or ``"bytes"`` (raw bytes: float64 stored exactly, raw
        images).
      codec: for images, how they are compressed.
      doc: a description kept in ``features.json``.
      bounds: what the declared space allows (:class:`Bounds`), for tensors; not part of the
        feature (two leaves that differ only in bounds are equal).
    """

    kind: Literal["tensor", "image", "text"]
    shape: tuple[int, ...] = ()
    dtype: np.dtype = _FLOAT32
    encoding: Literal["none", "bytes", "zlib"] = "none"
    codec: ImageCodec | None = None
    doc: str = ""
    bounds: Bounds | None = dataclasses.field(default=None, compare=False)

    @property
    def is_float(self) -> bool:
        return self.kind == "tensor" and self.dtype.kind == "f"

    @property
    def rounds_to_float32(self) -> bool:
        """A float64 tensor stored as a float list: its values are rounded to float32."""
        return self.kind == "tensor" and self.dtype == _FLOAT64 and self.encoding == "none"

    def describe(self) -> str:
        if self.kind == "text":
            return "a str"
        what = f"shape {self.shape} {self.dtype}"
        return f"{what} image ({self.codec})" if self.kind == "image" else what


@dataclasses.dataclass(frozen=True)
class Group:
    """A nest of specs: ``dict``, ``tuple`` (stored with keys "0", "1", ...) or ``steps``."""

    fields: Mapping[str, Spec]
    kind: Literal["dict", "tuple", "steps"] = "dict"
    doc: str = ""


Spec = Leaf | Group


def check_float64_storage(float64: str) -> str:
    """Returns ``float64`` if it is one of :data:`FLOAT64_STORAGE`.

    Raises:
      ValueError: naming the valid choices.
    """
    if float64 not in FLOAT64_STORAGE:
        raise ValueError(f"float64: expected one of {list(FLOAT64_STORAGE)}, given {float64!r}")
    return float64


def tensor(shape: tuple[int, ...] = (), dtype: Any = np.float32, doc: str = "", *,
           float64: str = "float32") -> Leaf:
    """A numeric tensor leaf.

    Args:
      shape, dtype, doc: the leaf's.
      float64: how a float64 leaf is stored (:data:`FLOAT64_STORAGE`): ``"float32"`` as a float
        list (rounded to float32), ``"exact"`` as raw bytes. Wider floats are always bytes.
    """
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":
        raise UnsupportedSpaceError(f"tensor dtype must be bool, int, uint or float; given {dtype}")
    encoding = "none"
    if dtype.kind == "f" and dtype.itemsize > 4:  # (wider than float64: no float list form)
        exact = dtype != _FLOAT64 or check_float64_storage(float64) == "exact"
        encoding = "bytes" if exact else "none"
    return Leaf("tensor", tuple(int(d) for d in shape), dtype, encoding, None, doc)


def image(shape: tuple[int, ...], codec: str | ImageCodec = "png", doc: str = "") -> Leaf:
    """A uint8 HxWxC image leaf (C in 1, 3, 4); ``codec="raw"`` gives a bytes-encoded tensor."""
    codec = ImageCodec.parse(codec)
    shape = tuple(int(d) for d in shape)
    if not is_image_shape(shape, np.uint8):
        raise UnsupportedSpaceError(f"image shape must be (H, W, 1|3|4), given {shape}")
    if codec.format == "raw":
        return Leaf("tensor", shape, np.dtype(np.uint8), "bytes", None, doc)
    if codec.format == "jpeg" and shape[-1] == 4:
        raise UnsupportedSpaceError("JPEG cannot store 4-channel images; use png or raw")
    return Leaf("image", shape, np.dtype(np.uint8), "none", codec, doc)


def text(doc: str = "") -> Leaf:
    """A UTF-8 string leaf."""
    return Leaf("text", (), TEXT_DTYPE, "none", None, doc)


def is_image_shape(shape: tuple[int, ...], dtype: Any) -> bool:
    """Whether an array of this shape and dtype is an image: uint8 HxWx{1,3,4}, the one rule
    the logger, the readers, the tools and the trainer share."""
    return np.dtype(dtype) == np.uint8 and len(shape) == 3 and shape[-1] in (1, 3, 4)


def iter_leaf_keys(spec: Spec, prefix: tuple[str, ...] = ()
                   ) -> Iterator[tuple[tuple[str, ...], Leaf]]:
    """Yields ``(keys, leaf)`` in storage order: the dict keys from ``spec`` down to each leaf.

    The stored feature name is the keys joined with ``/`` (as tfds joins them). Our loggers
    refuse keys with ``/`` (:func:`check_keys`), but a dataset written by another tool may
    hold one (tfds allows it), so readers nest values by these keys, never by splitting names.
    """
    if isinstance(spec, Leaf):
        yield prefix, spec
        return
    for key, sub in spec.fields.items():
        yield from iter_leaf_keys(sub, (*prefix, key))


def iter_leaves(spec: Spec, prefix: str = "") -> Iterator[tuple[str, Leaf]]:
    """Yields ``(path, leaf)`` in storage order; paths join keys with ``/``."""
    for keys, leaf in iter_leaf_keys(spec):
        yield "/".join((prefix, *keys) if prefix else keys), leaf


def check_keys(spec: Spec, path: str = "") -> None:
    """Refuses dict keys that ``features.json`` cannot hold unambiguously.

    tfds stores every leaf under its key path joined with ``/``, so a key holding ``/`` reads
    back differently from how it was logged by any reader that nests names, and collides with a
    nested key of the same name (``{"cam/left": ..., "cam": {"left": ...}}`` makes a dataset
    tfds cannot open). Empty keys and keys that are not ``str`` are refused too.

    Raises:
      SpecError: naming the key's full path.
    """
    if isinstance(spec, Leaf):
        return
    for key, sub in spec.fields.items():
        where = join(path, str(key))
        if not isinstance(key, str) or not key or "/" in key:
            hint = ("tfds stores values under their key path joined with '/', so this key "
                    "would read back as nested keys or collide with them")
            if isinstance(key, str) and key:
                hint += f"; rename it, e.g. {key.replace('/', '_')!r}"
            raise SpecError(where, "a dict key that is a non-empty str without '/'", repr(key),
                            hint)
        check_keys(sub, where)


def step_key(key: str) -> str:
    """A key path given from the episode's root (``steps/observation/x``) as it is within a step
    (``observation/x``); a path already within a step is returned as it is."""
    return key[len("steps/"):] if key.startswith("steps/") else key


def join(prefix: str, key: str) -> str:
    return f"{prefix}/{key}" if prefix else key


# ---------------------------------------------------------------------------------------------
# bounds


def with_bounds(leaf: Leaf, low: Any, high: Any) -> Leaf:
    """``leaf`` with the :func:`bounds` ``[low, high]`` (unchanged where they allow every
    value)."""
    b = bounds(low, high, leaf.shape, leaf.dtype)
    return dataclasses.replace(leaf, bounds=b) if b is not None else leaf



# ---------------------------------------------------------------------------------------------
# specs <-> features.json (the tfds FeatureConnector proto, as JSON)


def _shape_json(shape: tuple[int, ...]) -> dict:
    return {"dimensions": [str(d) for d in shape]} if shape else {}


def spec_to_features_json(spec: Spec) -> dict:
    """The proto-JSON of the tfds feature for ``spec``, as tfds writes ``features.json``."""
    if isinstance(spec, Group):
        inner = {"features": {k: spec_to_features_json(v) for k, v in spec.fields.items()}}
        if spec.kind == "steps":
            out = {"pythonClassName": _CLS_DATASET,
                   "sequence": {"feature": {"pythonClassName": _CLS_DICT, "featuresDict": inner},
                                "length": "-1"}}
        else:
            out = {"pythonClassName": _CLS_DICT, "featuresDict": inner}
    elif spec.kind == "image":
        out = {"pythonClassName": _CLS_IMAGE,
               "image": {"shape": _shape_json(spec.shape), "dtype": "uint8",
                         "encodingFormat": spec.codec.format}}
    elif spec.kind == "text":
        out = {"pythonClassName": _CLS_TEXT, "text": {}}
    else:
        out = {"pythonClassName": _CLS_TENSOR,
               "tensor": {"shape": _shape_json(spec.shape), "dtype": spec.dtype.name,
                          "encoding": spec.encoding}}
    if spec.doc:
        out["description"] = spec.doc
    return out


def spec_from_features_json(data: Mapping[str, Any], *, path: str = "") -> Spec:
    """Reads a tfds feature proto-JSON (``features.json``, or a FeatureConnector's proto).

    Supports the features RLDS datasets use: FeaturesDict, Dataset, Sequence, Tensor, Scalar,
    Image, Text and ClassLabel (read as an int64 scalar).

    Raises:
      UnsupportedSpaceError: for other feature classes, naming the key path.
    """
    if "type" in data and "content" in data:  # FeatureConnector.to_json() form
        data = {"pythonClassName": data["type"], "featuresDict": data["content"]}
    cls = data.get("pythonClassName", "")
    doc = data.get("description", "")
    short = cls.rsplit(".", 1)[-1]
    if short == "FeaturesDict":
        fields = data["featuresDict"]["features"]
        return Group({k: spec_from_features_json(v, path=join(path, k)) for k, v in fields.items()},
                     "dict", doc)
    if short in ("Dataset", "Sequence"):
        seq = data["sequence"]
        if int(seq.get("length", "-1")) not in (-1, 0) and short == "Dataset":
            raise UnsupportedSpaceError(f"{path}: fixed-length Dataset features are not supported")
        inner = spec_from_features_json(seq["feature"], path=path)
        if short == "Sequence":
            raise UnsupportedSpaceError(f"{path}: tfds Sequence features are not supported")
        if not isinstance(inner, Group):
            inner = Group({"": inner})
        return Group(inner.fields, "steps", doc)
    if short in ("Tensor", "Scalar"):
        t = data["tensor"]
        shape = tuple(int(d) for d in t.get("shape", {}).get("dimensions", []))
        if any(d < 0 for d in shape):
            raise UnsupportedSpaceError(f"{path}: tensors of unknown shape {shape} are not supported")
        dtype = t.get("dtype", "float32")
        if dtype == "string":
            return Leaf("text", (), TEXT_DTYPE, "none", None, doc)
        return Leaf("tensor", shape, np.dtype(dtype), t.get("encoding", "none"), None, doc)
    if short == "Image":
        im = data["image"]
        shape = tuple(int(d) for d in im.get("shape", {}).get("dimensions", []))
        return Leaf("image", shape, np.dtype(im.get("dtype", "uint8")), "none",
                    ImageCodec(im.get("encodingFormat") or "png"), doc)
    if short == "Text":
        return Leaf("text", (), TEXT_DTYPE, "none", None, doc)
    if short == "ClassLabel":
        return Leaf("tensor", (), np.dtype(np.int64), "none", None, doc)
    raise UnsupportedSpaceError(f"{path or '<root>'}: tfds feature {cls or data!r} is not supported")


def strip_docs(data: Any) -> Any:
    """``features.json`` content without descriptions, for comparing two feature sets."""
    if isinstance(data, Mapping):
        return {k: strip_docs(v) for k, v in data.items() if k != "description"}
    return data


def diff_features(a: Mapping, b: Mapping, path: str = "") -> list[str]:
    """Human-readable differences between two features.json dicts (descriptions ignored)."""
    a_spec, b_spec = spec_from_features_json(a), spec_from_features_json(b)
    a_leaves, b_leaves = dict(iter_leaves(a_spec)), dict(iter_leaves(b_spec))
    out = []
    for k in a_leaves.keys() - b_leaves.keys():
        out.append(f"{k}: only in the first ({a_leaves[k].describe()})")
    for k in b_leaves.keys() - a_leaves.keys():
        out.append(f"{k}: only in the second ({b_leaves[k].describe()})")
    for k in sorted(a_leaves.keys() & b_leaves.keys()):
        la, lb = a_leaves[k], b_leaves[k]
        da, db = dataclasses.replace(la, doc=""), dataclasses.replace(lb, doc="")
        if da == db:
            continue
        fa = f"{la.describe()} encoding={la.encoding}"
        fb = f"{lb.describe()} encoding={lb.encoding}"
        sa, sb = float64_storage_of(la), float64_storage_of(lb)
        if sa and sb and da == dataclasses.replace(db, encoding=la.encoding):
            fa = f"{fa}, {_STORED[sa]}"
            fb = (f"{fb}, {_STORED[sb]}; the loggers' float64='float32'|'exact' chooses, "
                  "tools/reshard_rlds.py --float64 converts a dataset")
        out.append(f"{k}: {fa} vs {fb}")
    return sorted(out)


_STORED = {"float32": "float64 stored as float32", "exact": "float64 stored exactly"}


def float64_storage_of(leaf: Leaf) -> str | None:
    """The :data:`FLOAT64_STORAGE` of a float64 tensor leaf; None for other leaves (and for a
    float64 tensor compressed with zlib, which no conversion here touches)."""
    if leaf.kind != "tensor" or leaf.dtype != _FLOAT64:
        return None
    return {"none": "float32", "bytes": "exact"}.get(leaf.encoding)


def adopt_float64(spec: Spec, existing: Spec | None) -> Spec:
    """``spec`` with each float64 tensor stored as ``existing`` (the same key path of a dataset
    being appended to) stores it, so that a logger whose float64 storage is not given appends
    to a dataset written with either storage."""
    if existing is None:
        return spec
    if isinstance(spec, Leaf):
        if (isinstance(existing, Leaf) and spec.shape == existing.shape
                and float64_storage_of(spec) and float64_storage_of(existing)):
            return dataclasses.replace(spec, encoding=existing.encoding)
        return spec
    if not isinstance(existing, Group):
        return spec
    return dataclasses.replace(spec, fields={k: adopt_float64(v, existing.fields.get(k))
                                             for k, v in spec.fields.items()})


def float64_features(features: Mapping[str, Any], float64: str
                     ) -> tuple[dict, tuple[tuple[str, int], ...]]:
    """A ``features.json`` (proto-JSON) with every float64 tensor of a fixed shape stored as
    ``float64`` says (:data:`FLOAT64_STORAGE`), and the ``(key path, elements per value)`` of
    those tensors. zlib-compressed tensors, tensors of unknown shape and those inside a tfds
    ``Sequence`` (several values per step) are left as they are."""
    encoding = {"float32": "none", "exact": "bytes"}[check_float64_storage(float64)]
    found: list[tuple[str, int]] = []

    def walk(node: Mapping[str, Any], path: str) -> dict:
        out = dict(node)
        short = str(node.get("pythonClassName", "")).rsplit(".", 1)[-1]
        if "featuresDict" in node:
            inner = dict(node["featuresDict"])
            inner["features"] = {k: walk(v, join(path, k))
                                 for k, v in inner.get("features", {}).items()}
            out["featuresDict"] = inner
        elif "sequence" in node and short == "Dataset":  # one value per step
            out["sequence"] = {**node["sequence"], "feature": walk(node["sequence"]["feature"],
                                                                    path)}
        elif isinstance(node.get("tensor"), Mapping):
            t = node["tensor"]
            dims = [int(d) for d in t.get("shape", {}).get("dimensions", [])]
            if (t.get("dtype") == "float64" and t.get("encoding", "none") in ("none", "bytes")
                    and all(d >= 0 for d in dims)):
                out["tensor"] = {**t, "encoding": encoding}
                if short == "Scalar" and encoding != "none":  # tfds' Scalar takes no encoding
                    out["pythonClassName"] = _CLS_TENSOR
                found.append((path, int(np.prod(dims, dtype=np.int64))))
        return out

    return walk(features, ""), tuple(found)


# ---------------------------------------------------------------------------------------------
# Value checks

Checker = Callable[[Any, list], None]


def compile_checker(spec: Spec, path: str = "", *, strict_finite: bool = False,
                    strict_bounds: bool = False) -> Checker:
    """Compiles ``spec`` into ``check(value, out)``, which appends one validated, independent
    copy per leaf to ``out`` (in :func:`iter_leaves` order) or raises :class:`SpecError`.

    Text values come out as ``bytes``; tensors and images as numpy arrays (scalars may come out
    as Python ``float``/``int``/``bool`` of the right kind, which stack exactly). With
    ``strict_bounds``, a value outside its leaf's :class:`Bounds` raises
    :class:`OutOfBoundsError`."""
    if isinstance(spec, Leaf):
        leaf_check = leaf_checker(spec, path, strict_finite=strict_finite,
                                  strict_bounds=strict_bounds)

        def check_leaf(value, out, _f=leaf_check):
            out.append(_f(value))

        return check_leaf
    subs = [(k, compile_checker(v, join(path, k), strict_finite=strict_finite,
                                strict_bounds=strict_bounds))
            for k, v in spec.fields.items()]
    if spec.kind == "tuple":
        n = len(subs)

        def check_tuple(value, out):
            if not isinstance(value, (tuple, list)) or len(value) != n:
                raise SpecError(path, f"a tuple of {n} values", _describe_value(value))
            for (_, sub), v in zip(subs, value):
                sub(v, out)

        return check_tuple
    keys = frozenset(k for k, _ in subs)

    def check_dict(value, out):
        if not isinstance(value, Mapping):
            raise SpecError(path, f"a dict with keys {sorted(keys)}", _describe_value(value))
        if len(value) != len(keys) or not keys.issuperset(value.keys()):
            _raise_key_mismatch(path, keys, value)
        for k, sub in subs:
            sub(value[k], out)

    return check_dict


def _raise_key_mismatch(path: str, keys: frozenset, value: Mapping) -> None:
    given = set(value.keys())
    extra = sorted(map(str, given - keys))
    missing = sorted(keys - given)
    parts = []
    if extra:
        parts.append(f"unknown keys {[join(path, k) for k in extra]}")
    if missing:
        parts.append(f"missing keys {[join(path, k) for k in missing]}")
    raise UnknownKeyError(path, f"keys {sorted(keys)}", f"keys {sorted(map(str, given))}",
                          "; ".join(parts))


def _describe_value(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"shape {value.shape} {value.dtype}"
    if isinstance(value, np.generic):
        return f"numpy scalar {value.dtype}"
    if isinstance(value, (str, bytes)):
        return f"{type(value).__name__} {value[:40]!r}"
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(map(str, value))}"
    return f"{type(value).__name__} {value!r}"[:120]


def leaf_checker(leaf: Leaf, path: str, *, strict_finite: bool = False,
                 strict_bounds: bool = False) -> Callable[[Any], Any]:
    """``check(value) -> stored value`` for one leaf (see :func:`compile_checker`): bytes for
    text; for images the validated array itself, which the caller must hand to the encoder
    (which copies it) before returning to user code; an independent array or scalar otherwise."""
    if leaf.kind == "text":

        def check_text(value):
            if value.__class__ is str:
                return value.encode("utf-8")
            if isinstance(value, (bytes, bytearray)):
                return bytes(value)
            if isinstance(value, (str, np.str_)):
                return str(value).encode("utf-8")
            if isinstance(value, np.bytes_):
                return bytes(value)
            if isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind in "US":
                return check_text(value.item())
            raise SpecError(path, "a str", _describe_value(value))

        return check_text

    dtype, shape = leaf.dtype, leaf.shape
    ndarray = np.ndarray
    if leaf.kind == "image":
        # Frames are not copied here: the encoder copies them at once into its own buffer
        # (the one copy the logger makes), in the same call.
        def check_image(value):
            if value.__class__ is ndarray and value.dtype is dtype and value.shape == shape:
                return value
            return convert_exact(value, leaf, path)

        return check_image

    check_finite = strict_finite and dtype.kind == "f"
    in_bounds = leaf.bounds if strict_bounds else None
    # A float64 stored as a float list: the value kept is the one stored (rounded to float32),
    # so that statistics and counts agree with what every reader reads back.
    round32 = leaf.rounds_to_float32
    # Python scalars that convert exactly, without numpy, on the hot path.
    py_fast: tuple[type, ...] = ()
    if shape == ():
        py_fast = (dtype.type,)
        if dtype == np.float64:
            py_fast = (float, np.float64)
        elif dtype == np.bool_:
            py_fast = (bool, np.bool_)

    def check_array(value):
        if value.__class__ is ndarray and value.dtype is dtype and value.shape == shape:
            arr = round_to_float32(value, path) if round32 else value.copy()
        elif py_fast and value.__class__ in py_fast:
            if round32:
                value = _round_scalar_to_float32(value, path)
            if check_finite and not np.isfinite(value):
                raise NonFiniteError(path, "a finite value", repr(value))
            if in_bounds is not None:
                in_bounds.check(value, path)
            return value
        else:
            arr = convert_exact(value, leaf, path)
            if round32:
                arr = round_to_float32(arr, path)
        if check_finite and not np.isfinite(arr).all():
            bad = np.argwhere(~np.isfinite(arr))[0].tolist()
            raise NonFiniteError(path, "finite values", f"{arr[tuple(bad)]} at index {bad}")
        if in_bounds is not None:
            in_bounds.check(arr, path)
        return arr

    return check_array


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _too_large_for_float32(path: str, given: str) -> SpecError:
    return SpecError(path, f"a value float32 can hold (|x| <= {_FLOAT32_MAX:.8g})", given,
                     "float64 values are stored as float32 (the loggers' float64='float32', the "
                     "default) and this one would become infinity; float64='exact' stores "
                     "float64 values exactly")


def round_to_float32(arr: np.ndarray, path: str) -> np.ndarray:
    """A new float64 array of ``arr``'s values rounded to float32, as a float list stores them
    (round to nearest; magnitudes up to half float32's smallest subnormal become zero; NaN and
    infinities stay, to be counted or refused as non-finite).

    Raises:
      SpecError: for a finite value beyond float32's range (it would become infinite).
    """
    try:
        with np.errstate(over="raise"):  # a cast that overflows sets the overflow flag
            return arr.astype(_FLOAT32).astype(_FLOAT64)
    except FloatingPointError:
        with np.errstate(over="ignore"):
            bad = np.isfinite(arr) & np.isinf(arr.astype(_FLOAT32))
        index = tuple(np.argwhere(bad)[0].tolist())
        where = f" at index {list(index)}" if index else ""
        raise _too_large_for_float32(path, f"{arr[index].item()!r}{where}") from None


def _round_scalar_to_float32(value: float, path: str) -> float:
    try:
        return _F32.unpack(_F32.pack(value))[0]
    except OverflowError:  # struct refuses what would round to infinity, as the cast does
        raise _too_large_for_float32(path, repr(value)) from None


def convert_exact(value: Any, leaf: Leaf, path: str) -> np.ndarray:
    """``value`` as an array of ``leaf``'s dtype and shape, if that changes no element."""
    dtype, shape = leaf.dtype, leaf.shape
    expected = leaf.describe()
    if value is None:
        raise SpecError(path, expected, "None", "None is not a value of any feature; log a "
                        "sentinel where there is no value (NaN, -1, ...)")
    if isinstance(value, (str, bytes, Mapping)):
        raise SpecError(path, expected, _describe_value(value))
    try:
        arr = np.asarray(value)
    except Exception as e:
        raise SpecError(path, expected, f"{type(value).__name__} ({e})") from e
    if arr.dtype.kind not in "biuf":
        raise SpecError(path, expected, _describe_value(arr))
    if arr.shape != shape:
        raise SpecError(path, expected, f"shape {arr.shape} {arr.dtype}")
    if arr.dtype == dtype:
        return arr.copy() if arr is value else arr
    with np.errstate(all="ignore"):
        cast = arr.astype(dtype)
        back = cast.astype(arr.dtype)
    same = np.array_equal(back, arr, equal_nan=arr.dtype.kind == "f")
    if not same:
        flat_a, flat_b = arr.reshape(-1), back.reshape(-1)
        if arr.dtype.kind == "f":
            diff = ~((flat_a == flat_b) | (np.isnan(flat_a) & np.isnan(flat_b)))
        else:
            diff = flat_a != flat_b
        i = int(np.argmax(diff))
        raise SpecError(
            path, expected, f"shape {arr.shape} {arr.dtype}",
            f"converting to {dtype} would change element {i}: {flat_a[i]!r} -> {flat_b[i]!r}; "
            "log the declared dtype or declare the dtype you log")
    return cast


def zero_value(leaf: Leaf) -> Any:
    """The value a leaf holds where nothing was given: zeros, False, or an empty string."""
    if leaf.kind == "text":
        return b""
    return np.zeros(leaf.shape, leaf.dtype)
