"""Checks that a dataset directory is a sound RLDS dataset, without TensorFlow.

:func:`validate` reads every record of every committed shard once and checks:

* metadata: ``dataset_info.json`` and ``features.json`` parse, the file format is tfrecord, the
  features hold an RLDS ``steps`` sequence, no two features are stored under the same name;
* records: every shard exists, every record is whole and its CRCs match, the record count of each
  shard equals its ``shardLengths`` entry (and ``numBytes`` the shards' size);
* features: every episode decodes against ``features.json``, every step feature has one value
  per step, images carry a PNG/JPEG header of the declared size (or decode, with
  ``decode_images=True``);
* step flags: exactly one ``is_first``, at step 0; exactly one ``is_last``, at the end;
  ``is_terminal`` only on the last step;
* ``episode_id`` is unique across the dataset;
* ``statistics.json`` covers exactly the committed shards;
* no staging shard of a dead writer and no unlisted shard is left over (``recover`` commits
  them); a live writer is reported as a warning;
* a resharded dataset's ``reshard_manifest.json`` matches the shards (sha256, episode counts).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os
import re
from typing import Any, Literal

import numpy as np

from oxe_envlogger.errors import CorruptDatasetError
from oxe_envlogger.format import layout, reader, record, stats
from oxe_envlogger.format.specs import Group, Leaf

Severity = Literal["error", "warning"]


@dataclasses.dataclass(frozen=True)
class Issue:
    """One finding: ``check`` names the kind, ``where`` the file, episode or key."""

    severity: Severity
    check: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity.upper()} [{self.check}] {self.where}: {self.message}"


@dataclasses.dataclass
class ValidationReport:
    """What :func:`validate` found. ``ok`` when there is no error (warnings allowed)."""

    directory: str
    issues: list[Issue] = dataclasses.field(default_factory=list)
    omitted: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    splits: dict[str, int] = dataclasses.field(default_factory=dict)
    episodes: int = 0
    steps: int = 0
    shards: int = 0
    bytes: int = 0
    checks: list[str] = dataclasses.field(default_factory=list)
    max_per_check: int = 20

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def num_errors(self) -> int:
        return len(self.errors) + sum(n for (s, _), n in self.omitted.items() if s == "error")

    @property
    def num_warnings(self) -> int:
        return len(self.warnings) + sum(n for (s, _), n in self.omitted.items() if s == "warning")

    @property
    def ok(self) -> bool:
        return self.num_errors == 0

    def add(self, severity: Severity, check: str, where: str, message: str) -> None:
        shown = sum(1 for i in self.issues if i.check == check and i.severity == severity)
        if shown >= self.max_per_check:
            self.omitted[(severity, check)] += 1
        else:
            self.issues.append(Issue(severity, check, where, message))

    def format(self) -> str:
        """A human-readable report: counts, then each issue."""
        status = "OK" if self.ok else "FAILED"
        lines = [f"{status}: {self.directory}",
                 f"  {self.episodes} episodes, {self.steps} steps in {self.shards} shards "
                 f"({self.bytes / 1e6:.2f} MB); splits {self.splits}",
                 f"  checked: {', '.join(self.checks)}",
                 f"  {self.num_errors} errors, {self.num_warnings} warnings"]
        lines += [f"  {i}" for i in self.issues]
        for (severity, check), n in sorted(self.omitted.items()):
            lines.append(f"  ... and {n} more {severity}s [{check}]")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"directory": self.directory, "ok": self.ok, "errors": self.num_errors,
                "warnings": self.num_warnings, "episodes": self.episodes, "steps": self.steps,
                "shards": self.shards, "bytes": self.bytes, "splits": self.splits,
                "checks": self.checks, "issues": [dataclasses.asdict(i) for i in self.issues],
                "omitted": {f"{s}/{c}": n for (s, c), n in self.omitted.items()}}


class _HashingFile(io.RawIOBase):
    """A read-only file that feeds a sha256 with everything read (one pass for both)."""

    def __init__(self, f):
        self.f = f
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        if n:
            self.digest.update(memoryview(b)[:n])
        return n


_CHANNELS = {"1": 1, "L": 1, "I;16": 1, "LA": 2, "RGB": 3, "YCbCr": 3, "CMYK": 4, "RGBA": 4,
             "P": None}


def _check_image(data: bytes, leaf: Leaf, decode: bool) -> str | None:
    """None if ``data`` is an image of the leaf's shape, else what is wrong."""
    from PIL import Image

    h, w, c = leaf.shape if len(leaf.shape) == 3 else (*leaf.shape, 1)
    try:
        with Image.open(io.BytesIO(data)) as im:
            size, mode, fmt = im.size, im.mode, im.format
            if decode:
                im.load()
    except Exception as e:
        return f"not a readable image ({len(data)} bytes): {str(e).split(' <')[0]}"
    if size != (w, h):
        return f"{fmt} of {size[0]}x{size[1]}, declared {w}x{h}"
    channels = _CHANNELS.get(mode)
    if channels is not None and channels != c and not (c in (3, 4) and channels in (1, 3, 4)):
        return f"{fmt} in mode {mode}, declared {c} channels"
    return None


