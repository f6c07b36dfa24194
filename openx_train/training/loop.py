"""The training loop: a config and a run directory in, a trained policy's checkpoints out.

::

    from openx_train.training import loop
    config = loop.train_config()              # or a configs/bc/*.py get_config()
    config.data.datasets = [{"path": "logs/reacher"}]
    metrics = loop.train(config, "runs/bc")   # rerun: resumes from the latest checkpoint

Built in two parts so that other trainers (Re-Mix) reuse them with another step:

* :func:`build` reads the datasets, makes the loaders (the training stream starting at the
  resumed step), the input spec, the policy, the fresh train state and the mesh;
* :func:`run_loop` runs a jitted *block* step (``K`` batches per call through ``lax.scan``, one
  transfer per block) over the loader, whose blocks a :class:`Prefetch` thread draws, gathers
  and transfers while the previous ones train, with validation, checkpoints (every ``save_freq``, the
  best by validation loss, on SIGTERM/SIGINT), metrics (CSV, TensorBoard, optional wandb) and a
  progress bar; values leave the device only at log intervals.

Run as several processes (``jax.distributed``), each process reads its share of every dataset
(``process_index``/``process_count``) and ``config.batch_size`` is the global batch.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import queue
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from openx_train import run as run_lib
from openx_train.data import (
    AugmentConfig,
    DatasetConfig,
    LoaderConfig,
    Structure,
    infer_structure,
    make_dataloader,
)
from openx_train.data.errors import ConfigError
from openx_train.models import input_spec, make_policy, model_config, resolve_model_config
from openx_train.models.spec import EXAMPLE_MASK, InputSpec, model_inputs
from openx_train.training.events import EventWriter
from openx_train.training.optimizer import optimizer_config
from openx_train.training.sharding import (
    BATCH_AXIS,
    make_mesh,
    put_batch,
    put_state,
    replicated_sharding,
)
from openx_train.training.state import TrainState, create_train_state
from openx_train.training.step import (
    combine_eval_metrics,
    jit_eval_step,
    run_block,
    train_step,
)

log = logging.getLogger(__name__)

# Env vars read when the config does not set the distributed fields.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
_DATASET_FIELDS = ("path", "name", "structure", "split", "val_split", "val_fraction",
                   "min_length", "drop_invalid", "episodes")
_LOADER_FIELDS = ("n_obs", "n_action", "goal_relabeling", "drop_final_step", "weights",
                  "domain_key", "augment", "augment_options", "image_dtype", "prefetch",
                  "num_parallel_calls")


class TrainConfigError(ConfigError):
    """A training config that cannot be run (naming the field)."""


def train_config() -> ml_collections.ConfigDict:
    """The default training config: every field the loop reads.

    Fields:
      data.datasets: list of dicts, one per dataset: ``path`` (required), and optionally
        ``name``, ``structure`` (a :meth:`Structure.to_json` dict; default
        ``data.structure``, else inferred from the logged keys), ``split``, ``val_split``,
        ``val_fraction`` (default ``data.val_fraction``), ``min_length``, ``drop_invalid``,
        ``episodes``.
      data.structure: the structure of datasets that give none (None: inferred).
      data.image_size: camera size of inferred structures (None: as logged).
      data.val_fraction: episodes held out for validation, where a dataset does not say.
      data.loader: :class:`~openx_train.data.LoaderConfig` fields (``n_obs``, ``n_action``,
        ``goal_relabeling``, ``weights``, ``domain_key``, ``augment`` (bool: image
        augmentation of training batches), ``augment_options`` (the :class:`AugmentConfig`
        fields, by default its defaults),
        ``image_dtype``, ``prefetch`` (batches the camera pipeline makes ahead, and blocks
        the loop's :class:`Prefetch` thread transfers ahead of the step; 0: none),
        ``num_parallel_calls``, ``drop_final_step``).
      model, optimizer: see :func:`~openx_train.models.model_config` and
        :func:`~openx_train.training.optimizer_config`.
      steps: train steps. batch_size: the global batch. seed: parameters, dropout, data.
      deterministic: the loader gives the same batches for the same seed (a resumed run ends
        with the parameters of an uninterrupted one).
      steps_per_call: batches per jitted call (a ``lax.scan`` block); the loop uses the
        largest divisor of it that every frequency and ``steps`` share.
      log_freq, val_freq, save_freq, eval_freq: in steps (0 disables the last three).
      val_batches: validation batches per validation (0: the whole split).
      keep: checkpoints kept besides the best by validation loss.
      eval: in-training evaluation (``env_name``, ``num_episodes``, ``num_envs``,
        ``max_episode_steps``), run through ``openx_train.eval.evaluate``.
      compilation_cache: directory of JAX's persistent compilation cache ("" : the user
        cache directory, "none": off).
      distributed: ``coordinator_address``, ``num_processes``, ``process_id`` (or the env
        vars ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``).
      wandb: ``project`` (empty: no wandb), ``name``, ``mode`` (``"offline"``).

    Returns:
      A new, unlocked ``ConfigDict``.
    """
    placeholder = ml_collections.config_dict.placeholder
    return ml_collections.ConfigDict({
        "kind": "bc",
        "data": {
            "datasets": [],
            "structure": placeholder(dict),
            "image_size": placeholder(int),
            "val_fraction": 0.05,
            "loader": {"n_obs": 1, "n_action": 1, "goal_relabeling": False,
                       "drop_final_step": True, "weights": "uniform", "domain_key": "dataset",
                       "augment": True, "augment_options": dataclasses.asdict(AugmentConfig()),
                       "image_dtype": "uint8",
                       "prefetch": 2,
                       "num_parallel_calls": -1},
        },
        "model": model_config(),
        "optimizer": optimizer_config(),
        "steps": 1000,
        "batch_size": 256,
        "seed": 0,
        "deterministic": False,
        "steps_per_call": 8,
        "log_freq": 100,
        "val_freq": 500,
        "val_batches": 0,
        "save_freq": 1000,
        "keep": 3,
        "eval_freq": 0,
        "eval": {"env_name": "", "num_episodes": 10, "num_envs": 2, "max_episode_steps": 0},
        "compilation_cache": "",
        "distributed": {"coordinator_address": "", "num_processes": 0, "process_id": -1},
        "wandb": {"project": "", "name": "", "mode": "offline"},
    })


def _plain(value: Any) -> Any:
    return run_lib._plain(value)


def _check_fields(given: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise TrainConfigError(f"{where}: unknown fields {unknown}; expected fields among "
                               f"{sorted(known)}")


def _structure(entry: Mapping[str, Any], config: Any, where: str) -> Structure:
    given = entry.get("structure")
    if given is None:
        given = _plain(config.data.get("structure"))
    if given is None:
        image_size = config.data.get("image_size")
        return infer_structure(os.fspath(entry["path"]), image_size=image_size or None)
    if isinstance(given, Structure):
        return given
    try:
        return Structure.from_json(_plain(given))
    except ConfigError as e:
        raise TrainConfigError(f"{where}.structure: {e}") from e


def dataset_configs(config: Any) -> list[DatasetConfig]:
    """The :class:`~openx_train.data.DatasetConfig` of each ``config.data.datasets`` entry.

    Raises:
      TrainConfigError: for a missing path or an unknown field, naming the entry.
    """
    entries = _plain(config.data.datasets)
    if not isinstance(entries, list) or not entries:
        raise TrainConfigError("data.datasets: expected a non-empty list of {'path': ...} "
                               f"dicts (or --data=DIR[,DIR...]), given {entries!r}")
    out = []
    for i, entry in enumerate(entries):
        where = f"data.datasets[{i}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not entry.get("path"):
            raise TrainConfigError(f"{where}: expected a dict with a 'path', given {entry!r}")
        _check_fields(entry, _DATASET_FIELDS, where)
        if not os.path.isdir(entry["path"]):
            raise TrainConfigError(f"{where}.path: no such dataset directory: {entry['path']!r}")
        kwargs = {k: entry[k] for k in ("name", "split", "val_split", "min_length",
                                        "drop_invalid", "episodes") if entry.get(k) is not None}
        kwargs["val_fraction"] = float(entry.get("val_fraction", config.data.val_fraction))
        out.append(DatasetConfig(os.fspath(entry["path"]), _structure(entry, config, where),
                                 **kwargs))
    return out


def report(result: Mapping[str, Any]) -> str:
    """What the training tools print last: a warning when the run was stopped by a signal, and
    the result as one JSON line (non-finite numbers as null)."""
    if result.get("stopped_by"):
        log.warning("stopped by %s at step %d; rerun the same command to resume",
                    result["stopped_by"], result["step"])
    return json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                       for k, v in result.items()})


def apply_flags(config: Any, *, data: Sequence[str] | None = None, name: str | None = None,
                project: str | None = None, wandb_mode: str = "offline",
                coordinator_address: str | None = None, num_processes: int | None = None,
                process_id: int | None = None) -> Any:
    """The config with the command line's ``--data``, wandb and distributed flags applied
    (``tools/train_bc.py`` and ``tools/train_remix.py``): ``data`` replaces the datasets with
    these directories, one dataset each (with the config's structure when it gives one)."""
    with config.unlocked():
        if data:
            structure = _plain(config.data.get("structure"))
            if structure is None:
                given = [_plain(d).get("structure") if isinstance(_plain(d), dict) else None
                         for d in config.data.datasets]
                if given and given[0] is not None and all(g == given[0] for g in given):
                    structure = given[0]
            entries = []
            for d in data:
                entry = {"path": os.path.abspath(d)}
                if structure is not None:
                    entry["structure"] = structure
                entries.append(entry)
            config.data.datasets = entries
        if project:
            config.wandb.project = project
            config.wandb.mode = wandb_mode
        if name:
            config.wandb.name = name
        if coordinator_address:
            config.distributed.coordinator_address = coordinator_address
        if num_processes:
            config.distributed.num_processes = num_processes
        if process_id is not None:
            config.distributed.process_id = process_id
    return config


def loader_config(config: Any, *, process_index: int = 0, process_count: int = 1,
                  start_batch: int = 0, validation: bool = False) -> LoaderConfig:
    """The :class:`~openx_train.data.LoaderConfig` of a training config (per process).

    Raises:
      TrainConfigError: for an unknown loader field, or a batch the processes do not divide.
    """
    given = _plain(config.data.loader)
    _check_fields(given, _LOADER_FIELDS, "data.loader")
    if config.batch_size % process_count:
        raise TrainConfigError(f"batch_size: expected a multiple of the {process_count} "
                               f"processes, given {config.batch_size}")
    kwargs = dict(given)
    augment = kwargs.pop("augment", True)
    options = kwargs.pop("augment_options", None) or {}
    if isinstance(augment, dict):  # a plain-dict config may give the fields here
        augment, options = True, augment
    if augment is True:
        _check_fields(options, [f.name for f in dataclasses.fields(AugmentConfig)],
                      "data.loader.augment_options")
        augment = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v
                                   for k, v in options.items()})
    elif augment in (False, None):
        augment = None
    else:
        raise TrainConfigError(f"data.loader.augment: expected a bool, given {augment!r}")
    weights = kwargs.pop("weights", "uniform")
    if isinstance(weights, list):
        weights = tuple(weights)
    return LoaderConfig(batch_size=config.batch_size // process_count, augment=augment,
                        weights=weights, seed=int(config.seed),
                        deterministic=bool(config.deterministic), process_index=process_index,
                        process_count=process_count, start_batch=start_batch,
                        remainder="pad" if validation else "partial", **kwargs)


