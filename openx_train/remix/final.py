"""The final policy's data: a BC config sampled by a Re-Mix run's weights and restricted to a
data budget (``tools/train_bc.py --weights=runs/remix/mixture_weights.json --data_budget=0.25``).

* ``weights``: the loader samples each domain (``config.data.loader.domain_key``) by these
  weights (a weights file, ``"size"``, ``"uniform"``, ...), replacing
  ``config.data.loader.weights``.
* ``data_budget``: keeps that fraction of all training frames, each domain's share
  proportional to the weights with water-filling, whole episodes chosen deterministically from
  ``config.seed`` (:func:`~openx_train.remix.select_episodes`); the kept episodes are written
  to ``<path>/kept_episodes.json`` and restrict the config's datasets (their ``episodes``
  field). The same command gives the same selection, so a rerun resumes on the same data.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from openx_train.data import make_dataloader
from openx_train.data.errors import ConfigError
from openx_train.data.loader import dataset_name
from openx_train.remix.budget import KEPT_FILE, BudgetSelection, save_kept_episodes, select_episodes

log = logging.getLogger(__name__)


def _is_main_process(config: Any) -> bool:
    pid = config.get("distributed", {}).get("process_id", -1)
    if pid is None or pid < 0:
        pid = int(os.environ.get("JAX_PROCESS_ID", 0) or 0)
    return int(pid) == 0


def apply_weights_and_budget(config: Any, path: str | os.PathLike, *,
                             weights: str | None = None, data_budget: float | None = None
                             ) -> tuple[Any, BudgetSelection | None]:
    """The config sampled by ``weights`` and restricted to ``data_budget`` (see the module
    docstring).

    Args:
      config: a BC training config (:func:`~openx_train.training.loop.train_config`); changed
        in place (unlocked for the change).
      path: the run directory (``kept_episodes.json`` goes there).
      weights: the domain weights (a ``mixture_weights.json`` path, ``"size"``,
        ``"uniform"``); None keeps the config's.
      data_budget: the fraction of all training frames to keep, in ``(0, 1]``; None or 1 keeps
        every episode (1 still writes the kept list).

    Returns:
      ``(config, selection)``: the selection is None without a budget.

    Raises:
      ConfigError: for a budget out of range, weights that do not name the config's domains,
        or a config whose datasets cannot be read.
    """
    from openx_train.training import loop

    if weights is not None:
        weights = os.path.abspath(weights) if os.path.exists(weights) else weights
        with config.unlocked():
            config.data.loader.weights = weights
    if data_budget is None:
        return config, None
    if not (isinstance(data_budget, (int, float)) and 0 < data_budget <= 1):
        raise ConfigError(f"data_budget: expected a fraction in (0, 1], given {data_budget!r}")
    datasets = loop.dataset_configs(config)
    loader_config = loop.loader_config(config)
    loader = make_dataloader(datasets, loader_config)
    selection = select_episodes(loader.episodes, loader_config.weights,
                                data_budget=float(data_budget), seed=int(config.seed),
                                domains=loader.domain_names)
    if _is_main_process(config):
        os.makedirs(path, exist_ok=True)
        save_kept_episodes(os.path.join(os.fspath(path), KEPT_FILE), selection)
    kept = selection.per_dataset()
    entries = []
    for entry, d in zip(loop._plain(config.data.datasets), datasets):
        entry = {"path": entry} if isinstance(entry, str) else dict(entry)
        ids = sorted(kept.get(dataset_name(d), ()))
        if not ids:
            log.info("data budget: dataset %r keeps no episode; left out", dataset_name(d))
            continue
        entry["episodes"] = ids
        entries.append(entry)
    if not entries:
        raise ConfigError(f"data_budget {data_budget}: no episode kept (every domain's weight "
                          "is zero?)")
    with config.unlocked():
        config.data.datasets = entries
    log.info("data budget %.3g: %d of %d training frames in %d episodes", data_budget,
             selection.kept_total, selection.total_frames, len(selection.episodes))
    return config, selection
