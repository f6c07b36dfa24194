"""The run directory: what a training run leaves behind, and how to read it back.

::

    PATH/
      config.json    the full resolved config (after command-line overrides and ``--data``)
      run.json       RunInfo: datasets (path, structure, the exact statistics each was normalized
                     with, frames, episodes), the model's input spec, the resolved model config,
                     the domains, the loader options that shape a model input
      checkpoints/   orbax: the last ``keep`` checkpoints plus the best by validation loss; each
                     holds the whole train state (step, params, optimizer state, rng, EMA params)
      metrics.csv, tensorboard/

A policy needs nothing else::

    info = read_run(path)
    params, step = restore_params(path, "best")

The training loop saves through :class:`Checkpointer`::

    ckpt = Checkpointer(path, keep=3)
    state = ckpt.restore(state) if ckpt.latest_step() is not None else state
    ckpt.save(state, val_loss=0.12)
    ckpt.close()
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from openx_train.data.config import Structure
from openx_train.data.errors import ConfigError, DatasetFormatError
from openx_train.data.statistics import DatasetStatistics
from openx_train.models.errors import InputSpecError
from openx_train.models.spec import InputSpec

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
KINDS = ("bc", "remix")
# Items of a checkpoint: the parameters (restorable alone), the EMA parameters when kept, the
# rest of the state as a flat list of leaves (its structure comes from the template at restore),
# and a small JSON record (step, validation loss, leaf count).
_PARAMS, _EMA, _REST, _META = "params", "ema_params", "rest", "meta"


class _QuietLibraries(logging.Filter):
    """Drops orbax's INFO records (a line per file it reads or writes) and its warning that a
    checkpoint directory opened for reading is read only (policies open it so on purpose);
    orbax's other warnings and errors pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" not in record.pathname:
            return True
        return record.levelno >= logging.WARNING and \
            not str(record.msg).startswith("Given directory is read only")


# Libraries whose INFO lines say nothing a user of the tools acts on: jax's backend probing
# ("Unable to initialize backend 'tpu'"), PyOpenGL's missing accelerator module.
_CHATTY = ("jax._src.xla_bridge", "OpenGL.acceleratesupport")


def quiet_library_logs(logger: str = "absl") -> None:
    """Keeps the command-line tools' logs to what a user needs: installs :class:`_QuietLibraries`
    on ``logger`` (absl's, which orbax logs through) once, and raises the chatty libraries'
    loggers to WARNING."""
    target = logging.getLogger(logger)
    if not any(isinstance(f, _QuietLibraries) for f in target.filters):
        target.addFilter(_QuietLibraries())
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)


class RunError(ValueError):
    """A run directory that cannot be read, or a checkpoint that does not fit."""


class RunNotFoundError(RunError, FileNotFoundError):
    """A path that is not a run directory (or has no checkpoint)."""


