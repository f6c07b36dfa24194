"""Trained policies in their envs: the env's raw observations in, unnormalized actions out,
with exactly the preprocessing of training.

Train/eval skew (a policy fed differently at rollout than in training) is avoided by not
re-implementing anything: the observation goes through the functions the loader itself uses.

* Key selection and normalization: :func:`openx_train.data.structure.select_observation`
  (the loader's step tables are built by it) with the dataset's structure and the exact
  statistics it was normalized with.
* Images: :func:`openx_train.data.ops.preprocess_frames` without augmentation (the loader's
  ``crop_and_resize`` and ``finish``: bilinear resize to the camera size, the batch dtype).
  Only camera policies import TensorFlow (for these ops); a state-only policy never does.
* History: windows of ``n_obs`` observations with ``pad_mask``, the first observation repeated
  before the episode start, as :class:`openx_train.eval.ObservationHistory` builds them (the
  loader's ``history_indices`` convention), and ``pad_mask_dict`` by
  :func:`openx_train.data.structure.pad_mask_dict`.
* The model's inputs: :func:`openx_train.models.model_inputs` (language tokenized there).
* Actions: the model's normalized chunk split per action key and inverted by
  :func:`openx_train.data.frames.unnormalize`.

::

    policy = load_policy("runs/bc")                      # a run of tools/train_bc.py
    evaluate(policy, "Reacher-v5", num_episodes=50, **policy.rollout_options())

    step = policy.stepwise()                             # one action per call, in a robot loop
    step.reset(np.arange(num_envs))
    action = step(observation)                           # [num_envs, ...]

A policy built from parts (a module, its parameters, the input spec, the dataset's structure
and statistics) is :func:`make_env_policy`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from openx_train import models
from openx_train.data import frames
from openx_train.data.config import Normalization, Structure
from openx_train.data.statistics import DatasetStatistics
from openx_train.data.structure import (
    ResolvedStructure,
    pad_mask_dict,
    resolve_structure,
    select_observation,
)
from openx_train.eval import tree
from openx_train.eval.policy import StepwisePolicy
from openx_train.eval.wrappers import (
    OBSERVATION,
    PAD_MASK,
    Chunking,
    RecedingHorizon,
    TemporalEnsemble,
)
from openx_train.models.spec import unflatten
from oxe_envlogger.format.specs import Leaf

log = logging.getLogger(__name__)

__all__ = ["ActionDecoder", "EnvPolicy", "PolicyInputError", "Preprocessor", "load_policy",
           "make_env_policy"]


class PolicyInputError(ValueError):
    """An observation, task input or action that does not fit the policy."""


def _observation_leaves(observation: Any, lead: int) -> dict[str, Leaf]:
    """Step leaves (``observation/...`` paths) of a raw observation with ``lead`` leading axes."""
    out = {}
    for path, value in tree.leaves(observation):
        a = np.asarray(value)
        shape = tuple(a.shape[lead:])
        key = f"{OBSERVATION}/{path}" if path else OBSERVATION
        if a.dtype == np.uint8 and len(shape) == 3 and shape[-1] in (1, 3, 4):
            out[key] = Leaf("image", shape, np.dtype(np.uint8))
        elif a.dtype.kind in "biuf":
            out[key] = Leaf("tensor", shape, a.dtype)
        else:
            out[key] = Leaf("text", shape, np.dtype(object))
    return out


def _split_window(observation: Any, n_obs: int) -> tuple[Any, np.ndarray]:
    """``(raw observation [B, n_obs, ...], pad_mask [B, n_obs])`` from a window with its
    pad mask (:func:`openx_train.eval.wrappers.with_pad_mask`), or from a plain batched
    observation when ``n_obs == 1``."""
    if isinstance(observation, Mapping) and PAD_MASK in observation:
        pad_mask = np.asarray(observation[PAD_MASK], bool)
        rest = {k: v for k, v in observation.items() if k != PAD_MASK}
        if set(rest) == {OBSERVATION} and not isinstance(rest[OBSERVATION], Mapping):
            rest = rest[OBSERVATION]  # an array observation: with_pad_mask put it there
        if pad_mask.ndim != 2 or pad_mask.shape[1] != n_obs:
            raise PolicyInputError(f"observation/{PAD_MASK}: expected bool [B, n_obs={n_obs}], "
                                   f"given shape {list(pad_mask.shape)}")
        for path, leaf in tree.leaves(rest):
            if np.shape(leaf)[:2] != pad_mask.shape:
                name = f"observation/{path}" if path else "observation"
                raise PolicyInputError(f"{name}: expected leading axes {list(pad_mask.shape)} "
                                       f"[B, n_obs] (as the pad mask), given shape "
                                       f"{list(np.shape(leaf))}")
        return rest, pad_mask
    if n_obs != 1:
        raise PolicyInputError(
            f"observation: this policy reads windows of n_obs={n_obs} observations with a "
            f"{PAD_MASK!r}; run it with evaluate(..., **policy.rollout_options()), "
            "policy.stepwise(), or a HistoryWrapper(env, n_obs)")
    n = tree.batch_size(observation, "observation")
    return tree.map_structure(lambda x: np.asarray(x)[:, None], observation), np.ones((n, 1), bool)


def _image_dtype(spec: models.InputSpec, camera: str) -> str:
    for prefix in ("observation", "goal"):
        s = spec.get(f"{prefix}/{camera}")
        if s is not None:
            return "float32" if s.dtype == "float32" else "uint8"
    return "uint8"


def _preprocess_frames(images: Any, size: tuple[int, int], dtype: str) -> np.ndarray:
    """The loader's image preprocessing (TensorFlow, imported here: camera policies only).

    Eager, not in a tf.function: grappler rewrites x / 255 in a function graph, which changes
    the last bit of some values (the no-skew test saw it; the loader's tf.data functions
    compute them as eager ops do)."""
    import tensorflow as tf

    from openx_train.data import ops

    return np.asarray(ops.preprocess_frames(tf.constant(images), size, dtype=dtype))


class Preprocessor:
    """A batch of raw env observations (and task inputs) to the policy's model inputs, through
    the loader's own functions (see the module docstring).

    Args:
      spec: the policy's input spec.
      structure: the structure of the dataset the policy acts as (its keys and normalization).
      statistics: the statistics that dataset was normalized with (None when nothing is
        normalized).
      dataset: the dataset's name (for messages).
    """

    def __init__(self, spec: models.InputSpec, structure: Structure,
                 statistics: DatasetStatistics | None, *, dataset: str = ""):
        self.spec, self.structure, self.statistics = spec, structure, statistics
        self.dataset = dataset
        missing = [k for k in structure.normalized_keys()
                   if statistics is None or k not in statistics]
        if missing:
            raise PolicyInputError(f"dataset {dataset!r}: the statistics lack the normalized "
                                   f"keys {missing}")
        self._resolved: ResolvedStructure | None = None
        self._leaves: dict[str, Leaf] | None = None

    @property
    def n_obs(self) -> int:
        return self.spec.n_obs

    def resolve(self, observation: Any, *, lead: int) -> ResolvedStructure:
        """The structure checked against an observation's keys (the first observation's; later
        observations must have the same keys, shapes and dtypes)."""
        leaves = _observation_leaves(observation, lead)
        if self._resolved is not None:
            if leaves != self._leaves:
                raise PolicyInputError(
                    f"observation: its keys, shapes or dtypes changed since the first call: "
                    f"{ {k: (v.shape, str(v.dtype)) for k, v in leaves.items()} } != "
                    f"{ {k: (v.shape, str(v.dtype)) for k, v in self._leaves.items()} }")
            return self._resolved
        # Actions are not observed, and the instruction comes as instruction=: their keys only
        # need to exist for the check.
        all_leaves = {**leaves, **{k: Leaf("tensor", (1,), np.dtype(np.float32))
                                   for k in self.structure.action}}
        if self.structure.language not in (None, "auto"):
            all_leaves[self.structure.language] = Leaf("text", (), np.dtype(object))
        try:
            resolved = resolve_structure(self.structure, all_leaves)
        except Exception as e:
            raise PolicyInputError(f"dataset {self.dataset!r}: the observation does not fit "
                                   f"the structure the policy was trained with: {e}") from e
        self._resolved, self._leaves = resolved, leaves
        return resolved

    def _frames(self, raw: Any, lead: tuple[int, ...], resolved: ResolvedStructure
                ) -> dict[str, np.ndarray]:
        """State and camera images of raw observations with leading axes ``lead``, each
        ``[*lead, ...]`` as the batch has them."""
        n = int(np.prod(lead))
        flat = tree.map_structure(
            lambda x: np.reshape(np.asarray(x), (n, *np.shape(x)[len(lead):])), raw)
        steps = {OBSERVATION: flat, "is_first": np.zeros(n, bool)}
        # numpy, as the loader's step tables are built.
        table = select_observation(steps, resolved, statistics=self.statistics)
        out = {}
        if table["state"] is not None:
            out["state"] = np.asarray(table["state"])
        for cam in resolved.cameras:
            dtype = _image_dtype(self.spec, cam.name)
            if cam.key is None:
                out[cam.name] = np.zeros((n, *cam.size, 3), dtype)
            else:
                out[cam.name] = _preprocess_frames(table["images"][cam.name], cam.size, dtype)
        return {k: v.reshape(*lead, *v.shape[1:]) for k, v in out.items()}

    def __call__(self, observation: Any, *, instruction: Any = None, goal: Any = None,
                 language_embedding: Any = None) -> dict[str, Any]:
        """The model inputs of a batch of observations.

        Args:
          observation: the env's batched observation (leaves ``[B, ...]``, as a vector env
            gives them) when ``n_obs == 1``; otherwise a window with its pad mask (leaves
            ``[B, n_obs, ...]`` and ``pad_mask`` bool ``[B, n_obs]``, as
            :class:`~openx_train.eval.ObservationHistory` and
            :func:`~openx_train.eval.wrappers.with_pad_mask` make it).
          instruction: the language instructions, ``[B]`` strings (policies with language).
          goal: the goal observations, leaves ``[B, ...]`` (goal-conditioned policies).
          language_embedding: float ``[B, E]`` (policies trained on precomputed embeddings).

        Returns:
          Nested dicts of numpy arrays, as :func:`~openx_train.models.model_inputs` gives them
          for a loader batch.

        Raises:
          PolicyInputError: naming the key path of an input that does not fit.
          openx_train.models.InputSpecError: for a model input of the wrong shape or dtype.
        """
        spec = self.spec
        raw, pad_mask = _split_window(observation, spec.n_obs)
        resolved = self.resolve(raw, lead=2)
        obs = self._frames(raw, pad_mask.shape, resolved)
        obs[PAD_MASK] = pad_mask
        obs["pad_mask_dict"] = {k: np.asarray(v) for k, v in
                                pad_mask_dict(pad_mask, resolved).items()}
        batch: dict[str, Any] = {"observation": obs}
        size = pad_mask.shape[0]
        if spec.goal_keys:
            if goal is None:
                raise PolicyInputError("goal: this policy is goal-conditioned; pass goal= (the "
                                       "goal observations, batched)")
            if isinstance(goal, Mapping) and PAD_MASK in goal:
                raise PolicyInputError("goal: expected one observation per row, given a window")
            self.resolve(goal, lead=1)
            batch["goal"] = self._frames(goal, (size,), resolved)
        if spec.language == "tokens":
            if instruction is None:
                raise PolicyInputError("instruction: this policy reads a language instruction; "
                                       "pass instruction= ([B] strings)")
            batch["language_instruction"] = _instructions(instruction, size)
        elif spec.language == "embedding":
            if language_embedding is None:
                raise PolicyInputError("language_embedding: this policy reads precomputed "
                                       "instruction embeddings; pass language_embedding= [B, E]")
            batch["language_embedding"] = np.asarray(language_embedding, np.float32)
        return models.model_inputs(batch, spec, train=False)


def _instructions(instruction: Any, size: int) -> np.ndarray:
    if isinstance(instruction, str | bytes):
        instruction = [instruction] * size
    values = [v if isinstance(v, bytes) else str(v).encode("utf-8")
              for v in np.asarray(instruction, dtype=object).reshape(-1)]
    if len(values) != size:
        raise PolicyInputError(f"instruction: expected {size} instructions (one per row), given "
                               f"{len(values)}")
    return np.array(values, dtype=object)


class ActionDecoder:
    """The model's normalized action chunk ``[..., A]`` back to the dataset's action keys.

    Args:
      structure: the dataset's structure (its action keys, in order, and their normalization).
      statistics: the statistics it was normalized with.
      action_dim: ``A``, the model's action width.
      shapes: each action key's shape; default: from the statistics, or ``(A,)`` for a single
        key.

    Raises:
      PolicyInputError: when the shapes are unknown or do not add up to ``action_dim``.
    """

    def __init__(self, structure: Structure, statistics: DatasetStatistics | None,
                 action_dim: int, *, shapes: Mapping[str, tuple[int, ...]] | None = None):
        self.structure, self.statistics = structure, statistics
        shapes = dict(shapes or {})
        for key in structure.action:
            if key in shapes:
                continue
            if statistics is not None and key in statistics:
                shapes[key] = tuple(np.shape(statistics[key].mean))
            elif len(structure.action) == 1:
                shapes[key] = (action_dim,)
            else:
                raise PolicyInputError(f"action key {key!r}: its shape is unknown (no "
                                       "statistics); give shapes=")
        self.shapes = {k: tuple(int(d) for d in shapes[k]) for k in structure.action}
        sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes.values()]
        if sum(sizes) != action_dim:
            raise PolicyInputError(f"actions: the keys {self.shapes} have {sum(sizes)} values; "
                                   f"the policy predicts {action_dim}")
        self._bounds = np.cumsum(sizes)[:-1]
        self._modes = {}  # key: its normalization, for the normalized keys
        for key in structure.action:
            mode = structure.normalization_of(key)
            if mode is not Normalization.NONE:
                if statistics is None or key not in statistics:
                    raise PolicyInputError(f"action key {key!r}: normalized ({mode.value}) but "
                                           "the statistics lack it")
                self._modes[key] = mode

    def __call__(self, normalized: Any) -> Any:
        """``[..., A]`` to the unnormalized action: an array for one action key (``action``),
        else a dict nested as the keys' paths below ``action/``."""
        y = np.asarray(normalized, np.float32)
        out = {}
        for (key, shape), part in zip(self.shapes.items(),
                                      np.split(y, self._bounds, axis=-1)):
            part = part.reshape(*part.shape[:-1], *shape)
            if key in self._modes:
                part = frames.unnormalize(part, self.statistics[key], self._modes[key], key=key)
            out[key] = part
        if len(out) == 1:
            return next(iter(out.values()))
        return unflatten({key.removeprefix("action/"): value for key, value in out.items()})


