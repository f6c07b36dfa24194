"""The batch keys a policy consumes: the input spec, and the selection of a batch's model inputs.

A policy is built from its config and an :class:`InputSpec`; the spec is read off the first
training batch (:func:`input_spec`), saved with the weights (``to_json``) and is all that is
needed, with the config, to rebuild the policy for inference. :func:`model_inputs` turns a loader
batch into exactly the arrays the policy consumes (language tokenized), in training and at
inference alike.

Batch keys (besides the loader's ``observation``, ``goal``, ``action`` and ``action_pad_mask``):

* ``language_tokens``: int32 ``[B, max_tokens]``, made by :func:`model_inputs` from the loader's
  ``language_instruction`` bytes with :func:`~openx_train.models.language.tokenize`.
* ``language_embedding``: float32 ``[B, E]``: a precomputed instruction embedding, given by the
  user (``task.language = "embedding"``).
* ``dataset_id``: int32 ``[B]``: index of each example's dataset (per-dataset metrics).
* ``example_mask``: bool ``[B]``: False for padding examples (a validation loader that pads its
  last partial batch); absent means every example counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from openx_train.models.errors import InputSpecError
from openx_train.models.language import tokenize

ACTION = "action"
ACTION_PAD_MASK = "action_pad_mask"
DATASET_ID = "dataset_id"
EXAMPLE_MASK = "example_mask"
LANGUAGE_INSTRUCTION = "language_instruction"
LANGUAGE_TOKENS = "language_tokens"
LANGUAGE_EMBEDDING = "language_embedding"
PAD_MASK = "pad_mask"
PAD_MASK_DICT = "pad_mask_dict"
_MASKS = (PAD_MASK, PAD_MASK_DICT)


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """Shape (without the batch dimension) and dtype name of one batch array."""

    shape: tuple[int, ...]
    dtype: str


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What a policy consumes, per example.

    Attributes:
      inputs: ``(path, ArraySpec)`` of each model input, sorted by path: ``observation/<key>``
        (``state``: ``[n_obs, D]``; a camera: ``[n_obs, h, w, 3]``), ``observation/pad_mask``,
        ``observation/pad_mask_dict/<key>``, ``goal/<key>`` (one step: ``[D]``,
        ``[h, w, 3]``), ``language_tokens`` or ``language_embedding``.
      action: the action chunk, ``[n_action, A]`` float32 (normalized).
      vocab_size: hash buckets of the language tokens (0 without tokens).
    """

    inputs: tuple[tuple[str, ArraySpec], ...]
    action: ArraySpec
    vocab_size: int = 0

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(sorted(
            (str(p), ArraySpec(tuple(int(d) for d in s.shape), str(s.dtype)))
            for p, s in self.inputs)))
        object.__setattr__(self, "action", ArraySpec(tuple(int(d) for d in self.action.shape),
                                                     str(self.action.dtype)))
        if len(self.action.shape) != 2:
            raise InputSpecError(f"input spec action: expected shape [n_action, A], given "
                                 f"{list(self.action.shape)}")
        if f"observation/{PAD_MASK}" not in dict(self.inputs):
            raise InputSpecError("input spec: expected observation/pad_mask among the inputs")

    def get(self, path: str) -> ArraySpec | None:
        """The spec of one input path, or None."""
        return dict(self.inputs).get(path)

    @property
    def observation_keys(self) -> tuple[str, ...]:
        """Encoded observation keys (state vectors and cameras), sorted."""
        return tuple(p.split("/", 1)[1] for p, _ in self.inputs
                     if p.startswith("observation/") and p.count("/") == 1
                     and p != f"observation/{PAD_MASK}")

    @property
    def goal_keys(self) -> tuple[str, ...]:
        return tuple(p.split("/", 1)[1] for p, _ in self.inputs if p.startswith("goal/"))

    @property
    def language(self) -> str:
        """``"tokens"``, ``"embedding"`` or ``"none"``."""
        if self.get(LANGUAGE_TOKENS) is not None:
            return "tokens"
        return "embedding" if self.get(LANGUAGE_EMBEDDING) is not None else "none"

    @property
    def n_obs(self) -> int:
        return self.get(f"observation/{PAD_MASK}").shape[0]

    @property
    def n_action(self) -> int:
        return self.action.shape[0]

    @property
    def action_dim(self) -> int:
        return self.action.shape[1]

    def is_image(self, path: str) -> bool:
        """Whether an observation or goal path holds images (``[..., h, w, c]``)."""
        spec = self.get(path)
        return spec is not None and len(spec.shape) == (4 if path.startswith("observation/")
                                                        else 3)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serializable description; :meth:`from_json` reads it back."""
        return {"inputs": {p: {"shape": list(s.shape), "dtype": s.dtype} for p, s in self.inputs},
                "action": {"shape": list(self.action.shape), "dtype": self.action.dtype},
                "vocab_size": self.vocab_size}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> InputSpec:
        """The spec :meth:`to_json` described.

        Raises:
          InputSpecError: for a description without its fields.
        """
        try:
            inputs = tuple((p, ArraySpec(tuple(s["shape"]), s["dtype"]))
                           for p, s in data["inputs"].items())
            action = ArraySpec(tuple(data["action"]["shape"]), data["action"]["dtype"])
            return cls(inputs, action, int(data.get("vocab_size", 0)))
        except (KeyError, TypeError, AttributeError) as e:
            raise InputSpecError(f"input spec: expected {{'inputs': {{path: {{'shape', "
                                 f"'dtype'}}}}, 'action': {{...}}}}, given {data!r}") from e

    def train_specs(self) -> tuple[tuple[str, ArraySpec], ...]:
        """The inputs plus the training targets (``action``, ``action_pad_mask``)."""
        return (*self.inputs, (ACTION, self.action),
                (ACTION_PAD_MASK, ArraySpec((self.n_action,), "bool")))

    def zeros(self, batch_size: int = 1, *, train: bool = True) -> dict[str, Any]:
        """A batch of zeros in the spec's shapes (masks True), e.g. to initialize parameters."""
        flat = {}
        for path, spec in (self.train_specs() if train else self.inputs):
            fill = np.ones if spec.dtype == "bool" else np.zeros
            flat[path] = fill((batch_size, *spec.shape), spec.dtype)
        return unflatten(flat)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to ``{"a/b": leaf}``."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a/b": leaf}`` to nested dicts."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _spec_of(value: Any) -> ArraySpec:
    value = np.asarray(value)
    return ArraySpec(tuple(value.shape[1:]), value.dtype.name)