# ------------------------------------------------------------------------------- setup

def initialize_distributed(config: Any) -> tuple[int, int]:
    """Starts ``jax.distributed`` (gloo collectives on CPU) when the config or the env asks for
    several processes; returns ``(process_index, process_count)``."""
    d = config.get("distributed") or {}
    address = d.get("coordinator_address") or os.environ.get(ENV_COORDINATOR, "")
    count = int(d.get("num_processes") or os.environ.get(ENV_NUM_PROCESSES, 0) or 0)
    pid = d.get("process_id", -1)
    pid = int(pid if pid is not None and pid >= 0 else os.environ.get(ENV_PROCESS_ID, -1))
    if count > 1:
        if not address or pid < 0:
            raise TrainConfigError(
                f"distributed: {count} processes need coordinator_address and process_id "
                f"(or {ENV_COORDINATOR}, {ENV_PROCESS_ID}); given {address!r}, {pid}")
        if not jax.distributed.is_initialized():
            # Cross-process collectives of the CPU backend (before any backend starts).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(address, num_processes=count, process_id=pid)
    return jax.process_index(), jax.process_count()


def enable_compilation_cache(setting: str) -> str | None:
    """Turns on JAX's persistent compilation cache (reruns skip compiling); returns the
    directory, or None when ``setting`` is ``"none"``."""
    if setting == "none":
        return None
    directory = setting or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "openx_train", "xla")
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


