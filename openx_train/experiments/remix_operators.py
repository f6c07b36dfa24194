"""The Re-Mix experiment of issue 14 on the operators data: a reference BC policy, Re-Mix
weights over the eight operators, then final BC policies at data budgets 100% and 25% under four
weightings, each over several seeds and evaluated in Reacher-v5::

    python -m openx_train.experiments.operators run --path=runs/remix_experiment \\
        [--size=full|tiny] [--seeds=0,1,2] [--episodes=50] [--steps=N] [--remix_steps=N]
    python -m openx_train.experiments.operators table --path=runs/remix_experiment  # so far

Into ``--path``: ``data/`` and ``operators.json`` (the collection, reused when present),
``ref/`` (the reference BC run), ``remix/`` (the Re-Mix run: ``mixture_weights.json``,
``weights.png``), ``final/<weighting>_<budget>_s<seed>/`` (each final BC run with its
``eval.json``), and ``results.json``, ``results.txt`` (the table) and ``results.png`` (the
returns with their intervals). Every run resumes and every finished evaluation is reused, so an
interrupted experiment continues where it stopped.

The weightings, per operator domain:

* ``size``: each domain's share of frames (what sampling frames uniformly gives);
* ``uniform``: every domain alike;
* ``remix``: the Re-Mix run's ``average_alpha``;
* ``better_only``: the two ``better`` operators alike, the others 0 (an oracle that knows the
  qualities).

The budget keeps that fraction of all training frames, each domain's share by the weighting with
water-filling (:func:`~openx_train.remix.select_episodes`), episodes chosen from the run's
seed; at 100% every episode of a domain with a positive weight is kept, and the weighting only
changes how often each domain is sampled. Each final policy is evaluated on ``--episodes``
episodes (the same reset seeds for every run); the table gives each weighting and budget's mean
return over the seeds with the 95% t-interval of the seeds' means, and the weights.

Whatever the table shows is the result: the experiment is not tuned until Re-Mix wins.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from openx_train.data.mixture import (
    load_mixture_weights,
    resolve_mixture_weights,
    save_mixture_weights,
)
from openx_train.eval.rollout import t_interval
from openx_train.experiments import operators as ops
from oxe_envlogger.format.layout import atomic_write_json

log = logging.getLogger(__name__)

WEIGHTINGS = ("size", "uniform", "remix", "better_only")
BUDGETS = (1.0, 0.25)
RESULTS_JSON, RESULTS_TEXT, RESULTS_PLOT = "results.json", "results.txt", "results.png"
EVAL_FILE = "eval.json"
EVAL_SEED = 100_000  # evaluation episodes reset with seeds apart from the collection's


class QuietOrbax(logging.Filter):
    """Orbax logs every checkpoint it reads or writes at INFO; keep its warnings only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "orbax" not in record.pathname


@dataclasses.dataclass(frozen=True)
class ExperimentOptions:
    """What the experiment runs.

    Attributes:
      size: the collection's size (``"full"`` or ``"tiny"``).
      data_seed: the collection's seed.
      seeds: the final runs' seeds (the reference and Re-Mix use the first).
      budgets: data budgets of the final runs.
      weightings: among :data:`WEIGHTINGS`.
      episodes: evaluation episodes per final policy.
      steps: train steps of every BC run (None: the config's).
      remix_steps: steps of the Re-Mix run (None: ``steps``).
      batch_size: every run's batch (None: the config's).
      num_envs: evaluation sub-envs.
      overrides: further config fields, ``{"optimizer.learning_rate": 1e-3, ...}``.
    """

    size: str = "full"
    data_seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    budgets: tuple[float, ...] = BUDGETS
    weightings: tuple[str, ...] = WEIGHTINGS
    episodes: int = 50
    steps: int | None = None
    remix_steps: int | None = None
    batch_size: int | None = None
    num_envs: int = 4
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        unknown = sorted(set(self.weightings) - set(WEIGHTINGS))
        if unknown:
            raise ValueError(f"weightings: expected some of {list(WEIGHTINGS)}, given {unknown}")
        if not self.seeds:
            raise ValueError("seeds: expected at least one")