def _flags(raw: dict, key: str) -> np.ndarray | None:
    payload = raw.get(f"steps/{key}")
    if payload is None:
        return None
    kind, values = record.decode_feature(payload)
    if kind != "int64":
        return None
    return values.astype(bool)


def _check_flags(report: ValidationReport, where: str, raw: dict) -> int:
    first, last, term = (_flags(raw, k) for k in ("is_first", "is_last", "is_terminal"))
    if first is None or last is None:
        report.add("error", "flags", where, "no steps/is_first or steps/is_last")
        return 0
    n = len(first)
    if n == 0:
        report.add("error", "flags", where, "an episode without steps")
        return 0
    if len(last) != n or (term is not None and len(term) != n):
        report.add("error", "flags", where, f"flag lengths differ: is_first {n}, is_last "
                   f"{len(last)}, is_terminal {None if term is None else len(term)}")
        return n
    if not first[0] or first.sum() != 1:
        report.add("error", "flags", where, f"is_first must be set at step 0 only; set at "
                   f"{np.flatnonzero(first).tolist()[:10]}")
    if not last[-1] or last.sum() != 1:
        report.add("error", "flags", where, f"is_last must be set at the last step ({n - 1}) "
                   f"only; set at {np.flatnonzero(last).tolist()[:10]}")
    if term is not None and term[:-1].any():
        report.add("error", "flags", where, f"is_terminal set before the last step, at "
                   f"{np.flatnonzero(term[:-1]).tolist()[:10]}")
    return n


def _check_features(report: ValidationReport, where: str, data: bytes, raw: dict,
                    spec: Group, declared: set[str], decode_images: bool) -> None:
    try:
        episode = reader.decode_episode(data, spec, decode_images=decode_images)
    except (CorruptDatasetError, ValueError) as e:
        report.add("error", "features", where, f"does not decode against features.json: {e}")
        return
    except Exception as e:  # an image the codec cannot decode, and the like
        report.add("error", "features", where, f"does not decode: {type(e).__name__}: {e}")
        return
    extra = sorted(set(raw) - declared)
    if extra:
        report.add("warning", "features", where, f"keys not in features.json: {extra[:10]}")
    if decode_images:
        return
    for path, leaf in reader.step_leaves(spec):
        if leaf.kind != "image":
            continue
        frames = reader.get_path(episode["steps"], path)
        for t, frame in enumerate(frames):
            problem = _check_image(frame, leaf, decode=False)
            if problem:
                report.add("error", "features", f"{where} steps/{path}[{t}]", problem)
                break


def _leftovers(report: ValidationReport, directory: str, info: dict) -> None:
    """Staging shards, unlisted shards and temporary files left by crashed writers."""
    listed = set()
    for split in layout.list_splits(info):
        listed.update(os.path.basename(p) for p, _ in layout.shard_paths(directory, info, split))
    pattern = layout.shard_pattern(info.get("name", ""))
    for entry in sorted(os.listdir(directory)):
        if pattern.match(entry) and entry not in listed:
            report.add("error", "leftovers", entry, "shard file not listed in dataset_info.json "
                       "(a crash between rename and commit?); run tools/recover_rlds.py")
        elif ".tmp-" in entry:
            report.add("warning", "leftovers", entry, "temporary file of an interrupted write")
    quarantine = os.path.join(directory, layout.QUARANTINE)
    if os.path.isdir(quarantine):
        kept = sorted(e for e in os.listdir(quarantine) if not e.endswith(".recovery.json"))
        if kept:
            report.add("warning", "leftovers", f"{layout.QUARANTINE}/",
                       f"{len(kept)} damaged files that recovery replaced are kept here "
                       f"({', '.join(kept[:5])}{', ...' if len(kept) > 5 else ''}); the dataset "
                       "does not read them")
    stage = layout.staging_dir(directory)
    if os.path.isdir(stage):
        for entry in sorted(os.listdir(stage)):
            m = re.match(r"^(?P<writer>[0-9a-f]+)-", entry)
            if not m:
                continue
            if layout.writer_alive(directory, m["writer"]):
                report.add("warning", "leftovers", f"{layout.INTERNAL}/staging/{entry}",
                           f"writer {m['writer']} is live; its episodes are not committed yet")
            else:
                size = os.path.getsize(os.path.join(stage, entry))
                report.add("error", "leftovers", f"{layout.INTERNAL}/staging/{entry}",
                           f"staging shard ({size} bytes) of dead writer {m['writer']}; run "
                           "tools/recover_rlds.py to commit its episodes")


