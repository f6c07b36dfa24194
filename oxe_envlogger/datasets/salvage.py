"""Salvaging damaged datasets: the intact records of a damaged shard, a lost dataset_info.json.

:func:`oxe_envlogger.datasets.recovery.recover` calls these, under the dataset lock:

* :func:`repair_shards`: every shard of a split is scanned (:func:`record.scan_records`); a
  damaged one (flipped bytes, cut short) is replaced by a shard of its intact records, found
  before and after the damage, and the original is kept under ``quarantine/`` with a note of
  what was found (:func:`keep_aside`; never deleted). A listed shard that is missing becomes an
  empty shard, so that the names of the others stay valid.
* :func:`rebuild_info`: a missing or unreadable ``dataset_info.json`` is rebuilt from
  ``features.json`` and the shard files present: the name, splits and template from the file
  names, the shard lengths from the records.
* :func:`reconcile_manifest` and :func:`refresh_statistics`: the reshard manifest and
  ``statistics.json`` are made to agree with what is listed.

Nothing here reads a shard that a live writer may still write: committed shards never change,
and the staging shards of live writers are not touched (see :func:`recovery.recover`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import shutil
import uuid
from collections.abc import Sequence

from oxe_envlogger.errors import RecoveryError
from oxe_envlogger.format import layout, reader, record, stats

log = logging.getLogger(__name__)


def quarantine_dir(directory: str) -> str:
    return os.path.join(directory, layout.QUARANTINE)


def keep_aside(directory: str, path: str, note: dict) -> str:
    """Keeps the file ``path`` under ``quarantine/`` (a hard link, so that its name can then be
    replaced in one step; a copy where the file system has no links), with ``note`` beside it
    as ``<name>.recovery.json``. Kept once: a file already kept (a recovery interrupted before it
    replaced the original) is found again. Returns the kept file's path inside ``directory``.
    """
    qdir = quarantine_dir(directory)
    os.makedirs(qdir, exist_ok=True)
    name = os.path.basename(path)
    for entry in sorted(os.listdir(qdir)):
        kept = os.path.join(qdir, entry)
        if entry.startswith(name) and os.path.samefile(kept, path):
            break
    else:
        kept = next(os.path.join(qdir, n) for n in (name if i == 0 else f"{name}.{i}"
                                                    for i in itertools.count())
                    if not os.path.lexists(os.path.join(qdir, n)))
        try:
            os.link(path, kept)
        except OSError:  # no hard links here (some network and FUSE file systems)
            shutil.copy2(path, kept)
    layout.atomic_write_json(f"{kept}.recovery.json", note)
    layout.fsync_dir(qdir)
    return os.path.relpath(kept, directory)


def _copy_records(src: str, dst: str, scan: record.ShardScan) -> None:
    """Writes the intact records of ``src`` (as ``scan`` found them) to ``dst``, fsynced."""
    runs: list[list[int]] = []
    for offset, length in scan.records:
        end = offset + record.framed_size(length)
        if runs and runs[-1][1] == offset:
            runs[-1][1] = end
        else:
            runs.append([offset, end])
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        for start, end in runs:
            fi.seek(start)
            left = end - start
            while left:
                chunk = fi.read(min(left, 1 << 20))
                if not chunk:
                    raise OSError(f"{src} shrank while it was salvaged")
                fo.write(chunk)
                left -= len(chunk)
        fo.flush()
        os.fsync(fo.fileno())


def salvage_shard(directory: str, path: str, scan: record.ShardScan, *,
                  listed: int | None = None) -> dict:
    """Replaces the damaged shard ``path`` by a shard of its intact records, keeping the
    original under ``quarantine/``. Caller holds the dataset lock.

    Returns:
      What was done: ``{"shard", "kept_as", "records", "listed", "damaged", "lost_bytes"}``.
    """
    name = os.path.basename(path)
    kept_bytes = sum(record.framed_size(n) for _, n in scan.records)
    result = {"shard": name, "kept_as": None, "records": len(scan.records), "listed": listed,
              "damaged": [list(d) for d in scan.damaged], "lost_bytes": scan.size - kept_bytes}
    tmp = os.path.join(directory, layout.INTERNAL, f"salvage-{name}.tmp-{os.getpid()}-"
                                                   f"{uuid.uuid4().hex[:8]}")
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    try:
        _copy_records(path, tmp, scan)
        result["kept_as"] = keep_aside(directory, path, {
            "shard": name, "recovered": layout.now_iso(), "bytes": scan.size,
            "damaged": result["damaged"], "intact_records": len(scan.records),
            "listed_records": listed,
            "note": f"the damaged original of {name}; the dataset now holds its "
                    f"{len(scan.records)} intact records"})
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    layout.fsync_dir(directory)
    log.warning("%s: %s; kept its %d intact records (the original is %s)", path,
                scan.describe(), len(scan.records), result["kept_as"])
    return result


def repair_shards(directory: str, paths: Sequence[tuple[str, int | None]], report: dict
                  ) -> tuple[list[int], bool]:
    """Checks a split's shards, salvaging the damaged ones (caller holds the lock).

    Args:
      directory: the dataset directory.
      paths: ``(shard path, listed number of records or None)`` in shard order.
      report: the recovery report; ``salvaged_shards``, ``missing_shards``, ``relisted`` and
        ``episodes`` are added to.

    Returns:
      The number of records of each shard now, and whether any shard or count changed.
    """
    lengths, changed = [], False
    for path, listed in paths:
        name = os.path.basename(path)
        if not os.path.lexists(path):
            with open(path, "xb") as f:  # an empty shard: the later shards keep their names
                os.fsync(f.fileno())
            layout.fsync_dir(directory)
            report["missing_shards"].append({"shard": name, "listed": listed})
            log.warning("%s: listed but missing; its %s episodes are lost (now an empty shard)",
                        path, listed)
            lengths.append(0)
            changed = True
            continue
        scan = record.scan_records(path)
        if scan.damaged:
            report["salvaged_shards"].append(salvage_shard(directory, path, scan, listed=listed))
            report["episodes"] += len(scan.records)
            changed = True
        elif listed is not None and len(scan.records) != listed:
            report["relisted"].append({"shard": name, "listed": listed,
                                       "records": len(scan.records)})
            changed = True
        lengths.append(len(scan.records))
    return lengths, changed


def rebuild_info(directory: str, report: dict) -> dict:
    """Writes a new ``dataset_info.json`` from ``features.json`` and the shard files present,
    salvaging damaged shards on the way; an unreadable old one is kept under ``quarantine/``.
    Description, version and citation are not known any more: they get the defaults. Caller
    holds the lock.

    Returns:
      The new dataset_info dict.

    Raises:
      RecoveryError: when ``features.json`` is missing or unreadable (it cannot be rebuilt
        from the records), or the dataset's name or shard names do not tell the layout.
    """
    lost_features = layout.features_problem(directory)
    if lost_features:
        raise RecoveryError(f"{directory}: cannot rebuild {layout.DATASET_INFO}: {lost_features}",
                            report)
    found = layout.shard_files(directory)
    meta = None
    with contextlib.suppress(ValueError):
        meta = layout.read_json(os.path.join(directory, layout.METADATA))
    name = (meta or {}).get("dataset_name") if isinstance(meta, dict) else None
    if name not in found:
        if len(found) == 1:
            name = next(iter(found))
        elif found:
            raise RecoveryError(f"{directory}: cannot rebuild {layout.DATASET_INFO}: shards of "
                                f"several datasets ({sorted(found)}) and no {layout.METADATA} "
                                "naming one", report)
        elif not isinstance(name, str):
            raise RecoveryError(f"{directory}: cannot rebuild {layout.DATASET_INFO}: no shard "
                                f"files and no {layout.METADATA} to tell the dataset's name",
                                report)
    splits = found.get(name) or {layout.DEFAULT_SPLIT: []}
    order = sorted(splits, key=lambda s: (s != layout.DEFAULT_SPLIT, s))
    entries = []
    for split in order:
        files = splits[split]
        totals = {t for _, t, _ in files}
        if len(totals) > 1:
            raise RecoveryError(f"{directory}: cannot rebuild {layout.DATASET_INFO}: the shard "
                                f"names of split {split!r} disagree on the number of shards "
                                f"({[f for *_, f in files]})", report)
        total = next(iter(totals), None)
        template = layout.DEFAULT_TEMPLATE if total is not None else layout.APPEND_TEMPLATE
        count = total if total is not None else max((i for i, _, _ in files), default=-1) + 1
        beyond = [f for i, _, f in files if i >= count]
        if beyond:
            raise RecoveryError(f"{directory}: cannot rebuild {layout.DATASET_INFO}: {beyond} "
                                "lie beyond the number of shards their names give", report)
        paths = [(os.path.join(directory, layout.shard_filename(template, name, split, i, count)),
                  None) for i in range(count)]
        lengths, _ = repair_shards(directory, paths, report)
        entries.append({"filepathTemplate": template, "name": split,
                        "numBytes": str(sum(os.path.getsize(p) for p, _ in paths)),
                        "shardLengths": [str(n) for n in lengths]})
    info = layout.new_dataset_info(name)
    info["splits"] = entries
    old = os.path.join(directory, layout.DATASET_INFO)
    if os.path.lexists(old):
        keep_aside(directory, old, {"file": layout.DATASET_INFO, "recovered": layout.now_iso(),
                                    "note": "unreadable; rebuilt from features.json and the "
                                            "shard files"})
    layout.atomic_write_json(old, info)
    report["rebuilt"].append(layout.DATASET_INFO)
    log.warning("%s: rebuilt %s from %s and %d shard files (description, version and citation "
                "set to defaults)", directory, layout.DATASET_INFO, layout.FEATURES,
                sum(len(e["shardLengths"]) for e in entries))
    return info


def _episode_id(data: bytes) -> str | None:
    payload = record.split_example(data).get("episode_id")
    if payload is None:
        return None
    kind, values = record.decode_feature(payload)
    return values[0].decode("utf-8", "replace") if kind == "bytes" and values else None


def reconcile_manifest(directory: str, changed: set[str]) -> bool:
    """Brings ``reshard_manifest.json`` in line with the shards named in ``changed`` (file
    names), which recovery rewrote, and with any whose size differs from the manifest's (a
    recovery killed before it got here): their sha256, sizes and episode rows; the rows of
    episodes no longer there move to ``lost``. Rows are matched by episode id. Returns whether
    the manifest changed. Caller holds the lock."""
    path = os.path.join(directory, layout.RESHARD_MANIFEST)
    try:
        manifest = layout.read_json(path)
    except ValueError:
        log.warning("%s is not readable JSON; left as it is", path)
        return False
    if not manifest:
        return False
    cols = {c: i for i, c in enumerate(manifest["episode_columns"])}
    rows = [list(r) for r in manifest.get("episodes", [])]
    lost = manifest.setdefault("lost", [])
    manifest["lost_columns"] = [*manifest["episode_columns"], "reason"]
    touched = False
    for split, entry in manifest.get("splits", {}).items():
        for k, shard in enumerate(entry.get("shards", [])):
            file = os.path.join(directory, shard["file"])
            if shard["file"] not in changed and (not os.path.isfile(file)
                                                 or os.path.getsize(file) == shard["bytes"]):
                continue
            digest = hashlib.sha256()
            with open(file, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    digest.update(block)
            ids = [_episode_id(data) for data in record.read_records(file)]
            mine = [r for r in rows if r[cols["split"]] == split and r[cols["shard"]] == k]
            rows = [r for r in rows if not (r[cols["split"]] == split and r[cols["shard"]] == k)]
            by_id = {r[cols["episode_id"]]: r for r in mine if r[cols["episode_id"]] is not None}
            for i, ep_id in enumerate(ids):
                row = by_id.pop(ep_id, None) if ep_id is not None else None
                if row is None:  # not in the manifest: where it came from is not known
                    row = [None] * len(cols)
                    row[cols["split"]], row[cols["shard"]] = split, k
                    row[cols["episode_id"]] = ep_id
                    if "changes" in cols:
                        row[cols["changes"]] = "salvaged"
                row[cols["index"]] = i
                rows.append(row)
            kept = {id(r) for r in rows}
            lost += [[*r, f"damaged; the original {shard['file']} is under {layout.QUARANTINE}/"]
                     for r in mine if id(r) not in kept]
            shard.update(episodes=len(ids), bytes=os.path.getsize(file),
                         sha256=digest.hexdigest())
            touched = True
        entry["episodes"] = sum(s["episodes"] for s in entry.get("shards", []))
        entry["bytes"] = sum(s["bytes"] for s in entry.get("shards", []))
    if not touched:
        return False
    rank = {s: i for i, s in enumerate(manifest.get("splits", {}))}
    rows.sort(key=lambda r: (rank.get(r[cols["split"]], len(rank)), r[cols["shard"]],
                             r[cols["index"]]))
    manifest["episodes"] = rows
    layout.atomic_write_bytes(path, layout.dump_manifest(manifest))
    return True


def refresh_statistics(directory: str, *, upgrade: bool = False) -> bool:
    """Makes ``statistics.json`` cover exactly the listed shards: rebuilt when it covers a
    shard that is no longer listed, or with another number of episodes (statistics cannot be
    taken back out), or with ``upgrade`` when it holds an older logger's sampled quantiles
    (``StatsSet.legacy_keys``), else caught up. Datasets whose features the TF-free reader does
    not know have none. Returns whether it changed. Caller holds the lock."""
    info = layout.read_json(os.path.join(directory, layout.DATASET_INFO))
    path = os.path.join(directory, layout.STATISTICS)
    try:
        loaded = stats.load(directory)
    except ValueError:  # not JSON: it is derived data, rebuilt below
        loaded, stale = None, os.path.exists(path)
    else:
        listed = {s: {os.path.basename(p): n for p, n in layout.shard_paths(directory, info, s)}
                  for s in layout.list_splits(info)}
        stale = loaded is not None and (any(
            listed.get(split, {}).get(name) != n
            for split, names in loaded[1].items() for name, n in names.items())
            or (upgrade and bool(loaded[0].legacy_keys())))
    if stale:
        os.unlink(path)
    elif loaded is not None and stats.is_current(directory):
        return False
    try:
        reader.read_spec(directory)
    except Exception:  # features the TF-free reader does not know: no statistics
        return stale
    stats.catch_up(directory)
    return True