def _apply(module: models.Policy, params: Any, inputs: Any, rng: jax.Array, call: Any,
           *, temperature: float | None = None) -> jax.Array:
    return module.apply({"params": params}, inputs, method=models.Policy.predict_action,
                        rngs={"sample": jax.random.fold_in(rng, call)},
                        temperature=temperature)


class EnvPolicy:
    """A trained policy for a batch of envs: raw observations in, unnormalized action chunks
    out (:class:`openx_train.eval.Policy`).

    Build it with :func:`load_policy` or :func:`make_env_policy`.

    Attributes:
      module: the Flax policy module.
      params: its parameters.
      preprocess: the :class:`Preprocessor`.
      decode: the :class:`ActionDecoder`.
      step: the training step of the parameters (None when unknown).
      dataset: the dataset whose structure and statistics it uses.
    """

    def __init__(self, module: models.Policy, params: Any, preprocess: Preprocessor,
                 decode: ActionDecoder, *, seed: int = 0, temperature: float | None = None,
                 step: int | None = None, dataset: str = ""):
        self.module, self.params = module, params
        self.preprocess, self.decode = preprocess, decode
        self.temperature = temperature
        self.step, self.dataset = step, dataset
        self._rng = jax.random.PRNGKey(seed)
        self._calls = 0
        # Jitted once per policy: the module is closed over, not hashed at every call.
        self.jitted_model = jax.jit(functools.partial(_apply, module, temperature=temperature))

    @property
    def spec(self) -> models.InputSpec:
        return self.module.spec

    @property
    def n_obs(self) -> int:
        return self.spec.n_obs

    @property
    def n_action(self) -> int:
        return self.spec.n_action

    def model_inputs(self, observation: Any, **task: Any) -> dict[str, Any]:
        """What the model is fed for these observations (see :meth:`Preprocessor.__call__`)."""
        return self.preprocess(observation, **task)

    def predict(self, inputs: Any) -> np.ndarray:
        """The model's normalized action chunks ``[B, n_action, A]`` for model inputs (one
        jitted call; a new ``sample`` key each call)."""
        call = np.uint32(self._calls)
        self._calls += 1
        return np.asarray(self.jitted_model(self.params, inputs, self._rng, call))

    def __call__(self, observation: Any, **task: Any) -> Any:
        """Unnormalized action chunks ``[B, n_action, ...]`` (a dict of them for several action
        keys) for a batch of observations; see :meth:`Preprocessor.__call__` for the inputs."""
        return self.decode(self.predict(self.preprocess(observation, **task)))

    def reset(self, env_indices: np.ndarray) -> None:
        """Nothing to forget: the history and chunks are held by the rollout (see
        :meth:`rollout_options`)."""

    def rollout_options(self, *, exec_horizon: int | None = None,
                        temporal_ensemble: float | None = None) -> dict[str, Any]:
        """The ``n_obs`` and ``chunking`` options of :func:`openx_train.eval.evaluate` this
        policy needs: windows of its ``n_obs``, and its chunks executed by receding horizon
        (the first ``exec_horizon`` actions, default all ``n_action``) or, with
        ``temporal_ensemble`` (the ``exp_weight``), by temporal ensembling."""
        return {"n_obs": self.n_obs, "chunking": self.chunking(
            exec_horizon=exec_horizon, temporal_ensemble=temporal_ensemble)}

    def chunking(self, *, exec_horizon: int | None = None,
                 temporal_ensemble: float | None = None) -> Chunking:
        """See :meth:`rollout_options`."""
        if temporal_ensemble is not None:
            if exec_horizon is not None:
                raise ValueError("exec_horizon and temporal_ensemble: give one, not both")
            return TemporalEnsemble(self.n_action, float(temporal_ensemble))
        return RecedingHorizon(self.n_action, exec_horizon or self.n_action)

    def stepwise(self, *, exec_horizon: int | None = None,
                 temporal_ensemble: float | None = None) -> StepwisePolicy:
        """This policy run one env step at a time: call it with each step's batched raw
        observation and get one action per env (``reset(env_indices)`` where episodes start)."""
        return StepwisePolicy(self, n_obs=self.n_obs, chunking=self.chunking(
            exec_horizon=exec_horizon, temporal_ensemble=temporal_ensemble))


