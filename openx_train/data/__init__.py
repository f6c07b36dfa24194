"""The training input pipeline: RLDS datasets on disk to numpy batches for JAX.

Functional pieces, each usable alone (tf.data in, tf.data out)::

    episodes = load_dataset(path, "train")                        # episodes, images encoded
    stats = compute_dataset_statistics(path)                      # stored, cached or computed
    episodes = standardize_dataset(episodes, structure=..., statistics=stats, n_obs=2, n_action=4)
    frames = flatten_dataset(episodes)                            # one element per frame

(``load_dataset``, ``standardize_dataset`` and ``flatten_dataset`` import TensorFlow when first
used; the rest of this package never does)

and the loader that mixes datasets into batches (shuffling indices, reading images after the
shuffle)::

    loader = make_dataloader([DatasetConfig(path, structure)], LoaderConfig(batch_size=256))
    for batch in loader: ...

Batches carry ``domain_id``: the dataset, or an episode field's value
(``LoaderConfig(domain_key="episode_metadata/operator")``), which Re-Mix weights.
"""

from __future__ import annotations

import importlib
from typing import Any

from openx_train.data.config import (
    AugmentConfig,
    Camera,
    DatasetConfig,
    LoaderConfig,
    Normalization,
    Structure,
)
from openx_train.data.errors import (
    ConfigError,
    DataPipelineError,
    DatasetFormatError,
    MissingKeyError,
)
from openx_train.data.frames import normalize, unnormalize
from openx_train.data.loader import DataLoader, EpisodeRecord, make_dataloader
from openx_train.data.mixture import (
    load_mixture_weights,
    resolve_mixture_weights,
    save_mixture_weights,
)
from openx_train.data.statistics import (
    DatasetStatistics,
    KeyStatistics,
    compute_dataset_statistics,
)
from openx_train.data.structure import infer_structure

# The tf.data functions load TensorFlow (seconds, hundreds of MB) only when first used: the
# state-only loader never needs it.
_LAZY = {
    "load_dataset": "openx_train.data.loading",
    "flatten_dataset": "openx_train.data.standardize",
    "standardize_dataset": "openx_train.data.standardize",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AugmentConfig",
    "Camera",
    "ConfigError",
    "DataLoader",
    "DataPipelineError",
    "DatasetConfig",
    "DatasetFormatError",
    "DatasetStatistics",
    "EpisodeRecord",
    "KeyStatistics",
    "LoaderConfig",
    "MissingKeyError",
    "Normalization",
    "Structure",
    "compute_dataset_statistics",
    "flatten_dataset",
    "infer_structure",
    "load_dataset",
    "load_mixture_weights",
    "make_dataloader",
    "normalize",
    "resolve_mixture_weights",
    "save_mixture_weights",
    "standardize_dataset",
    "unnormalize",
]