@dataclasses.dataclass(frozen=True)
class Setup:
    """What :func:`build` made.

    Attributes:
      config: the training config.
      datasets: the dataset configs.
      loader: the training loader (its stream starts at ``start_step``).
      val_loader: the validation loader, or None without validation frames.
      first_batch: the loader's first batch (already taken from ``batches``).
      batches: the training stream of host blocks (``[block, B, ...]``), the first block
        first.
      spec: the policy's input spec.
      state: a fresh train state on the mesh (restore a checkpoint into it).
      mesh: the 1-D batch mesh of every device.
      info: the run's :class:`~openx_train.run.RunInfo`.
      start_step: the step the loader starts at.
    """

    config: Any
    datasets: tuple[DatasetConfig, ...]
    loader: Any
    val_loader: Any
    first_batch: Mapping[str, Any]
    batches: Iterator[Mapping[str, Any]]
    spec: InputSpec
    state: TrainState
    mesh: Any
    info: run_lib.RunInfo
    start_step: int


def build(config: Any, *, start_step: int = 0, process_index: int = 0,
          process_count: int = 1, block: int = 1,
          datasets: Sequence[DatasetConfig] | None = None) -> Setup:
    """Loaders, input spec, policy, a fresh train state and the mesh of a training config.

    Args:
      config: a :func:`train_config`-shaped config.
      start_step: where the training stream starts (a resumed run's step).
      process_index, process_count: this process's share of the data.
      block: batches per host item of ``Setup.batches`` (stacked on a leading axis).
      datasets: the dataset configs, instead of :func:`dataset_configs` of ``config`` (Re-Mix
        passes them with its reference's normalization statistics).

    Raises:
      TrainConfigError, ConfigError, ModelConfigError: for configs that do not fit the data.
    """
    datasets = tuple(dataset_configs(config) if datasets is None else datasets)
    model = resolve_model_config(config.model)
    loader = make_dataloader(list(datasets), loader_config(
        config, process_index=process_index, process_count=process_count,
        start_batch=start_step))
    val_loader = None
    if any(d.val_fraction > 0 or d.val_split for d in datasets) and config.val_freq:
        val_loader = make_dataloader(list(datasets), loader_config(
            config, process_index=process_index, process_count=process_count,
            validation=True), split="validation")
        if len(val_loader) == 0:
            val_loader = None
    batches = loader.blocks(block)  # [block, B, ...] per item: one gather per block
    first = next(batches)
    first_batch = jax.tree.map(lambda x: x[0], first)
    spec = input_spec(model, first_batch)
    policy = make_policy(model, spec)
    mesh = make_mesh()
    state = create_train_state(policy, config.optimizer, rng=jax.random.PRNGKey(config.seed),
                               total_steps=int(config.steps), num_datasets=len(loader.names))
    state = put_state(state, mesh)
    info = run_lib.RunInfo(
        kind=config.get("kind", "bc"), datasets=run_lib.dataset_infos(
            loader, [d.path for d in datasets]),
        input_spec=spec, model=_plain(model.to_dict()),
        loader={**_plain(config.data.loader), "batch_size": int(config.batch_size)},
        domain_key=loader.domain_key, domain_names=loader.domain_names)
    return Setup(config=config, datasets=datasets, loader=loader, val_loader=val_loader,
                 first_batch=first_batch, batches=_chain(first, batches), spec=spec,
                 state=state, mesh=mesh, info=info, start_step=start_step)


