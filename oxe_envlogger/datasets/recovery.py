"""Crash recovery: commit what dead writers left, repair damaged shards, rebuild lost metadata.

A writer killed at any moment leaves at most staging files and an unlisted last shard (see the
commit protocol in :mod:`oxe_envlogger.format.layout`). :func:`recover` (run automatically when a
writer opens the directory, and by ``tools/recover_rlds.py`` / ``oxe-recover-rlds``) validates
them, truncates a torn last record and commits them. Run with ``verify``, it also checks every
committed shard: a damaged one is replaced by a shard of its intact records (the original is kept
under ``quarantine/``), and a lost ``dataset_info.json`` is rebuilt from ``features.json`` and the
shard files (the pieces are in :mod:`oxe_envlogger.datasets.salvage`).

It sits above statistics (it catches them up after a repair) and the reader, so nothing below it
needs to import it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Any

from oxe_envlogger.datasets import salvage
from oxe_envlogger.errors import RecoveryError
from oxe_envlogger.format import record
from oxe_envlogger.format.layout import (
    DATASET_INFO,
    DEFAULT_TEMPLATE,
    FEATURES,
    FILE_FORMAT,
    INTERNAL,
    METADATA,
    RESHARD_MANIFEST,
    STATISTICS,
    DatasetDir,
    PathLike,
    atomic_write_json,
    check_directory,
    dataset_lock,
    features_problem,
    file_format,
    holds_dataset_remains,
    is_tfrecord,
    list_splits,
    now_iso,
    read_info_or_none,
    shard_filename,
    shard_paths,
    split_entry,
    staging_dir,
    writer_alive,
)

log = logging.getLogger(__name__)


def _orphan_shards(directory: str, info: dict, split: str) -> list[str]:
    entry = split_entry(info, split)
    if entry is None:
        return []
    template = entry.get("filepathTemplate") or DEFAULT_TEMPLATE
    if "{SHARD_INDEX}" not in template or "SHARD_X_OF_Y" in template:
        return []
    out = []
    index = len(entry.get("shardLengths", []))
    while True:
        path = os.path.join(directory, shard_filename(template, info["name"], split, index, None))
        if not os.path.exists(path):
            return out
        out.append(path)
        index += 1


def _whole_records(directory: str, path: str, report: dict) -> tuple[int, int]:
    """``(records, bytes)`` of a crashed writer's shard once its damage is dealt with: a torn
    last record (never completed) is cut off; damage before intact records is salvaged."""
    scan = record.scan_records(path)
    if scan.torn_tail:
        end = scan.damaged[0][0]
        os.truncate(path, end)
        report["truncated_bytes"] += scan.size - end
    elif scan.damaged:
        report["salvaged_shards"].append(salvage.salvage_shard(directory, path, scan))
    return len(scan.records), os.path.getsize(path)


def recover(directory: PathLike, *, verify: bool = True) -> dict:
    """Makes every durable episode visible and a damaged dataset readable again; idempotent.

    Always: lists shards that were renamed but not yet listed, commits the staging shards of
    dead writers (a torn last record is cut off) and rebuilds a missing or unreadable
    ``dataset_info.json`` from ``features.json`` and the shard files. Live writers are left
    alone. With ``verify`` (writers opening a directory pass False, so as not to read it all),
    every listed shard is read as well: a damaged one is replaced by a shard of its intact
    records, before and after the damage, and the original is kept under ``quarantine/``; a
    missing one becomes an empty shard; a wrong record count is corrected, and statistics with
    an older logger's sampled quantiles are rebuilt with sketches. Then ``statistics.json`` and a
    reshard manifest are brought in line with the shards.

    Returns:
      A report: ``{"committed_shards": [...], "episodes": n (committed or salvaged),
      "truncated_bytes": n, "removed_empty": n, "salvaged_shards": [...],
      "missing_shards": [...], "relisted": [...], "rebuilt": [...], "updated": [...]}``.

    Raises:
      FileNotFoundError: for a missing path, or a directory that holds no dataset.
      NotADirectoryError: for a path that is a file.
      RecoveryError: for what cannot be repaired (a lost ``features.json``, ...), after every
        repair that could be made; ``error.report`` tells those.
    """
    directory = check_directory(directory)
    report: dict[str, Any] = {"committed_shards": [], "episodes": 0, "truncated_bytes": 0,
                              "removed_empty": 0, "salvaged_shards": [], "missing_shards": [],
                              "relisted": [], "rebuilt": [], "updated": []}
    problems: list[str] = []
    stage = staging_dir(directory)
    if (read_info_or_none(directory) is None and not holds_dataset_remains(directory)
            and not (os.path.isdir(stage) and os.listdir(stage))):
        raise FileNotFoundError(f"{directory}: no dataset here (no {DATASET_INFO}, {FEATURES} "
                                "or shard files)")
    with dataset_lock(directory):
        for entry in os.listdir(os.path.join(directory, INTERNAL)):
            if entry.startswith("salvage-") and ".tmp-" in entry:  # of an interrupted recovery
                os.unlink(os.path.join(directory, INTERNAL, entry))
        staged = sorted(os.listdir(stage)) if os.path.isdir(stage) else []
        info = read_info_or_none(directory)
        if info is None:
            info = salvage.rebuild_info(directory, report)
            verify = False  # every shard was just read
        name = info["name"]
        touched = bool(report["rebuilt"])
        for split in list_splits(info):
            for path in _orphan_shards(directory, info, split):
                count, end = _whole_records(directory, path, report)
                entry = split_entry(info, split)
                entry["shardLengths"].append(str(count))
                entry["numBytes"] = str(int(entry.get("numBytes", "0")) + end)
                atomic_write_json(os.path.join(directory, DATASET_INFO), info)
                report["committed_shards"].append(path)
                report["episodes"] += count
                touched = True
        dead_writers = set()
        for fname in staged:
            m = re.match(r"^(?P<writer>[0-9a-f]+)-(?P<split>.+)-(?P<seq>\d+)\.tfrecord$", fname)
            path = os.path.join(stage, fname)
            if not m:
                continue
            if writer_alive(directory, m["writer"]):
                continue
            dead_writers.add(m["writer"])
            count, end = _whole_records(directory, path, report)
            if count == 0:
                os.unlink(path)
                report["removed_empty"] += 1
                continue
            ds = DatasetDir(directory, name, split=m["split"])
            final = ds.commit_shard(path, count, end)
            info = ds.read_info()
            report["committed_shards"].append(final)
            report["episodes"] += count
            touched = True
        if verify:
            fmt = file_format(info)
            if fmt != FILE_FORMAT:
                problems.append(f"its shards are {fmt}, not checked here (tfrecord only)")
            else:
                relisted = False
                for split in list_splits(info):
                    paths = shard_paths(directory, info, split)
                    lengths, changed = salvage.repair_shards(directory, paths, report)
                    if changed:
                        entry = split_entry(info, split)
                        entry["shardLengths"] = [str(n) for n in lengths]
                        entry["numBytes"] = str(sum(os.path.getsize(p) for p, _ in paths))
                        relisted = True
                if relisted:
                    atomic_write_json(os.path.join(directory, DATASET_INFO), info)
                    report["updated"].append(DATASET_INFO)
                    touched = True
        lost_features = features_problem(directory)
        if lost_features:
            problems.append(lost_features)
        for writer in dead_writers:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, INTERNAL, "writers", f"{writer}.lock"))
        if dead_writers:
            def mark(meta):
                for s in meta.get("sessions", []):
                    if s.get("writer_id") in dead_writers and not s.get("closed"):
                        s["closed"] = now_iso()
                        s["ended"] = "crashed; recovered"

            DatasetDir(directory, name).update_metadata(mark)
        rewritten = {r["shard"] for key in ("salvaged_shards", "missing_shards", "relisted")
                     for r in report[key]}
        if salvage.reconcile_manifest(directory, rewritten):
            report["updated"].append(RESHARD_MANIFEST)
        # Statistics are caught up where they are kept (never added to a foreign dataset that
        # recovery did not change).
        keeps_stats = touched or os.path.exists(os.path.join(directory, STATISTICS))
        if (not lost_features and keeps_stats
                and is_tfrecord(info)
                and salvage.refresh_statistics(directory, upgrade=verify)):
            report["updated"].append(STATISTICS)
        repairs = {k: report[k] for k in ("salvaged_shards", "missing_shards", "relisted",
                                          "rebuilt") if report[k]}
        if repairs and os.path.exists(os.path.join(directory, METADATA)):
            DatasetDir(directory, name).update_metadata(
                lambda meta: meta.setdefault("recoveries", []).append({"at": now_iso(),
                                                                       **repairs}))
    if report["committed_shards"] or report["salvaged_shards"]:
        log.info("recovered %d episodes in %d shards of %s", report["episodes"],
                 len(report["committed_shards"]) + len(report["salvaged_shards"]), directory)
    if problems:
        raise RecoveryError(f"{directory}: " + "; ".join(problems), report)
    return report


def needs_recovery(directory: PathLike) -> bool:
    """Whether :func:`recover` would change anything without ``verify`` (cheap; no lock, no
    reading of shards)."""
    info = read_info_or_none(os.fspath(directory))
    if info is None:
        if holds_dataset_remains(os.fspath(directory)):
            return True
    else:
        for split in list_splits(info):
            if _orphan_shards(os.fspath(directory), info, split):
                return True
    stage = staging_dir(directory)
    if not os.path.isdir(stage):
        return False
    for fname in os.listdir(stage):
        m = re.match(r"^(?P<writer>[0-9a-f]+)-", fname)
        if m and not writer_alive(directory, m["writer"]):
            return True
    return False