def _check_episode(report: ValidationReport, where: str, data: bytes, spec: Group | None,
                   declared: set[str], decode_images: bool, ids: dict[str, str]) -> None:
    raw = record.split_example(data)
    n = _check_flags(report, where, raw)
    report.episodes += 1
    report.steps += n
    if spec is not None:
        _check_features(report, where, data, raw, spec, declared, decode_images)
    ep_id = raw.get("episode_id")
    if ep_id is not None:
        kind, values = record.decode_feature(ep_id)
        if kind == "bytes" and values:
            key = values[0].decode("utf-8", "replace")
            if key in ids:
                report.add("error", "episode_id", where, f"episode_id {key!r} also in {ids[key]}")
            else:
                ids[key] = where


def validate(directory: str | os.PathLike, *, decode_images: bool = False,
             max_per_check: int = 20) -> ValidationReport:
    """Validates one dataset directory (see the module docstring).

    Args:
      directory: the dataset directory.
      decode_images: decode every image (slow) instead of reading its header.
      max_per_check: issues listed per kind of check; the rest are counted.

    Returns:
      The report; ``report.ok`` is False when any error was found.
    """
    directory = os.path.abspath(os.fspath(directory))
    report = ValidationReport(directory, max_per_check=max_per_check)
    report.checks.append("metadata")
    info = _check_metadata(report, directory)
    if info is None:
        return report
    spec, declared = _read_spec(report, directory)
    manifest = layout.read_json(os.path.join(directory, layout.RESHARD_MANIFEST))
    manifest_shards = {}
    if manifest:
        for split, entry in manifest.get("splits", {}).items():
            for sh in entry.get("shards", []):
                manifest_shards[sh["file"]] = (split, sh)
    report.checks += ["records", "flags", "episode_id"]
    if spec is not None:
        report.checks.append("features")
    if manifest:
        report.checks.append("manifest")
    ids: dict[str, str] = {}
    for split in layout.list_splits(info):
        _check_split(report, directory, info, split, spec, declared, decode_images=decode_images,
                     ids=ids, manifest_shards=manifest_shards)
    for name in sorted(manifest_shards):
        report.add("error", "manifest", name, "in the manifest but not in dataset_info.json")
    if not ids and report.episodes:
        report.add("warning", "episode_id", directory, "no episode_id feature: uniqueness not "
                   "checked")
    report.checks.append("statistics")
    _check_statistics(report, directory)
    report.checks.append("leftovers")
    _leftovers(report, directory, info)
    return report


def _check_metadata(report: ValidationReport, directory: str) -> dict | None:
    """``dataset_info.json`` when it and ``features.json`` are there and readable and the shards
    are TFRecord files; else None, with the reason in ``report``."""
    try:
        layout.check_directory(directory)
    except OSError as e:
        report.add("error", "metadata", directory, str(e).split(": ", 1)[-1])
        return None
    lost_features = layout.features_problem(directory)
    try:
        info = layout.read_json(os.path.join(directory, layout.DATASET_INFO))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fix = ("run tools/recover_rlds.py to rebuild it from features.json and the shards"
               if not lost_features else f"and {lost_features}")
        report.add("error", "metadata", layout.DATASET_INFO, f"{e}; {fix}")
        return None
    if info is None:
        shards = sum(len(v) for d in layout.shard_files(directory).values() for v in d.values())
        if not lost_features:
            problem = (f"missing, but {layout.FEATURES} and {shards} shard files are here: run "
                       "tools/recover_rlds.py to rebuild it")
        else:
            problem = f"missing, and {lost_features}" if shards else "missing: not a dataset directory"
        report.add("error", "metadata", layout.DATASET_INFO, problem)
        return None
    if lost_features:
        report.add("error", "metadata", layout.FEATURES, lost_features)
        return None
    fmt = layout.file_format(info)
    if fmt != layout.FILE_FORMAT:
        report.add("error", "metadata", layout.DATASET_INFO,
                   f"file format {fmt!r} is not checked here (tfrecord only)")
        return None
    return info