def _chain(first, rest):
    yield first
    yield from rest


def put_block(block: Mapping[str, Any], spec: InputSpec, mesh: Any, *,
              inputs: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None
              ) -> dict[str, Any]:
    """A stacked host block ``[K, B, ...]`` as device arrays split along ``B``: the policy's
    model inputs with the training targets, or ``inputs(flat batch of K * B examples)`` (Re-Mix
    adds the domain ids and the reference's losses)."""
    k, b = np.shape(block["action"])[:2]
    flat = jax.tree.map(lambda x: np.reshape(x, (k * b, *np.shape(x)[2:])), dict(block))
    host = (model_inputs(flat, spec, train=True) if inputs is None else inputs(flat))
    host = jax.tree.map(lambda x: np.reshape(x, (k, b, *np.shape(x)[1:])), host)
    sharding = NamedSharding(mesh, PartitionSpec(None, BATCH_AXIS))
    if jax.process_count() == 1:
        return jax.device_put(host, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), host)


def jit_block_step(mesh: Any, step_fn: Callable = train_step, *, unroll: bool = False
                   ) -> Callable:
    """``step_fn`` over a stacked block of batches in one jitted call (``lax.scan``): state
    replicated and donated, batches split along their second axis; returns the state and the
    metrics stacked ``[K, ...]``.

    Args:
      mesh: the device mesh.
      step_fn: ``(state, batch) -> (state, metrics)``.
      unroll: unroll the scan (straight-line code, no XLA while loop). XLA's CPU backend leaves
        the convolutions of a while-loop body (the backward pass's weight and input gradients)
        in layouts its Eigen convolution cannot take and runs them in a naive loop: an image
        step in a rolled scan was 20x slower than the same step alone (see
        :func:`needs_unrolled_block`). Compile time grows with the block size.
    """

    def block_step(state, batches):
        return run_block(step_fn, state, batches, unroll=unroll)

    replicated = replicated_sharding(mesh)
    return jax.jit(block_step,
                   in_shardings=(replicated, NamedSharding(mesh, PartitionSpec(None, BATCH_AXIS))),
                   out_shardings=(replicated, replicated), donate_argnums=0)


