"""Stage 3: every episode ref, in the merged order -> filtered, relabelled, split and packed into
:class:`ShardTask` s by the byte budget.

Part of :mod:`oxe_envlogger.datasets.reshard` (see there for the stages).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterable

from oxe_envlogger.datasets.reshard.inputs import Inputs
from oxe_envlogger.datasets.reshard.options import ReshardOptions
from oxe_envlogger.datasets.reshard.scan import EpisodeRef, entry_size, example_size
from oxe_envlogger.datasets.reshard.transform import Transform
from oxe_envlogger.format import layout, record

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PlannedEpisode:
    """One output episode: its source, and the language to write (None: as it is)."""

    ref: EpisodeRef
    global_index: int
    language: str | None
    changes: str  # "", or what changes joined by "+": "features", "float64", "language"
    size: int  # framed output size


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One output shard to write."""

    split: str
    index: int
    filename: str
    episodes: tuple[PlannedEpisode, ...]

    @property
    def num_bytes(self) -> int:
        return sum(e.size for e in self.episodes)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything :func:`write_shard` and :func:`finalize` need."""

    name: str
    inputs: Inputs
    transform: Transform
    features: dict
    splits: tuple[str, ...]
    tasks: tuple[ShardTask, ...]
    skipped: tuple[tuple[int, EpisodeRef, str], ...]
    options: ReshardOptions
    unmatched_language_keys: tuple[str, ...]

    @property
    def num_episodes(self) -> int:
        return sum(len(t.episodes) for t in self.tasks)

    @property
    def num_bytes(self) -> int:
        return sum(t.num_bytes for t in self.tasks)


def _language_payload(text: str, ref: EpisodeRef, language_key: str) -> bytes:
    n = ref.num_steps if language_key.startswith("steps/") else 1
    return record.bytes_list_payload([text.encode("utf-8")] * n)


def _output_size(ref: EpisodeRef, transform: Transform, language: bytes | None) -> int:
    """The framed size of the episode after :func:`transform_record`; mirrors it exactly."""
    entries: dict[str, int] = {}
    for key, n in (*ref.touched, *ref.float64):
        new = transform.output_key(key)
        if new is not None:
            entries[new] = n
    if language is not None:
        entries[transform.language_key] = len(language)
    body = ref.base_size + sum(entry_size(k, n) for k, n in entries.items())
    return record.framed_size(example_size(body))


def _episode_group(ref: EpisodeRef, global_index: int) -> str:
    """The episode an episode record belongs to (see :func:`layout.episode_group`); the merged
    index where there is no id."""
    return layout.episode_group(ref.episode_id) if ref.episode_id else f"#{global_index}"


def _validation_rank(seed: int, group: str) -> bytes:
    # Keyed by the episode id where there is one, so that an episode keeps its side when
    # other datasets join the merge.
    return hashlib.sha256(f"{seed}\0{group}".encode()).digest()


def _choose_validation(kept: list[PlannedEpisode], k: int, seed: int) -> set[int]:
    """Indices into ``kept`` of about ``k`` validation episodes, chosen by a seeded hash of each
    episode's group, so that the parts of a split episode stay on one side."""
    groups = [_episode_group(e.ref, e.global_index) for e in kept]
    ranked = sorted(range(len(kept)), key=lambda i: _validation_rank(seed, groups[i]))
    chosen: set[int] = set()
    chosen_groups: set[str] = set()
    for i in ranked:  # the parts of a group are adjacent: they share its rank
        if len(chosen) >= k and groups[i] not in chosen_groups:
            break
        chosen.add(i)
        chosen_groups.add(groups[i])
    return chosen


def build_plan(inputs: Inputs, refs: Iterable[EpisodeRef], options: ReshardOptions,
               transform: Transform, features: dict) -> Plan:
    """Filters, relabels, splits and packs the episodes (in any order; sorted here).

    Raises:
      ValueError: for ``skip_episodes`` out of range, or when no episode is left.
    """
    order = {(s.source, s.split, s.shard): i for i, s in enumerate(inputs.shards)}
    refs = sorted(refs, key=lambda r: (order[(r.source, r.split, r.shard)], r.index))
    kept, skipped, unmatched = _select(refs, options, transform)
    splits = _split_validation(kept, options)
    name = options.dataset_name or inputs.sources[0].name
    tasks = _pack(splits, name, options)
    return Plan(name, inputs, transform, features, tuple(splits), tuple(tasks), tuple(skipped),
                options, unmatched)