def experiment_config(data_dir: str, options: ExperimentOptions, *, seed: int,
                      steps: int | None = None) -> Any:
    """The experiment's config (``configs/remix/reacher_operators.py``) on ``data_dir``."""
    from openx_train.configs.remix.reacher_operators import get_config

    config = get_config()
    config.data.datasets = [{"path": os.path.abspath(data_dir)}]
    config.seed = int(seed)
    if steps is not None:
        config.steps = int(steps)
        config.optimizer.warmup_steps = min(int(config.optimizer.warmup_steps), int(steps) // 4)
        for key in ("log_freq", "val_freq", "save_freq"):
            config[key] = max(1, min(int(config[key]), int(steps)))
    if options.batch_size is not None:
        config.batch_size = int(options.batch_size)
    for key, value in options.overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _weights_for(weighting: str, domains: Sequence[str], frames: Sequence[int],
                 remix_file: str | None) -> np.ndarray:
    if weighting == "remix":
        return resolve_mixture_weights(remix_file, domains, frames, kind="domain")
    if weighting == "better_only":
        w = [1.0 if d.startswith("better") else 0.0 for d in domains]
        return resolve_mixture_weights(w, domains, frames, kind="domain")
    return resolve_mixture_weights(weighting, domains, frames, kind="domain")


def _run_name(weighting: str, budget: float, seed: int) -> str:
    return f"{weighting}_{round(100 * budget)}_s{seed}"


def _evaluate(run: str, options: ExperimentOptions) -> dict[str, Any]:
    out = os.path.join(run, EVAL_FILE)
    if os.path.exists(out):
        with open(out) as f:
            return json.load(f)
    from openx_train.inference import evaluate_run

    result = evaluate_run(run, ops.ENV_ID, num_episodes=options.episodes,
                          num_envs=options.num_envs, seed=EVAL_SEED, vectorization="sync")
    keep = {k: result.get(k) for k in ("return_mean", "return_ci95", "length_mean",
                                        "num_episodes", "checkpoint_step")}
    keep["returns"] = [float(e["return"]) for e in result.get("episodes", [])]
    atomic_write_json(out, keep)
    return keep


def _summary(values: Sequence[float]) -> tuple[float, float | None]:
    values = np.asarray(values, np.float64)
    return float(values.mean()), t_interval(values)


def format_results(results: Mapping[str, Any]) -> str:
    """The experiment's table: the weights per domain, then each weighting's return per
    budget (mean over seeds, 95% interval of the seeds' means)."""
    domains = results["domains"]
    width = max(8, *(len(d) for d in domains))
    lines = ["weights per domain",
             f"{'weighting':<12}" + "".join(f"{d:>{width + 1}}" for d in domains)]
    for w, values in results["weights"].items():
        lines.append(f"{w:<12}" + "".join(f"{values[d]:>{width + 1}.3f}" for d in domains))
    budgets = [f"{round(100 * b)}%" for b in results["budgets"]]
    lines += ["", f"return in {results['env_id']} (mean over {len(results['seeds'])} seeds "
              f"x {results['episodes']} episodes; ± the 95% interval of the seeds' means)",
              f"{'weighting':<12}" + "".join(f"{'budget ' + b:>22}" for b in budgets)]
    for w in results["weights"]:
        row = f"{w:<12}"
        for b in budgets:
            cell = results["returns"].get(w, {}).get(b)
            if cell is None:
                row += f"{'-':>22}"
                continue
            ci = cell["ci95"]
            text = f"{cell['mean']:.2f}" + (f" ± {ci:.2f}" if ci is not None else "")
            row += f"{text:>22}"
        lines.append(row)
    if results.get("reference_return") is not None:
        lines.append(f"{'reference':<12}{results['reference_return']:>22.2f}   (BC on every "
                     "episode, sampled by size, seed 0)")
    if results.get("wall_s") is not None:
        lines.append(f"wall time: {results['wall_s']:.0f} s")
    return "\n".join(lines)


def plot_results(results: Mapping[str, Any], out_path: str) -> str:
    """A PNG: each weighting's mean return per budget with its 95% interval."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    weightings = list(results["weights"])
    budgets = [f"{round(100 * b)}%" for b in results["budgets"]]
    fig = Figure(figsize=(9.5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(weightings), 1)
    for i, w in enumerate(weightings):
        means, errs, xs = [], [], []
        for j, b in enumerate(budgets):
            cell = results["returns"].get(w, {}).get(b)
            if cell is None:
                continue
            xs.append(j + (i - (len(weightings) - 1) / 2) * width)
            means.append(cell["mean"])
            errs.append(cell["ci95"] or 0.0)
        ax.bar(xs, means, width=width, yerr=errs, capsize=3, label=w)
    if results.get("reference_return") is not None:
        ax.axhline(results["reference_return"], color="gray", linestyle="--", linewidth=1,
                   label="reference (all data)")
    ax.set_xticks(range(len(budgets)), [f"budget {b}" for b in budgets])
    ax.set_ylabel(f"return in {results['env_id']} (higher is better)")
    ax.set_title(f"Final BC by data weighting ({len(results['seeds'])} seeds x "
                 f"{results['episodes']} episodes, 95% intervals)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path)
    return out_path


def run_experiment(path: str | os.PathLike, options: ExperimentOptions | None = None
                   ) -> dict[str, Any]:
    """Runs (or continues) the whole experiment in ``path``; see the module docstring.

    Args:
      path: the experiment's directory.
      options: what to run (default: :class:`ExperimentOptions`, the issue's full size).

    Returns:
      The results (also in ``results.json``): ``domains``, ``weights`` (weighting -> domain
      -> weight), ``returns`` (weighting -> budget -> ``mean``, ``ci95``, ``seeds``),
      ``reference_return``, ``wall_s`` and the options.
    """
    from openx_train.remix.final import apply_weights_and_budget
    from openx_train.remix.train import train_remix
    from openx_train.training.loop import train

    options = options or ExperimentOptions()
    t0 = time.perf_counter()
    path = os.path.abspath(os.fspath(path))
    data_dir = os.path.join(path, ops.DATA_DIR)
    if not os.path.exists(os.path.join(path, ops.SUMMARY_FILE)):
        log.info("collecting the operators' data (%s) into %s", options.size, data_dir)
        ops.run_collection(path, size=options.size, seed=options.data_seed, overwrite=True)
    first = options.seeds[0]
    ref_dir, remix_dir = os.path.join(path, "ref"), os.path.join(path, "remix")
    log.info("reference BC -> %s", ref_dir)
    train(experiment_config(data_dir, options, seed=first, steps=options.steps), ref_dir)
    _evaluate(ref_dir, options)
    log.info("Re-Mix -> %s", remix_dir)
    remix = train_remix(experiment_config(data_dir, options, seed=first,
                                          steps=options.remix_steps or options.steps),
                        ref_dir, remix_dir)
    domains = list(remix["domains"])
    frames = _domain_frames(data_dir, options, domains, seed=first)
    weights_dir = os.path.join(path, "weights")
    os.makedirs(weights_dir, exist_ok=True)
    weight_files = {}
    for w in options.weightings:
        values = _weights_for(w, domains, frames, remix["weights_file"])
        weight_files[w] = os.path.join(weights_dir, f"{w}.json")
        save_mixture_weights(weight_files[w], {d: float(v) for d, v in zip(domains, values)},
                             metadata={"weighting": w})
    for budget in options.budgets:
        for w in options.weightings:
            for seed in options.seeds:
                run = os.path.join(path, "final", _run_name(w, budget, seed))
                log.info("final BC %s", run)
                config = experiment_config(data_dir, options, seed=seed, steps=options.steps)
                config, _ = apply_weights_and_budget(config, run, weights=weight_files[w],
                                                     data_budget=budget)
                train(config, run)
                _evaluate(run, options)
    results = collect_results(path, options, wall_s=time.perf_counter() - t0)
    atomic_write_json(os.path.join(path, RESULTS_JSON), results)
    text = format_results(results)
    with open(os.path.join(path, RESULTS_TEXT), "w") as f:
        f.write(text + "\n")
    plot_results(results, os.path.join(path, RESULTS_PLOT))
    return results


def collect_results(path: str | os.PathLike, options: ExperimentOptions, *,
                    wall_s: float | None = None) -> dict[str, Any]:
    """The results of the runs of ``path`` that have finished (their ``eval.json``): what
    :func:`run_experiment` returns at the end, or a partial table while it runs (cells without
    a finished seed are left out).

    Raises:
      FileNotFoundError: before the Re-Mix run has written its weights.
    """
    path = os.path.abspath(os.fspath(path))
    remix_dir = os.path.join(path, "remix")
    domains = list(load_mixture_weights(os.path.join(remix_dir, "mixture_weights.json")))
    weights = {}
    for w in options.weightings:
        file = os.path.join(path, "weights", f"{w}.json")
        if os.path.exists(file):
            weights[w] = dict(load_mixture_weights(file))
    returns: dict[str, dict[str, Any]] = {}
    for budget in options.budgets:
        for w in options.weightings:
            per_seed = []
            for seed in options.seeds:
                file = os.path.join(path, "final", _run_name(w, budget, seed), EVAL_FILE)
                if os.path.exists(file):
                    with open(file) as f:
                        per_seed.append(float(json.load(f)["return_mean"]))
            if per_seed:
                mean, ci = _summary(per_seed)
                returns.setdefault(w, {})[f"{round(100 * budget)}%"] = {
                    "mean": mean, "ci95": ci, "seeds": per_seed}
    reference = None
    if os.path.exists(os.path.join(path, "ref", EVAL_FILE)):
        with open(os.path.join(path, "ref", EVAL_FILE)) as f:
            reference = json.load(f)["return_mean"]
    return {"env_id": ops.ENV_ID, "domains": domains, "weights": weights, "returns": returns,
            "reference_return": reference, "budgets": list(options.budgets),
            "seeds": list(options.seeds), "episodes": options.episodes,
            "remix_run": remix_dir, "options": dataclasses.asdict(options),
            "wall_s": wall_s}


def _domain_frames(data_dir: str, options: ExperimentOptions, domains: Sequence[str], *,
                   seed: int) -> list[int]:
    """Each domain's training frames, as the loader of the final runs counts them."""
    from openx_train.data import make_dataloader
    from openx_train.training import loop

    config = experiment_config(data_dir, options, seed=seed, steps=options.steps)
    loader = make_dataloader(loop.dataset_configs(config), loop.loader_config(config))
    by_name = dict(zip(loader.domain_names, loader.domain_frames))
    return [int(by_name.get(d, 0)) for d in domains]