def needs_unrolled_block(spec: InputSpec) -> bool:
    """Whether :func:`jit_block_step` should unroll its scan: on XLA's CPU backend, for a
    policy with image inputs (rank-4 or higher per example). Measured at 64/32 px, CNN width
    32, batch 64 (bench/bench_train.py --only block): 23 s a step rolled, 0.8 s unrolled."""
    has_images = any(
        (path.startswith("observation/") and len(s.shape) >= 4)
        or (path.startswith("goal/") and len(s.shape) >= 3) for path, s in spec.inputs)
    return has_images and jax.default_backend() == "cpu"


def block_size(config: Any, start_step: int) -> int:
    """Batches per jitted call: the largest divisor of ``steps_per_call`` that divides every
    event step (logging, validation, saving, evaluation, the end, the start)."""
    k = max(1, int(config.get("steps_per_call", 1)))
    for f in (config.log_freq, config.val_freq, config.save_freq, config.get("eval_freq", 0),
              config.steps, start_step):
        if f:
            k = math.gcd(k, int(f))
    return max(k, 1)


# ----------------------------------------------------------------------------- metrics

class MetricsWriter:
    """metrics.csv, TensorBoard event files and (when asked and installed) wandb; process 0
    writes, the others do nothing."""

    def __init__(self, path: str, *, start_step: int, enabled: bool = True,
                 wandb_config: Mapping[str, Any] | None = None, config: Any = None):
        self.enabled = enabled
        self.path = os.path.join(path, run_lib.METRICS_FILE)
        self._columns: list[str] | None = None
        self._rows: list[dict[str, Any]] = []
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if os.path.exists(self.path):  # resumed: keep the rows up to the checkpoint
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self._columns = list(reader.fieldnames or [])
                self._rows = [r for r in reader if int(float(r["step"])) <= start_step]
            self._rewrite()
        self._tb = EventWriter(os.path.join(path, run_lib.TENSORBOARD_DIR))
        wandb_config = dict(wandb_config or {})
        if wandb_config.get("project"):
            self._wandb = start_wandb(path, wandb_config, config)

    def _rewrite(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, self._columns or ["step"], extrasaction="ignore")
            w.writeheader()
            w.writerows(self._rows)
        os.replace(tmp, self.path)

    def write(self, step: int, values: Mapping[str, float]) -> None:
        """One row (step and values); new columns rewrite the file with them."""
        if not self.enabled:
            return
        row = {"step": step, **{k: _fmt(v) for k, v in values.items()}}
        new = [k for k in row if k not in (self._columns or [])]
        self._rows.append(row)
        if new or self._columns is None:
            self._columns = [*(self._columns or []), *new]
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self._columns, extrasaction="ignore").writerow(row)
        self._tb.scalars(step, {k: v for k, v in values.items()
                                if v is not None and np.isfinite(v)})
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in values.items() if v is not None}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


WANDB_DIR = "wandb"
WANDB_ID_FILE = "run_id"


def start_wandb(path: str, options: Mapping[str, Any], config: Any = None) -> Any:
    """The wandb run of a run directory, or None (with a warning) when wandb is not installed.

    wandb writes under ``path/wandb`` (offline runs as ``offline-run-*/run-*.wandb``, which
    ``wandb sync`` uploads). The wandb run id is kept in ``path/wandb/run_id``, so a resumed
    training run logs into the same wandb run.

    Args:
      path: the run directory.
      options: ``project``, ``name`` (empty: wandb's), ``mode`` (``"offline"`` by default,
        ``"online"``, ``"disabled"``).
      config: the training config, stored with the wandb run.
    """
    try:
        import wandb
    except ImportError:
        log.warning("wandb: project %r asked for, but wandb is not installed (pip install "
                    "wandb); metrics go to metrics.csv and TensorBoard only",
                    options["project"])
        return None
    directory = os.path.join(path, WANDB_DIR)
    os.makedirs(directory, exist_ok=True)
    id_file = os.path.join(directory, WANDB_ID_FILE)
    if os.path.exists(id_file):
        with open(id_file) as f:
            run_id = f.read().strip()
    else:
        run_id = secrets.token_hex(4)  # wandb's id alphabet: [a-z0-9]
        with open(id_file, "w") as f:
            f.write(run_id + "\n")
    return wandb.init(project=options["project"], name=options.get("name") or None,
                      mode=options.get("mode") or "offline", dir=path, id=run_id,
                      config=_plain(config), resume="allow")