def input_spec(config: Any, batch: Mapping[str, Any]) -> InputSpec:
    """The inputs a policy of this model config consumes, read off a loader batch.

    Args:
      config: the model config (``config.model``; see :mod:`openx_train.models.config`).
      batch: a batch of :func:`openx_train.data.make_dataloader` (numpy).

    Returns:
      The :class:`InputSpec`.

    Raises:
      ModelConfigError: for an invalid config.
      InputSpecError: when the batch lacks what the config asks for (an observation key, the
        goal, the language), naming the key.
    """
    from openx_train.models.config import resolve_model_config

    config = resolve_model_config(config)
    obs = batch.get("observation")
    if not isinstance(obs, Mapping) or PAD_MASK not in obs:
        raise InputSpecError("batch observation: expected a dict with pad_mask (a loader "
                             f"batch), given {type(obs).__name__}")
    available = sorted(k for k in obs if k not in _MASKS)
    keys = tuple(config.observation_keys) or tuple(available)
    missing = [k for k in keys if k not in obs or k in _MASKS]
    if missing:
        raise InputSpecError(f"model.observation_keys: {missing} are not in the batch's "
                             f"observation; it has {available}")
    if not keys:
        raise InputSpecError("batch observation: no state or camera key to encode")
    flat: dict[str, ArraySpec] = {f"observation/{PAD_MASK}": _spec_of(obs[PAD_MASK])}
    for key in keys:
        spec = _spec_of(obs[key])
        if len(spec.shape) not in (2, 4):
            raise InputSpecError(f"batch observation/{key}: expected [B, n_obs, D] or "
                                 f"[B, n_obs, h, w, c], given shape {np.shape(obs[key])}")
        flat[f"observation/{key}"] = spec
        if key in obs.get(PAD_MASK_DICT, {}):
            flat[f"observation/{PAD_MASK_DICT}/{key}"] = _spec_of(obs[PAD_MASK_DICT][key])
    if config.task.goal:
        goal = batch.get("goal")
        if not isinstance(goal, Mapping):
            raise InputSpecError("model.task.goal is True but the batch has no goal (use "
                                 "LoaderConfig(goal_relabeling=True))")
        for key in keys:
            if key not in goal:
                raise InputSpecError(f"batch goal: expected key {key!r}, given "
                                     f"{sorted(goal)}")
            flat[f"goal/{key}"] = _spec_of(goal[key])
    vocab_size = 0
    if config.task.language == "tokens":
        if LANGUAGE_INSTRUCTION not in batch and LANGUAGE_TOKENS not in batch:
            raise InputSpecError("model.task.language is 'tokens' but the batch has no "
                                 "language_instruction (the datasets have no language?)")
        flat[LANGUAGE_TOKENS] = ArraySpec((config.task.max_tokens,), "int32")
        vocab_size = config.task.vocab_size
    elif config.task.language == "embedding":
        if LANGUAGE_EMBEDDING not in batch:
            raise InputSpecError("model.task.language is 'embedding': expected "
                                 "batch['language_embedding'] float32 [B, E]")
        flat[LANGUAGE_EMBEDDING] = _spec_of(batch[LANGUAGE_EMBEDDING])
    if ACTION not in batch:
        raise InputSpecError("batch: expected an action [B, n_action, A]")
    action = _spec_of(batch[ACTION])
    return InputSpec(tuple(flat.items()), action, vocab_size)


