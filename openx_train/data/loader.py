"""``make_dataloader``: several datasets mixed into training (or validation) batches.

How it stays fast and small:

* Each dataset is read once (:mod:`oxe_envlogger.format.reader`, numpy, images left unread;
  ``structure.select_structure`` normalizes state and action) into a **step table** held in
  memory: per step the state, action and language, and per camera a byte-range reference to
  the encoded image in its shard (see :mod:`openx_train.data.image_index`), never the image.
* Which frames a batch holds is decided in numpy by :mod:`openx_train.data.sampler`, for every
  loader: a domain by weight, then the next frame of that domain's **index permutation**
  (frame ``p`` of a domain's epoch ``e`` is a stateless bijection of ``p`` keyed by
  ``(seed, domain, e)``; it holds nothing, covers the domain, and gives each process of a
  multi-host run a disjoint share). By default a domain is a dataset;
  ``LoaderConfig.domain_key`` can name an episode field (``"episode_metadata/operator"``)
  instead, so that weights apply to the operators (scenes, robots) inside a dataset.
* A whole batch is gathered at once (``frames.gather_frames``: windows, chunks, masks, goals)
  from the step table. State-only batches are gathered in numpy and never import TensorFlow.
  With cameras, the same indices feed a ``tf.data`` pipeline
  (:mod:`openx_train.data.camera_batches`) that gathers with the same function, reads the
  image bytes by ``pread`` after the shuffle, 16 samples at a time, then decodes, crops,
  resizes and colour-jitters each sample, samples in parallel (one crop for the whole history
  window and the goal).
* Every random draw is stateless, seeded by ``(seed, batch number)``; batch ``b``'s draws
  depend only on them and the domain counters before it, which a loader started at
  ``start_batch`` counts without drawing frames. With ``deterministic=True`` the same seed
  gives the same batches (state-only batches are always deterministic).

Batches are numpy trees (see :func:`make_dataloader`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from openx_train.data import frames
from openx_train.data.cache import read_dataset_info, shard_files
from openx_train.data.config import DATASET_DOMAIN, DatasetConfig, LoaderConfig
from openx_train.data.errors import ConfigError, DatasetFormatError, MissingKeyError
from openx_train.data.image_index import build_image_index
from openx_train.data.leaves import read_spec, step_leaves
from openx_train.data.mixture import resolve_mixture_weights
from openx_train.data.sampler import GOAL, IndexBatch, TrainSampler, uniforms
from openx_train.data.statistics import DatasetStatistics, compute_dataset_statistics
from openx_train.data.structure import ResolvedStructure, resolve_structure, select_structure
from oxe_envlogger.errors import OXEEnvLoggerError
from oxe_envlogger.format import layout, reader, record
from oxe_envlogger.format.specs import Leaf

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
_ALWAYS = ("is_first", "is_last", "is_terminal")  # step keys filters always see
_HOLDOUT_SALT = b"openx_train.validation"
_METADATA_PREFIX = "episode_metadata/"


@dataclasses.dataclass(frozen=True)
class StepTable:
    """Every step of one dataset's episodes (those of this loader's split), in episode order.

    Attributes:
      name: the dataset's name.
      resolved: its structure checked against its keys.
      statistics: the statistics it was normalized with (None when nothing is normalized).
      state: float32 ``[S, D]`` normalized state, or None.
      action: float32 ``[S, A]`` normalized action.
      language: ``[S]`` bytes, or None.
      images: camera name to int64 ``[S, 3]`` references ``(file id, offset, length)``.
      files: the shard files the references point into.
      episode_start: int64 ``[S]``: the row of each step's episode's first step.
      episode_length: int64 ``[S]``: RLDS steps of each step's episode.
      episode_index: int64 ``[S]``: each step's episode index in its split.
      frames: int64 ``[F]``: the rows that are training frames.
      num_episodes: episodes in the table.
      episode_ids: ``[E]`` the episodes' ids, in table order.
      episode_frames: int64 ``[E]``: training frames of each episode (they are ``frames`` in
        order).
      domains: ``[E]`` each episode's value of the loader's domain key (str or int); None
        when the domains are the datasets.
      domain_values: the values of the domain key among every episode read from the source
        split, before the validation hold-out and the ``episodes`` restriction (so the
        training and validation loaders of one config name the same domains).
    """

    name: str
    resolved: ResolvedStructure
    statistics: DatasetStatistics | None
    state: np.ndarray | None
    action: np.ndarray
    language: np.ndarray | None
    images: Mapping[str, np.ndarray]
    files: tuple[str, ...]
    episode_start: np.ndarray
    episode_length: np.ndarray
    episode_index: np.ndarray
    frames: np.ndarray
    num_episodes: int
    episode_ids: tuple[str, ...]
    episode_frames: np.ndarray
    domains: tuple[Any, ...] | None
    domain_values: frozenset[Any]


@dataclasses.dataclass(frozen=True)
class EpisodeRecord:
    """One training episode of a loader (``DataLoader.episodes``).

    Attributes:
      dataset: the dataset's name.
      episode_id: its id (``DatasetConfig(episodes=...)`` takes these).
      domain: the name of its domain.
      frames: its training frames.
    """

    dataset: str
    episode_id: str
    domain: str
    frames: int


def dataset_name(cfg: DatasetConfig) -> str:
    return cfg.name or str(read_dataset_info(cfg.path).get("name") or os.path.basename(cfg.path))


def _held_out(ids: Sequence[bytes], fraction: float, seed: int) -> np.ndarray:
    """Which episodes are validation: a hash of (seed, episode id) below ``fraction``; stable
    when episodes are appended or reordered; at least one episode when ``fraction > 0``, and at
    least one left for training when there are two or more. The parts of an episode that the
    logger split share its first part's id here, so they stay on one side."""
    if fraction <= 0 or not len(ids):
        return np.zeros(len(ids), bool)
    groups = [layout.episode_group(i.decode("utf-8", "replace")).encode() for i in ids]
    u = np.array([int.from_bytes(hashlib.blake2b(
        _HOLDOUT_SALT + str(seed).encode() + b":" + g, digest_size=8).digest(), "little")
        / 2.0**64 for g in groups])
    held = u < fraction
    if not held.any():
        held = u == u.min()  # every part of the episode with the lowest hash
    elif held.all() and u.max() > u.min():
        held = u < u.max()  # the episode with the highest hash stays for training
    return held