def _fmt(v: Any) -> Any:
    return "" if v is None else float(v)


def summarize(metrics: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, float]:
    """Host values of a log interval's stacked step metrics: means of ``loss``,
    ``grad_norm`` and other scalars, the last ``learning_rate``, per-dataset losses weighed by
    their counts (``loss/<dataset>``)."""
    host = jax.device_get(list(metrics))
    out: dict[str, float] = {}
    if not host:
        return out
    keys = host[0].keys()
    for k in keys:
        if k in ("dataset_loss", "dataset_count"):
            continue
        values = np.concatenate([np.reshape(m[k], (-1, *np.shape(m[k])[1:])) for m in host])
        if values.ndim > 1:
            continue
        out[k] = float(values[-1]) if k == "learning_rate" else float(np.mean(values))
    if "dataset_loss" in keys:
        loss = np.concatenate([np.reshape(m["dataset_loss"], (-1, len(names))) for m in host])
        count = np.concatenate([np.reshape(m["dataset_count"], (-1, len(names))) for m in host])
        total = np.sum(count, axis=0)
        for i, n in enumerate(names):
            if len(names) > 1 and total[i] > 0:
                out[f"loss/{n}"] = float(np.sum(loss[:, i] * count[:, i]) / total[i])
    return out


def validate(state: TrainState, loader: Any, spec: InputSpec, mesh: Any, eval_step: Callable,
             *, max_batches: int = 0) -> dict[str, Any]:
    """The validation loss of ``state`` over the validation loader (its padding rows count for
    nothing)."""
    results = []
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        batch = dict(batch)
        batch[EXAMPLE_MASK] = batch["valid"]
        results.append(eval_step(state, put_batch(batch, spec, mesh)))
    return combine_eval_metrics(results)


# -------------------------------------------------------------------------------- loop