def model_inputs(batch: Mapping[str, Any], spec: InputSpec, *, train: bool = True
                 ) -> dict[str, Any]:
    """Exactly the arrays a policy consumes, from a loader batch (numpy, on the host).

    Language instructions are tokenized here (strings cannot enter jit). With ``train``, the
    targets ``action`` and ``action_pad_mask`` are kept, and ``dataset_id`` and
    ``example_mask`` when the batch has them.

    Args:
      batch: a loader batch (nested dicts of numpy arrays), or one already selected.
      spec: the policy's input spec.
      train: keep the training targets.

    Returns:
      Nested dicts of numpy arrays.

    Raises:
      InputSpecError: for a missing key, or an array whose shape or dtype differs from the
        spec's, naming the key path, the expected and the given value.
    """
    flat_batch = flatten(batch)
    if spec.language == "tokens" and LANGUAGE_TOKENS not in flat_batch:
        if LANGUAGE_INSTRUCTION not in flat_batch:
            raise InputSpecError("batch: expected language_instruction (bytes [B]) or "
                                 "language_tokens for this policy")
        flat_batch[LANGUAGE_TOKENS] = tokenize(
            flat_batch[LANGUAGE_INSTRUCTION], vocab_size=spec.vocab_size,
            max_tokens=spec.get(LANGUAGE_TOKENS).shape[0])
    wanted = spec.train_specs() if train else spec.inputs
    out = {}
    size = None
    for path, s in wanted:
        if path not in flat_batch:
            raise InputSpecError(f"batch {path}: missing; expected {s.dtype} "
                                 f"{['B', *s.shape]}")
        value = np.asarray(flat_batch[path])
        if value.shape[1:] != s.shape or value.dtype.name != s.dtype:
            raise InputSpecError(f"batch {path}: expected {s.dtype} {['B', *s.shape]}, given "
                                 f"{value.dtype.name} {list(value.shape)}")
        if size is None:
            size = value.shape[0]
        elif value.shape[0] != size:
            raise InputSpecError(f"batch {path}: expected batch size {size} (as the other "
                                 f"keys), given {value.shape[0]}")
        out[path] = value
    if train:
        for key, dtype in ((DATASET_ID, np.int32), (EXAMPLE_MASK, np.bool_)):
            if key in flat_batch:
                value = np.asarray(flat_batch[key])
                if value.shape != (size,):
                    raise InputSpecError(f"batch {key}: expected shape [{size}], given "
                                         f"{list(value.shape)}")
                out[key] = value.astype(dtype, copy=False)
    return unflatten(out)
