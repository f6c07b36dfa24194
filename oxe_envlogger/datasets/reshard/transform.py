"""Feature transformations: renames, drops and float64 conversions, on ``features.json`` and on raw
Example keys.

Part of :mod:`oxe_envlogger.datasets.reshard` (see there for the stages).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from oxe_envlogger.datasets.reshard.options import PROTECTED, ReshardOptions
from oxe_envlogger.errors import (
    CorruptDatasetError,
)
from oxe_envlogger.format import record
from oxe_envlogger.format.specs import (
    float64_features,
    round_to_float32,
)


def _under(key: str, path: str) -> bool:
    return key == path or key.startswith(path + "/")


@dataclasses.dataclass(frozen=True)
class Transform:
    """Renames and drops of feature paths, the language feature to rewrite, and the float64
    features to convert (``float64_keys``: input key and elements per value, of every float64
    feature when ``float64`` names the storage to convert to)."""

    drop: tuple[str, ...] = ()
    rename: tuple[tuple[str, str], ...] = ()
    language_key: str | None = None
    language_added: bool = False  # the inputs have no language feature: every episode gets one
    float64: str | None = None
    float64_keys: tuple[tuple[str, int], ...] = ()

    def float64_payload(self, payload: bytes | memoryview, key: str, rows: int) -> bytes:
        """The payload of float64 feature ``key`` (``rows`` values) stored the other way: raw
        float64 bytes as a float list (rounded to float32) or a float list as raw bytes
        (widened exactly).

        Raises:
          SpecError: converting to float32, for a finite value beyond its range.
          CorruptDatasetError: for a payload that holds no float64 values of ``rows`` rows.
        """
        kind, values = record.decode_feature(payload)
        exact = self.float64 == "exact"
        per_row = dict(self.float64_keys)[key]
        if kind == "bytes" and not exact:
            if len(values) != rows or any(len(v) != 8 * per_row for v in values):
                raise CorruptDatasetError(
                    f"{key}: expected {rows} float64 byte strings of {8 * per_row} bytes, found "
                    f"{len(values)} of {sorted({len(v) for v in values})} bytes")
            flat = np.frombuffer(b"".join(values), "<f8")
            return record.float_list_payload(round_to_float32(flat, key))
        if kind == "float" and exact:
            if values.size != rows * per_row:
                raise CorruptDatasetError(f"{key}: expected {rows} x {per_row} floats, found "
                                          f"{values.size}")
            return record.fixed_bytes_list_payload(values.astype("<f8").reshape(rows, per_row))
        raise CorruptDatasetError(f"{key}: expected float64 values stored "
                                  f"{'as floats' if exact else 'as bytes'}, found a {kind} list")

    @property
    def changes_features(self) -> bool:
        return bool(self.drop or self.rename)

    def output_key(self, key: str) -> str | None:
        """The output key of an input key (None when dropped)."""
        if any(_under(key, d) for d in self.drop):
            return None
        for old, new in self.rename:
            if _under(key, old):
                return new + key[len(old):]
        return key

    def touches(self, key: str) -> bool:
        """Whether a transformation may change this input key's entry."""
        out = self.output_key(key)
        return out != key or (self.language_key is not None and out == self.language_key)


def _node_children(node: dict) -> dict | None:
    """The ``{name: feature}`` dict of a FeaturesDict or of a Dataset of FeaturesDict."""
    if "featuresDict" in node:
        return node["featuresDict"].setdefault("features", {})
    if "sequence" in node:
        return _node_children(node["sequence"]["feature"])
    return None


def feature_paths(features: dict) -> list[str]:
    """Every feature path (groups and leaves) of a features.json, e.g. ``steps/observation``."""
    out = []

    def walk(node, prefix):
        children = _node_children(node)
        if children is None:
            return
        for k, v in children.items():
            p = f"{prefix}/{k}" if prefix else k
            out.append(p)
            walk(v, p)

    walk(features, "")
    return out


def _pop_feature(features: dict, path: str) -> dict:
    parts = path.split("/")
    node = features
    for p in parts[:-1]:
        node = _node_children(node)[p]
    return _node_children(node).pop(parts[-1])


