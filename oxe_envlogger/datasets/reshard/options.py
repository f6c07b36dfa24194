"""What a reshard does (:class:`ReshardOptions`) and the constants its stages share.

Part of :mod:`oxe_envlogger.datasets.reshard` (see there for the stages).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from oxe_envlogger.format import layout
from oxe_envlogger.format.specs import (
    check_float64_storage,
)

MANIFEST_VERSION = 1
LANGUAGE_KEY = "steps/language_instruction"
TMP_PREFIX = ".oxe-reshard-"
# Steps fields that RLDS readers need; renaming or dropping them would break the dataset.
PROTECTED = ("steps", "steps/is_first", "steps/is_last", "steps/is_terminal")
# dataset_info.json fields carried over from the first input (the others are recomputed).
_INFO_CARRIED = ("description", "citation", "location", "releaseNotes", "redistributionInfo",
                 "version")
_SMALL_RECORD = 256 * 1024  # records up to this size are scanned with one read
_MAX_LANGUAGE_PAYLOAD = 1 << 20

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class ReshardOptions:
    """What :func:`reshard` does.

    Attributes:
      dataset_name: TFDS name of the output (default: the first input's name).
      shard_bytes: close an output shard before it would exceed this many bytes (an episode
        larger than the budget gets a shard of its own).
      shard_episodes: also close a shard after this many episodes (``--shard_size``).
      skip_episodes: global input indices (see the module docstring) of episodes to leave out.
      drop_invalid: leave out episodes whose ``invalid`` flag is set.
      relabel_language: new language instruction for every episode (unless ``language_map``
        names the episode).
      language_map: ``{episode_id or global index: instruction}`` for single episodes.
      language_key: the feature that holds the instruction (added as a Text feature if the input
        has none); a ``steps/`` key holds one value per step, another key one per episode.
      validation_fraction: fraction of the kept episodes moved to ``validation_split``; the
        choice is a seeded hash ranking of the episode ids, so it does not depend on numpy.
        The parts of an episode that the logger split at ``max_episode_bytes`` stay together.
      validation_split: name of that split (``"val"``, as the Open X-Embodiment loaders expect).
      split_seed: seed of the validation choice.
      rename_features: ``{old path: new path}`` of features (and feature groups), e.g.
        ``{"steps/observation/image": "steps/observation/image_0"}``.
      drop_features: paths of features (or groups) to remove.
      float64: convert every float64 feature to this storage: ``"float32"`` (a float list,
        rounded to float32, which loaders that skip tfds' decoding read as numbers) or
        ``"exact"`` (raw float64 bytes; exact only where the input was, float32-stored values
        are widened). Inputs that differ only in this storage can then be merged. Tensors a
        foreign dataset compresses with zlib or gives no fixed shape are left as they are
        (see :func:`oxe_envlogger.format.specs.float64_features`). None: keep each feature as it is
        stored (the inputs must agree).
      input_splits: splits read from every input (default: all of each input's splits). All
        of them go into ``train`` (and ``validation_split``).
      overwrite: replace an existing dataset at the output path.
      verify: check the CRC of every copied record.
      fsync: fsync every output file before the output is moved into place.
      workers: threads writing output shards in :func:`reshard` (default: CPU count, at most 8).
    """

    dataset_name: str | None = None
    shard_bytes: int = layout.DEFAULT_SHARD_BYTES
    shard_episodes: int | None = None
    skip_episodes: tuple[int, ...] = ()
    drop_invalid: bool = False
    relabel_language: str | None = None
    language_map: Mapping[str, str] | None = None
    language_key: str = LANGUAGE_KEY
    validation_fraction: float = 0.0
    validation_split: str = "val"
    split_seed: int = 0
    rename_features: Mapping[str, str] | None = None
    drop_features: tuple[str, ...] = ()
    float64: str | None = None
    input_splits: tuple[str, ...] | None = None
    overwrite: bool = False
    verify: bool = True
    fsync: bool = True
    workers: int | None = None

    def __post_init__(self):
        if self.shard_bytes <= 0:
            raise ValueError(f"shard_bytes: expected > 0, given {self.shard_bytes}")
        if self.shard_episodes is not None and self.shard_episodes <= 0:
            raise ValueError(f"shard_episodes: expected > 0, given {self.shard_episodes}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction: expected 0 <= f < 1, given {self.validation_fraction}")
        if self.validation_split == layout.DEFAULT_SPLIT:
            raise ValueError(f"validation_split: must differ from {layout.DEFAULT_SPLIT!r}")
        if any(int(i) < 0 for i in self.skip_episodes):
            raise ValueError(f"skip_episodes: expected indices >= 0, given {self.skip_episodes}")
        if self.dataset_name is not None:
            layout.check_dataset_name(self.dataset_name)
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers: expected >= 1, given {self.workers}")
        if self.float64 is not None:
            check_float64_storage(self.float64)

    def to_json(self) -> dict[str, Any]:
        """The options that shape the output (for the manifest; deterministic)."""
        lang_map = dict(self.language_map or {})
        return {
            "dataset_name": self.dataset_name,
            "shard_bytes": self.shard_bytes,
            "shard_episodes": self.shard_episodes,
            "skip_episodes": sorted({int(i) for i in self.skip_episodes}),
            "drop_invalid": self.drop_invalid,
            "relabel_language": self.relabel_language,
            "language_map": {"entries": len(lang_map),
                             "sha256": hashlib.sha256(json.dumps(
                                 lang_map, sort_keys=True).encode()).hexdigest()}
            if lang_map else None,
            "language_key": self.language_key,
            "validation_fraction": self.validation_fraction,
            "validation_split": self.validation_split,
            "split_seed": self.split_seed,
            "rename_features": dict(self.rename_features or {}),
            "drop_features": list(self.drop_features),
            "float64": self.float64,
            "input_splits": list(self.input_splits) if self.input_splits is not None else None,
        }