def _select(refs: list[EpisodeRef], options: ReshardOptions, transform: Transform
            ) -> tuple[list[PlannedEpisode], list[tuple[int, EpisodeRef, str]], tuple[str, ...]]:
    """``(kept, skipped, unmatched language_map keys)``: the episodes (in the merged order) left
    after ``skip_episodes`` and ``drop_invalid``, each with its new language and output size."""
    total = len(refs)
    skip = {int(i) for i in options.skip_episodes}
    beyond = sorted(i for i in skip if i >= total)
    if beyond:
        raise ValueError(f"skip_episodes {beyond}: the inputs hold {total} episodes "
                         f"(indices 0..{total - 1})")
    lang_map = {str(k): v for k, v in (options.language_map or {}).items()}
    used_keys: set[str] = set()
    kept, skipped = [], []
    for gi, ref in enumerate(refs):
        if gi in skip:
            skipped.append((gi, ref, "skip_episodes"))
            continue
        if options.drop_invalid and ref.invalid:
            skipped.append((gi, ref, "invalid"))
            continue
        text = None
        if ref.episode_id is not None and ref.episode_id in lang_map:
            text = lang_map[ref.episode_id]
            used_keys.add(ref.episode_id)
        elif str(gi) in lang_map:
            text = lang_map[str(gi)]
            used_keys.add(str(gi))
        elif options.relabel_language is not None:
            text = options.relabel_language
        elif transform.language_added:
            text = ""
        payload = None
        if text is not None:
            payload = _language_payload(text, ref, transform.language_key)
            if payload == ref.language and not transform.changes_features:
                text, payload = None, None  # already says so: copy the record unchanged
        parts = ((["features"] if transform.changes_features else [])
                 + (["float64"] if ref.float64 else [])
                 + (["language"] if text is not None else []))
        size = (_output_size(ref, transform, payload) if parts
                else record.framed_size(ref.length))
        kept.append(PlannedEpisode(ref, gi, text, "+".join(parts), size))
    if not kept:
        raise ValueError(f"no episode left of {total} (skipped: {len(skipped)})")
    unmatched = tuple(sorted(set(lang_map) - used_keys))
    if unmatched:
        log.warning("language_map: %d keys match no episode id or index: %s", len(unmatched),
                    list(unmatched[:10]))
    return kept, skipped, unmatched


def _split_validation(kept: list[PlannedEpisode], options: ReshardOptions
                      ) -> dict[str, list[PlannedEpisode]]:
    """``{split: episodes}``: all in the default split, or ``validation_fraction`` of them (by
    episode group, seeded) in the validation split."""
    splits: dict[str, list[PlannedEpisode]] = {layout.DEFAULT_SPLIT: kept}
    k = int(options.validation_fraction * len(kept) + 0.5)
    if options.validation_fraction > 0 and k == 0:
        log.warning("validation_fraction %s of %d episodes rounds to none; no %r split",
                    options.validation_fraction, len(kept), options.validation_split)
    if k:
        chosen = _choose_validation(kept, k, options.split_seed)
        splits = {layout.DEFAULT_SPLIT: [e for i, e in enumerate(kept) if i not in chosen],
                  options.validation_split: [e for i, e in enumerate(kept) if i in chosen]}
        if not splits[layout.DEFAULT_SPLIT]:
            raise ValueError("validation_fraction leaves no training episode")
    return splits


def _pack(splits: dict[str, list[PlannedEpisode]], name: str, options: ReshardOptions
          ) -> list[ShardTask]:
    """Each split's episodes, in order, packed into shards by ``shard_bytes`` (and
    ``shard_episodes``); an episode above the budget gets a shard of its own."""
    tasks = []
    for split, episodes in splits.items():
        groups: list[list[PlannedEpisode]] = []
        current: list[PlannedEpisode] = []
        nbytes = 0
        for ep in episodes:
            if current and (nbytes + ep.size > options.shard_bytes or (
                    options.shard_episodes and len(current) >= options.shard_episodes)):
                groups.append(current)
                current, nbytes = [], 0
            current.append(ep)
            nbytes += ep.size
        groups.append(current)
        for i, group in enumerate(groups):
            filename = layout.shard_filename(layout.DEFAULT_TEMPLATE, name, split, i, len(groups))
            tasks.append(ShardTask(split, i, filename, tuple(group)))
    return tasks