def _put_feature(features: dict, path: str, feature: dict) -> None:
    parts = path.split("/")
    node = features
    for p in parts[:-1]:
        children = _node_children(node)
        if children is None:
            raise ValueError(f"{path}: {p!r} is not a feature group")
        if p not in children:
            children[p] = {"pythonClassName": "tensorflow_datasets.core.features.features_dict."
                                              "FeaturesDict", "featuresDict": {"features": {}}}
        node = children[p]
    children = _node_children(node)
    if children is None:
        raise ValueError(f"{path}: the parent is not a feature group")
    children[parts[-1]] = feature


def _prune_empty_groups(node: dict) -> None:
    children = _node_children(node)
    if children is None:
        return
    for k in list(children):
        sub = _node_children(children[k])
        if sub is not None:
            _prune_empty_groups(children[k])
            if not _node_children(children[k]) and "featuresDict" in children[k]:
                del children[k]


_TEXT_FEATURE = {"pythonClassName": "tensorflow_datasets.core.features.text_feature.Text",
                 "text": {}, "description": "Language instruction of the episode."}


def make_transform(features: dict, options: ReshardOptions) -> tuple[Transform, dict]:
    """Checks the renames and drops against ``features`` and returns the transform and the
    output features.json.

    Raises:
      ValueError: for an unknown, protected or conflicting path, naming it.
    """
    paths = feature_paths(features)
    known = set(paths)
    out = copy.deepcopy(features)
    drops = tuple(dict.fromkeys(options.drop_features))
    renames = tuple((str(a), str(b)) for a, b in (options.rename_features or {}).items())
    for path in list(drops) + [a for a, _ in renames]:
        if path not in known:
            raise ValueError(f"feature {path!r} does not exist; features: {paths}")
        if any(_under(p, path) for p in PROTECTED) or path in PROTECTED:
            raise ValueError(f"feature {path!r} cannot be renamed or dropped: RLDS readers need "
                             f"{list(PROTECTED[1:])}")
    for a, b in renames:
        if any(_under(a, d) for d in drops):
            raise ValueError(f"feature {a!r} is both renamed and dropped")
        if a.startswith("steps/") != b.startswith("steps/") or b in ("", "steps"):
            raise ValueError(f"rename {a!r} -> {b!r}: a feature stays inside steps/ (one value "
                             "per step) or outside it (one per episode)")
    for path in drops:
        _pop_feature(out, path)
    moved = [(a, b, _pop_feature(out, a)) for a, b in renames]
    remaining = set(feature_paths(out))
    for a, b, feature in moved:
        if b in remaining:
            raise ValueError(f"rename {a!r} -> {b!r}: {b!r} exists already")
        _put_feature(out, b, feature)
        remaining = set(feature_paths(out))
    _prune_empty_groups(out)
    float64_keys: tuple[tuple[str, int], ...] = ()
    if options.float64 is not None:
        out = float64_features(out, options.float64)[0]
        float64_keys = float64_features(features, options.float64)[1]  # the input keys
    language_key, added = None, False
    if options.relabel_language is not None or options.language_map:
        language_key = options.language_key
        if language_key in ("steps", "") or language_key in PROTECTED:
            raise ValueError(f"language_key {language_key!r} is not a text feature path")
        if language_key not in set(feature_paths(out)):
            _put_feature(out, language_key, copy.deepcopy(_TEXT_FEATURE))
            added = True
        else:
            node = _node_at(out, language_key)
            cls = node.get("pythonClassName", "")
            dtype = node.get("tensor", {}).get("dtype")
            if not (cls.endswith("text_feature.Text") or dtype == "string"):
                raise ValueError(f"language_key {language_key!r} is a {cls.rsplit('.', 1)[-1]}, "
                                 "not a Text feature")
    return Transform(drops, renames, language_key, added, options.float64, float64_keys), out


def _node_at(features: dict, path: str) -> dict:
    node = features
    for p in path.split("/"):
        node = _node_children(node)[p]
    return node


