"""Mixture weights of several datasets: uniform, by size, explicit, or from a weights file.

A weights file (written by :func:`save_mixture_weights`, e.g. at the end of a Re-Mix run, and
read by ``LoaderConfig(weights="path/to/weights.json")``) is JSON::

    {"format": "openx_train.mixture_weights", "version": 1,
     "weights": {"<dataset name>": 0.7, ...}, "metadata": {...}}

A plain ``{"<dataset name>": weight}`` object is read too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from openx_train.data.config import MixtureWeights
from openx_train.data.errors import ConfigError
from oxe_envlogger.format import layout

log = logging.getLogger(__name__)

WEIGHTS_FORMAT = "openx_train.mixture_weights"
WEIGHTS_VERSION = 1


def save_mixture_weights(path: str | os.PathLike, weights: Mapping[str, float], *,
                         metadata: Mapping[str, Any] | None = None) -> None:
    """Writes dataset weights atomically (see the module docstring for the format).

    Raises:
      ConfigError: for negative or non-finite weights, or all zero.
    """
    checked = _check({str(k): float(v) for k, v in weights.items()}, "save_mixture_weights")
    data = {"format": WEIGHTS_FORMAT, "version": WEIGHTS_VERSION, "weights": checked,
            "metadata": dict(metadata or {})}
    layout.atomic_write_json(path, data)


def load_mixture_weights(path: str | os.PathLike) -> dict[str, float]:
    """Dataset name to weight, from a weights file.

    Raises:
      ConfigError: when the file is not a weights file or holds invalid weights.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"mixture weights {os.fspath(path)}: cannot read: {e}") from None
    if isinstance(data, Mapping) and data.get("format") == WEIGHTS_FORMAT:
        if data.get("version") != WEIGHTS_VERSION:
            raise ConfigError(f"mixture weights {os.fspath(path)}: expected version "
                              f"{WEIGHTS_VERSION}, given {data.get('version')!r}")
        data = data.get("weights")
    if not isinstance(data, Mapping) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in data.values()):
        raise ConfigError(f"mixture weights {os.fspath(path)}: expected an object of dataset "
                          "name -> number")
    return _check({str(k): float(v) for k, v in data.items()}, os.fspath(path))


def _check(weights: Mapping[str, float], where: str) -> dict[str, float]:
    for name, w in weights.items():
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"{where}: weight of {name!r} expected finite and >= 0, given {w!r}")
    if weights and sum(weights.values()) <= 0:
        raise ConfigError(f"{where}: expected a positive weight, given all zero")
    return dict(weights)


def resolve_mixture_weights(weights: MixtureWeights, names: Sequence[str],
                            sizes: Sequence[int], *, kind: str = "dataset") -> np.ndarray:
    """Normalized sampling probabilities, one per dataset (or domain).

    Args:
      weights: ``"uniform"``, ``"size"``, a sequence aligned with ``names``, a mapping from
        name, or the path of a weights file.
      names: the datasets' (or domains') names.
      sizes: their numbers of frames (for ``"size"``).
      kind: what ``names`` name, in messages: ``"dataset"`` or ``"domain"``.

    Raises:
      ConfigError: for an unknown mode, a length or name mismatch, or invalid values.
    """
    n = len(names)
    if isinstance(weights, (str, os.PathLike)):
        mode = os.fspath(weights)
        if mode == "uniform":
            w = np.ones(n)
        elif mode == "size":
            w = np.asarray(sizes, np.float64)
        elif mode.endswith(".json") or os.path.exists(mode):
            w = _from_mapping(load_mixture_weights(mode), names, mode, kind)
        else:
            raise ConfigError(f"mixture weights: expected 'uniform', 'size', a weights file, a "
                              f"sequence or a mapping, given {mode!r}")
    elif isinstance(weights, Mapping):
        w = _from_mapping(_check({str(k): float(v) for k, v in weights.items()}, "weights"),
                          names, "weights", kind)
    else:
        w = np.asarray(list(weights), np.float64)
        if w.shape != (n,):
            raise ConfigError(f"mixture weights: expected {n} weights (one per {kind} "
                              f"{list(names)}), given {len(w)}")
        _check(dict(zip(names, w.tolist())), "mixture weights")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ConfigError(f"mixture weights: expected non-negative weights with a positive sum, "
                          f"given {dict(zip(names, w.tolist()))}")
    return w / w.sum()


def _from_mapping(mapping: Mapping[str, float], names: Sequence[str], where: str,
                  kind: str) -> np.ndarray:
    missing = [k for k in names if k not in mapping]
    if missing:
        raise ConfigError(f"{where}: no weight for {kind}s {missing} (weights given for "
                          f"{sorted(mapping)})")
    extra = sorted(set(mapping) - set(names))
    if extra:
        warnings.warn(f"{where}: weights for {kind}s not in the mixture are ignored: {extra}",
                      stacklevel=3)
    return np.asarray([mapping[k] for k in names], np.float64)