def resolve_domain_field(path: str, key: str, name: str) -> tuple[str, Leaf]:
    """The episode field a ``domain_key`` names in one dataset, and its leaf.

    ``key`` is an episode field's path in ``features.json``. OXE datasets nest their metadata
    under ``episode_metadata/``; our logger stores ``set_episode_metadata`` values beside
    ``steps`` (``operator``, not ``episode_metadata/operator``), so a key starting with
    ``episode_metadata/`` that is not in the dataset is looked up without that prefix too:
    ``"episode_metadata/operator"`` works for both.

    Raises:
      MissingKeyError: naming the key and the dataset's episode fields.
      ConfigError: for a field that is not a scalar string, integer or bool.
    """
    leaves = dict(reader.episode_leaves(read_spec(path)))
    field = key.strip("/")
    if field not in leaves and field.startswith(_METADATA_PREFIX):
        field = field[len(_METADATA_PREFIX):]
    if field not in leaves:
        raise MissingKeyError(f"dataset {name!r}: domain_key {key!r} is not an episode field; "
                              f"the dataset's episode fields are {sorted(leaves)}")
    leaf = leaves[field]
    ok = leaf.shape == () and (leaf.kind == "text" or (
        leaf.kind == "tensor" and leaf.encoding == "none" and leaf.dtype.kind in "iub"))
    if not ok:
        raise ConfigError(f"dataset {name!r}: domain_key {key!r}: expected a scalar string, "
                          f"integer or bool episode field, given {leaf.kind} of dtype "
                          f"{leaf.dtype} and shape {leaf.shape}")
    return field, leaf


def _domain_value(value: Any, leaf: Leaf) -> Any:
    if leaf.kind == "text":
        return bytes(value).decode("utf-8", "replace")
    return bool(value) if leaf.dtype.kind == "b" else int(value)


def _source_split(cfg: DatasetConfig, split: str, name: str) -> str:
    if split == "train" or cfg.val_split is None:
        if split == "validation" and not cfg.val_fraction:
            raise ConfigError(f"dataset {name!r}: no validation data; give "
                              "DatasetConfig(val_split=...) or val_fraction")
        return cfg.split
    return cfg.val_split


def build_step_table(cfg: DatasetConfig, config: LoaderConfig, *, split: str = "train",
                     name: str | None = None) -> StepTable:
    """Reads one dataset's (non-image) steps and image references into a :class:`StepTable`.

    Raises:
      ConfigError, MissingKeyError: when the structure does not fit the dataset.
      DatasetFormatError: when the dataset cannot be read or its image index does not match.
    """
    name = name or dataset_name(cfg)
    resolved = resolve_structure(cfg.structure, step_leaves(cfg.path))
    statistics = _statistics(cfg, name)
    source = _source_split(cfg, split, name)
    min_length = max(cfg.min_length, 2 if config.drop_final_step else 1)
    domain = None
    if config.domain_key != DATASET_DOMAIN:
        domain = resolve_domain_field(cfg.path, config.domain_key, name)
    rows = _read_rows(cfg, source, resolved, statistics, domain, min_length)
    domain_values = frozenset(r["domain"] for r in rows) if domain is not None else frozenset()
    rows = _keep_rows(rows, cfg, config, split=split, name=name, min_length=min_length)
    if not rows:
        raise ConfigError(f"dataset {name!r}: no episodes left in split {source!r} after "
                          f"filters and min_length={min_length}")
    cams = [c for c in resolved.cameras if c.key is not None]
    files = _attach_images(rows, cfg, source, cams, name) if cams else ()
    rows = join_split_parts(rows)
    return _assemble(rows, resolved, statistics, config, cams=cams, files=files, name=name,
                     has_domain=domain is not None, domain_values=domain_values)


def _statistics(cfg: DatasetConfig, name: str) -> Any:
    """The statistics the dataset is normalized with: given in its config, or computed."""
    statistics = cfg.statistics
    norm_keys = cfg.structure.normalized_keys()
    if statistics is None and norm_keys:
        statistics = compute_dataset_statistics(cfg.path, split=cfg.split, keys=norm_keys)
    missing = [k for k in norm_keys if k not in statistics]
    if missing:
        raise ConfigError(f"dataset {name!r}: statistics lack the normalized keys {missing}")
    return statistics


