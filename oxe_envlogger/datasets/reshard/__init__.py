"""Merge, filter, relabel, split and reshard RLDS datasets by copying serialized records.

The resharder never decodes an episode it does not change: it reads the framing and a few small
fields of every record (``episode_id``, ``invalid``, the step count, the language payload), plans
the output, then copies the framed records byte for byte (CRC-checked) into the output shards.
Episodes it changes (language relabelled, features renamed or dropped, float64 features converted
between their two storages) are re-assembled from their raw feature payloads
(:func:`oxe_envlogger.format.record.split_example`), so even then no image is decoded; only the float64
features being converted are. Nothing here imports TensorFlow.

The work has four stages, each a pure function of its inputs, so that the same stages run in one
process (:func:`reshard`, with a thread per output shard) or as an Apache Beam pipeline
(:mod:`oxe_envlogger.datasets.reshard.beam`) and give byte-identical output; each stage is a
module of this package (``inputs``, ``scan``, ``plan``, ``write``, ``output``; ``options`` and
``transform`` hold what they share):

1. :func:`discover`: find the input datasets (sorted) and check that their features agree.
2. :func:`scan_shard`: one input shard -> one :class:`EpisodeRef` per record.
3. :func:`build_plan`: every ref, in the merged order -> filtered, relabelled, split and packed
   into :class:`ShardTask` s by the byte budget.
4. :func:`write_shard`: one task -> one output shard file, its sha256 and its statistics;
   :func:`finalize` writes the metadata and :func:`commit_output` moves the finished directory
   into place (until then the output exists only as a hidden temporary sibling).

Episodes are numbered in the merged input order (input datasets sorted by path, then each
dataset's splits in ``dataset_info.json`` order, shards in order, records in order); that global
index is what ``skip_episodes`` and index keys of ``language_map`` refer to, and the manifest
(``reshard_manifest.json``) maps every output episode back to it and to its source.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from oxe_envlogger.datasets.reshard.inputs import discover
from oxe_envlogger.datasets.reshard.options import TMP_PREFIX, PathLike, ReshardOptions
from oxe_envlogger.datasets.reshard.output import (
    check_output,
    commit_output,
    discard_staging,
    finalize,
    make_staging,
)
from oxe_envlogger.datasets.reshard.plan import Plan, build_plan
from oxe_envlogger.datasets.reshard.scan import EpisodeRef, scan_shard
from oxe_envlogger.datasets.reshard.transform import feature_paths, make_transform
from oxe_envlogger.datasets.reshard.write import write_shard

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ReshardReport:
    """What :func:`reshard` did."""

    output_dir: str
    manifest: dict
    episodes: int
    bytes: int
    skipped: int
    sources: int

    def format(self) -> str:
        splits = ", ".join(f"{s}: {v['episodes']} episodes in {len(v['shards'])} shards"
                           for s, v in self.manifest["splits"].items())
        return (f"wrote {self.output_dir}: {self.episodes} episodes ({self.bytes / 1e6:.1f} MB) "
                f"from {self.sources} datasets; {splits}; skipped {self.skipped}")


class Progress:
    """Progress hooks (the tools draw a tqdm bar); every method may be called from threads."""

    def start(self, episodes: int, num_bytes: int) -> None:
        """Called once the plan is known."""

    def update(self, episodes: int, num_bytes: int) -> None:
        """Called after each episode written."""

    def close(self) -> None:
        """Called at the end."""


def plan_reshard(rlds_dirs: Sequence[PathLike], output_dir: PathLike,
                 options: ReshardOptions) -> Plan:
    """Stages 1-3 in this process: the plan of :func:`reshard` without writing anything."""
    inputs = discover(rlds_dirs, output_dir=output_dir, input_splits=options.input_splits,
                      float64=options.float64)
    transform, features = make_transform(inputs.features, options)
    refs: list[EpisodeRef] = []
    for shard in inputs.shards:
        refs += scan_shard(shard, transform)
    return build_plan(inputs, refs, options, transform, features)


def reshard(rlds_dirs: Sequence[PathLike], output_dir: PathLike,
            options: ReshardOptions | None = None, *, progress: Progress | None = None
            ) -> ReshardReport:
    """Merges the datasets under ``rlds_dirs`` into one dataset at ``output_dir``.

    See the module docstring for the stages and :class:`ReshardOptions` for what can be done on
    the way. The output appears at ``output_dir`` only when it is complete.

    Raises:
      FeatureMismatchError: when the inputs' features differ (listing the differences).
      DatasetExistsError: when ``output_dir`` holds a dataset and not ``options.overwrite``.
      CorruptDatasetError: for a damaged input record.
      ValueError: for options that do not fit the inputs.
    """
    options = options or ReshardOptions()
    out = check_output(output_dir, overwrite=options.overwrite)
    plan = plan_reshard(rlds_dirs, out, options)
    progress = progress or Progress()
    progress.start(plan.num_episodes, plan.num_bytes)
    staging = make_staging(out)
    lock = threading.Lock()

    def tick(episodes: int, nbytes: int) -> None:
        with lock:
            progress.update(episodes, nbytes)

    try:
        workers = options.workers or min(8, os.cpu_count() or 1)
        # Largest shards first, so that the threads finish together.
        tasks = sorted(plan.tasks, key=lambda t: -t.num_bytes)
        with ThreadPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
            results = list(pool.map(lambda t: write_shard(
                t, staging, transform=plan.transform, features=plan.features, options=options,
                progress=tick), tasks))
        manifest = finalize(plan, results, staging, "local")
        commit_output(staging, out, overwrite=options.overwrite, fsync=options.fsync)
    except BaseException:
        discard_staging(staging)
        raise
    finally:
        progress.close()
    report = ReshardReport(out, manifest, plan.num_episodes, sum(r.num_bytes for r in results),
                           len(plan.skipped), len(plan.inputs.sources))
    log.info("%s", report.format())
    return report


def load_language_map(path: PathLike) -> dict[str, str]:
    """Reads a language map file: a JSON object ``{episode id or index: instruction}``, or
    JSON lines ``{"episode_id" | "index": ..., "language_instruction": ...}``, or a TSV
    ``key<TAB>instruction`` per line.

    Raises:
      ValueError: for a file in none of these forms, naming the line.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    with contextlib.suppress(json.JSONDecodeError):
        data = json.loads(text)
        if isinstance(data, dict):
            return {str(k): str(v) for k, v in data.items()}
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
                key = row.get("episode_id", row.get("index"))
                value = row.get("language_instruction", row.get("instruction"))
            except (json.JSONDecodeError, AttributeError) as e:
                raise ValueError(f"{path}:{n}: not a JSON object: {e}") from e
            if key is None or value is None:
                raise ValueError(f"{path}:{n}: expected keys episode_id or index, and "
                                 "language_instruction")
            out[str(key)] = str(value)
        elif "\t" in line:
            key, value = line.split("\t", 1)
            out[key.strip()] = value.rstrip("\n")
        else:
            raise ValueError(f"{path}:{n}: expected a JSON object, JSON lines or "
                             "'key<TAB>instruction' lines")
    return out


__all__ = [
    "TMP_PREFIX",
    "EpisodeRef",
    "Plan",
    "Progress",
    "ReshardOptions",
    "ReshardReport",
    "build_plan",
    "check_output",
    "commit_output",
    "discard_staging",
    "discover",
    "feature_paths",
    "finalize",
    "load_language_map",
    "make_staging",
    "make_transform",
    "plan_reshard",
    "reshard",
    "scan_shard",
    "write_shard",
]