def make_env_policy(module: models.Policy, params: Any, *, structure: Structure,
                    statistics: DatasetStatistics | None, dataset: str = "",
                    action_shapes: Mapping[str, tuple[int, ...]] | None = None, seed: int = 0,
                    temperature: float | None = None, step: int | None = None) -> EnvPolicy:
    """An env policy from its parts.

    Args:
      module: the policy module (:func:`openx_train.models.make_policy`; its ``spec`` is the
        input spec it was trained with).
      params: its parameters.
      structure: the structure of the dataset whose observations and actions it uses.
      statistics: the statistics that dataset was normalized with.
      dataset: the dataset's name (for messages).
      action_shapes: each action key's shape, when the statistics do not give it.
      seed: seeds the head's sampling (diffusion noise, discrete temperature).
      temperature: overrides the discrete head's temperature.
      step: the training step of the parameters, for reports.

    Returns:
      The :class:`EnvPolicy`.
    """
    spec = module.spec
    return EnvPolicy(module, params, Preprocessor(spec, structure, statistics, dataset=dataset),
                     ActionDecoder(structure, statistics, spec.action_dim, shapes=action_shapes),
                     seed=seed, temperature=temperature, step=step, dataset=dataset)


def _run_dataset(info: Any, dataset: str | None, path: str) -> Any:
    """The dataset of a run whose structure and statistics a policy uses."""
    names = list(info.names)
    if dataset is not None:
        for d in info.datasets:
            if d.name == dataset:
                return d
        raise PolicyInputError(f"load_policy dataset: the run {path!r} trained on {names}; "
                               f"given {dataset!r}")
    first = info.datasets[0]
    if len(names) == 1:
        return first

    def same(d):
        return (d.structure.to_json() == first.structure.to_json()
                and (d.statistics is None) == (first.statistics is None)
                and (d.statistics is None or d.statistics.to_json() == first.statistics.to_json()))

    if all(same(d) for d in info.datasets):  # pooled statistics and one structure
        return first
    raise PolicyInputError(
        f"load_policy dataset: the run {path!r} trained on {len(names)} datasets, each "
        f"normalized with its own statistics (or read with its own keys); name the one whose "
        f"env this policy acts in: dataset= one of {names}")


