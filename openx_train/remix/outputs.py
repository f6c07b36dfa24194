"""What a Re-Mix run writes: the weights every ``save_freq`` steps, the final mixture, a plot.

In the run directory::

    alpha_<step>.json      {"step": 500, "domains": [...], "alpha": {name: w},
                            "average_alpha": {name: w}}
    mixture_weights.json   the final average_alpha, in the loader's weights-file format
                           (LoaderConfig(weights=...) and train_bc.py --weights read it)
    domain_weights.png     alpha and average_alpha of every domain over the steps
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from openx_train.data.errors import ConfigError
from openx_train.data.mixture import save_mixture_weights
from oxe_envlogger.format import layout

ALPHA_FILE = "alpha_{step}.json"
WEIGHTS_FILE = "mixture_weights.json"
PLOT_FILE = "domain_weights.png"
_ALPHA_RE = re.compile(r"^alpha_(\d+)\.json$")


@dataclasses.dataclass(frozen=True)
class AlphaHistory:
    """The weights a run saved, in step order.

    Attributes:
      steps: int64 ``[T]``.
      domains: the K domain names.
      alpha: float64 ``[T, K]``.
      average_alpha: float64 ``[T, K]``.
    """

    steps: np.ndarray
    domains: tuple[str, ...]
    alpha: np.ndarray
    average_alpha: np.ndarray


def _named(names: Sequence[str], values: Any, what: str) -> dict[str, float]:
    values = np.asarray(values, np.float64).reshape(-1)
    if len(values) != len(names):
        raise ConfigError(f"{what}: expected {len(names)} weights (one per domain {list(names)}), "
                          f"given {len(values)}")
    return {str(n): float(v) for n, v in zip(names, values)}


def write_alpha(directory: str | os.PathLike, step: int, domains: Sequence[str], alpha: Any,
                average_alpha: Any) -> str:
    """Writes ``alpha_<step>.json`` atomically (write step 0, ``a0``, before the first update
    and the plot starts from it).

    Args:
      directory: the run directory (created if missing).
      step: the train step.
      domains: the domain names, in the weights' order.
      alpha: ``[K]`` current weights (any array, a JAX one included).
      average_alpha: ``[K]`` their running average.

    Returns:
      The file's path.

    Raises:
      ConfigError: when the weights do not have one value per domain.
    """
    domains = [str(d) for d in domains]
    data = {"step": int(step), "domains": domains,
            "alpha": _named(domains, alpha, "alpha"),
            "average_alpha": _named(domains, average_alpha, "average_alpha")}
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(os.fspath(directory), ALPHA_FILE.format(step=int(step)))
    layout.atomic_write_json(path, data)
    return path


def read_alpha_history(directory: str | os.PathLike) -> AlphaHistory:
    """Every ``alpha_<step>.json`` of a run directory, in step order.

    Raises:
      ConfigError: when there is none, one cannot be read, or their domains differ.
    """
    directory = os.fspath(directory)
    found = sorted((int(m.group(1)), name) for name in os.listdir(directory)
                   if (m := _ALPHA_RE.match(name)))
    if not found:
        raise ConfigError(f"{directory}: no alpha_<step>.json files")
    steps, alphas, averages, domains = [], [], [], None
    for step, name in found:
        path = os.path.join(directory, name)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            names = tuple(data["domains"])
            alpha = [float(data["alpha"][d]) for d in names]
            average = [float(data["average_alpha"][d]) for d in names]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}: expected step, domains, alpha and average_alpha: "
                              f"{type(e).__name__}: {e}") from None
        if domains is not None and names != domains:
            raise ConfigError(f"{path}: domains {list(names)} differ from those of the earlier "
                              f"files {list(domains)}")
        domains = names
        steps.append(step)
        alphas.append(alpha)
        averages.append(average)
    return AlphaHistory(np.asarray(steps, np.int64), domains, np.asarray(alphas, np.float64),
                        np.asarray(averages, np.float64))


def write_final_weights(directory: str | os.PathLike, domains: Sequence[str],
                        average_alpha: Any, *, metadata: Mapping[str, Any] | None = None) -> str:
    """Writes the run's output, ``average_alpha``, as ``mixture_weights.json`` in the loader's
    weights-file format (``openx_train.data.save_mixture_weights``).

    Args:
      directory: the run directory.
      domains: the domain names, in the weights' order.
      average_alpha: ``[K]`` the final average weights.
      metadata: stored beside the weights (the step, the domain key, the options, ...).

    Returns:
      The file's path.
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(os.fspath(directory), WEIGHTS_FILE)
    save_mixture_weights(path, _named([str(d) for d in domains], average_alpha, "average_alpha"),
                         metadata={"source": "remix", **dict(metadata or {})})
    return path


def plot_weights(directory: str | os.PathLike, out_path: str | os.PathLike | None = None, *,
                 history: AlphaHistory | None = None) -> str:
    """A PNG of every domain's ``alpha`` and ``average_alpha`` over the steps, from the run's
    ``alpha_<step>.json`` files (matplotlib on the Agg canvas: no display needed).

    Args:
      directory: the run directory.
      out_path: the PNG; default ``<directory>/domain_weights.png``.
      history: the weights to draw instead of the alpha files' (e.g. every logged step's).

    Returns:
      The PNG's path.

    Raises:
      ConfigError: when the directory has no readable alpha files.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if history is None:
        history = read_alpha_history(directory)
    out_path = os.fspath(out_path or os.path.join(os.fspath(directory), PLOT_FILE))
    k = len(history.domains)
    fig = Figure(figsize=(9.0, 6.0), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, sharex=True)
    colors = _colors(k)
    for ax, values, title in ((axes[0], history.alpha, "alpha (current weights)"),
                              (axes[1], history.average_alpha, "average_alpha (the output)")):
        for i, name in enumerate(history.domains):
            ax.plot(history.steps, values[:, i], color=colors[i], label=name,
                    marker="o" if len(history.steps) < 20 else None, markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("weight")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[1].set_xlabel("step")
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path)
    return out_path


def _colors(k: int) -> list[Any]:
    """K distinguishable colours (tab10, then tab20, then a continuous map)."""
    from matplotlib import colormaps

    if k <= 10:
        return [colormaps["tab10"](i) for i in range(k)]
    if k <= 20:
        return [colormaps["tab20"](i) for i in range(k)]
    return [colormaps["viridis"](i / max(k - 1, 1)) for i in range(k)]