class Prefetch:
    """Device blocks made from host blocks in a background thread, up to ``depth`` ahead of
    the training thread, in order: drawing the indices, gathering the frames and transferring
    them overlap the jitted steps instead of running between them. An exception of the host
    stream or of ``put`` is raised by the ``next`` that would have returned its block.

    With ``depth=0`` the blocks are made on the calling thread, when asked for.
    """

    _END = object()

    def __init__(self, blocks: Iterator[Any], put: Callable[[Any], Any], depth: int = 2):
        self._blocks = blocks
        self._put = put
        self._thread: threading.Thread | None = None
        if depth <= 0:
            return
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for host in self._blocks:
                item = self._put(host)
                while not self._offer(item):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    return
            item = self._END
        except BaseException as e:  # handed to the training thread
            item = _Raised(e)
        while not self._offer(item) and not self._stop.is_set():
            pass

    def _offer(self, item: Any) -> bool:
        try:
            self._queue.put(item, timeout=0.1)
            return True
        except queue.Full:
            return False

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self) -> Any:
        if self._thread is None:
            return self._put(next(self._blocks))
        item = self._queue.get()
        if item is self._END:
            self._queue.put(item)  # every later next ends too
            raise StopIteration
        if isinstance(item, _Raised):
            self._queue.put(item)
            raise item.error
        return item

    def close(self) -> None:
        """Stops the thread (the blocks it made ahead are dropped)."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)
        self._thread.join()

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class _Raised:
    error: BaseException


class _Stop:
    """SIGTERM/SIGINT set a flag that the loop checks between blocks (a second SIGINT raises
    KeyboardInterrupt at once)."""

    def __init__(self):
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        log.warning("%s: saving a checkpoint, then stopping", self.signal)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step",
                dynamic_ncols=True, desc="train")


def run_loop(setup: Setup, path: str, *, checkpointer: run_lib.Checkpointer,
             block_step: Callable, state: TrainState, block: int,
             eval_fn: Callable[[TrainState, int], Mapping[str, float]] | None = None,
             on_log: Callable[[int, TrainState, Mapping[str, float]], None] | None = None,
             time_origin: float | None = None, put_fn: Callable = put_block,
             summarize_fn: Callable = summarize) -> dict[str, Any]:
    """Runs ``block_step`` from ``state.step`` to ``config.steps``.

    Args:
      setup: from :func:`build` (its stream starts at ``state.step``).
      path: the run directory.
      checkpointer: saves every ``save_freq`` steps, at a new best validation loss, at the end
        and on SIGTERM/SIGINT.
      block_step: ``(state, stacked batches [block, B, ...]) -> (state, metrics [block, ...])``
        jitted (:func:`jit_block_step` of any step function).
      state: the (fresh or restored) state on the mesh.
      block: batches per call (it divides every event step).
      eval_fn: ``(state, step) -> metrics`` run every ``eval_freq`` steps (process 0 logs).
      on_log: called at log intervals with the step, the state and the host metrics.
      time_origin: ``time.perf_counter()`` at the command's start (for ``first_step_s``).
      put_fn: ``(host block, spec, mesh) -> device block`` (default :func:`put_block`; Re-Mix
        also transfers the domain ids).
      summarize_fn: ``(device metrics of a log interval, dataset names) -> host values``
        (default :func:`summarize`; Re-Mix adds per-domain values).

    Returns:
      The last logged metrics, plus ``step``, ``val_loss`` (the last), ``stopped_by`` (the
      signal's name, or None) and ``first_step_s``.
    """
    config = setup.config
    steps = int(config.steps)
    start = int(jax.device_get(state.step))
    main = jax.process_index() == 0
    writer = MetricsWriter(path, start_step=start, enabled=main,
                           wandb_config=_plain(config.get("wandb", {})), config=config)
    eval_step = jit_eval_step(setup.mesh)
    names = setup.loader.names
    best = checkpointer.val_loss(checkpointer.best_step()) if checkpointer.best_step() else None
    pending: list[Any] = []  # device metrics of the current log interval
    inflight: list[Any] = []  # the last blocks' metrics, to bound how far the host runs ahead
    wait = 0.0
    t_interval = time.perf_counter()
    last: dict[str, Any] = {"step": start, "val_loss": None, "stopped_by": None,
                            "first_step_s": None}
    interval_start = start
    step = start
    bar = _progress(steps, start, main)
    depth = int(_plain(config.data.loader).get("prefetch", 2) or 0)
    blocks = Prefetch(setup.batches, lambda host: put_fn(host, setup.spec, setup.mesh), depth)
    try:
        with _Stop() as stop:
            while step < steps:
                t0 = time.perf_counter()
                device = next(blocks)
                wait += time.perf_counter() - t0
                state, metrics = block_step(state, device)
                step += block
                pending.append(metrics)
                inflight.append(metrics["loss"])
                if len(inflight) > 2:
                    inflight.pop(0).block_until_ready()
                if last["first_step_s"] is None and time_origin is not None:
                    jax.block_until_ready(metrics["loss"])
                    last["first_step_s"] = time.perf_counter() - time_origin
                    last["first_step_unix"] = time.time()
                    log.info("first step after %.2f s", last["first_step_s"])
                bar.update(block)
                values: dict[str, Any] = {}
                if step % config.log_freq == 0 or step == steps or stop.signal:
                    values = summarize_fn(pending, names)
                    elapsed = time.perf_counter() - t_interval
                    values["steps_per_sec"] = (step - interval_start) / max(elapsed, 1e-9)
                    values["data_wait_share"] = wait / max(elapsed, 1e-9)
                    pending, wait, t_interval, interval_start = [], 0.0, time.perf_counter(), step
                    bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}",
                                    sps=f"{values['steps_per_sec']:.0f}", refresh=False)
                val_loss = None
                if setup.val_loader is not None and config.val_freq and (
                        step % config.val_freq == 0 or step == steps):
                    t_val = time.perf_counter()
                    v = validate(state, setup.val_loader, setup.spec, setup.mesh, eval_step,
                                 max_batches=int(config.get("val_batches", 0)))
                    val_loss = v["loss"]
                    values["val_loss"] = val_loss
                    if len(names) > 1:
                        for i, n in enumerate(names):
                            if v["dataset_count"][i] > 0:
                                values[f"val_loss/{n}"] = float(v["dataset_loss"][i])
                    last["val_loss"] = val_loss
                    t_interval += time.perf_counter() - t_val  # not train time
                evaluate = eval_fn is not None and bool(config.get("eval_freq")) and (
                    step % config.eval_freq == 0 or step == steps) and not stop.signal
                better = val_loss is not None and np.isfinite(val_loss) and (
                    best is None or val_loss < best)
                if better:
                    best = val_loss
                if (better or step == steps or stop.signal or evaluate
                        or (config.save_freq and step % config.save_freq == 0)):
                    checkpointer.save(state, val_loss=val_loss)
                if evaluate:  # from the checkpoint just saved, as a user would load it
                    t_eval = time.perf_counter()
                    checkpointer.wait()
                    values.update({f"eval/{k}": v for k, v in eval_fn(state, step).items()})
                    t_interval += time.perf_counter() - t_eval
                if values:
                    writer.write(step, values)
                    last.update(values)
                    if on_log is not None:
                        on_log(step, state, values)
                if stop.signal:
                    last["stopped_by"] = stop.signal
                    break
    finally:
        blocks.close()
        bar.close()
        checkpointer.wait()
        writer.close()
    last["step"] = step
    return last


def _write_run_files(path: str, setup: Setup, config: Any) -> None:
    resolved = ml_collections.ConfigDict(_plain(config))
    resolved.data.datasets = [
        {"path": os.path.abspath(d.path), "name": n, "structure": d.structure.to_json(),
         "val_fraction": d.val_fraction, **({"split": d.split} if d.split != "train" else {}),
         **({"val_split": d.val_split} if d.val_split else {}),
         **({"episodes": sorted(d.episodes)} if d.episodes is not None else {})}
        for d, n in zip(setup.datasets, setup.loader.names)]
    run_lib.write_run(path, setup.info, resolved)


def train(config: Any, path: str | os.PathLike, *,
          eval_fn: Callable[[TrainState, int], Mapping[str, float]] | None = None
          ) -> dict[str, Any]:
    """Trains a BC policy on ``config``'s datasets into the run directory ``path``.

    Reruns on the same ``path`` resume from the latest checkpoint with the same data order
    (the loader starts at the resumed step), so an interrupted run ends as an uninterrupted
    one would (bitwise with ``config.deterministic``). SIGTERM/SIGINT save a checkpoint, then
    return (``stopped_by`` names the signal).

    Args:
      config: a :func:`train_config`-shaped ``ConfigDict``.
      path: the run directory (see :mod:`openx_train.run`).
      eval_fn: run every ``eval_freq`` steps: ``(state, step) -> metrics``.

    Returns:
      The last logged metrics (``loss``, ``val_loss``, ``grad_norm``, ``learning_rate``,
      ``steps_per_sec``, ``data_wait_share``, per-dataset losses), ``step``, ``stopped_by``,
      ``first_step_s`` (seconds from the call to the first step's result) and
      ``first_step_unix`` (its wall-clock time).

    Raises:
      TrainConfigError, ConfigError, ModelConfigError: for a config that does not fit.
    """
    t0 = time.perf_counter()
    path = os.path.abspath(os.fspath(path))
    process_index, process_count = initialize_distributed(config)
    enable_compilation_cache(str(config.get("compilation_cache", "")))
    os.makedirs(path, exist_ok=True)
    checkpointer = run_lib.Checkpointer(path, keep=int(config.keep))
    try:
        start = checkpointer.latest_step() or 0
        if start >= int(config.steps):
            log.info("%s: already trained to step %d (steps=%d)", path, start, config.steps)
        block = block_size(config, start)
        setup = build(config, start_step=start, process_index=process_index,
                      process_count=process_count, block=block)
        if process_index == 0:
            _write_run_files(path, setup, config)
        state = setup.state
        if start:
            state = checkpointer.restore(state)
            log.info("resumed %s at step %d", path, start)
        if eval_fn is None and config.get("eval_freq") and config.eval.get("env_name"):
            eval_fn = _default_eval_fn(config, path, setup)
        block_step = jit_block_step(setup.mesh, unroll=needs_unrolled_block(setup.spec))
        return run_loop(setup, path, checkpointer=checkpointer, block_step=block_step,
                        state=state, block=block, eval_fn=eval_fn, time_origin=t0)
    finally:
        checkpointer.close()


def _default_eval_fn(config: Any, path: str, setup: Setup):
    """Rollouts of the checkpoint just saved, through ``openx_train.inference.evaluate_run``
    (the policy exactly as ``load_policy`` gives it), on process 0; None when that module is
    not available."""
    try:
        from openx_train.inference import evaluate_run  # type: ignore[import-not-found]
    except ImportError:
        log.warning("eval_freq: openx_train.inference.evaluate_run is not available; no "
                    "evaluation during training")
        return None

    def eval_fn(state: TrainState, step: int) -> dict[str, float]:
        if jax.process_index() != 0:
            return {}
        e = config.eval
        result = evaluate_run(path, e.env_name, which=step, num_episodes=int(e.num_episodes),
                              num_envs=int(e.num_envs) or None, seed=int(config.seed),
                              max_episode_steps=int(e.max_episode_steps) or None)
        return {k: float(result[k]) for k in ("return_mean", "return_ci95", "success_rate",
                                              "length_mean") if result.get(k) is not None}

    return eval_fn


__all__ = [
    "Prefetch",
    "Setup",
    "TrainConfigError",
    "apply_flags",
    "block_size",
    "build",
    "dataset_configs",
    "enable_compilation_cache",
    "initialize_distributed",
    "jit_block_step",
    "loader_config",
    "needs_unrolled_block",
    "put_block",
    "report",
    "run_loop",
    "start_wandb",
    "summarize",
    "train",
    "train_config",
    "validate",
]