def load_policy(path: str | os.PathLike, dataset: str | None = None,
                which: str | int = "latest", *, ema: bool | None = None, seed: int = 0,
                temperature: float | None = None) -> EnvPolicy:
    """A trained policy from a run directory (``tools/train_bc.py --path``), ready for its env.

    Everything comes from the run: the model config and input spec (``run.json``), the
    parameters (a checkpoint), and the structure and statistics the dataset was normalized with;
    the observations are then preprocessed by the loader's own functions (see the module
    docstring).

    Args:
      path: the run directory.
      dataset: the dataset whose keys and statistics to use (its env is the one the policy acts
        in). Needed for a mixture whose datasets differ in statistics or keys; default: the
        run's only dataset (or the first, when every dataset shares pooled statistics and one
        structure).
      which: the checkpoint: ``"latest"``, ``"best"`` (lowest validation loss) or a step.
      ema: use the EMA parameters; None: when the run kept them.
      seed: seeds the head's sampling (diffusion, discrete with temperature).
      temperature: overrides the discrete head's temperature.

    Returns:
      The :class:`EnvPolicy` (``policy.step`` is the checkpoint's step).

    Raises:
      openx_train.run.RunNotFoundError: when ``path`` is not a run or has no such checkpoint.
      PolicyInputError: for an unknown ``dataset`` or an ambiguous mixture (listing the names).
    """
    from openx_train import run

    path = os.fspath(path)
    info = run.read_run(path)
    chosen = _run_dataset(info, dataset, path)
    module = models.make_policy(info.model, info.input_spec)
    params, step = run.restore_params(path, which, ema=ema)
    log.info("load_policy %s: step %d, dataset %r", path, step, chosen.name)
    return make_env_policy(module, params, structure=chosen.structure,
                           statistics=chosen.statistics, dataset=chosen.name, seed=seed,
                           temperature=temperature, step=step)