def _plain(value: Any) -> Any:
    """ConfigDicts, mappings, tuples and numpy scalars as plain JSON values."""
    if hasattr(value, "to_dict") and not isinstance(value, Mapping):
        value = value.to_dict()
    if isinstance(value, Mapping) or hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """One dataset of a run.

    Attributes:
      name: its name (``DataLoader.names``; ``dataset_id`` indexes these).
      path: its directory.
      structure: the keys read and how they were normalized.
      statistics: the exact statistics its state and action were normalized with (None when
        nothing was normalized).
      frames: training frames.
      episodes: training episodes.
    """

    name: str
    path: str
    structure: Structure
    statistics: DatasetStatistics | None = None
    frames: int = 0
    episodes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "structure": self.structure.to_json(),
                "statistics": None if self.statistics is None else self.statistics.to_json(),
                "frames": int(self.frames), "episodes": int(self.episodes)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DatasetInfo:
        stats = data.get("statistics")
        return cls(name=str(data["name"]), path=str(data["path"]),
                   structure=Structure.from_json(data["structure"]),
                   statistics=None if stats is None else DatasetStatistics.from_json(
                       stats, source="run"),
                   frames=int(data.get("frames", 0)), episodes=int(data.get("episodes", 0)))


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What a policy needs to be rebuilt and fed exactly as in training (``run.json``).

    Attributes:
      kind: ``"bc"`` or ``"remix"``.
      datasets: the mixture's datasets, in ``dataset_id`` order.
      input_spec: the policy's inputs (:class:`~openx_train.models.InputSpec`).
      model: the resolved model config, as plain JSON (``resolve_model_config`` takes it).
      loader: the loader options that shape a model input (``n_obs``, ``n_action``,
        ``goal_relabeling``, ``image_dtype``, ``drop_final_step``, ...), plain JSON.
      domain_key: ``LoaderConfig.domain_key``.
      domain_names: the domains, indexed by ``domain_id``.
      pooled_statistics: whether the datasets were normalized with statistics pooled across
        the mixture (then every dataset's ``statistics`` are those pooled ones).
      extra: anything else a kind of run records (plain JSON).
      format_version: of ``run.json``.
    """

    kind: str
    datasets: tuple[DatasetInfo, ...]
    input_spec: InputSpec
    model: Mapping[str, Any]
    loader: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    domain_key: str = "dataset"
    domain_names: tuple[str, ...] = ()
    pooled_statistics: bool = False
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.kind not in KINDS:
            raise RunError(f"run kind: expected one of {KINDS}, given {self.kind!r}")
        object.__setattr__(self, "datasets", tuple(self.datasets))
        object.__setattr__(self, "domain_names", tuple(str(n) for n in self.domain_names))
        if not self.datasets:
            raise RunError("run datasets: expected at least one dataset, given none")
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise RunError(f"run datasets: names must be unique, given {names}")

    @property
    def names(self) -> tuple[str, ...]:
        """Dataset names, in ``dataset_id`` order."""
        return tuple(d.name for d in self.datasets)

    def dataset(self, name: str | None = None) -> DatasetInfo:
        """One dataset by name (default: the only one, or the first).

        Raises:
          RunError: for a name the run did not train on.
        """
        if name is None:
            return self.datasets[0]
        for d in self.datasets:
            if d.name == name:
                return d
        raise RunError(f"run dataset: expected one of {list(self.names)}, given {name!r}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable description; :meth:`from_json` reads it back."""
        return {"format_version": self.format_version, "kind": self.kind,
                "datasets": [d.to_json() for d in self.datasets],
                "input_spec": self.input_spec.to_json(), "model": _plain(self.model),
                "loader": _plain(self.loader), "domain_key": self.domain_key,
                "domain_names": list(self.domain_names),
                "pooled_statistics": bool(self.pooled_statistics), "extra": _plain(self.extra)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, source: str = RUN_FILE) -> RunInfo:
        """The RunInfo :meth:`to_json` described.

        Raises:
          RunError: for another format version or a missing or malformed field (naming it).
        """
        if not isinstance(data, Mapping):
            raise RunError(f"{source}: expected a JSON object, given {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise RunError(f"{source} format_version: expected {FORMAT_VERSION}, given "
                           f"{version!r}")
        for key in ("kind", "datasets", "input_spec", "model"):
            if key not in data:
                raise RunError(f"{source}: missing field {key!r}")
        datasets = []
        for i, d in enumerate(data["datasets"]):
            try:
                datasets.append(DatasetInfo.from_json(d))
            except (KeyError, TypeError, AttributeError, ConfigError, DatasetFormatError) as e:
                raise RunError(f"{source} datasets[{i}]: {type(e).__name__}: {e}") from e
        try:
            spec = InputSpec.from_json(data["input_spec"])
        except InputSpecError as e:
            raise RunError(f"{source} input_spec: {e}") from e
        return cls(kind=data["kind"], datasets=tuple(datasets), input_spec=spec,
                   model=dict(data["model"]), loader=dict(data.get("loader", {})),
                   domain_key=str(data.get("domain_key", "dataset")),
                   domain_names=tuple(data.get("domain_names", ())),
                   pooled_statistics=bool(data.get("pooled_statistics", False)),
                   extra=dict(data.get("extra", {})), format_version=int(version))


def _write_json(path: str, value: Any) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def write_run(path: str | os.PathLike, info: RunInfo, config: Any = None) -> None:
    """Writes ``run.json`` (and ``config.json`` when ``config`` is given) into ``path``,
    creating it; each file is replaced atomically.

    Args:
      path: the run directory.
      info: what the run trained on.
      config: the full resolved config (a ConfigDict or a mapping).
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if config is not None:
        _write_json(os.path.join(path, CONFIG_FILE), _plain(config))
    _write_json(os.path.join(path, RUN_FILE), info.to_json())


def _read_json(path: str, name: str) -> Any:
    if not os.path.isdir(path):
        raise RunNotFoundError(f"run directory {path!r}: no such directory (expected the "
                               "--path of tools/train_bc.py)")
    file = os.path.join(path, name)
    if not os.path.exists(file):
        raise RunNotFoundError(f"run directory {path!r}: expected {name} in it, which a "
                               f"training run writes before its first step; missing: {file}")
    try:
        with open(file) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise RunError(f"{file}: not readable JSON: {e}") from e


def read_run(path: str | os.PathLike) -> RunInfo:
    """The :class:`RunInfo` of a run directory.

    Raises:
      RunNotFoundError: when ``path`` or its ``run.json`` does not exist (naming the path and
        the missing file).
      RunError: for a ``run.json`` that cannot be read (naming the field).
    """
    path = os.fspath(path)
    return RunInfo.from_json(_read_json(path, RUN_FILE), source=os.path.join(path, RUN_FILE))


def read_config(path: str | os.PathLike) -> Any:
    """The run's ``config.json`` as an ``ml_collections.ConfigDict``.

    Raises:
      RunNotFoundError: when there is none.
    """
    import ml_collections

    return ml_collections.ConfigDict(_read_json(os.fspath(path), CONFIG_FILE))


# ---------------------------------------------------------------------------- checkpoints

def state_tree(state: Any) -> dict[str, Any]:
    """The saved parts of a train state: ``step``, ``params``, ``opt_state``, ``rng``,
    ``ema_params`` (None when not kept), and ``extra`` when the state has such a field."""
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state,
            "rng": state.rng, "ema_params": state.ema_params}
    for name in ("extra",):
        if hasattr(state, name):
            tree[name] = getattr(state, name)
    return tree


def _import_ocp():
    import orbax.checkpoint as ocp

    return ocp


def _leaves_dict(tree: Any) -> dict[str, Any]:
    return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


class Checkpointer:
    """The run's checkpoints (orbax): keeps the last ``keep`` plus the best by validation loss.

    Args:
      path: the run directory (checkpoints go to ``path/checkpoints``).
      keep: how many of the latest checkpoints to keep (>= 1); the best by validation loss is
        kept besides.
      async_save: write in a background thread (the next steps run meanwhile).
      read_only: open for restoring only.
      local: this process alone reads (no barrier with the other processes of a
        ``jax.distributed`` run): for reading another run's checkpoint, e.g. Re-Mix's
        reference, in every process independently. Needs ``read_only``.
    """

    def __init__(self, path: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False, local: bool = False):
        if not isinstance(keep, int) or keep < 1:
            raise RunError(f"checkpoints keep: expected an int >= 1, given {keep!r}")
        ocp = _import_ocp()
        self.path = os.path.abspath(os.fspath(path))
        self.directory = os.path.join(self.path, CHECKPOINT_DIR)
        self.keep = keep
        self._ocp = ocp
        if local and not read_only:
            raise RunError("checkpoints local: only for reading (read_only=True)")
        self._local = local
        multiprocessing = {}
        if local and jax.process_count() > 1:
            index = jax.process_index()
            multiprocessing["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
                primary_host=index, active_processes={index},
                barrier_sync_key_prefix=f"local{index}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, create=not read_only, read_only=read_only,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only,
            **multiprocessing)
        if local:  # handlers given: the items' metadata can be read before restoring them
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={
                _PARAMS: ocp.StandardCheckpointHandler(), _EMA: ocp.StandardCheckpointHandler(),
                _REST: ocp.StandardCheckpointHandler(), _META: ocp.JsonCheckpointHandler()})
        else:
            self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                  item_names=(_PARAMS, _EMA, _REST, _META))
        self._val_loss: dict[int, float | None] = {}
        for step in self._manager.all_steps():
            self._val_loss[step] = self._read_meta(step).get("val_loss")

    def _read_meta(self, step: int) -> dict[str, Any]:
        ocp = self._ocp
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                **{_META: ocp.args.JsonRestore()}))
        except Exception as e:  # orbax raises several kinds for a damaged step
            raise RunError(f"checkpoint {step} in {self.directory}: unreadable ({e})") from e
        return dict(out[_META])

    def steps(self) -> list[int]:
        """Steps of the checkpoints on disk, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def best_step(self) -> int | None:
        """The step of the checkpoint with the lowest validation loss (the latest among
        equals), or None when no checkpoint has one."""
        scored = [(v, -s) for s, v in self._val_loss.items()
                  if v is not None and np.isfinite(v) and s in self._manager.all_steps()]
        return -min(scored)[1] if scored else None

    def val_loss(self, step: int) -> float | None:
        """The validation loss recorded with a checkpoint (None when none was)."""
        return self._val_loss.get(step)

    def resolve(self, which: str | int = "latest") -> int:
        """A checkpoint's step from ``"latest"``, ``"best"`` or a step number.

        Raises:
          RunNotFoundError: when there is no such checkpoint.
        """
        steps = self.steps()
        if not steps:
            raise RunNotFoundError(f"checkpoints of {self.path!r}: none in {self.directory}")
        if which == "latest":
            return steps[-1]
        if which == "best":
            best = self.best_step()
            if best is None:
                raise RunNotFoundError(
                    f"checkpoints of {self.path!r}: no checkpoint has a validation loss (the run "
                    "had no validation split or val_freq; use which='latest')")
            return best
        if isinstance(which, (int, np.integer)) and not isinstance(which, bool):
            if int(which) not in steps:
                raise RunNotFoundError(f"checkpoints of {self.path!r}: no step {int(which)}; "
                                       f"have {steps}")
            return int(which)
        raise RunError(f"checkpoint which: expected 'latest', 'best' or a step number, given "
                       f"{which!r}")

    def save(self, state: Any, *, val_loss: float | None = None, force: bool = False) -> bool:
        """Saves ``state`` at its step (in the background when ``async_save``), then deletes
        checkpoints that are neither among the last ``keep`` nor the best.

        Args:
          state: a train state (see :func:`state_tree`); every process calls this.
          val_loss: the validation loss of this state, when measured.
          force: overwrite a checkpoint of the same step.

        Returns:
          Whether a checkpoint was written (False: this step is already saved).
        """
        ocp = self._ocp
        tree = state_tree(state)
        step = int(jax.device_get(tree.pop("step")))
        if step in self._manager.all_steps():
            if not force:
                if val_loss is not None and self._val_loss.get(step) is None:
                    log.info("checkpoint %d already saved; its validation loss is not recorded",
                             step)
                return False
            self._manager.wait_until_finished()
            self._manager.delete(step)
        params = tree.pop("params")
        ema = tree.pop("ema_params")
        rest = _leaves_dict(tree)
        meta = {"step": step, "val_loss": None if val_loss is None else float(val_loss),
                "rest_leaves": len(rest), "ema": ema is not None}
        items = {_PARAMS: ocp.args.StandardSave(params), _REST: ocp.args.StandardSave(rest),
                 _META: ocp.args.JsonSave(meta)}
        if ema is not None:
            items[_EMA] = ocp.args.StandardSave(ema)
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._val_loss[step] = meta["val_loss"]
        self._prune()
        return bool(saved)

    def _prune(self) -> None:
        steps = self.steps()
        keep = set(steps[-self.keep:])
        best = self.best_step()
        if best is not None:
            keep.add(best)
        for s in steps:
            if s not in keep:
                self._manager.wait_until_finished()
                self._manager.delete(s)
                self._val_loss.pop(s, None)

    def restore(self, template: Any, which: str | int = "latest") -> Any:
        """A train state restored into the structure, dtypes and shardings of ``template``
        (e.g. a freshly created state, placed on the mesh).

        Raises:
          RunNotFoundError: when there is no such checkpoint.
          RunError: when the checkpoint does not fit the template.
        """
        ocp = self._ocp
        step = self.resolve(which)
        self._manager.wait_until_finished()
        meta = self._read_meta(step)
        tree = state_tree(template)
        tree.pop("step")
        params, ema = tree.pop("params"), tree.pop("ema_params")
        if (ema is not None) != bool(meta.get("ema")):
            raise RunError(f"checkpoint {step} of {self.path!r}: EMA parameters "
                           f"{'saved' if meta.get('ema') else 'not saved'}, but the config "
                           f"{'keeps' if ema is not None else 'does not keep'} them")
        rest_template = _leaves_dict(tree)
        if meta.get("rest_leaves") != len(rest_template):
            raise RunError(f"checkpoint {step} of {self.path!r}: {meta.get('rest_leaves')} "
                           f"optimizer/state arrays saved, the config's state has "
                           f"{len(rest_template)} (another optimizer or model?)")

        def abstract(t):
            return jax.tree.map(ocp.utils.to_shape_dtype_struct, t)

        items = {_PARAMS: ocp.args.StandardRestore(abstract(params)),
                 _REST: ocp.args.StandardRestore(abstract(rest_template))}
        if ema is not None:
            items[_EMA] = ocp.args.StandardRestore(abstract(ema))
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as e:
            raise RunError(f"checkpoint {step} of {self.path!r} does not fit the config's train "
                           f"state: {e}") from e
        rest_leaves = [out[_REST][k] for k in sorted(rest_template)]
        rest = jax.tree.unflatten(jax.tree.structure(tree), rest_leaves)
        step_value = jax.device_put(np.asarray(step, np.asarray(template.step).dtype),
                                    getattr(template.step, "sharding", None))
        new = template.replace(step=step_value, params=out[_PARAMS],
                               ema_params=out[_EMA] if ema is not None else None, **rest)
        return new

    def restore_params(self, which: str | int = "latest", *, ema: bool | None = None
                       ) -> tuple[Any, int]:
        """Just the parameters of a checkpoint (numpy arrays, on the host).

        Args:
          which: ``"latest"``, ``"best"`` or a step.
          ema: take the EMA parameters; None: they when saved, else the parameters.

        Returns:
          ``(params, step)``.
        """
        ocp = self._ocp
        step = self.resolve(which)
        self._manager.wait_until_finished()
        meta = self._read_meta(step)
        has_ema = bool(meta.get("ema"))
        if ema and not has_ema:
            raise RunError(f"checkpoint {step} of {self.path!r}: no EMA parameters were saved "
                           "(optimizer.ema_decay was not set)")
        item = _EMA if (has_ema if ema is None else ema) else _PARAMS
        if self._local:
            # onto this process's first device: the saved sharding may name another
            # process's device
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            restore = ocp.args.StandardRestore(jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                self._manager.item_metadata(step)[item]))
        else:
            restore = ocp.args.StandardRestore()
        out = self._manager.restore(step, args=ocp.args.Composite(**{item: restore}))
        params = jax.tree.map(np.asarray, out[item])
        return params, step

    def wait(self) -> None:
        """Blocks until a background save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for background saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def restore_params(path: str | os.PathLike, which: str | int = "latest", *,
                   ema: bool | None = None, local: bool = False) -> tuple[Any, int]:
    """The parameters of a run's checkpoint, with no optimizer, dataset or config needed.

    Args:
      path: the run directory.
      which: ``"latest"``, ``"best"`` (lowest validation loss) or a step number.
      ema: take the EMA parameters (an error when the run kept none); None: the EMA
        parameters when the run kept them, else the parameters.
      local: read in this process alone, without synchronizing with the other processes of
        a ``jax.distributed`` run (each process reads the same files).

    Returns:
      ``(params, step)``: params as nested dicts of numpy arrays.

    Raises:
      RunNotFoundError: when ``path`` has no such checkpoint.
      RunError: for ``ema=True`` without EMA parameters, or a bad ``which``.
    """
    path = os.fspath(path)
    if not os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        raise RunNotFoundError(f"run directory {path!r}: expected {CHECKPOINT_DIR}/ in it, "
                               f"which training writes at its first save; missing: "
                               f"{os.path.join(path, CHECKPOINT_DIR)}")
    ckpt = Checkpointer(path, read_only=True, async_save=False, local=local)
    try:
        return ckpt.restore_params(which, ema=ema)
    finally:
        ckpt.close()


def remove_checkpoints(path: str | os.PathLike) -> None:
    """Deletes a run's checkpoints (a fresh start on the same path)."""
    shutil.rmtree(os.path.join(os.fspath(path), CHECKPOINT_DIR), ignore_errors=True)


def dataset_infos(loader: Any, paths: Sequence[str]) -> tuple[DatasetInfo, ...]:
    """The :class:`DatasetInfo` of each dataset of a training ``DataLoader``.

    Args:
      loader: the training loader.
      paths: each dataset's directory, in the loader's order.
    """
    return tuple(
        DatasetInfo(name=n, path=os.path.abspath(os.fspath(p)), structure=loader.structures[n],
                    statistics=loader.statistics[n], frames=int(f), episodes=int(e))
        for n, p, f, e in zip(loader.names, paths, loader.num_frames, loader.num_episodes))
