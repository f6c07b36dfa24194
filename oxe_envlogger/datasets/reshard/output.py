"""Finishing: the output's metadata and manifest, and the move of the finished directory into
place (until then the output exists only as a hidden temporary sibling).

Part of :mod:`oxe_envlogger.datasets.reshard` (see there for the stages).
"""

from __future__ import annotations

import contextlib
import copy
import filecmp
import logging
import os
import shutil
import stat
import uuid
from collections.abc import Sequence

from oxe_envlogger.datasets.reshard.options import (
    _INFO_CARRIED,
    MANIFEST_VERSION,
    TMP_PREFIX,
    PathLike,
)
from oxe_envlogger.datasets.reshard.plan import Plan
from oxe_envlogger.datasets.reshard.write import ShardResult
from oxe_envlogger.errors import (
    DatasetExistsError,
)
from oxe_envlogger.format import layout, provenance, stats

log = logging.getLogger(__name__)


def _statistics_json(plan: Plan, results: Sequence[ShardResult]) -> dict | None:
    if any(r.stats is None for r in results):
        return None
    total = stats.StatsSet({})
    splits: dict[str, stats.StatsSet] = {}
    covers: dict[str, dict[str, int]] = {}
    for r in _ordered(plan, results):
        shard = stats.StatsSet.from_json(r.stats)
        total.merge(shard)
        splits.setdefault(r.split, stats.StatsSet({})).merge(shard)
        covers.setdefault(r.split, {})[r.filename] = r.num_episodes
    return total.to_json(covers, splits)


def _ordered(plan: Plan, results: Sequence[ShardResult]) -> list[ShardResult]:
    rank = {s: i for i, s in enumerate(plan.splits)}
    return sorted(results, key=lambda r: (rank[r.split], r.index))


def manifest_json(plan: Plan, results: Sequence[ShardResult], runner: str) -> dict:
    """The manifest: sources, options, shards (with sha256) and one row per output episode."""
    sources = plan.inputs.sources
    results = _ordered(plan, results)
    by_task = {(r.split, r.index): r for r in results}
    splits = {}
    for split in plan.splits:
        rs = [r for r in results if r.split == split]
        splits[split] = {
            "episodes": sum(r.num_episodes for r in rs),
            "bytes": sum(r.num_bytes for r in rs),
            "shards": [{"file": r.filename, "episodes": r.num_episodes, "bytes": r.num_bytes,
                        "sha256": r.sha256} for r in rs],
        }
    rows = []
    for task in plan.tasks:
        assert (task.split, task.index) in by_task
        for i, ep in enumerate(task.episodes):
            ref = ep.ref
            rows.append([task.split, task.index, i, ref.source, ref.split,
                         os.path.basename(ref.path), ref.index, ep.global_index, ref.episode_id,
                         ref.num_steps, ep.changes])
    skipped = [[gi, ref.source, ref.split, os.path.basename(ref.path), ref.index, ref.episode_id,
                reason] for gi, ref, reason in plan.skipped]
    return {
        "format_version": MANIFEST_VERSION,
        "dataset_name": plan.name,
        "runner": runner,
        "sources": [{"index": s.index, "directory": s.directory, "name": s.name,
                     "splits": list(s.splits),
                     "episodes": sum(sh.num_episodes for sh in plan.inputs.shards
                                     if sh.source == s.index)} for s in sources],
        "options": plan.options.to_json(),
        "splits": splits,
        "episode_columns": ["split", "shard", "index", "source", "source_split", "source_shard",
                            "source_index", "global_index", "episode_id", "num_steps", "changes"],
        "episodes": rows,
        "skipped_columns": ["global_index", "source", "source_split", "source_shard",
                            "source_index", "episode_id", "reason"],
        "skipped": skipped,
        "unmatched_language_keys": list(plan.unmatched_language_keys),
    }