def _read_rows(cfg: DatasetConfig, source: str, resolved: ResolvedStructure, statistics: Any,
               domain: tuple[str, Leaf] | None, min_length: int) -> list[dict[str, Any]]:
    """One row per episode (in episode order) with its selected, normalized step columns.

    Episodes are read with :mod:`oxe_envlogger.format.reader` (numpy, images left encoded and
    unread), one record at a time; only the small columns are kept."""
    spec = read_spec(cfg.path)
    leaves = dict(reader.step_leaves(spec))
    keys = {*resolved.load_keys(images=False), *(k for k in _ALWAYS if k in leaves)}
    if cfg.drop_invalid and "invalid" not in dict(reader.episode_leaves(spec)):
        raise MissingKeyError(f"dataset {cfg.path!r}: drop_invalid needs an episode field "
                              "'invalid', which this dataset does not have")
    no_images = dataclasses.replace(resolved, cameras=())
    files = shard_files(cfg.path, source)
    if not files:
        log.warning("%s: split %r has no episodes", cfg.path, source)
    rows = []
    index = 0
    for shard, _ in files:
        for data in record.read_records(shard):
            episode = _decode(data, spec, keys, index, cfg.path)
            index += 1
            if not _kept(episode, cfg, min_length):
                continue
            table = select_structure(episode["steps"], no_images, statistics=statistics)
            row = {"episode_index": episode["episode_index"],
                   "episode_length": episode["episode_length"],
                   "episode_id": _episode_id(episode), "action": table["action"]}
            for column in ("state", "language"):
                if table[column] is not None:
                    row[column] = table[column]
            if domain is not None:
                row["domain"] = _domain_value(reader.get_path(episode, domain[0]), domain[1])
            rows.append(row)
    return rows


def _decode(data: bytes, spec: Any, keys: set[str], index: int, path: str) -> dict[str, Any]:
    """One record as the episode dict filters see (``steps`` with ``step_index``,
    ``episode_index``, ``episode_length`` and the episode fields), numpy."""
    try:
        episode = reader.decode_episode(data, spec, keys=keys, decode_images=False)
    except OXEEnvLoggerError as e:
        raise DatasetFormatError(f"{path}: episode {index}: {e}") from None
    length = len(episode["steps"]["is_first"])
    episode["steps"]["step_index"] = np.arange(length, dtype=np.int32)
    episode["episode_index"] = np.int64(index)
    episode["episode_length"] = np.int32(length)
    return episode


def _kept(episode: Mapping[str, Any], cfg: DatasetConfig, min_length: int) -> bool:
    """``min_length``, ``drop_invalid`` and the dataset's filters (a filter may return a numpy
    or TensorFlow bool, or an array of them: all must hold)."""
    if int(episode["episode_length"]) < min_length:
        return False
    if cfg.drop_invalid and bool(episode["invalid"]):
        return False
    return all(bool(np.all(np.asarray(fn(episode)))) for fn in cfg.filters)


def _episode_id(episode: Mapping[str, Any]) -> str:
    value = episode.get("episode_id")
    if value is None:
        return str(int(episode["episode_index"]))
    return bytes(value).decode("utf-8", "replace")


def _keep_rows(rows: list[dict[str, Any]], cfg: DatasetConfig, config: LoaderConfig, *,
               split: str, name: str, min_length: int) -> list[dict[str, Any]]:
    """The rows of the split asked for: the validation hold-out, then the episodes to keep."""
    if cfg.val_fraction:
        held = _held_out([r["episode_id"].encode() for r in rows], cfg.val_fraction,
                         config.seed)
        keep = held if split == "validation" else ~held
        rows = [r for r, k in zip(rows, keep) if k]
    if cfg.episodes is not None and split == "train":
        # The parts of a split episode are kept with their first part, whose id they share.
        groups = [layout.episode_group(r["episode_id"]) for r in rows]
        unknown = sorted(cfg.episodes - set(groups))
        if unknown:
            raise ConfigError(
                f"dataset {name!r}: {len(unknown)} of the {len(cfg.episodes)} episodes to keep "
                f"are not among its {len(set(groups))} training episodes (after filters, "
                f"min_length={min_length} and the validation hold-out), e.g. {unknown[:3]}")
        rows = [r for r, g in zip(rows, groups) if g in cfg.episodes]
    return rows


def _attach_images(rows: list[dict[str, Any]], cfg: DatasetConfig, source: str, cams,
                   name: str) -> tuple[str, ...]:
    """Adds each row's image references (file, offset, length per frame); returns the files."""
    index = build_image_index(cfg.path, source, [c.key for c in cams])
    for r in rows:
        ep = int(r["episode_index"])
        if ep >= len(index.episode_length) or index.episode_length[ep] != int(r["episode_length"]):
            raise DatasetFormatError(
                f"dataset {name!r}: the image index of episode {ep} does not match its "
                "records (the dataset changed while loading?)")
        r["images"] = {cam.name: index.refs(cam.key, ep) for cam in cams}
    return index.files