def _read_spec(report: ValidationReport, directory: str) -> tuple[Group | None, set[str]]:
    """The dataset's spec (None where it cannot be read or is not RLDS, said in ``report``)
    and the feature keys it declares."""
    spec = None
    try:
        spec = reader.read_spec(directory)
    except CorruptDatasetError as e:
        report.add("error", "features", layout.FEATURES, str(e))
    except Exception as e:
        report.add("warning", "features", layout.FEATURES,
                   f"features not checked (the TF-free reader does not know them): {e}")
    if spec is not None:
        steps = spec.fields.get("steps")
        if not isinstance(steps, Group) or not {"is_first", "is_last"} <= set(steps.fields):
            report.add("error", "metadata", layout.FEATURES,
                       "not an RLDS dataset: no steps sequence with is_first/is_last")
            spec = None
    declared = set()
    if spec is not None:
        declared = {f"steps/{p}" for p, _ in reader.step_leaves(spec)}
        declared |= {p for p, _ in reader.episode_leaves(spec)}
    return spec, declared


def _check_split(report: ValidationReport, directory: str, info: dict, split: str,
                 spec: Group | None, declared: set[str], *, decode_images: bool,
                 ids: dict[str, str], manifest_shards: dict) -> None:
    """Reads every record of one split's shards (their counts, sizes and manifest entries
    checked; each listed shard is taken out of ``manifest_shards``)."""
    try:
        shards = layout.shard_paths(directory, info, split)
    except Exception as e:
        report.add("error", "metadata", layout.DATASET_INFO, f"split {split!r}: {e}")
        return
    report.splits[split] = sum(n for _, n in shards)
    entry = layout.split_entry(info, split) or {}
    split_bytes = split_records = 0
    for path, expected in shards:
        name = os.path.basename(path)
        report.shards += 1
        if not os.path.isfile(path):
            report.add("error", "records", name, "listed in dataset_info.json but missing")
            continue
        split_bytes += os.path.getsize(path)
        count, digest = 0, None
        try:
            with open(path, "rb", buffering=0) as f:
                hashing = _HashingFile(f)
                records = record.iter_records(io.BufferedReader(hashing, 1 << 20), path=path)
                for i, (_, data) in enumerate(records):
                    count += 1
                    _check_episode(report, f"{name}[{i}]", data, spec, declared,
                                   decode_images, ids)
                # Read to the end of the file: the hash covers all of it.
                digest = hashing.digest.hexdigest()
        except CorruptDatasetError as e:
            report.add("error", "records", name, f"{e} (after {count} whole records); run "
                       "tools/recover_rlds.py to keep every intact record")
        split_records += count
        if count != expected:
            report.add("error", "records", name,
                       f"{count} records, dataset_info.json lists {expected}")
        if name in manifest_shards:
            _, sh = manifest_shards.pop(name)
            if digest is not None and digest != sh.get("sha256"):
                report.add("error", "manifest", name, "sha256 differs from the manifest")
            if sh.get("episodes") != count:
                report.add("error", "manifest", name, f"{count} episodes, the manifest "
                           f"lists {sh.get('episodes')}")
    report.bytes += split_bytes
    listed_bytes = int(entry.get("numBytes", 0) or 0)
    # Ours count whole files; TFDS's writers count the serialized examples (no framing).
    if listed_bytes and listed_bytes not in (split_bytes, split_bytes - 16 * split_records):
        report.add("warning", "records", f"split {split}", f"numBytes {listed_bytes} in "
                   f"dataset_info.json, shards hold {split_bytes}")


def _check_statistics(report: ValidationReport, directory: str) -> None:
    """``statistics.json`` covers exactly the committed shards, with sketched quantiles."""
    if not os.path.exists(os.path.join(directory, layout.STATISTICS)):
        report.add("warning", "statistics", layout.STATISTICS, "missing")
        return
    loaded = stats.load(directory)
    if not stats.is_current(directory):
        covers = loaded[1] if loaded else {}
        report.add("error", "statistics", layout.STATISTICS,
                   f"not current: covers {sum(len(v) for v in covers.values())} shards of "
                   f"{report.shards}; run tools/recover_rlds.py (it catches up) or "
                   "oxe_envlogger.format.stats.catch_up")
    legacy = loaded[0].legacy_keys() if loaded else []
    if legacy:
        report.add("warning", "statistics", layout.STATISTICS,
                   f"the quantiles of {legacy} come from an older logger's sample of at "
                   "most 512 rows and are not used; run tools/recover_rlds.py to rebuild "
                   "them")
