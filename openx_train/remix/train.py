"""The Re-Mix run: a proxy policy trained against a reference BC run, learning the domain
weights that the final BC run trains on (issue 14).

::

    from openx_train.remix.train import remix_config, train_remix
    config = remix_config()                       # or a configs/remix/*.py get_config()
    config.data.datasets = [{"path": "logs/operators"}]
    train_remix(config, "runs/ref", "runs/remix")  # rerun: resumes from the latest checkpoint

It reuses the BC loop (:mod:`openx_train.training.loop`): the same config fields, loaders,
checkpoints (the whole :class:`~openx_train.remix.RemixState`, weights included), validation of
the proxy, metrics and progress bar, with the Re-Mix block step in place of BC's. What it adds:

* the reference: ``run.json`` and the parameters of a BC run on the same config
  (``config.remix.reference_checkpoint``: ``"latest"``, ``"best"`` or a step; its EMA
  parameters when it kept them); the datasets are normalized with the reference's statistics,
  and a config that differs from the reference's in datasets, structure, normalization, model
  inputs or head is refused, every difference listed
  (:func:`~openx_train.remix.reference.check_reference`);
* the domains: ``config.data.loader.domain_key`` (``"dataset"`` or an episode field such as
  ``"episode_metadata/operator"``); the initial weights ``config.remix.initial_weights``
  (``"size"``: each domain's share of frames, ``"uniform"``, or given);
* the reference's losses computed once per training frame before the first step, where they
  are a function of the frame (``config.remix.cache_reference``,
  :mod:`~openx_train.remix.reference_cache`), so the step runs the proxy only;
* in the run directory: ``alpha_<step>.json`` at step 0 and then every ``save_freq`` steps (at
  the first log step at or after each multiple), ``mixture_weights.json`` (``average_alpha`` in
  the loader's weights-file format, for ``train_bc.py --weights``) and ``weights.png`` (the
  weights at every logged step) at the end; in metrics.csv and TensorBoard, every domain's ``alpha/<domain>``,
  ``average_alpha/<domain>`` and ``excess/<domain>`` (its mean excess loss over the log
  interval), besides the loop's metrics and ``proxy_loss``, ``reference_loss``, ``excess``.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from openx_train import run as run_lib
from openx_train.data.errors import ConfigError
from openx_train.data.loader import dataset_name
from openx_train.models import make_policy, resolve_model_config
from openx_train.models.spec import InputSpec
from openx_train.remix.outputs import (
    AlphaHistory,
    plot_weights,
    write_alpha,
    write_final_weights,
)
from openx_train.remix.reference import check_reference
from openx_train.remix.reference_cache import (
    cache_refusal,
    reference_losses,
    use_cache,
    with_reference_losses,
)
from openx_train.remix.step import (
    RemixState,
    create_remix_state,
    jit_remix_block_step,
    remix_inputs,
)
from openx_train.remix.weights import ABSENT_RULES, RemixOptions, initial_weights
from openx_train.training import loop
from openx_train.training.sharding import put_state

log = logging.getLogger(__name__)

WEIGHTS_PLOT = "weights.png"
#: Per-domain metrics of the step, and their names in metrics.csv / TensorBoard.
_DOMAIN_METRICS = {"alpha": "alpha", "average_alpha": "average_alpha",
                   "domain_excess": "excess"}


def remix_config() -> ml_collections.ConfigDict:
    """The default Re-Mix config: every field of the BC loop's
    (:func:`~openx_train.training.loop.train_config`) and ``remix``:

    Fields:
      remix.eta: step size of the weight update (robomimic 0.2; Bridge 1.0).
      remix.smoothing: ``c``, the share of the initial weights mixed in after each update
        (robomimic 5e-2; Bridge 5e-3).
      remix.absent: ``"keep"`` (a domain absent from a batch keeps its weight) or
        ``"zero_excess"`` (the released code's rule).
      remix.initial_weights: ``"size"`` (each domain's share of frames), ``"uniform"``, a list
        aligned with the domains, a ``{domain: weight}`` dict, or a weights file.
      remix.reference_checkpoint: which checkpoint of the reference: ``"latest"``, ``"best"`` or
        a step number.
      remix.cache_reference: ``"auto"`` (the default), ``"on"`` or ``"off"``: compute the
        reference's loss once per training frame before training instead of in every step,
        where that loss is a function of the frame
        (:mod:`~openx_train.remix.reference_cache`); ``"auto"`` when the run draws at least as
        many samples as there are training frames.

    The same config trains the reference and the final policy with ``train_bc.py`` (which
    ignores ``remix``), so the three runs agree on data, normalization and head.

    Returns:
      A new, unlocked ``ConfigDict`` (the head: 48 gaussian bins).
    """
    config = loop.train_config()
    config.model.head.kind = "discrete"
    config.model.head.num_bins = 48
    config.model.head.bin_type = "gaussian"
    config.remix = ml_collections.ConfigDict({
        "eta": 0.2, "smoothing": 5e-2, "absent": "keep", "initial_weights": "size",
        "reference_checkpoint": "latest", "cache_reference": "auto"})
    return config


def remix_options(config: Any) -> RemixOptions:
    """``config.remix`` as :class:`~openx_train.remix.RemixOptions`.

    Raises:
      ConfigError: for a missing ``remix`` section or a value out of range (naming it).
    """
    r = config.get("remix")
    if r is None:
        raise ConfigError("remix: expected a remix section (eta, smoothing, absent, "
                          "initial_weights, reference_checkpoint); see remix_config()")
    absent = r.get("absent", "keep")
    if absent not in ABSENT_RULES:
        raise ConfigError(f"remix.absent: expected one of {list(ABSENT_RULES)}, given "
                          f"{absent!r}")
    try:
        return RemixOptions(eta=float(r.get("eta", 0.2)),
                            smoothing=float(r.get("smoothing", 5e-2)), absent=absent)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"remix: {e}") from e


def _initial_weights_setting(config: Any) -> Any:
    value = loop._plain(config.remix.get("initial_weights", "size"))
    return tuple(value) if isinstance(value, list) else value


def _reference_checkpoint(config: Any) -> str | int:
    which = config.remix.get("reference_checkpoint", "latest")
    if isinstance(which, str) and which.isdigit():
        return int(which)
    return which


# ------------------------------------------------------------------------- the reference

@dataclasses.dataclass(frozen=True)
class Reference:
    """A reference BC run, loaded.

    Attributes:
      path: its run directory.
      info: its :class:`~openx_train.run.RunInfo`.
      params: its parameters (numpy; the EMA ones when it kept them).
      step: the checkpoint's step.
    """

    path: str
    info: run_lib.RunInfo
    params: Any
    step: int


def load_reference(path: str | os.PathLike, which: str | int = "latest") -> Reference:
    """A reference run's ``run.json`` and parameters.

    Raises:
      RunNotFoundError: when ``path`` is not a run directory or has no such checkpoint.
    """
    path = os.path.abspath(os.fspath(path))
    info = run_lib.read_run(path)
    params, step = run_lib.restore_params(path, which, local=True)  # every process reads
    return Reference(path=path, info=info, params=params, step=int(step))


def _planned_info(config: Any, datasets: Sequence[Any]) -> dict[str, Any]:
    """What the Re-Mix run's ``run.json`` will say about the fields compared with the
    reference's, before the loader is built (the input spec comes after)."""
    model = resolve_model_config(config.model)
    return {"datasets": [{"name": dataset_name(d), "path": os.path.abspath(d.path),
                          "structure": d.structure.to_json()} for d in datasets],
            "pooled_statistics": False, "model": loop._plain(model.to_dict())}


def with_reference_statistics(datasets: Sequence[Any], reference: Reference) -> list[Any]:
    """The datasets, each normalized with the statistics its namesake in the reference was.

    Raises:
      ConfigError: when a dataset is not in the reference, or has no statistics there.
    """
    out = []
    for d in datasets:
        name = dataset_name(d)
        try:
            stats = reference.info.dataset(name).statistics
        except run_lib.RunError as e:
            raise ConfigError(f"remix reference {reference.path}: {e}") from e
        if stats is None:
            raise ConfigError(f"remix reference {reference.path}: dataset {name!r} has no "
                              "normalization statistics in run.json")
        out.append(dataclasses.replace(d, statistics=stats))
    return out


# ------------------------------------------------------------------------ loop pieces

def put_remix_block(block: Mapping[str, Any], spec: InputSpec, mesh: Any, *,
                    reference_loss: np.ndarray | None = None) -> dict[str, Any]:
    """A stacked host block ``[K, B, ...]`` of loader batches as device arrays split along
    ``B``, with ``domain_id`` (the BC loop's ``put_block`` keeps only the policy's inputs) and,
    given the reference's losses by row (:func:`~openx_train.remix.reference_losses`), each
    example's ``reference_loss``."""

    def inputs(flat: dict[str, Any]) -> dict[str, Any]:
        if reference_loss is not None:
            flat = with_reference_losses(flat, reference_loss)
        return remix_inputs(flat, spec)

    return loop.put_block(block, spec, mesh, inputs=inputs)


def summarize_remix(metrics: Sequence[Mapping[str, Any]], names: Sequence[str],
                    domains: Sequence[str]) -> dict[str, float]:
    """The loop's summary of a log interval's metrics, plus per domain ``alpha/<d>`` and
    ``average_alpha/<d>`` (after the interval's last step) and ``excess/<d>`` (the mean excess
    of the domain's examples over the interval; absent when it had none)."""
    out = loop.summarize(metrics, names)
    host = jax.device_get(list(metrics))
    if not host:
        return out
    k = len(domains)

    def stacked(key):
        return np.concatenate([np.reshape(m[key], (-1, k)) for m in host])

    for key in ("alpha", "average_alpha"):
        last = stacked(key)[-1]
        for i, d in enumerate(domains):
            out[f"{_DOMAIN_METRICS[key]}/{d}"] = float(last[i])
    excess, count = stacked("domain_excess"), stacked("domain_count")
    total = count.sum(axis=0)
    for i, d in enumerate(domains):
        if total[i] > 0:
            out[f"excess/{d}"] = float(np.sum(excess[:, i] * count[:, i]) / total[i])
    return out


def logged_history(path: str | os.PathLike, domains: Sequence[str]) -> AlphaHistory | None:
    """Every domain's ``alpha`` and ``average_alpha`` at every logged step (metrics.csv),
    after the initial weights (``alpha_0.json``); None when nothing was logged."""
    path = os.fspath(path)
    metrics = os.path.join(path, run_lib.METRICS_FILE)
    first = os.path.join(path, "alpha_0.json")
    if not (os.path.exists(metrics) and os.path.exists(first)):
        return None
    with open(first) as f:
        a0 = json.load(f)["alpha"]
    steps, alpha, average = [0], [[a0[d] for d in domains]], [[a0[d] for d in domains]]
    with open(metrics, newline="") as f:
        for row in csv.DictReader(f):
            try:
                a = [float(row[f"alpha/{d}"]) for d in domains]
                m = [float(row[f"average_alpha/{d}"]) for d in domains]
            except (KeyError, TypeError, ValueError):
                continue
            steps.append(int(float(row["step"])))
            alpha.append(a)
            average.append(m)
    if len(steps) < 2:
        return None
    return AlphaHistory(steps=np.asarray(steps, np.int64), domains=tuple(domains),
                        alpha=np.asarray(alpha, np.float64),
                        average_alpha=np.asarray(average, np.float64))


class _AlphaWriter:
    """``alpha_<step>.json`` at step 0, then at the first log step at or after every multiple of
    ``save_freq`` (and at the end), on process 0."""

    def __init__(self, path: str, domains: Sequence[str], save_freq: int, steps: int, *,
                 enabled: bool):
        self.path, self.domains = path, list(domains)
        self.save_freq, self.steps, self.enabled = int(save_freq), int(steps), enabled
        self.last = -1

    def write(self, step: int, state: RemixState, *, force: bool = False) -> None:
        if not self.enabled:
            return
        due = force or step == self.steps or step == 0 or (
            self.save_freq and step // self.save_freq > max(self.last, 0) // self.save_freq)
        if not due or step == self.last:
            return
        weights = jax.device_get(state.weights)
        write_alpha(self.path, step, self.domains, weights.alpha, weights.average_alpha)
        self.last = step


def _reference_cache(config: Any, setup: loop.Setup, policy: Any, params: Any, start: int
                     ) -> np.ndarray | None:
    """The reference's loss of every training frame by row, when ``remix.cache_reference``
    and the run allow it (see :mod:`~openx_train.remix.reference_cache`); else None."""
    setting = str(config.remix.get("cache_reference", "auto"))
    refusal = cache_refusal(policy, setup.loader.config, setup.spec)
    frames = int(sum(setup.loader.num_frames))
    samples = (int(config.steps) - start) * int(config.batch_size)
    if not use_cache(setting, refusal, samples=samples, frames=frames):
        log.info("reference losses computed in every step (cache_reference=%r%s)", setting,
                 f"; {refusal}" if refusal else f"; {samples} samples, {frames} frames")
        return None
    return reference_losses(policy, params, setup.loader.frame_pass(), setup.spec)


# ------------------------------------------------------------------------------ train

def train_remix(config: Any, reference: str | os.PathLike, path: str | os.PathLike
                ) -> dict[str, Any]:
    """Runs Re-Mix on ``config``'s data against the reference BC run, into ``path``.

    Reruns on the same ``path`` resume from the latest checkpoint (weights and their average
    included) with the same data order. SIGTERM/SIGINT save a checkpoint and the weights, then
    return.

    Args:
      config: a :func:`remix_config`-shaped ``ConfigDict``.
      reference: the reference BC run's directory (``train_bc.py --path``).
      path: the Re-Mix run directory.

    Returns:
      The loop's last metrics (see :func:`~openx_train.training.loop.train`), plus
      ``domains``, ``alpha`` and ``average_alpha`` (lists), ``reference_cached`` (whether the
      reference's losses were computed once per frame), ``weights_file`` and
      ``weights_plot`` (paths; None on processes other than 0).

    Raises:
      ConfigError: for a config that differs from the reference's (every difference
        listed), or that does not fit the data.
      RunNotFoundError: when ``reference`` is not a run with a checkpoint.
    """
    t0 = time.perf_counter()
    path = os.path.abspath(os.fspath(path))
    options = remix_options(config)
    # before anything touches JAX (restoring the reference does)
    process_index, process_count = loop.initialize_distributed(config)
    ref = load_reference(reference, _reference_checkpoint(config))
    datasets = loop.dataset_configs(config)
    planned = _planned_info(config, datasets)
    # Everything but the input spec (known once the loader gives a batch) before anything is
    # built or trained; the spec after.
    check_reference({**ref.info.to_json(), "input_spec": None},
                    {**planned, "input_spec": None}, path=ref.path)
    datasets = with_reference_statistics(datasets, ref)
    loop.enable_compilation_cache(str(config.get("compilation_cache", "")))
    os.makedirs(path, exist_ok=True)
    checkpointer = run_lib.Checkpointer(path, keep=int(config.keep))
    try:
        start = checkpointer.latest_step() or 0
        block = loop.block_size(config, start)
        setup = loop.build(config, start_step=start, process_index=process_index,
                           process_count=process_count, block=block, datasets=datasets)
        check_reference(ref.info, setup.info, path=ref.path)  # the input spec, now known
        domains = list(setup.loader.domain_names)
        a0 = initial_weights(domains, setup.loader.domain_frames,
                             _initial_weights_setting(config))
        info = dataclasses.replace(setup.info, kind="remix", extra={
            "reference": ref.path, "reference_step": ref.step,
            "remix": {"eta": options.eta, "smoothing": options.smoothing,
                      "absent": options.absent, "initial_weights": a0.tolist()}})
        setup = dataclasses.replace(setup, info=info)
        if process_index == 0:
            loop._write_run_files(path, setup, config)
        reference_policy = make_policy(resolve_model_config(ref.info.model), ref.info.input_spec)
        state = put_state(create_remix_state(setup.state, a0, reference_policy=reference_policy,
                                             options=options), setup.mesh)
        if start:
            state = checkpointer.restore(state)
            log.info("resumed %s at step %d", path, start)
        reference_params = put_state(ref.params, setup.mesh)
        cache = _reference_cache(config, setup, reference_policy, ref.params, start)
        jitted = jit_remix_block_step(setup.mesh, unroll=loop.needs_unrolled_block(setup.spec))

        def block_step(s, batches):
            return jitted(s, reference_params, batches)

        alphas = _AlphaWriter(path, domains, int(config.save_freq), int(config.steps),
                              enabled=process_index == 0)
        if not start:
            alphas.write(0, state)
        else:
            alphas.last = start
        final = {"state": state}

        def on_log(step, s, values):
            # The loop logs at its last step (the end, or a signal), so the last state seen
            # here is the final one (earlier ones were donated to the next step).
            final["state"] = s
            alphas.write(step, s)

        def summarize(metrics, names):
            return summarize_remix(metrics, names, domains)

        result = loop.run_loop(setup, path, checkpointer=checkpointer, block_step=block_step,
                               state=state, block=block, on_log=on_log, time_origin=t0,
                               put_fn=functools.partial(put_remix_block, reference_loss=cache),
                               summarize_fn=summarize)
        state = final["state"]
    finally:
        checkpointer.close()
    weights = jax.device_get(state.weights)
    result.update(domains=domains, alpha=np.asarray(weights.alpha).tolist(),
                  average_alpha=np.asarray(weights.average_alpha).tolist(),
                  reference_cached=cache is not None, weights_file=None, weights_plot=None)
    if process_index == 0:
        alphas.write(int(result["step"]), state, force=True)
        result["weights_file"] = write_final_weights(
            path, domains, weights.average_alpha,
            metadata={"step": int(result["step"]), "domain_key": setup.loader.domain_key,
                      "reference": ref.path, "eta": options.eta,
                      "smoothing": options.smoothing})
        result["weights_plot"] = plot_weights(path, os.path.join(path, WEIGHTS_PLOT),
                                              history=logged_history(path, domains))
    return result


__all__ = [
    "Reference",
    "load_reference",
    "logged_history",
    "put_remix_block",
    "remix_config",
    "remix_options",
    "summarize_remix",
    "train_remix",
    "with_reference_statistics",
]
