"""Data budgets: keep a fraction of all training frames, split across domains by weight.

``select_episodes(loader.episodes, weights, data_budget=0.25, seed=0)`` keeps
``data_budget`` of the frames:

1. **Targets by water-filling.** Domain k's target is ``T * w_k / sum(w)`` of the budget
   ``T = data_budget * total frames``; a domain whose frames do not reach its target gives all
   it has, and what it could not give is shared among the others in proportion to their
   weights, again until every target fits (a domain of weight 0 gets nothing, so with zero
   weights the budget may not be spent).
2. **Whole episodes, by seed.** Each domain's episodes are ordered by a hash of
   ``(seed, dataset, episode id)`` (stable when episodes are added or reordered) and the kept
   ones are the prefix of that order whose frames come closest to the target (ties: the
   shorter prefix), at least one episode when the target is positive. So a domain keeps within
   half an episode of its target, except that a positive target under half an episode still
   keeps one; a domain that gives all it has keeps it exactly. For the same seed and weights a
   smaller budget keeps a subset of what a larger one keeps.

The kept list is written as JSON (:func:`save_kept_episodes`) and restricts the datasets of a
run (:func:`restrict_datasets`, through ``DatasetConfig(episodes=...)``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from openx_train.data.config import DatasetConfig, MixtureWeights
from openx_train.data.errors import ConfigError
from openx_train.data.loader import EpisodeRecord, dataset_name
from openx_train.data.mixture import resolve_mixture_weights
from oxe_envlogger.format import layout

log = logging.getLogger(__name__)

KEPT_FILE = "kept_episodes.json"
KEPT_FORMAT = "openx_train.kept_episodes"
KEPT_VERSION = 1
_ORDER_SALT = b"openx_train.data_budget"

KeptEpisodes = Mapping[str, Collection[str]]


@dataclasses.dataclass(frozen=True)
class BudgetSelection:
    """What a data budget keeps.

    Attributes:
      data_budget: the fraction of all frames asked for.
      seed: the seed of the episode order.
      domains: the domain names.
      weights: each domain's weight (normalized).
      domain_frames: each domain's frames before the budget.
      targets: each domain's frames after water-filling (real numbers).
      kept_frames: each domain's frames kept (whole episodes).
      episodes: the kept episodes, in the order they were given.
    """

    data_budget: float
    seed: int
    domains: tuple[str, ...]
    weights: tuple[float, ...]
    domain_frames: tuple[int, ...]
    targets: tuple[float, ...]
    kept_frames: tuple[int, ...]
    episodes: tuple[EpisodeRecord, ...]

    @property
    def total_frames(self) -> int:
        return sum(self.domain_frames)

    @property
    def kept_total(self) -> int:
        return sum(self.kept_frames)

    def per_dataset(self) -> dict[str, frozenset[str]]:
        """Dataset name to the ids of its kept episodes (datasets with none left out)."""
        out: dict[str, set[str]] = {}
        for r in self.episodes:
            out.setdefault(r.dataset, set()).add(r.episode_id)
        return {k: frozenset(v) for k, v in out.items()}


def water_fill(weights: Sequence[float], capacities: Sequence[float], total: float
               ) -> np.ndarray:
    """Splits ``total`` in proportion to ``weights``, none above its capacity: a capped share's
    excess is redistributed among the others by weight.

    Args:
      weights: ``[K]`` non-negative weights.
      capacities: ``[K]`` what each can take at most.
      total: the amount to split.

    Returns:
      float64 ``[K]``, each within ``[0, capacity]``; the sum is ``total``, or less when the
      capacities of the positive weights add up to less.

    Raises:
      ConfigError: for negative or non-finite inputs, or mismatched lengths.
    """
    w = np.asarray(weights, np.float64)
    cap = np.asarray(capacities, np.float64)
    if w.shape != cap.shape or w.ndim != 1:
        raise ConfigError(f"water_fill: expected weights and capacities of one length, given "
                          f"{w.shape} and {cap.shape}")
    if not (np.all(np.isfinite(w)) and np.all(w >= 0) and np.all(np.isfinite(cap))
            and np.all(cap >= 0) and math.isfinite(total) and total >= 0):
        raise ConfigError(f"water_fill: expected finite non-negative values, given weights "
                          f"{w.tolist()}, capacities {cap.tolist()}, total {total!r}")
    out = np.zeros_like(w)
    active = (w > 0) & (cap > 0)
    remaining = float(total)
    while active.any() and remaining > 0:
        share = np.where(active, remaining * w / w[active].sum(), 0.0)
        full = active & (cap <= share)
        if not full.any():
            out[active] = share[active]
            break
        # Shares only grow as capped ones leave, so every domain capped now stays capped.
        out[full] = cap[full]
        remaining = max(remaining - float(cap[full].sum()), 0.0)
        active &= ~full
    return out


def _order_key(seed: int, record: EpisodeRecord) -> bytes:
    return hashlib.blake2b(_ORDER_SALT + f"{seed}:".encode() + record.dataset.encode() + b"\0"
                           + record.episode_id.encode(), digest_size=16).digest()


def _closest_prefix(frames: np.ndarray, target: float) -> int:
    """The number of leading episodes whose frames come closest to ``target`` (ties: fewer),
    at least one when the target is positive."""
    cumulative = np.concatenate([[0], np.cumsum(frames)])
    n = int(np.argmin(np.abs(cumulative - target)))  # argmin takes the first of ties
    return max(n, 1) if target > 0 and len(frames) else n


def select_episodes(episodes: Sequence[EpisodeRecord], weights: MixtureWeights = "size", *,
                    data_budget: float, seed: int = 0,
                    domains: Sequence[str] | None = None) -> BudgetSelection:
    """Keeps ``data_budget`` of the frames of ``episodes``, split across their domains by
    ``weights`` (see the module docstring for the rule).

    Args:
      episodes: the training episodes (``DataLoader.episodes``).
      weights: per domain: ``"size"`` (every frame alike: the same fraction of each domain),
        ``"uniform"``, a ``{domain: weight}`` mapping, a weights file (``mixture_weights.json``
        of a Re-Mix run) or a sequence aligned with ``domains``.
      data_budget: the fraction of all frames to keep, in ``(0, 1]``.
      seed: orders each domain's episodes.
      domains: the domain names (``DataLoader.domain_names``); default: in order of first
        appearance in ``episodes``. Needed when ``weights`` is a sequence.

    Returns:
      A :class:`BudgetSelection`.

    Raises:
      ConfigError: for a budget outside ``(0, 1]``, no episodes, or weights that do not fit
        the domains.
    """
    if not (isinstance(data_budget, (int, float)) and 0 < data_budget <= 1):
        raise ConfigError(f"data_budget: expected a fraction in (0, 1], given {data_budget!r}")
    if not episodes:
        raise ConfigError("select_episodes: expected episodes, given none")
    if domains is None:
        domains = list(dict.fromkeys(r.domain for r in episodes))
    domains = [str(d) for d in domains]
    index = {d: k for k, d in enumerate(domains)}
    unknown = sorted({r.domain for r in episodes} - set(index))
    if unknown:
        raise ConfigError(f"select_episodes: episodes of domains {unknown} not among the domains "
                          f"{domains}")
    members: list[list[int]] = [[] for _ in domains]
    for i, r in enumerate(episodes):
        members[index[r.domain]].append(i)
    frames = np.array([sum(episodes[i].frames for i in m) for m in members], np.int64)
    w = resolve_mixture_weights(weights, domains, frames.tolist(), kind="domain")
    targets = water_fill(w, frames, data_budget * float(frames.sum()))
    kept: list[int] = []
    kept_frames = []
    for m, target in zip(members, targets):
        order = sorted(m, key=lambda i: _order_key(seed, episodes[i]))
        n = _closest_prefix(np.array([episodes[i].frames for i in order], np.int64), target)
        kept.extend(order[:n])
        kept_frames.append(sum(episodes[i].frames for i in order[:n]))
    selection = BudgetSelection(
        data_budget=float(data_budget), seed=int(seed), domains=tuple(domains),
        weights=tuple(float(x) for x in w), domain_frames=tuple(int(x) for x in frames),
        targets=tuple(float(x) for x in targets), kept_frames=tuple(kept_frames),
        episodes=tuple(episodes[i] for i in sorted(kept)))
    log.info("data budget %.3g: %d of %d frames kept (%s)", data_budget, selection.kept_total,
             selection.total_frames, ", ".join(
                 f"{d}: {k}/{f}" for d, k, f in zip(domains, kept_frames, frames)))
    return selection


def save_kept_episodes(path: str | os.PathLike, selection: BudgetSelection) -> None:
    """Writes a selection as JSON, atomically: the budget, the per-domain figures and the
    kept episodes (``{"dataset", "episode_id", "domain", "frames"}`` each)."""
    data = {
        "format": KEPT_FORMAT, "version": KEPT_VERSION,
        "data_budget": selection.data_budget, "seed": selection.seed,
        "frames": {"total": selection.total_frames,
                   "budget": selection.data_budget * selection.total_frames,
                   "kept": selection.kept_total},
        "domains": [{"name": d, "weight": w, "frames": f, "target": t, "kept_frames": k}
                    for d, w, f, t, k in zip(selection.domains, selection.weights,
                                             selection.domain_frames, selection.targets,
                                             selection.kept_frames)],
        "episodes": [dataclasses.asdict(r) for r in selection.episodes],
    }
    layout.atomic_write_json(path, data)


def load_kept_episodes(path: str | os.PathLike) -> dict[str, frozenset[str]]:
    """Dataset name to the ids of its kept episodes, from :func:`save_kept_episodes`'s file.

    Raises:
      ConfigError: when the file cannot be read or is not a kept-episodes file.
    """
    where = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"kept episodes {where}: cannot read: {e}") from None
    if not isinstance(data, Mapping) or data.get("format") != KEPT_FORMAT:
        raise ConfigError(f"kept episodes {where}: expected format {KEPT_FORMAT!r}, given "
                          f"{data.get('format') if isinstance(data, Mapping) else type(data)!r}")
    if data.get("version") != KEPT_VERSION:
        raise ConfigError(f"kept episodes {where}: expected version {KEPT_VERSION}, given "
                          f"{data.get('version')!r}")
    out: dict[str, set[str]] = {}
    try:
        for r in data["episodes"]:
            out.setdefault(str(r["dataset"]), set()).add(str(r["episode_id"]))
    except (KeyError, TypeError):
        raise ConfigError(f"kept episodes {where}: expected episodes of "
                          "{dataset, episode_id}") from None
    return {k: frozenset(v) for k, v in out.items()}


def restrict_datasets(datasets: Sequence[DatasetConfig],
                      kept: KeptEpisodes | BudgetSelection | str | os.PathLike
                      ) -> list[DatasetConfig]:
    """The datasets restricted to the kept episodes (``DatasetConfig(episodes=...)``); a
    dataset with none kept is left out (a loader cannot read an empty dataset, and its weight
    was zero or its domains' targets were).

    Args:
      datasets: the run's datasets.
      kept: a :class:`BudgetSelection`, a kept-episodes file, or dataset name to episode ids.

    Returns:
      The restricted datasets, in their order.

    Raises:
      ConfigError: when the kept episodes name a dataset that is not among ``datasets``.
    """
    if isinstance(kept, BudgetSelection):
        kept = kept.per_dataset()
    elif isinstance(kept, (str, os.PathLike)):
        kept = load_kept_episodes(kept)
    named = [(dataset_name(d), d) for d in datasets]
    unknown = sorted(set(kept) - {n for n, _ in named})
    if unknown:
        raise ConfigError(f"kept episodes name datasets {unknown} that are not in the mixture "
                          f"{[n for n, _ in named]}")
    out = []
    for name, d in named:
        ids = kept.get(name)
        if not ids:
            log.info("data budget: dataset %r keeps no episode; left out", name)
            continue
        out.append(dataclasses.replace(d, episodes=frozenset(ids)))
    return out