#: The summary fields of :func:`evaluate_run` (its per-episode list aside).
SUMMARY_KEYS = ("return_mean", "return_ci95", "return_std", "success_rate", "length_mean",
                "num_episodes", "env_steps", "env_steps_per_s", "wall_time_s", "num_envs",
                "seed", "env_name", "path", "checkpoint_step", "dataset", "video_path",
                "log_dir")


def evaluate_run(path: str | os.PathLike, env_name: Any, *, num_episodes: int = 50,
                 num_envs: int | None = None, dataset: str | None = None,
                 which: str | int = "latest", ema: bool | None = None, seed: int = 0,
                 exec_horizon: int | None = None, temporal_ensemble: float | None = None,
                 instruction_key: str = "language_instruction",
                 max_episode_steps: int | None = None, vectorization: str = "async",
                 video_path: str | None = None, video_episodes: int = 3,
                 log_dir: str | None = None, log_name: str | None = None,
                 env_kwargs: Mapping[str, Any] | None = None, on_episode: Any = None
                 ) -> dict[str, Any]:
    """Rolls out a run's policy in a gymnasium env (:func:`openx_train.eval.evaluate`) with the
    history and chunking of its input spec.

    Args:
      path: the run directory.
      env_name: a gymnasium env id (``oxe_envlogger/...`` ids are registered here), or a
        function that makes the env.
      num_episodes: episodes to run (episode ``k`` is reset with ``seed + k``).
      num_envs: sub-envs (default: the CPU count).
      dataset: see :func:`load_policy`.
      which: the checkpoint (``"latest"``, ``"best"`` or a step).
      ema: see :func:`load_policy`.
      seed: the first episode's seed (and the policy's sampling seed).
      exec_horizon: actions of each chunk executed before the policy is asked again (receding
        horizon; default: the whole chunk).
      temporal_ensemble: ensemble overlapping chunks with this ``exp_weight`` instead.
      instruction_key: the reset ``info`` key holding the instruction, for policies with
        language.
      max_episode_steps: time limit (default: the env's).
      vectorization: ``"async"`` (a process per sub-env) or ``"sync"``.
      video_path: a ``.mp4`` or ``.gif`` of the first ``video_episodes`` episodes.
      video_episodes: episodes in the video.
      log_dir: log the rollouts there as an RLDS dataset.
      log_name: the logged dataset's name (default: from the env id).
      env_kwargs: keyword arguments of ``gym.make`` (an env id only).
      on_episode: called with each episode's record as it ends.

    Returns:
      :func:`~openx_train.eval.evaluate`'s results plus ``env_name``, ``path``,
      ``checkpoint_step`` and ``dataset``.
    """
    import oxe_envlogger.envs  # noqa: F401  (registers oxe_envlogger/SyntheticCamera-v0)
    from openx_train.eval import TaskInput, evaluate

    policy = load_policy(path, dataset, which, ema=ema, seed=seed)
    instruction = (TaskInput(info_key=instruction_key) if policy.spec.language != "none"
                   else None)
    if policy.spec.goal_keys:
        raise PolicyInputError("evaluate_run: this policy is goal-conditioned; evaluate it with "
                               "openx_train.eval.evaluate(..., goal=TaskInput(...))")
    results = evaluate(policy, env_name, num_episodes=num_episodes, num_envs=num_envs, seed=seed,
                       vectorization=vectorization, max_episode_steps=max_episode_steps,
                       instruction=instruction, video_path=video_path,
                       video_episodes=video_episodes, log_dir=log_dir, log_name=log_name,
                       env_kwargs=env_kwargs, on_episode=on_episode,
                       **policy.rollout_options(exec_horizon=exec_horizon,
                                                temporal_ensemble=temporal_ensemble))
    name = env_name if isinstance(env_name, str) else getattr(env_name, "__name__",
                                                                     repr(env_name))
    results.update(env_name=name, path=os.fspath(path), checkpoint_step=policy.step,
                   dataset=policy.dataset)
    return results


def evaluate_baseline(name: str, env_name: str, *, num_episodes: int = 50,
                      num_envs: int | None = None, seed: int = 0,
                      max_episode_steps: int | None = None, vectorization: str = "async",
                      env_kwargs: Mapping[str, Any] | None = None, on_episode: Any = None
                      ) -> dict[str, Any]:
    """Rolls out a reference policy of ``oxe_envlogger.envs`` (``"scripted"``: the env's
    scripted expert; ``"random"``: uniform random actions) on the same episodes (the same
    seeds) as :func:`evaluate_run`.

    Raises:
      ValueError: for an env without a scripted policy.
    """
    import gymnasium as gym

    from openx_train.eval import batch_policy, evaluate
    from oxe_envlogger import envs

    env = gym.make(env_name, **dict(env_kwargs or {}))
    try:
        fn = envs.make_policy(name, env, seed)
    finally:
        env.close()
    return evaluate(batch_policy(fn), env_name, num_episodes=num_episodes, num_envs=num_envs,
                    seed=seed, max_episode_steps=max_episode_steps,
                    vectorization=vectorization, env_kwargs=env_kwargs, on_episode=on_episode)
