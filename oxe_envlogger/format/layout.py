"""The dataset directory: TFDS metadata files, shards, commits and crash recovery.

A dataset is one directory that ``tfds.builder_from_directory(dir)`` opens unchanged::

    dataset_info.json              TFDS DatasetInfo (splits, shard lengths, file template)
    features.json                  TFDS features (the RLDS episode structure)
    <name>-<split>.tfrecord-NNNNN  committed shards, one episode per record, never modified
    oxe_envlogger.json             provenance: writer sessions, env, seeds, versions, stalls
    statistics.json                running statistics of actions and float observations
    .oxe/lock                      flock taken for every metadata change
    .oxe/writers/<id>.lock         flock held by each live writer for its whole life
    .oxe/staging/<id>-<n>.tfrecord shards being written (durable, not yet visible to readers)
    quarantine/                    damaged files that recovery replaced, kept (never deleted)

Shards written by the logger use the template ``{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_INDEX}``
(TFDS's SequentialWriter uses the same), recorded in ``dataset_info.json``, so that appending a
shard never renames the others. Resharded datasets use TFDS's default ``-NNNNN-of-MMMMM`` names.

Commit protocol (under ``.oxe/lock``): a closed staging shard is renamed to the next free index,
then ``dataset_info.json`` is replaced atomically (temp file, fsync, rename). A reader therefore
always sees a consistent dataset; a writer killed at any moment leaves at most staging files and
an unlisted last shard, which :func:`recover` (run automatically when a writer opens the
directory) validates, truncates to the last whole record and commits. Run by hand (``verify``),
it also checks every committed shard: a damaged one is replaced by a shard of its intact records
(the original is kept under ``quarantine/``), and a lost ``dataset_info.json`` is rebuilt from
``features.json`` and the shard files (see :mod:`oxe_envlogger.datasets.salvage`).

Everything else in a dataset directory (a user's notes, evaluation results) is not part of the
dataset: :func:`dataset_entries` tells the two apart, and replacing a dataset (a logger's
``overwrite=True``, the resharder's ``--overwrite``) leaves those files where they are.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from oxe_envlogger.errors import (
    CorruptDatasetError,
    DatasetExistsError,
    FeatureMismatchError,
    OXEEnvLoggerError,
)
from oxe_envlogger.format import record
from oxe_envlogger.format.specs import diff_features, strip_docs

log = logging.getLogger(__name__)

DATASET_INFO = "dataset_info.json"
FEATURES = "features.json"
METADATA = "oxe_envlogger.json"
STATISTICS = "statistics.json"
RESHARD_MANIFEST = "reshard_manifest.json"
INTERNAL = ".oxe"
QUARANTINE = "quarantine"
FILE_FORMAT = "tfrecord"
APPEND_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_INDEX}"
DEFAULT_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
DEFAULT_SPLIT = "train"
DEFAULT_VERSION = "0.1.0"
# The byte budget of a shard, for the logger and the resharder alike (TFDS aims at 200 MB too).
DEFAULT_SHARD_BYTES = 200 * 2**20
_NAME_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9_]*$")

PathLike = str | os.PathLike


def check_dataset_name(name: str) -> str:
    """Dataset names become file name prefixes that TFDS parses: letters, digits, underscores."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"dataset name: expected letters, digits and underscores starting with a letter "
            f"(e.g. {snake_name(str(name))!r}), given {name!r}")
    return name


def snake_name(text: str) -> str:
    """``"HalfCheetah-v5"`` -> ``"half_cheetah_v5"``."""
    s = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", text)
    s = re.sub(r"[^a-zA-Z0-9]+", "_", s).strip("_").lower()
    return s if s and s[0].isalpha() else f"ds_{s}"


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Atomic files and locks


