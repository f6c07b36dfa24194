"""The reference of a Re-Mix run: a BC run trained on the same data, normalized the same way,
with the same head. A Re-Mix config that differs from its reference's in datasets, structure
(the keys read and their normalization), normalization statistics, model inputs or head is
refused with an error listing every difference, since the excess loss of a proxy over a
reference that saw other data, or other targets, measures nothing.

The comparison is between two run descriptions in the form of ``run.json`` (see
:mod:`openx_train.run`): the reference's, and the one the Re-Mix run would write.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from openx_train.data.errors import ConfigError

#: What must agree, as ``run.json`` fields: each dataset's name, path and structure (which
#: holds the normalization of every key), whether statistics are pooled across the mixture,
#: the model's inputs (so the reference reads the proxy's batches) and the head.
_DATASET_FIELDS = ("name", "path", "structure")
_MAX_LISTED = 20


def _as_json(info: Any) -> Mapping[str, Any]:
    return info.to_json() if hasattr(info, "to_json") else info


def _model_head(info: Mapping[str, Any]) -> Any:
    model = info.get("model") or {}
    return model.get("head") if isinstance(model, Mapping) else None


def _fingerprint(info: Any) -> dict[str, Any]:
    info = _as_json(info)
    datasets = [{k: d.get(k) for k in _DATASET_FIELDS} for d in info.get("datasets", [])]
    return {"datasets": datasets, "pooled_statistics": info.get("pooled_statistics"),
            "input_spec": info.get("input_spec"), "model.head": _model_head(info)}


def _normalize(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _normalize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    return value


def _diff(reference: Any, current: Any, path: str, out: list[str]) -> None:
    if isinstance(reference, Mapping) and isinstance(current, Mapping):
        for key in sorted(set(reference) | set(current), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in reference:
                out.append(f"{sub}: the reference has none, this config {current[key]!r}")
            elif key not in current:
                out.append(f"{sub}: the reference {reference[key]!r}, this config has none")
            else:
                _diff(reference[key], current[key], sub, out)
    elif isinstance(reference, list) and isinstance(current, list):
        if len(reference) != len(current):
            out.append(f"{path}: the reference has {len(reference)}, this config "
                       f"{len(current)}")
        for i, (r, c) in enumerate(zip(reference, current)):
            _diff(r, c, f"{path}[{i}]", out)
    elif reference != current:
        out.append(f"{path}: the reference {reference!r}, this config {current!r}")


def reference_differences(reference: Any, current: Any) -> list[str]:
    """Where a run description differs from its reference's in what Re-Mix needs equal.

    Args:
      reference: the reference's ``RunInfo`` (or its ``run.json`` as a dict).
      current: the Re-Mix run's, built from its config the same way.

    Returns:
      One line per difference (``"datasets[1].structure.state_normalization: the reference
      'gaussian', this config 'bounds'"``), empty when they agree.
    """
    out: list[str] = []
    _diff(_normalize(_fingerprint(reference)), _normalize(_fingerprint(current)), "", out)
    return out


def check_reference(reference: Any, current: Any, *, path: str) -> None:
    """Refuses a Re-Mix config that differs from its reference's (see the module docstring).

    Args:
      reference: the reference's ``RunInfo`` (or ``run.json`` dict).
      current: the Re-Mix run's.
      path: the reference run's directory (named in the error).

    Raises:
      ConfigError: listing every difference.
    """
    diffs = reference_differences(reference, current)
    if diffs:
        listed = diffs[:_MAX_LISTED]
        more = f"\n  ... and {len(diffs) - len(listed)} more" if len(diffs) > len(listed) else ""
        raise ConfigError(
            f"remix reference {path}: the config differs from the reference's in "
            f"{len(diffs)} place(s) (datasets, structure, normalization, model inputs and head "
            "must agree):\n  " + "\n  ".join(listed) + more)


def reference_statistics(reference: Any) -> dict[str, Any]:
    """The statistics each dataset of the reference was normalized with, by dataset name (the
    ``statistics`` of ``run.json``, as JSON), for the Re-Mix run's datasets to reuse.

    Raises:
      ConfigError: when a dataset of the reference has no statistics.
    """
    out = {}
    for d in _as_json(reference).get("datasets", []):
        if d.get("statistics") is None:
            raise ConfigError(f"remix reference dataset {d.get('name')!r}: expected its "
                              "normalization statistics in run.json, found none")
        out[d["name"]] = d["statistics"]
    return out

