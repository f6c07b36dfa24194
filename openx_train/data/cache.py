"""Caches derived from a dataset (statistics, image byte ranges), keyed so that a stale one is
never used.

The key is a fingerprint of the split's data files: the dataset name and features, and for every
committed shard its name, episode count, size, modification time and the hash of its first and
last 64 KiB (which hold the first and last records with their CRCs). Appending episodes, writing a
new dataset over an old one or resharding all change it; reading it costs two small reads per
shard, not a pass over the data. A cache lives beside the data (``<prefix>_<key>.<ext>``) when the
directory is writable, else under ``$OPENX_TRAIN_CACHE_DIR`` or ``~/.cache/openx_train``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable

from openx_train.data.errors import DatasetFormatError
from oxe_envlogger.errors import OXEEnvLoggerError
from oxe_envlogger.format import layout

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
FORMAT_VERSION = 1
_SAMPLE_BYTES = 1 << 16


def read_dataset_info(path: PathLike) -> dict:
    """``dataset_info.json`` of a dataset directory.

    Raises:
      DatasetFormatError: when the directory holds no dataset.
    """
    info = layout.read_json(os.path.join(path, layout.DATASET_INFO))
    if info is None:
        raise DatasetFormatError(f"{os.fspath(path)}: no {layout.DATASET_INFO}; expected an "
                                 "RLDS/TFDS dataset directory")
    return info


def shard_files(path: PathLike, split: str) -> list[tuple[str, int]]:
    """``[(shard path, number of episodes)]`` of a split, in order.

    Raises:
      DatasetFormatError: for a missing split or a file format other than tfrecord.
    """
    info = read_dataset_info(path)
    try:
        return layout.shard_paths(path, info, split)
    except KeyError as e:
        raise DatasetFormatError(str(e).strip("'\"")) from None
    except OXEEnvLoggerError as e:  # another file format (array_record)
        raise DatasetFormatError(f"{os.fspath(path)}: {e}") from e


def dataset_fingerprint(path: PathLike, split: str, extra: Iterable[str] = ()) -> str:
    """A hex key that changes whenever the split's data files (or ``extra``) change."""
    path = os.fspath(path)
    info = read_dataset_info(path)
    h = hashlib.sha256()
    features = os.path.join(path, layout.FEATURES)
    with open(features, "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
    h.update(json.dumps([FORMAT_VERSION, info.get("name"), split, sorted(extra)]).encode())
    for shard, n in shard_files(path, split):
        try:
            st = os.stat(shard)
        except FileNotFoundError:
            raise DatasetFormatError(f"{path}: shard {os.path.basename(shard)} of split "
                                     f"{split!r} is listed but missing") from None
        h.update(f"{os.path.basename(shard)}|{n}|{st.st_size}|{st.st_mtime_ns}|".encode())
        with open(shard, "rb") as f:
            h.update(f.read(_SAMPLE_BYTES))
            if st.st_size > _SAMPLE_BYTES:
                f.seek(max(_SAMPLE_BYTES, st.st_size - _SAMPLE_BYTES))
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()[:20]


def user_cache_dir(path: PathLike) -> str:
    """The cache directory for a dataset whose own directory is not writable."""
    root = os.environ.get("OPENX_TRAIN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "openx_train")
    digest = hashlib.sha256(os.path.abspath(os.fspath(path)).encode()).hexdigest()[:16]
    return os.path.join(root, f"{os.path.basename(os.path.abspath(path))}-{digest}")


def cache_candidates(path: PathLike, filename: str) -> list[str]:
    """Where a cache file may be: beside the data, then the user cache directory."""
    return [os.path.join(os.fspath(path), filename), os.path.join(user_cache_dir(path), filename)]


def find_cached(path: PathLike, filename: str) -> str | None:
    for candidate in cache_candidates(path, filename):
        if os.path.isfile(candidate):
            return candidate
    return None


def write_cached(path: PathLike, filename: str, data: bytes) -> str | None:
    """Writes a cache file atomically beside the data, else in the user cache directory.

    Returns the path written, or None when neither place is writable (the cache is then only
    skipped: a warning is logged and the caller keeps its result)."""
    for candidate in cache_candidates(path, filename):
        directory = os.path.dirname(candidate)
        try:
            os.makedirs(directory, exist_ok=True)
            if not os.access(directory, os.W_OK):
                continue
            layout.atomic_write_bytes(candidate, data)
            return candidate
        except OSError as e:
            log.debug("cannot write cache %s: %s", candidate, e)
    log.warning("no writable place for the cache %s of %s", filename, os.fspath(path))
    return None