def fsync_dir(path: PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Replaces ``path`` with ``data`` so that readers see the old or the new file, never a part."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def dump_manifest(manifest: dict) -> bytes:
    """A reshard manifest as indented JSON with one line per episode row (diffable, and small)."""
    rows = {k: manifest[k] for k in ("episodes", "skipped", "lost") if k in manifest}
    head = json.dumps({k: ([] if k in rows else v) for k, v in manifest.items()}, indent=2)
    for key, values in rows.items():
        if values:
            body = ",\n".join("    " + json.dumps(r) for r in values)
            head = head.replace(f'"{key}": []', f'"{key}": [\n{body}\n  ]', 1)
    return (head + "\n").encode("utf-8")


def read_json(path: PathLike) -> Any | None:
    """The JSON file at ``path``, or None when there is none.

    Raises:
      json.JSONDecodeError: naming the file, when it is not valid JSON.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise json.JSONDecodeError(f"{os.fspath(path)} is not valid JSON: {e.msg}", e.doc,
                                   e.pos) from None


def check_directory(directory: PathLike, *, create: bool = False) -> str:
    """The absolute path of ``directory``, which must be a directory (made, with ``create``,
    where nothing is there yet).

    Raises:
      FileNotFoundError: when nothing is there (and not ``create``).
      NotADirectoryError: when it is a file (or anything else but a directory).
    """
    path = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(path):
        if os.path.lexists(path):
            raise NotADirectoryError(f"{os.fspath(directory)}: a file, not a dataset directory")
        if not create:
            raise FileNotFoundError(f"{os.fspath(directory)}: no such directory")
        os.makedirs(path, exist_ok=True)
    return path


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_paths(a: PathLike, b: PathLike) -> bool:
    """Swaps the directory entries ``a`` and ``b`` in one step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``), so that neither path is ever missing. Returns False where the system
    or the file system cannot (then nothing was changed).

    Raises:
      OSError: when the swap is possible but fails (a path missing, permissions, ...).
    """
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not glibc >= 2.28, or not Linux
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


@contextlib.contextmanager
def dataset_lock(directory: PathLike) -> Iterator[None]:
    """Exclusive lock on the dataset's metadata (all processes on this host)."""
    internal = os.path.join(directory, INTERNAL)
    os.makedirs(internal, exist_ok=True)
    fd = os.open(os.path.join(internal, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class WriterRegistration:
    """The flock a live writer holds on ``.oxe/writers/<id>.lock``; recovery skips live ones."""

    def __init__(self, directory: PathLike, writer_id: str):
        self.path = os.path.join(directory, INTERNAL, "writers", f"{writer_id}.lock")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(self._fd, f"{os.getpid()} {socket.gethostname()}\n".encode())

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def writer_alive(directory: PathLike, writer_id: str) -> bool:
    """Whether the writer `writer_id` still holds its lock (a live process on this host)."""
    path = os.path.join(directory, INTERNAL, "writers", f"{writer_id}.lock")
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def live_writers(directory: PathLike) -> list[str]:
    """The ids of the writers that hold their registration in ``directory`` now."""
    path = os.path.join(directory, INTERNAL, "writers")
    names = sorted(os.listdir(path)) if os.path.isdir(path) else []
    return [n[:-5] for n in names if n.endswith(".lock") and writer_alive(directory, n[:-5])]


def staging_dir(directory: PathLike) -> str:
    return os.path.join(directory, INTERNAL, "staging")


# ---------------------------------------------------------------------------------------------
# dataset_info.json


def shard_filename(template: str, name: str, split: str, index: int, num_shards: int | None,
                   file_format: str = FILE_FORMAT) -> str:
    """Formats a TFDS shard file name template."""
    out = (template.replace("{DATASET}", name).replace("{SPLIT}", split)
           .replace("{FILEFORMAT}", file_format).replace("{SHARD_INDEX}", f"{index:05d}"))
    if "{NUM_SHARDS}" in out or "{SHARD_X_OF_Y}" in out:
        if num_shards is None:
            raise ValueError(f"template {template!r} needs the number of shards")
        out = out.replace("{NUM_SHARDS}", f"{num_shards:05d}")
        out = out.replace("{SHARD_X_OF_Y}", f"{index:05d}-of-{num_shards:05d}")
    return out


def new_dataset_info(name: str, *, version: str = DEFAULT_VERSION, description: str = "",
                     splits: Mapping[str, tuple[list[int], int]] | None = None,
                     template: str = APPEND_TEMPLATE, citation: str = "") -> dict:
    """A ``dataset_info.json`` dict. ``splits`` maps split name to (shard lengths, bytes)."""
    splits = splits if splits is not None else {DEFAULT_SPLIT: ([], 0)}
    return {
        "citation": citation,
        "description": description,
        "fileFormat": FILE_FORMAT,
        "moduleName": "oxe_envlogger",
        "name": name,
        "splits": [{"filepathTemplate": template, "name": s, "numBytes": str(nbytes),
                    "shardLengths": [str(n) for n in lengths]}
                   for s, (lengths, nbytes) in splits.items()],
        "version": version,
    }


def new_metadata(name: str, *, created: str | None = None,
                 sessions: Sequence[Mapping[str, Any]] = ()) -> dict:
    """An ``oxe_envlogger.json`` dict: the format version, the dataset's name, when it was made
    (omitted when None) and its writer sessions."""
    meta: dict[str, Any] = {"format_version": 1, "dataset_name": name}
    if created is not None:
        meta["created"] = created
    meta["sessions"] = [dict(s) for s in sessions]
    return meta


def file_format(info: Mapping[str, Any]) -> str:
    """The shards' file format a ``dataset_info.json`` records (tfrecord where it says none,
    or null)."""
    return info.get("fileFormat") or FILE_FORMAT


def is_tfrecord(info: Mapping[str, Any]) -> bool:
    """Whether a dataset's shards are TFRecord files, the only format read without TFDS."""
    return file_format(info) == FILE_FORMAT


def split_entry(info: dict, split: str, *, create: bool = False) -> dict | None:
    for entry in info.setdefault("splits", []):
        if entry.get("name") == split:
            return entry
    if not create:
        return None
    entry = {"filepathTemplate": APPEND_TEMPLATE, "name": split, "numBytes": "0",
             "shardLengths": []}
    info["splits"].append(entry)
    return entry


def shard_paths(directory: PathLike, info: dict, split: str) -> list[tuple[str, int]]:
    """``[(path, number of episodes)]`` of a split's committed shards, in order."""
    entry = split_entry(info, split)
    if entry is None:
        known = [s.get("name") for s in info.get("splits", [])]
        raise KeyError(f"split {split!r} not in {os.fspath(directory)} (splits: {known})")
    lengths = [int(n) for n in entry.get("shardLengths", [])]
    template = entry.get("filepathTemplate") or DEFAULT_TEMPLATE
    if not is_tfrecord(info):
        raise OXEEnvLoggerError(f"{directory}: file format {file_format(info)!r} is not read here; "
                                "use tfds.builder_from_directory")
    return [(os.path.join(directory, shard_filename(template, info["name"], split, i,
                                                     len(lengths), FILE_FORMAT)), n)
            for i, n in enumerate(lengths)]


def list_splits(info: dict) -> list[str]:
    return [s["name"] for s in info.get("splits", [])]


def is_dataset(directory: PathLike) -> bool:
    return os.path.isfile(os.path.join(directory, DATASET_INFO))


# A shard's file name, in either template: <name>-<split>.tfrecord-<index>[-of-<total>].
_SHARD_NAME_RE = (r"^(?P<name>{name})-(?P<split>[^.]+)\." + FILE_FORMAT
                  + r"-(?P<index>\d{{5,}})(?:-of-(?P<total>\d{{5,}}))?$")
_SHARD_NAME = re.compile(_SHARD_NAME_RE.format(name="[a-zA-Z][a-zA-Z0-9_]*"))


def shard_pattern(name: str) -> re.Pattern:
    """The file names of dataset ``name``'s shards, in either template, of any split."""
    return re.compile(_SHARD_NAME_RE.format(name=re.escape(name)))


def shard_files(directory: str) -> dict[str, dict[str, list[tuple[int, int | None, str]]]]:
    """``{dataset name: {split: [(index, number of shards or None, file name)]}}`` of the shard
    files in ``directory`` (sorted)."""
    found: dict[str, dict[str, list]] = {}
    for entry in sorted(os.listdir(directory)):
        m = _SHARD_NAME.match(entry)
        if m and os.path.isfile(os.path.join(directory, entry)):
            total = int(m["total"]) if m["total"] else None
            found.setdefault(m["name"], {}).setdefault(m["split"], []).append(
                (int(m["index"]), total, entry))
    return found


# Files that describe a dataset besides the shards: its metadata, the resharder's manifest and
# the trainer's statistics caches (openx_train writes dataset_statistics_<key>.json beside the
# data); they are replaced, with the shards and INTERNAL, when the dataset is.
_DATASET_FILES = (DATASET_INFO, FEATURES, METADATA, STATISTICS, RESHARD_MANIFEST)
_CACHE_FILE = re.compile(r"^dataset_statistics_.*\.json$")


def dataset_entries(directory: PathLike, *, also: Sequence[str] = ()) -> list[str]:
    """The names of the entries of ``directory`` that make up its dataset: the shards (listed,
    or named like its shards, or like those of the datasets named ``also``), the metadata files
    (and the temporary files of their atomic writes) and ``.oxe/``. Any other entry (a user's
    ``NOTES.txt``, an ``eval/`` directory, ``quarantine/``) is not the dataset's, and replacing
    the dataset leaves it alone."""
    directory = os.fspath(directory)
    try:
        info = read_json(os.path.join(directory, DATASET_INFO))
    except ValueError:  # unreadable; the names still tell the dataset's files
        info = None
    info = info if isinstance(info, dict) else {}
    listed: set[str] = set()
    for split in list_splits(info):
        with contextlib.suppress(Exception):  # a foreign format or template: by name only
            listed.update(os.path.basename(p) for p, _ in shard_paths(directory, info, split))
    names = set(also) | ({info["name"]} if isinstance(info.get("name"), str) else set())
    meta_name = None
    with contextlib.suppress(ValueError):
        meta_name = (read_json(os.path.join(directory, METADATA)) or {}).get("dataset_name")
    if isinstance(meta_name, str):
        names.add(meta_name)
    patterns = [shard_pattern(n) for n in names]

    def ours(entry: str) -> bool:
        base = entry.split(".tmp-", 1)[0]
        return (entry == INTERNAL or entry in listed or base in _DATASET_FILES
                or bool(_CACHE_FILE.match(entry)) or any(p.match(entry) for p in patterns))

    return sorted(e for e in os.listdir(directory) if ours(e))


def no_dataset_error(directory: PathLike) -> FileNotFoundError:
    """The error for a directory without ``dataset_info.json``; where what is left of a dataset
    is there, it says that recovery rebuilds the file."""
    directory = os.fspath(directory)
    if holds_dataset_remains(directory):
        return FileNotFoundError(
            f"{directory}: {DATASET_INFO} is missing, but {FEATURES} or shards are here; "
            f"tools/recover_rlds.py {directory} rebuilds it")
    return FileNotFoundError(f"{directory}: no {DATASET_INFO}; not a dataset directory")


def find_datasets(root: PathLike) -> list[str]:
    """Every directory under ``root`` (inclusive) holding a ``dataset_info.json``, sorted."""
    root = os.fspath(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != INTERNAL)
        if DATASET_INFO in filenames and FEATURES in filenames:
            found.append(dirpath)
    return sorted(found)


def iter_serialized(directory: PathLike, split: str = DEFAULT_SPLIT, *, verify: bool = True
                    ) -> Iterator[tuple[str, int, bytes]]:
    """Yields ``(shard path, index in shard, serialized episode)`` over committed shards."""
    info = read_json(os.path.join(directory, DATASET_INFO))
    if info is None:
        raise no_dataset_error(directory)
    for path, _ in shard_paths(directory, info, split):
        for i, data in enumerate(record.read_records(path, verify=verify)):
            yield path, i, data


def verify_records(directory: PathLike, splits: Sequence[str] | None = None) -> dict[str, int]:
    """Reads every record of the listed shards (framing and CRCs; nothing is decoded).

    Returns:
      ``{split: number of records}``.

    Raises:
      DamagedShardError: at the first damaged record, naming the file and the byte.
      CorruptDatasetError: when a shard holds another number of records than listed.
    """
    info = read_json(os.path.join(directory, DATASET_INFO))
    if info is None:
        raise no_dataset_error(directory)
    out = {}
    for split in splits if splits is not None else list_splits(info):
        out[split] = 0
        for path, listed in shard_paths(directory, info, split):
            count = sum(1 for _ in record.read_records(path))
            if count != listed:
                raise CorruptDatasetError(f"{path}: {count} records, {DATASET_INFO} lists "
                                          f"{listed}; tools/recover_rlds.py corrects that")
            out[split] += count
    return out


# ---------------------------------------------------------------------------------------------
# Creating, opening and committing


class DatasetDir:
    """Metadata operations on one dataset directory. Every mutation takes :func:`dataset_lock`."""

    def __init__(self, directory: PathLike, name: str, *, split: str = DEFAULT_SPLIT):
        self.path = os.path.abspath(os.fspath(directory))
        self.name = check_dataset_name(name)
        self.split = split

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def lock(self):
        return dataset_lock(self.path)

    def read_info(self) -> dict | None:
        return read_json(self.file(DATASET_INFO))

    def read_features(self) -> dict | None:
        return read_json(self.file(FEATURES))

    def remove_dataset(self) -> None:
        """Deletes everything a dataset consists of (:func:`dataset_entries`, and shards named
        like this one's); other files in the directory stay. Caller holds the lock."""
        for entry in dataset_entries(self.path, also=(self.name,)):
            path = self.file(entry)
            if entry == INTERNAL:  # the lock and the live writers' registrations stay
                shutil.rmtree(staging_dir(self.path), ignore_errors=True)
            elif not os.path.isdir(path) or os.path.islink(path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def ensure(self, features_json: dict, *, description: str = "", version: str = DEFAULT_VERSION,
               metadata: Mapping[str, Any] | None = None) -> bool:
        """Creates the dataset if missing, else checks that its features equal ``features_json``.
        Caller holds the lock. Returns whether the dataset was created.

        Raises:
          FeatureMismatchError: listing each difference.
          DatasetExistsError: when another dataset name lives in the directory.
        """
        info = self.read_info()
        if info is not None:
            existing = self.read_features()
            if info.get("name") != self.name:
                raise DatasetExistsError(
                    f"{self.path} holds dataset {info.get('name')!r}, not {self.name!r}; use "
                    "another directory or the same dataset name")
            if existing is None:
                raise CorruptDatasetError(f"{self.path}: {DATASET_INFO} without {FEATURES}")
            if strip_docs(existing) != strip_docs(features_json):
                raise FeatureMismatchError(
                    f"cannot append to {self.path}: its features differ from the logged ones "
                    "(first: on disk, second: this logger); use another directory or "
                    "overwrite=True", diff_features(existing, features_json))
            if split_entry(info, self.split) is None:
                split_entry(info, self.split, create=True)
                atomic_write_json(self.file(DATASET_INFO), info)
            return False
        os.makedirs(self.path, exist_ok=True)
        atomic_write_json(self.file(FEATURES), features_json)
        meta = new_metadata(self.name, created=now_iso())
        meta.update(metadata or {})
        atomic_write_json(self.file(METADATA), meta)
        atomic_write_json(self.file(DATASET_INFO),
                          new_dataset_info(self.name, version=version, description=description,
                                           splits={self.split: ([], 0)}))
        return True

    def commit_shard(self, staging_path: str, num_episodes: int, num_bytes: int) -> str:
        """Renames a closed staging shard into the dataset and lists it. Caller holds the lock.

        Returns:
          The committed shard's path."""
        info = self.read_info()
        if info is None:
            raise CorruptDatasetError(f"{self.path}: {DATASET_INFO} vanished")
        entry = split_entry(info, self.split, create=True)
        template = entry.get("filepathTemplate") or DEFAULT_TEMPLATE
        if "{SHARD_INDEX}" not in template or "{NUM_SHARDS}" in template or "SHARD_X_OF_Y" in template:
            raise OXEEnvLoggerError(
                f"{self.path}: split {self.split!r} was written as a finished dataset "
                f"({template}); loggers append only to datasets they created")
        index = len(entry["shardLengths"])
        final = self.file(shard_filename(template, self.name, self.split, index, None))
        if os.path.exists(final):
            raise CorruptDatasetError(f"{final} exists but is not listed; run recover first")
        os.rename(staging_path, final)
        fsync_dir(self.path)
        entry["shardLengths"].append(str(num_episodes))
        entry["numBytes"] = str(int(entry.get("numBytes", "0")) + num_bytes)
        atomic_write_json(self.file(DATASET_INFO), info)
        return final

    def update_metadata(self, fn) -> dict:
        """Applies ``fn(meta) -> None`` to ``oxe_envlogger.json`` atomically. Caller holds the lock."""
        meta = read_json(self.file(METADATA)) or new_metadata(self.name)
        fn(meta)
        atomic_write_json(self.file(METADATA), meta)
        return meta


def update_session(meta: dict, session: Mapping[str, Any]) -> None:
    """Replaces (or adds) the session entry with the same ``writer_id``."""
    sessions = meta.setdefault("sessions", [])
    for i, s in enumerate(sessions):
        if s.get("writer_id") == session["writer_id"]:
            sessions[i] = dict(session)
            return
    sessions.append(dict(session))


# ---------------------------------------------------------------------------------------------
# Recovery


def read_info_or_none(directory: str) -> dict | None:
    """``dataset_info.json``, or None when it is missing or not readable JSON."""
    try:
        info = read_json(os.path.join(directory, DATASET_INFO))
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return None
    return info if isinstance(info, dict) else None


def features_problem(directory: PathLike) -> str | None:
    """What is wrong with ``features.json`` (which cannot be rebuilt), or None."""
    try:
        features = read_json(os.path.join(directory, FEATURES))
    except ValueError as e:
        return f"{e}; it cannot be rebuilt from the records: restore it from a copy"
    if features is None:
        return (f"{FEATURES} is missing; it cannot be rebuilt from the records: restore it "
                "from a copy")
    return None


def holds_dataset_remains(directory: PathLike) -> bool:
    """Whether a directory without a readable ``dataset_info.json`` holds what is left of a
    dataset (the file itself, unreadable, ``features.json`` or shard files)."""
    return (os.path.lexists(os.path.join(directory, DATASET_INFO))
            or os.path.lexists(os.path.join(directory, FEATURES))
            or bool(shard_files(directory)))


# Episode ids: ``<writer id>-<index>``, and ``<writer id>-<index>.<part>`` for the later parts
# of an episode that the logger split at its byte budget (see WriterOptions.max_episode_bytes).
_PART_ID = re.compile(r"^([0-9a-f]{12}-\d{6})\.(\d+)$")


def episode_id(writer_id: str, index: int, part: int = 0) -> str:
    """The id of a writer's ``index``-th episode (of its ``part``-th part, when split)."""
    base = f"{writer_id}-{index:06d}"
    return f"{base}.{part}" if part else base


def episode_part(episode_id: str) -> tuple[str, int]:
    """``(group, part)`` of an episode record: for a later part of an episode the logger split,
    the id of its first part and the part's number; else the id itself and 0."""
    m = _PART_ID.match(episode_id)
    return (m.group(1), int(m.group(2))) if m else (episode_id, 0)


def episode_group(episode_id: str) -> str:
    """The episode an episode record belongs to (see :func:`episode_part`)."""
    return episode_part(episode_id)[0]