def _assemble(rows: list[dict[str, Any]], resolved: ResolvedStructure, statistics: Any,
              config: LoaderConfig, *, cams, files: tuple[str, ...], name: str, has_domain: bool,
              domain_values: frozenset) -> StepTable:
    """Concatenates the rows' columns into the table and indexes its trainable frames."""
    lengths = np.array([int(r["episode_length"]) for r in rows], np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    per_step = np.repeat(np.arange(len(rows)), lengths)
    t = np.arange(int(lengths.sum())) - starts[per_step]
    last_frame = lengths - 1 if config.drop_final_step else lengths
    frames = np.flatnonzero(t < last_frame[per_step]).astype(np.int64)
    episode_frames = np.maximum(last_frame, 0).astype(np.int64)
    images: dict[str, np.ndarray] = {
        cam.name: np.concatenate([r["images"][cam.name] for r in rows]) for cam in cams}
    for cam in resolved.cameras:
        if cam.key is None:
            images[cam.name] = np.zeros((len(per_step), 3), np.int64)
    return StepTable(
        name=name, resolved=resolved, statistics=statistics,
        state=np.concatenate([r["state"] for r in rows]) if resolved.state else None,
        action=np.concatenate([r["action"] for r in rows]),
        language=np.concatenate([r["language"] for r in rows]) if resolved.language else None,
        images=images, files=files, episode_start=starts[per_step],
        episode_length=lengths[per_step],
        episode_index=np.repeat([int(r["episode_index"]) for r in rows], lengths).astype(np.int64),
        frames=frames, num_episodes=len(rows),
        episode_ids=tuple(r["episode_id"] for r in rows), episode_frames=episode_frames,
        domains=tuple(r["domain"] for r in rows) if has_domain else None,
        domain_values=domain_values)


_STEP_COLUMNS = ("action", "state", "language")


def join_split_parts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Joins the parts of an episode the logger split at its byte budget
    (``WriterOptions.max_episode_bytes``) back into one episode, so that history windows and
    action chunks run across the split.

    Part k+1 (id ``<id>.<k+1>``) starts from the observation part k ended on, which part k holds
    as its final step with a zero action: that step is dropped and part k+1 follows. Only runs
    of consecutive parts are joined (a part removed by a filter ends a run). ``rows`` are
    per-episode dicts in dataset order (``episode_id`` as str, ``episode_index``,
    ``episode_length``, per-step columns, ``images`` and ``domain``); the joined episode keeps
    its first part's place, index, id and domain value.
    """
    parts: dict[str, list[tuple[int, int]]] = {}
    for i, r in enumerate(rows):
        group, part = layout.episode_part(r["episode_id"])
        parts.setdefault(group, []).append((part, i))
    if all(len(v) == 1 for v in parts.values()):
        return rows
    runs: list[list[int]] = []  # row positions of each joined episode
    for members in parts.values():
        members.sort()
        run = [members[0]]
        for prev, cur in itertools.pairwise(members):
            if cur[0] == prev[0] + 1:
                run.append(cur)
            else:
                runs.append([i for _, i in run])
                run = [cur]
        runs.append([i for _, i in run])
    runs.sort(key=lambda run: run[0])
    out = []
    for run in runs:
        if len(run) == 1:
            out.append(rows[run[0]])
            continue
        pieces = [rows[i] for i in run]
        joined = dict(pieces[0])
        joined["episode_length"] = sum(int(p["episode_length"]) for p in pieces) - len(run) + 1
        for key in _STEP_COLUMNS:
            if key in joined:
                joined[key] = _join_columns([p[key] for p in pieces])
        if "images" in joined:
            joined["images"] = {cam: _join_columns([p["images"][cam] for p in pieces])
                                for cam in joined["images"]}
        out.append(joined)
    return out


def _join_columns(columns: list[np.ndarray]) -> np.ndarray:
    """One column of consecutive parts: each part's final step, repeated as the next part's
    first, is dropped."""
    return np.concatenate([c[:-1] for c in columns[:-1]] + [columns[-1]])


def _check_compatible(tables: Sequence[StepTable]) -> None:
    first = tables[0]

    def sig(t: StepTable):
        return {"state dim": t.resolved.state_dim, "action dim": t.resolved.action_dim,
                "cameras": {c.name: c.size for c in t.resolved.cameras}}

    for t in tables[1:]:
        a, b = sig(first), sig(t)
        for k in a:
            if a[k] != b[k]:
                raise ConfigError(f"datasets {first.name!r} and {t.name!r} cannot share batches: "
                                  f"{k} {a[k]} vs {b[k]}")


@dataclasses.dataclass(frozen=True)
class _Domains:
    """The loader's domains: names, frames and weights per domain, and each frame's domain."""

    names: tuple[str, ...]
    frames: np.ndarray  # int64 [K]
    weights: np.ndarray  # float64 [K], sampling probabilities
    of_episode: list[np.ndarray]  # per table, int32 [E]: each episode's domain
    of_frame: np.ndarray  # int32 [F]: the domain of each frame, datasets in order


def _assign_domains(tables: Sequence[StepTable], config: LoaderConfig, *, train: bool
                    ) -> _Domains:
    """Domain names (datasets, or the sorted distinct values of the domain key across the
    mixture), each episode's and frame's domain, and the sampling weights per domain.

    Raises:
      ConfigError: for weights that do not fit the domains, a domain with weight but no
        training frames, or a domain key with string values in one dataset and numbers in
        another.
    """
    key = config.domain_key
    if key == DATASET_DOMAIN:
        names = tuple(t.name for t in tables)
        of_episode = [np.full(t.num_episodes, i, np.int32) for i, t in enumerate(tables)]
    else:
        values = set().union(*(t.domain_values for t in tables))
        if len({isinstance(v, str) for v in values}) > 1:
            kinds = {t.name: sorted({type(v).__name__ for v in t.domain_values})
                     for t in tables}
            raise ConfigError(f"domain_key {key!r}: expected one kind of value across the "
                              f"mixture (strings, or integers and bools), given {kinds}")
        ordered = sorted(values)
        index = {v: i for i, v in enumerate(ordered)}
        names = tuple(str(v) for v in ordered)
        of_episode = [np.array([index[v] for v in t.domains], np.int32) for t in tables]
    of_frame = np.concatenate([np.repeat(d, t.episode_frames)
                               for d, t in zip(of_episode, tables)]).astype(np.int32)
    frames = np.bincount(of_frame, minlength=len(names)).astype(np.int64)
    kind = "dataset" if key == DATASET_DOMAIN else "domain"
    weights = resolve_mixture_weights(config.weights, names, frames.tolist(), kind=kind)
    if train and key != DATASET_DOMAIN and config.weights == "uniform" and frames.any() \
            and not frames.all():
        # "uniform" names no domain: it is uniform over the domains that have training frames.
        # A domain can be left without any when the validation hold-out (by episode id) takes
        # all of its episodes; its id and name stay, for validation batches.
        log.warning("domain_key %r: domains %s have no training frames (all their episodes "
                    "are held out or filtered); uniform weights leave them out", key,
                    [n for n, c in zip(names, frames) if c == 0])
        weights = np.where(frames > 0, weights, 0.0)
        weights = weights / weights.sum()
    empty = [n for n, w, c in zip(names, weights, frames) if w > 0 and c == 0]
    if empty and train:  # a validation pass samples nothing by weight
        what = "datasets" if key == DATASET_DOMAIN else f"domains of {key!r}"
        raise ConfigError(f"make_dataloader: {what} {empty} have weight but no frames")
    return _Domains(names, frames, weights, of_episode, of_frame)


class DataLoader:
    """An iterable of numpy batches, with what the trainer needs to know about them.

    Attributes:
      dataset: with cameras, the underlying ``tf.data.Dataset`` of batches (tensors); a
        state-only loader has none (it gathers its batches in numpy, without TensorFlow).
      split: ``"train"`` (endless) or ``"validation"`` (one pass).
      names: dataset names, indexed by ``dataset_id``.
      weights: sampling probability of each dataset (training); with a metadata
        ``domain_key``, what the domain weights give each dataset.
      num_frames: training frames of each dataset (this split, before the process shard).
      num_episodes: episodes of each dataset (this split).
      domain_key: ``LoaderConfig.domain_key``.
      domain_names: the domains, indexed by ``domain_id`` (the dataset names when
        ``domain_key="dataset"``).
      domain_frames: frames of each domain (this split, before the process shard).
      domain_weights: sampling probability of each domain (training).
      episodes: every episode of this split as an :class:`EpisodeRecord` (dataset, id,
        domain, frames), datasets in order, each in its order.
      statistics: per dataset name, the statistics its state and action were normalized with
        (use ``frames.unnormalize`` to turn predicted actions back).
      config: the loader options.
    """

    def __init__(self, source: _NumpyBatches | Any, *, split: str, frames: _Frames,
                 config: LoaderConfig, num_batches: int | None):
        tables, domains = frames.tables, frames.domains
        self._source = source
        self._frames = frames
        self.dataset = getattr(source, "dataset", None)
        self.split = split
        self.names = tuple(t.name for t in tables)
        self.num_frames = tuple(len(t.frames) for t in tables)
        self.num_episodes = tuple(t.num_episodes for t in tables)
        self.domain_key = config.domain_key
        self.domain_names = domains.names
        self.domain_frames = tuple(int(c) for c in domains.frames)
        self.domain_weights = domains.weights
        if config.domain_key == DATASET_DOMAIN:
            self.weights = domains.weights
        else:
            # P(dataset d) = sum_k P(domain k) * (frames of k in d) / (frames of k)
            dataset_of_frame = np.repeat(np.arange(len(tables)), self.num_frames)
            share = np.zeros((len(tables), len(domains.names)))
            np.add.at(share, (dataset_of_frame, domains.of_frame), 1.0)
            self.weights = share / np.maximum(domains.frames, 1) @ domains.weights
        self.episodes = tuple(
            EpisodeRecord(t.name, i, domains.names[d], int(f))
            for t, ds in zip(tables, domains.of_episode)
            for i, d, f in zip(t.episode_ids, ds, t.episode_frames))
        self.statistics = {t.name: t.statistics for t in tables}
        self.structures = {t.name: t.resolved.structure for t in tables}
        self.config = config
        self._num_batches = num_batches

    def frame_pass(self) -> DataLoader:
        """One pass over every frame of this loader's split, in order: each frame once, of all
        processes' shares (not only this process's), in full batches whose last one is filled
        with ``valid=False`` rows, without augmentation, each frame under the ``row`` it has in
        this loader's batches. Goals (``goal_relabeling``) are drawn as a validation pass draws
        them, so only the goal may differ from a training batch's sample of the same row.

        For a computation per frame of the training frames (Re-Mix caches its reference's
        losses by ``row``).
        """
        config = dataclasses.replace(self.config, process_index=0, process_count=1,
                                     remainder="pad", start_batch=0)
        f = self._frames
        passes, num_batches = _validation_batches(config, f.rows, f.counts, self.names,
                                                  f.domains.of_frame)
        source = _batch_source(functools.partial(_pass_blocks, passes), f, config,
                               train=False, fixed=config.batch_size)
        return DataLoader(source, split=self.split, frames=f, config=config,
                          num_batches=num_batches)

    @property
    def element_spec(self) -> Any:
        """The batches' structure: leaves with ``shape`` and ``dtype`` (``None`` for a batch
        dimension that varies)."""
        return self._source.element_spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._source)

    def blocks(self, size: int) -> Iterator[dict[str, Any]]:
        """The batches, ``size`` of them stacked per leaf (``[size, B, ...]``); a last
        incomplete block is dropped."""
        return self._source.blocks(size)

    def __len__(self) -> int:
        if self._num_batches is None:
            raise TypeError("a training DataLoader never ends; it has no length")
        return self._num_batches


def _concat_tables(tables: Sequence[StepTable]) -> tuple[dict[str, Any], list[str], np.ndarray]:
    """Stacks the tables into one (global rows and file ids); returns the numpy table, the
    files and the frame rows of all datasets, in order."""
    row_base = np.concatenate([[0], np.cumsum([len(t.action) for t in tables])[:-1]]).astype(
        np.int64)
    files: list[str] = []
    file_base = []
    for t in tables:
        file_base.append(len(files))
        files.extend(t.files)
    table: dict[str, Any] = {
        "action": np.concatenate([t.action for t in tables]).astype(np.float32, copy=False),
        "episode_start": np.concatenate([t.episode_start + b for t, b in zip(tables, row_base)]),
        "episode_length": np.concatenate([t.episode_length for t in tables]),
        "episode_index": np.concatenate([t.episode_index for t in tables]),
        "state": None, "language": None, "images": {},
    }
    if tables[0].state is not None:
        table["state"] = np.concatenate([t.state for t in tables]).astype(np.float32, copy=False)
    if any(t.language is not None for t in tables):
        table["language"] = np.concatenate(
            [t.language if t.language is not None else np.full(len(t.action), b"", object)
             for t in tables])
    for cam in tables[0].resolved.cameras:
        refs = []
        for t, fb in zip(tables, file_base):
            r = t.images[cam.name].copy()
            r[:, 0] += fb
            refs.append(r)
        table["images"][cam.name] = np.concatenate(refs).astype(np.int64, copy=False)
    frames = np.concatenate([t.frames + b for t, b in zip(tables, row_base)]).astype(np.int64)
    return table, files, frames


def _train_sampler(config: LoaderConfig, domains: _Domains, frames: np.ndarray,
                   num_frames: Sequence[int]) -> TrainSampler:
    """The training index sampler: domains drawn by weight, frames in a fresh permutation of
    each domain per epoch, this process's share only. (With ``domain_key="dataset"`` the
    domains are the datasets.)"""
    order = np.argsort(domains.of_frame, kind="stable")  # frames grouped by domain
    dataset_of_frame = np.repeat(np.arange(len(num_frames), dtype=np.int32), num_frames)
    return TrainSampler(weights=np.asarray(domains.weights, np.float64),
                        domain_frames=np.asarray(domains.frames, np.int64),
                        frame_rows=frames[order], frame_datasets=dataset_of_frame[order],
                        batch_size=config.batch_size, seed=config.seed,
                        process_index=config.process_index,
                        process_count=config.process_count, goals=config.goal_relabeling)


def _validation_batches(config: LoaderConfig, frames: np.ndarray, counts: np.ndarray,
                        names: Sequence[str], frame_domain: np.ndarray
                        ) -> tuple[list[IndexBatch], int]:
    """One pass of index batches: every dataset's frames in order, this process taking every ``process_count``-th one (so the
    processes' shares are disjoint and cover every frame), batched as ``config.remainder`` says.

    Raises:
      ConfigError: with ``remainder="drop"``, when not one full batch would come.
    """
    size, count = config.batch_size, config.process_count
    ids = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    first = (ids[:1], frames[:1], frame_domain[:1])  # a real frame to pad with
    mine = slice(config.process_index, None, count)
    ids, rows, domain_ids = ids[mine], frames[mine], frame_domain[mine]
    valid = np.ones(len(rows), bool)
    total = len(frames)
    if config.remainder == "partial":
        num_batches = -(-len(rows) // size)
    else:
        # Every process gets the same number of batches (a multi-host step runs in lockstep):
        # as many as the largest share fills (padding the others), or the smallest fills.
        if config.remainder == "pad":
            largest_share = -(-total // count)
            num_batches = -(-largest_share // size)
        else:
            num_batches = (total // count) // size
            if num_batches == 0:
                frames_of = ", ".join(f"{n!r}: {c}" for n, c in zip(names, counts))
                per_process = f" ({total // count} per process of {count})" if count > 1 else ""
                raise ConfigError(
                    f"validation: remainder='drop' keeps full batches only, and the validation "
                    f"frames ({frames_of}; {total} in all{per_process}) do not fill one batch of "
                    f"batch_size={size}; use LoaderConfig(remainder='partial') (a last smaller "
                    "batch) or 'pad' (a full batch with valid=False rows), or a smaller "
                    "batch_size")
        fill = num_batches * size - len(rows)
        if fill < 0:
            log.info("validation: remainder='drop' skips the last %d of this process's %d "
                     "frames", -fill, len(rows))
        ids = np.concatenate([ids, np.repeat(first[0], max(fill, 0))])[: num_batches * size]
        rows = np.concatenate([rows, np.repeat(first[1], max(fill, 0))])[: num_batches * size]
        valid = np.concatenate([valid, np.zeros(max(fill, 0), bool)])[: num_batches * size]
        domain_ids = np.concatenate([domain_ids, np.repeat(first[2], max(fill, 0))])[
            : num_batches * size]
    goals = uniforms(config.seed, GOAL, np.arange(num_batches), size) \
        if config.goal_relabeling else None
    out = [IndexBatch(b, ids[lo:lo + size], rows[lo:lo + size], valid[lo:lo + size],
                      domain_ids[lo:lo + size],
                      None if goals is None else goals[b, : len(rows[lo:lo + size])])
           for b, lo in enumerate(range(0, num_batches * size, size))]
    return out, num_batches


#: Index batches of a loader: called with a block size ``k`` (default 1), the batches with ``k``
#: consecutive ones concatenated per item (the training sampler's ``iterate``, or
#: :func:`_pass_blocks` of a pass).
IndexSource = Callable[..., Iterator[IndexBatch]]


def _pass_blocks(passes: Sequence[IndexBatch], size: int = 1) -> Iterator[IndexBatch]:
    """A pass's index batches, ``size`` consecutive ones concatenated per item; a last
    incomplete block, or one whose batches differ in size, is dropped."""
    if size == 1:
        yield from passes
        return
    for lo in range(0, len(passes) - size + 1, size):
        group = passes[lo:lo + size]
        if len({len(g.rows) for g in group}) > 1:
            return
        yield IndexBatch(group[0].number, *(
            None if group[0].goal_uniform is None and f == "goal_uniform"
            else np.concatenate([getattr(g, f) for g in group])
            for f in ("dataset_ids", "rows", "valid", "domain_ids", "goal_uniform")))


def make_dataloader(
    datasets: DatasetConfig | Sequence[DatasetConfig],
    config: LoaderConfig | None = None,
    *,
    split: str = "train",
) -> DataLoader:
    """Mixed, shuffled, decoded, augmented batches of one or more datasets.

    Each batch (numpy) is::

        {"observation": {"state": float32 [B, n_obs, D],       # when the structure has state
                         <camera>: uint8 [B, n_obs, h, w, 3],   # one per camera
                         "pad_mask": bool [B, n_obs],           # False before the episode start
                         "pad_mask_dict": {"state" | <camera>: bool [B, n_obs]}},
                                                                # also False for a missing camera
         "action": float32 [B, n_action, A],
         "action_pad_mask": bool [B, n_action],                 # False past the episode end
         "language_instruction": bytes [B],                     # when a dataset has language
         "goal": {"state": [B, D], <camera>: [B, h, w, 3]},     # with goal_relabeling
         "goal_step_index": int32 [B],                          # with goal_relabeling
         "dataset_id": int32 [B],                               # index into DataLoader.names
         "domain_id": int32 [B],                        # index into DataLoader.domain_names
         "episode_index": int64 [B], "step_index": int32 [B],
         "row": int64 [B],              # the frame's row in the loader's table of every step
         "valid": bool [B]}                                     # False: padding (see below)

    A validation pass yields every validation frame once, in order. Its last batch is smaller
    by default; with ``LoaderConfig(remainder="pad")`` it is filled to ``batch_size`` with rows
    whose ``valid`` is False (weight the loss by it), so every batch has the same shape and
    every process the same number of batches; with ``"drop"`` only full batches come. Training
    batches are always full and valid.

    Windows repeat the first observation and chunks the last action where they are padded.
    State and action are normalized with each dataset's statistics (``DataLoader.statistics``).

    Domains (``LoaderConfig.domain_key``): with ``"dataset"`` each dataset is a domain and
    ``domain_id == dataset_id``. With an episode field (``"episode_metadata/operator"``, which
    also finds our logger's ``operator``, see :func:`resolve_domain_field`) each distinct value
    across the mixture is a domain, named ``str(value)``, sorted (numbers numerically); the
    values are taken from every episode read, before the validation hold-out and the
    ``episodes`` restriction, so the training and validation loaders of one config agree (a
    domain may then have no frames in one of them). Training draws a domain by
    ``LoaderConfig.weights`` (per domain: ``"size"`` is every frame alike, ``"uniform"`` every
    domain alike), then the next frame of that domain's permutation, wherever the dataset.

    Args:
      datasets: the datasets to mix (names must be unique).
      config: batching options (:class:`~openx_train.data.LoaderConfig`).
      split: ``"train"``: an endless stream mixed by weight; ``"validation"``: one pass over
        every dataset's validation frames, in order, without augmentation.

    Returns:
      A :class:`DataLoader`.

    Raises:
      ConfigError, MissingKeyError: for options or structures that do not fit the datasets.
      DatasetFormatError: for a dataset that cannot be read.
    """
    config = config or LoaderConfig()
    if split not in SPLITS:
        raise ConfigError(f"make_dataloader split: expected one of {SPLITS}, given {split!r}")
    if isinstance(datasets, DatasetConfig):
        datasets = [datasets]
    datasets = list(datasets)
    if not datasets:
        raise ConfigError("make_dataloader: expected at least one DatasetConfig, given none")
    names = [dataset_name(d) for d in datasets]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"make_dataloader: dataset names {dupes} appear twice; give "
                          "DatasetConfig(name=...) to tell them apart")
    tables = [build_step_table(d, config, split=split, name=n) for d, n in zip(datasets, names)]
    _check_compatible(tables)
    counts = np.array([len(t.frames) for t in tables], np.int64)
    domains = _assign_domains(tables, config, train=split == "train")
    table, files, frames = _concat_tables(tables)
    train = split == "train"
    if train:
        sampler = _train_sampler(config, domains, frames, counts.tolist())
        index_batches = functools.partial(sampler.iterate, config.start_batch)
        num_batches = None
    else:
        passes, num_batches = _validation_batches(config, frames, counts, names,
                                                  domains.of_frame)
        index_batches = functools.partial(_pass_blocks, passes)
    fixed = config.batch_size if train or config.remainder != "partial" else None
    f = _Frames(table, files, tuple(tables), domains, frames, counts)
    source = _batch_source(index_batches, f, config, train=train, fixed=fixed)
    log.info("data loader (%s): %s", split, ", ".join(
        f"{n}: {c} frames, weight {w:.3f}"
        for n, c, w in zip(domains.names, domains.frames, domains.weights)))
    return DataLoader(source, split=split, frames=f, config=config, num_batches=num_batches)


@dataclasses.dataclass(frozen=True)
class _Frames:
    """What a loader's batches are gathered from: the stacked step table, its files, the
    per-dataset tables, the domains, and the frame rows (datasets in order) with their count
    per dataset."""

    table: dict[str, Any]
    files: list[str]
    tables: tuple[StepTable, ...]
    domains: _Domains
    rows: np.ndarray  # int64 [F]
    counts: np.ndarray  # int64 [datasets]


def _batch_source(index_batches: IndexSource, f: _Frames, config: LoaderConfig, *,
                  train: bool, fixed: int | None) -> Any:
    """Batches of the index batches: gathered in numpy (state only), or by the camera
    ``tf.data`` pipeline."""
    if f.tables[0].resolved.cameras:
        from openx_train.data import camera_batches  # TensorFlow: only with cameras

        indices = camera_batches.index_dataset(index_batches, fixed)
        return _TFBatches(camera_batches.camera_batches(indices, f.table, f.files, f.tables,
                                                        config, train=train))
    return _NumpyBatches(f.table, index_batches, config, fixed_size=fixed)


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """The shape (``None`` for a batch dimension that varies) and dtype of a batch leaf."""

    shape: tuple[int | None, ...]
    dtype: np.dtype


class _NumpyBatches:
    """State-only batches gathered in numpy from the step table (no TensorFlow): a batch is a
    few vectorized gathers (``frames.gather_frames``), a block of batches one gather."""

    def __init__(self, table: Mapping[str, Any], index_batches: IndexSource,
                 config: LoaderConfig, *, fixed_size: int | None):
        self._table = table
        self._index_batches = index_batches
        self._config = config
        self._fixed_size = fixed_size

    def gather(self, ib: IndexBatch) -> dict[str, Any]:
        """The batch of one index batch (or of several concatenated)."""
        t, rows, c = self._table, ib.rows, self._config
        out = frames.gather_frames(t, rows, t["episode_start"][rows], t["episode_length"][rows],
                                   n_obs=c.n_obs, n_action=c.n_action,
                                   goal_uniform=ib.goal_uniform,
                                   final_action_is_padding=c.drop_final_step)
        obs = out["observation"]
        obs["pad_mask_dict"] = {"state": obs["pad_mask"]} if t["state"] is not None else {}
        out["dataset_id"] = ib.dataset_ids
        out["domain_id"] = ib.domain_ids
        out["episode_index"] = t["episode_index"][rows]
        out["row"] = rows
        out["valid"] = ib.valid
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for ib in self._index_batches():
            yield self.gather(ib)

    def blocks(self, size: int) -> Iterator[dict[str, Any]]:
        for merged in self._index_batches(size):  # a block's indices drawn at once
            n = len(merged.rows) // size
            yield tree_map(lambda x, n=n: x.reshape(size, n, *x.shape[1:]), self.gather(merged))

    @property
    def element_spec(self) -> dict[str, Any]:
        first = self.gather(next(iter(self._index_batches())))
        return tree_map(lambda x: ArraySpec((self._fixed_size, *x.shape[1:]), x.dtype), first)


class _TFBatches:
    """Camera batches: a ``tf.data`` pipeline (see :mod:`openx_train.data.camera_batches`)."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.dataset.as_numpy_iterator()

    def blocks(self, size: int) -> Iterator[dict[str, Any]]:
        return self.dataset.batch(size, drop_remainder=True).prefetch(1).as_numpy_iterator()

    @property
    def element_spec(self) -> Any:
        return self.dataset.element_spec


def tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    """``fn`` on every leaf of nested dicts."""
    if isinstance(tree, Mapping):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    return fn(tree)