def _dataset_info(plan: Plan, results: Sequence[ShardResult]) -> dict:
    first = plan.inputs.info
    splits = {}
    for split in plan.splits:
        rs = [r for r in _ordered(plan, results) if r.split == split]
        splits[split] = ([r.num_episodes for r in rs], sum(r.num_bytes for r in rs))
    info = layout.new_dataset_info(
        plan.name, version=first.get("version") or layout.DEFAULT_VERSION,
        description=first.get("description", ""), citation=first.get("citation", ""),
        splits=splits, template=layout.DEFAULT_TEMPLATE)
    for key in _INFO_CARRIED:
        if key in first and key not in info:
            info[key] = copy.deepcopy(first[key])
    return info


def _metadata_json(plan: Plan, results: Sequence[ShardResult], runner: str) -> dict:
    codecs: dict[str, str] = {}
    for meta in plan.inputs.metadata:
        for key, codec in ((meta or {}).get("image_codecs") or {}).items():
            new = plan.transform.output_key(key)
            if new is not None:
                codecs.setdefault(new, codec)
    created = layout.now_iso()
    session = provenance.session_info(extra={
        "writer_id": f"reshard-{uuid.uuid4().hex[:12]}", "tool": "reshard", "runner": runner,
        "started": created, "closed": created, "ended": "closed",
        "episodes": plan.num_episodes,
        "steps": sum(e.ref.num_steps for t in plan.tasks for e in t.episodes),
        "bytes": sum(r.num_bytes for r in results),
        "shards": [r.filename for r in _ordered(plan, results)]})
    return {
        **layout.new_metadata(plan.name, created=created, sessions=[session]),
        "image_codecs": codecs,
        "resharded_from": [
            {"directory": s.directory, "name": s.name, "splits": list(s.splits),
             "metadata": plan.inputs.metadata[s.index]} for s in plan.inputs.sources],
        "manifest": layout.RESHARD_MANIFEST,
    }


def finalize(plan: Plan, results: Sequence[ShardResult], staging: str, runner: str) -> dict:
    """Writes features.json, statistics.json, the manifest, oxe_envlogger.json and, last,
    dataset_info.json into ``staging``. Returns the manifest."""
    results = _ordered(plan, results)
    want = sorted((t.split, t.index) for t in plan.tasks)
    if sorted((r.split, r.index) for r in results) != want:
        raise RuntimeError("finalize: the shard results do not match the plan")
    manifest = manifest_json(plan, results, runner)
    layout.atomic_write_json(os.path.join(staging, layout.FEATURES), plan.features)
    stats_json = _statistics_json(plan, results)
    if stats_json is not None:
        layout.atomic_write_json(os.path.join(staging, layout.STATISTICS), stats_json)
    else:
        log.warning("no statistics.json: the TF-free reader does not know these features")
    layout.atomic_write_bytes(os.path.join(staging, layout.RESHARD_MANIFEST),
                              layout.dump_manifest(manifest))
    layout.atomic_write_json(os.path.join(staging, layout.METADATA),
                             _metadata_json(plan, results, runner))
    layout.atomic_write_json(os.path.join(staging, layout.DATASET_INFO),
                             _dataset_info(plan, results))
    return manifest


def check_output(output_dir: PathLike, *, overwrite: bool) -> str:
    """The absolute output path, after checking that it may be written (and finishing a
    replacement of it that a killed resharder left half done, see :func:`finish_interrupted`).

    Raises:
      DatasetExistsError: when it holds a dataset and ``overwrite`` is False, when it is a
        non-empty directory that is not a dataset (never replaced), or when a logger is
        writing into it.
    """
    out = os.path.abspath(os.fspath(output_dir))
    finish_interrupted(out)
    if os.path.lexists(out):
        if not os.path.isdir(out):
            raise DatasetExistsError(f"{out} exists and is not a directory")
        entries = [e for e in os.listdir(out) if e != layout.INTERNAL]
        if entries and not layout.is_dataset(out):
            raise DatasetExistsError(f"{out} is a non-empty directory that holds no dataset; "
                                     "refusing to replace it")
        if layout.is_dataset(out) and not overwrite:
            raise DatasetExistsError(f"{out} holds a dataset; pass overwrite=True (--overwrite) "
                                     "to replace it")
        live = layout.live_writers(out)
        if live:
            raise DatasetExistsError(f"{out}: writers {live} are logging into it; replace it "
                                     "once they are closed")
    return out


def make_staging(output_dir: str) -> str:
    """A fresh hidden sibling directory of ``output_dir`` to write into."""
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    stale = sorted(e for e in os.listdir(parent)
                   if e.startswith(TMP_PREFIX) and f"-{os.path.basename(output_dir)}-" in e)
    if stale:
        log.warning("%s holds %s, left by a resharder that was killed (or is running); delete "
                    "them once no resharder runs", parent, stale)
    staging = os.path.join(parent, f"{TMP_PREFIX}tmp-{os.path.basename(output_dir)}-"
                                   f"{uuid.uuid4().hex[:12]}")
    os.makedirs(staging)
    return staging


# Written into the output being replaced just before the swap: a hidden sibling that holds it
# is then known to be the previous output (to take apart), not a staging directory.
_PREVIOUS_MARK = "reshard-previous-output"


def _link_tree(src: str, dst: str) -> None:
    """``dst`` as the same files as ``src``: hard links (copies where the file system has
    none), symbolic links and directories recreated.

    Raises:
      DatasetExistsError: for a special file (a FIFO, a socket) that cannot be linked.
    """
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
    elif os.path.isdir(src):
        os.mkdir(dst)
        for entry in sorted(os.listdir(src)):
            _link_tree(os.path.join(src, entry), os.path.join(dst, entry))
        shutil.copystat(src, dst)
    else:
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            if not stat.S_ISREG(os.lstat(src).st_mode):
                raise DatasetExistsError(f"{src}: a special file that cannot be kept in the new "
                                         "output; move it away first") from None
            shutil.copy2(src, dst)


def _carry_foreign(output_dir: str, staging: str) -> list[str]:
    """Links every entry of ``output_dir`` that is not part of its dataset (a user's
    ``NOTES.txt``, an ``eval/`` directory) into ``staging``. Returns their names.

    Raises:
      DatasetExistsError: when one has the name of an entry of the new output (listed; nothing
        is changed).
    """
    owned = set(layout.dataset_entries(output_dir))
    foreign = [e for e in sorted(os.listdir(output_dir)) if e not in owned]
    clash = [e for e in foreign if os.path.lexists(os.path.join(staging, e))]
    if clash:
        raise DatasetExistsError(f"{output_dir}: {clash} are not part of its dataset but have the "
                                 "names of files of the new output; move them away first")
    for entry in foreign:
        _link_tree(os.path.join(output_dir, entry), os.path.join(staging, entry))
    shutil.copymode(output_dir, staging)
    return foreign


def _same_entry(a: str, b: str) -> bool:
    """Whether ``b`` is what :func:`_link_tree` made of ``a`` (and neither changed since)."""
    if os.path.islink(a) or os.path.islink(b):
        return os.path.islink(a) and os.path.islink(b) and os.readlink(a) == os.readlink(b)
    if not os.path.isfile(a) or not os.path.isfile(b):
        return False
    return os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False)


def _move_over(src: str, dst: str) -> list[str]:
    """Empties ``src`` into ``dst``: an entry ``dst`` lacks is moved there, one it holds the
    same is dropped from ``src``. Returns the paths left in ``src`` (it differs in ``dst``)."""
    left = []
    for entry in sorted(os.listdir(src)):
        a, b = os.path.join(src, entry), os.path.join(dst, entry)
        if not os.path.lexists(b):
            os.rename(a, b)
        elif _same_entry(a, b):
            os.unlink(a)
        elif os.path.isdir(a) and not os.path.islink(a) and os.path.isdir(b) \
                and not os.path.islink(b):
            inner = _move_over(a, b)
            if inner:
                left += inner
            else:
                os.rmdir(a)
        else:
            left.append(a)
    return left


def _retire(previous: str, output_dir: str) -> None:
    """Takes apart a replaced output: its dataset files are deleted; its other entries go over
    to ``output_dir`` (they are there already, as links, unless made during the reshard), and
    one that differs from its namesake there is left in ``previous``, with a warning."""
    if not os.path.isdir(previous):  # retired already (by another resharder)
        return
    for entry in layout.dataset_entries(previous):
        path = os.path.join(previous, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    left = _move_over(previous, output_dir)
    if left:
        log.warning("%s: %s differ from the files of the same name in %s (changed while the "
                    "reshard ran?); they are kept here", previous, left, output_dir)
    else:
        os.rmdir(previous)


def finish_interrupted(output_dir: str) -> None:
    """Finishes what a resharder killed while replacing ``output_dir`` left: when the swap had
    not happened (only where it takes two renames), the previous output is put back; after it,
    the previous output, in a hidden sibling, is taken apart (see :func:`_retire`)."""
    parent, base = os.path.split(output_dir)
    if not os.path.isdir(parent):
        return
    for entry in sorted(os.listdir(parent)):
        if not (entry.startswith(TMP_PREFIX) and f"-{base}-" in entry):
            continue
        previous = os.path.join(parent, entry)
        mark = os.path.join(previous, layout.INTERNAL, _PREVIOUS_MARK)
        try:
            if (layout.read_json(mark) or {}).get("output") != output_dir:
                continue
        except (OSError, ValueError):
            continue
        if os.path.lexists(output_dir):
            log.warning("%s: taking apart %s, the output a killed resharder replaced",
                        output_dir, previous)
            _retire(previous, output_dir)
        else:
            log.warning("%s: putting the previous output back from %s (a resharder was killed "
                        "while replacing it)", output_dir, previous)
            os.unlink(mark)
            os.rename(previous, output_dir)


def commit_output(staging: str, output_dir: str, *, overwrite: bool, fsync: bool = True) -> None:
    """Moves the finished ``staging`` directory to ``output_dir`` (replacing a dataset there
    only when ``overwrite``).

    The entries of ``output_dir`` that are not its dataset's (:func:`layout.dataset_entries`: a
    user's notes, an ``eval/`` directory, ``quarantine/``) stay: they are hard-linked into the
    new output, which then takes the old one's place in one step (``renameat2`` with
    ``RENAME_EXCHANGE``; two renames where the file system cannot), so that a reader sees the
    old output or the new one, each whole, and those files all along. The old output is then
    taken apart (:func:`_retire`); a resharder killed on the way leaves it in a hidden sibling,
    which the next reshard into ``output_dir`` finishes (:func:`finish_interrupted`).

    Raises:
      DatasetExistsError: as :func:`check_output`; or when an entry of the user's has the name
        of one of the new output's (nothing is changed then).
    """
    check_output(output_dir, overwrite=overwrite)
    parent = os.path.dirname(output_dir)
    if not os.path.isdir(output_dir):
        if fsync:
            layout.fsync_dir(staging)
        os.rename(staging, output_dir)
        if fsync:
            layout.fsync_dir(parent)
        return
    # Under the old output's lock, so that no logger starts writing into it meanwhile.
    with layout.dataset_lock(output_dir):
        check_output(output_dir, overwrite=overwrite)
        _carry_foreign(output_dir, staging)
        layout.atomic_write_json(os.path.join(output_dir, layout.INTERNAL, _PREVIOUS_MARK),
                                 {"output": output_dir})
        if fsync:
            for dirpath, _, _ in os.walk(staging):
                layout.fsync_dir(dirpath)
        if layout.exchange_paths(staging, output_dir):
            previous = staging
        else:
            previous = os.path.join(parent, f"{TMP_PREFIX}old-{os.path.basename(output_dir)}-"
                                            f"{uuid.uuid4().hex[:12]}")
            os.rename(output_dir, previous)
            os.rename(staging, output_dir)
    if fsync:
        layout.fsync_dir(parent)
    try:
        _retire(previous, output_dir)
    except OSError as e:  # the new output is in place; what is left is finished next time
        log.warning("%s: could not take apart the previous output %s (%s); the next reshard "
                    "into it finishes that", output_dir, previous, e)


def discard_staging(staging: str) -> None:
    """Deletes a staging directory after a failure (its links to the user's files are only
    links), unless the swap had happened: then it holds the previous output, which
    :func:`finish_interrupted` takes apart."""
    if not os.path.exists(os.path.join(staging, layout.INTERNAL, _PREVIOUS_MARK)):
        shutil.rmtree(staging, ignore_errors=True)


