"""RLDS alignment: turns resets, steps and metadata into episodes for the writer.

Step alignment (RLDS). An episode of N env steps gives N+1 RLDS steps. Step t holds

* ``observation``: o_t, the observation the action was chosen from;
* ``action``: a_t, the action taken from o_t;
* ``reward``, ``discount``: what followed a_t (discount 0 where a_t ended the episode by
  termination, else 1 unless the env gives its own);
* ``is_first`` (t = 0), ``is_last`` (t = N), ``is_terminal`` (t = N and the env terminated;
  a truncation, e.g. a time limit, is not terminal).

The final step t = N holds the final observation o_N, a zero action, a zero reward and a discount
of 0 when terminal, else 1.

Metadata and language. ``set_step_metadata`` / ``set_language_instruction`` values are *sticky*:
each step records the values in effect when the step is completed, i.e. when ``step(a_t)`` is
called for step t, or when the episode ends for the final step. So a value set after o_t was
observed and before ``step(a_t)`` lands in step t (with o_t and a_t). A key never set holds zeros
(or an empty string). ``set_episode_metadata`` values in effect when the episode is written apply
to it; an episode is written at the next ``reset()`` or at ``close()``, so metadata set after the
last ``step()`` (a success flag, say) still belongs to the episode that just ended.

Types. Observation and action specs come from spaces, or are inferred from the first value.
Step metadata, episode metadata and the presence of a language instruction are declared, or
inferred from the values given during the first episode; the dataset's features are fixed when
the first episode is written (or taken from the dataset being appended to).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from oxe_envlogger import spaces
from oxe_envlogger.collect import lifecycle
from oxe_envlogger.collect.writer import DatasetWriter, EpisodeRows, WriterOptions
from oxe_envlogger.errors import (
    LoggerClosedError,
    SpecError,
    StepOrderError,
    UnknownKeyError,
)
from oxe_envlogger.format import codecs, layout, specs
from oxe_envlogger.format.specs import Group, Leaf, Spec

log = logging.getLogger(__name__)

STEP_RESERVED = ("observation", "action", "reward", "discount", "is_first", "is_last",
                 "is_terminal", "language_instruction")
# Steps are packed into column blocks every _MAX_BLOCK_ROWS steps, or fewer where the tensors
# of that many steps exceed _BLOCK_BYTES (so packing one is a short pause); the episode byte
# budget is checked every _BUDGET_STEPS steps, or at every block where blocks are smaller.
_MAX_BLOCK_ROWS = 1024
_BLOCK_BYTES = 1 << 20
_BUDGET_STEPS = 32
_ROW = 6  # entries per step in a stream's rows
EPISODE_RESERVED = ("steps", "episode_id", "invalid")


class _Part:
    """One compiled part of a step (observation, action, a metadata key): checks values and
    starts image encoding."""

    def __init__(self, spec: Spec, path: str, writer: DatasetWriter, strict_finite: bool,
                 strict_bounds: bool = False):
        self.spec = spec
        self.path = path
        self.leaves = list(specs.iter_leaves(spec))
        self._images = [(i, leaf.shape, leaf.codec) for i, (_, leaf) in enumerate(self.leaves)
                        if leaf.kind == "image"]
        self.has_images = images = bool(self._images)
        # check(value) -> the flat values: a list where images will be replaced by their
        # encodings, else a tuple. Tuples of arrays leave the garbage collector's tracking, so
        # the rows an episode holds do not make the collector rescan the heap every few
        # hundred steps (about 2 us per step with a small heap, more with a large one).
        if isinstance(spec, Leaf):  # the common case (a Box): one call
            leaf_check = specs.leaf_checker(spec, path, strict_finite=strict_finite,
                                            strict_bounds=strict_bounds)
            if images:
                self.check = lambda value: [leaf_check(value)]
            else:
                self.check = lambda value: (leaf_check(value),)
        else:
            group_check = specs.compile_checker(spec, path, strict_finite=strict_finite,
                                                strict_bounds=strict_bounds)

            def check(value: Any) -> list | tuple:
                out: list = []
                group_check(value, out)
                return out if images else tuple(out)

            self.check = check
        self._writer = writer
        self.zero = [self._zero_leaf(leaf) for _, leaf in self.leaves]
        # the bytes one value's tensors take in a block
        self.tensor_bytes = sum(int(np.prod(leaf.shape, dtype=np.int64)) * leaf.dtype.itemsize
                                for _, leaf in self.leaves if leaf.kind == "tensor")

    def pack(self, rows: Sequence[Sequence[Any]]) -> tuple:
        """The columns of some steps' checked values (``rows``: one flat value per step)."""
        # (not zip(*rows): an iterator per row, which the collector tracks, would make it
        # promote them when it runs meanwhile, and then run full collections)
        return tuple([_column(leaf, [row[i] for row in rows])
                      for i, (_, leaf) in enumerate(self.leaves)])

    def zeros(self, n: int) -> tuple:
        """The columns of ``n`` steps that hold no value (a key never set)."""
        return self.pack([self.zero] * n)

    def _zero_leaf(self, leaf: Leaf):
        if leaf.kind == "image":
            return codecs.encode(np.zeros(leaf.shape, np.uint8), leaf.codec)
        return specs.zero_value(leaf)

    def submit_images(self, flat: list) -> list:
        """Replaces image arrays by futures of their encoding (started now, off this thread)."""
        images = self._images
        if not images:
            return flat
        frames = self._writer.encode_images([(flat[i], codec) for i, _, codec in images])
        for (i, _, _), frame in zip(images, frames):
            flat[i] = frame
        return flat


def _column(leaf: Leaf, values: list) -> np.ndarray | tuple:
    """One leaf's values of consecutive steps as the garbage collector need not track them: an
    array ``(steps, *shape)`` for tensors; a tuple of ``bytes`` for strings and images (frames
    already encoded are replaced by their bytes; a tuple of bytes is untracked at the next
    collection)."""
    if leaf.kind == "tensor":
        if leaf.shape:  # arrays of the leaf's dtype and shape (checked): faster joined
            return np.concatenate(values, dtype=leaf.dtype).reshape(len(values), *leaf.shape)
        return np.asarray(values, dtype=leaf.dtype)
    if leaf.kind == "image":
        return tuple([v if v.__class__ is bytes or v.data is None else v.data for v in values])
    return tuple(values)


# A block: consecutive steps of an episode packed into columns (see _column), so that an
# episode's memory and the collector's work do not grow by Python objects per step. A plain
# tuple (the collector stops tracking a tuple of arrays and tuples of bytes; not a subclass,
# which it tracks) of:
_N, _OBS, _ACT, _REWARD, _DISCOUNT, _META, _LANGUAGE = range(7)
# the number of steps; a column per observation leaf; a column per action leaf; rewards;
# discounts; ((step metadata key, a column per leaf), ...), keys registered later holding
# zeros; languages.


def _infer_spec(value: Any, path: str, image_codec, image_codecs, float64: str) -> Spec:
    space = spaces.get_gym_space(value, _path=path)
    spec = spaces.space_to_spec(space, path=path, image_codec=image_codec,
                               image_codecs=image_codecs, float64=float64)
    specs.check_keys(spec, path)
    return spec


def _declaration_example(value: Any) -> str:
    """A declaration of ``value``'s feature as a user would write it, for error messages."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {_declaration_example(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (str, bytes)):
        return "str"
    if isinstance(value, (bool, int, float)):
        return type(value).__name__
    try:
        arr = np.asarray(value)
    except Exception:
        return "<a gymnasium space>"
    if arr.dtype.kind not in "biuf":
        return "<a gymnasium space>"
    dtype = f"np.{arr.dtype.name}"
    if arr.shape == ():
        return dtype
    if arr.dtype.kind == "f":
        low, high = "-np.inf", "np.inf"
    elif arr.dtype.kind == "b":
        low, high = "0", "1"
    else:
        low, high = np.iinfo(arr.dtype).min, np.iinfo(arr.dtype).max
    return f"gym.spaces.Box({low}, {high}, {arr.shape}, {dtype})"


class EpisodeRecorder:
    """Collects one episode at a time and hands finished episodes to a :class:`DatasetWriter`.

    Args:
      directory: dataset directory.
      dataset_name: TFDS dataset name.
      observation: observation spec, gymnasium space or other declaration; None to infer it from
        the first observation.
      action: the same for actions.
      reward_dtype, discount_dtype: dtypes of ``reward`` and ``discount``.
      step_metadata: declared step metadata ``{key: declaration}``; None to infer.
      episode_metadata: declared episode metadata; None to infer.
      language: whether steps carry ``language_instruction``; None to infer.
      image_codec, image_codecs: see :func:`oxe_envlogger.spaces.space_to_spec`.
      float64: how float64 values (of spaces, dtypes and inferred values) are stored:
        ``"float32"`` (a float list, rounded to float32) or ``"exact"`` (raw bytes); None:
        ``"float32"`` for a new dataset, and each float64 feature as the dataset being appended
        to stores it.
      docs: ``{key path or leaf name: description}`` kept in ``features.json``.
      strict_finite: raise :class:`NonFiniteError` on NaN/Inf instead of counting them.
      strict_bounds: raise :class:`OutOfBoundsError` on an observation or action outside its
        declared space (Box bounds, Discrete range) instead of counting it.
      incomplete: what ``close()`` does with an episode in progress: ``"keep"`` (written,
        truncated, ``invalid=True``) or ``"drop"``.
      options: :class:`WriterOptions`.
      overwrite: replace an existing dataset in ``directory``.
      session: provenance for ``oxe_envlogger.json``.
      description, version: for ``dataset_info.json``.
    """

    def __init__(self, directory: str | os.PathLike, dataset_name: str, *,
                 observation: Any = None, action: Any = None,
                 reward_dtype: Any = np.float64, discount_dtype: Any = np.float32,
                 step_metadata: Mapping[str, Any] | None = None,
                 episode_metadata: Mapping[str, Any] | None = None,
                 language: bool | None = None,
                 image_codec: str | specs.ImageCodec = "png",
                 image_codecs: Mapping[str, str | specs.ImageCodec] | None = None,
                 float64: str | None = None,
                 docs: Mapping[str, str] | None = None,
                 strict_finite: bool = False, strict_bounds: bool = False,
                 incomplete: str = "keep",
                 options: WriterOptions | None = None, overwrite: bool = False,
                 session: Mapping[str, Any] | None = None,
                 description: str = "", version: str = layout.DEFAULT_VERSION):
        if incomplete not in ("keep", "drop"):
            raise ValueError(f"incomplete: expected 'keep' or 'drop', given {incomplete!r}")
        self._codec = image_codec
        self._codecs = {specs.step_key(k): v for k, v in (image_codecs or {}).items()}
        self._float64 = None if float64 is None else specs.check_float64_storage(float64)
        self._float64_new = float64 or "float32"  # for features made here
        self._docs = dict(docs or {})
        self._strict = strict_finite
        self._strict_bounds = strict_bounds
        self._incomplete = incomplete
        self._description = description
        self._version = version
        self.writer = DatasetWriter(directory, dataset_name, options=options, overwrite=overwrite,
                                    session=session)
        self.directory = self.writer.dir.path
        self._closed = False
        self._max_episode_bytes = self.writer.options.max_episode_bytes
        self._fixed_step_bytes: float | None = None  # see _step_bytes
        self._frames_per_step = 0
        self._raw_frame_bytes = 0
        self._block_rows = _MAX_BLOCK_ROWS  # see _update_block_rows
        self._check_every = _ROW * _BUDGET_STEPS

        try:
            self._setup(observation, action, reward_dtype, discount_dtype, step_metadata,
                        episode_metadata, language)
        except BaseException:
            self.writer.close()  # releases the directory; nothing was written
            raise

    def _setup(self, observation, action, reward_dtype, discount_dtype, step_metadata,
               episode_metadata, language) -> None:
        existing = self.writer.existing_features()
        existing_steps: dict[str, Spec] = {}
        existing_episode: dict[str, Spec] = {}
        if existing is not None:
            ex = specs.spec_from_features_json(existing)
            existing_steps = dict(ex.fields["steps"].fields)
            existing_episode = {k: v for k, v in ex.fields.items() if k != "steps"}

        def declared(decl, path):
            if decl is None:
                return None
            spec = spaces.declaration_to_spec(decl, path=path, image_codec=self._codec,
                                             image_codecs=self._codecs,
                                             float64=self._float64_new)
            if existing is None:  # (a dataset being appended to keeps the keys it has)
                specs.check_keys(spec, path)
            return spec

        def stored_as_existing(spec, key):
            # float64 not given: append with the storage the dataset has (either works).
            if self._float64 is not None or spec is None:
                return spec
            return specs.adopt_float64(spec, existing_steps.get(key))

        obs_spec = stored_as_existing(declared(observation, "observation"), "observation")
        act_spec = stored_as_existing(declared(action, "action"), "action")
        if obs_spec is None and "observation" in existing_steps:
            obs_spec = existing_steps["observation"]
        if act_spec is None and "action" in existing_steps:
            act_spec = existing_steps["action"]
        self._obs = self._part(obs_spec, "observation") if obs_spec is not None else None
        self._act = self._part(act_spec, "action") if act_spec is not None else None
        self._reward_leaf = stored_as_existing(
            specs.tensor((), reward_dtype, float64=self._float64_new), "reward")
        self._reward = specs.leaf_checker(self._reward_leaf, "reward", strict_finite=self._strict)
        # Python floats stored exactly as float64 need no check on the hot path.
        self._reward_fast = float if (self._reward_leaf.dtype == np.float64 and not self._strict
                                      and not self._reward_leaf.rounds_to_float32) else None
        self._discount_leaf = stored_as_existing(
            specs.tensor((), discount_dtype, float64=self._float64_new), "discount")
        self._discount = specs.leaf_checker(self._discount_leaf, "discount")

        # Metadata: {top-level key: _Part}; None while still being inferred.
        self._step_meta_frozen = step_metadata is not None
        self._episode_meta_frozen = episode_metadata is not None
        self._language = language
        # What fixed each part's features, for the errors about keys that came too late.
        self._fixed_by = {"step": "declared" if step_metadata is not None else None,
                          "episode": "declared" if episode_metadata is not None else None,
                          "language": "declared" if language is not None else None}
        if existing is not None:
            self._fixed_by = dict.fromkeys(self._fixed_by, "existing")
            self._step_meta_frozen = self._episode_meta_frozen = True
            step_metadata = {k: v for k, v in existing_steps.items() if k not in STEP_RESERVED}
            episode_metadata = {k: v for k, v in existing_episode.items() if k not in EPISODE_RESERVED}
            self._language = "language_instruction" in existing_steps
        self._step_meta: dict[str, _Part] = {}
        for k, decl in (step_metadata or {}).items():
            self._check_meta_key(k, STEP_RESERVED, "step")
            self._step_meta[k] = self._part(declared(decl, k), k)
        self._episode_meta: dict[str, _Part] = {}
        for k, decl in (episode_metadata or {}).items():
            self._check_meta_key(k, EPISODE_RESERVED, "episode")
            self._episode_meta[k] = self._part(declared(decl, k), k)

        self._update_block_rows()
        # Episode streams (one per sub-env of a vector env); each holds its sticky metadata.
        self._s0 = _Stream(0)
        self.streams: list[_Stream] = [self._s0]
        self._episode_index = 0
        frames = [int(np.prod(leaf.shape)) for part in (self._obs, self._act,
                                                         *self._step_meta.values(),
                                                         *self._episode_meta.values())
                  if part is not None for _, leaf in part.leaves if leaf.kind == "image"]
        if frames:  # start the encoders now, not in the middle of the first step
            self.writer.prepare_encoder(max(frames))
        if self._ready_to_start():
            self._start()

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _check_meta_key(key: str, reserved, what: str) -> None:
        if not isinstance(key, str) or not key or "/" in key:
            raise SpecError(key, f"a {what} metadata key: a non-empty str without '/'", repr(key))
        if key in reserved:
            raise SpecError(key, f"a {what} metadata key other than {list(reserved)}", repr(key),
                            "that name is reserved by RLDS")

    def _part(self, spec: Spec, path: str) -> _Part:
        spec = self._with_docs(spec, path)
        # Bounds are the env's: observations and actions (metadata keys never set hold zeros,
        # which a space's bounds need not allow).
        return _Part(spec, path, self.writer, self._strict,
                     self._strict_bounds and path in ("observation", "action"))

    def _with_docs(self, spec: Spec, path: str) -> Spec:
        if not self._docs:
            return spec
        import dataclasses

        if isinstance(spec, Leaf):
            doc = self._docs.get(path) or self._docs.get(path.rsplit("/", 1)[-1])
            return dataclasses.replace(spec, doc=doc) if doc else spec
        fields = {k: self._with_docs(v, specs.join(path, k)) for k, v in spec.fields.items()}
        return dataclasses.replace(spec, fields=fields)

    def _ready_to_start(self) -> bool:
        return (self._obs is not None and self._act is not None and self._step_meta_frozen
                and self._episode_meta_frozen and self._language is not None)

    def _episode_spec(self) -> Group:
        step_fields: dict[str, Spec] = {
            "observation": self._obs.spec,
            "action": self._act.spec,
            "reward": self._reward_leaf,
            "discount": self._discount_leaf,
            "is_first": specs.tensor((), np.bool_),
            "is_last": specs.tensor((), np.bool_),
            "is_terminal": specs.tensor((), np.bool_),
        }
        if self._language:
            step_fields["language_instruction"] = specs.text(
                self._docs.get("language_instruction", "Language instruction of the episode."))
        for k, part in self._step_meta.items():
            step_fields[k] = part.spec
        fields: dict[str, Spec] = {
            "steps": Group(step_fields, "steps"),
            "episode_id": specs.text("Unique id of the episode: <writer id>-<index>."),
            "invalid": specs.tensor((), np.bool_, "True for an episode cut short by close(), an "
                                    "exception or a signal (it ends truncated)."),
        }
        for k, part in self._episode_meta.items():
            fields[k] = part.spec
        return Group(fields, "dict")

    def _start(self) -> None:
        codecs_used = {}
        for part, prefix in [(self._obs, "steps/observation"), (self._act, "steps/action")]:
            for p, leaf in part.leaves:
                if leaf.kind == "image":
                    codecs_used[specs.join(prefix, p) if p else prefix] = str(leaf.codec)
        self.writer.start(self._episode_spec(), description=self._description,
                          version=self._version,
                          metadata={"image_codecs": codecs_used,
                                    "step_alignment": "rlds: step t holds o_t, a_t and the reward "
                                    "and discount that followed a_t; the final step holds o_N "
                                    "with a zero action"})

    def _ensure_open(self) -> None:
        if self._closed:
            raise LoggerClosedError(f"the logger of {self.directory} is closed")
        if self.writer.started:
            self.writer.check()

    # -- values ------------------------------------------------------------------------------------

    def check_observation(self, obs: Any) -> list:
        if self._obs is None:
            self._obs = self._part(_infer_spec(obs, "observation", self._codec, self._codecs,
                                               self._float64_new),
                                   "observation")
            self._update_block_rows()
        return self._obs.check(obs)

    def check_action(self, action: Any, stream: _Stream | None = None) -> list:
        """Validates an action and the call order (call before stepping the env, so that a bad
        action or a step out of order changes nothing)."""
        s = stream or self._s0
        act = self._act
        if (act is not None and not self._closed and s.pending_obs is not None
                and not s.ended and self.writer.error is None):
            return act.check(action)  # the hot path
        self._ensure_open()
        self._check_can_step(s)
        if self._act is None:
            self._act = self._part(_infer_spec(action, "action", self._codec, self._codecs,
                                               self._float64_new),
                                   "action")
            self._update_block_rows()
        return self._act.check(action)

    def _targets(self, stream: _Stream | None) -> list[_Stream]:
        """The streams a setter applies to: the one given, else every stream (one, for a
        single env)."""
        return self.streams if stream is None else [stream]

    def set_step_metadata(self, metadata: Mapping[str, Any], stream: _Stream | None = None,
                          ) -> None:
        self._ensure_open()
        submitted = self._submit(self._check_meta(metadata, self._step_meta,
                                                  self._step_meta_frozen, STEP_RESERVED, "step"))
        for s in self._targets(stream):
            s.step_meta_now = {**s.step_meta_now, **submitted}

    def set_episode_metadata(self, metadata: Mapping[str, Any], stream: _Stream | None = None,
                             ) -> None:
        self._ensure_open()
        submitted = self._submit(self._check_meta(metadata, self._episode_meta,
                                                  self._episode_meta_frozen, EPISODE_RESERVED,
                                                  "episode"))
        for s in self._targets(stream):
            s.episode_meta_now = {**s.episode_meta_now, **submitted}

    def _check_meta(self, metadata, parts, frozen, reserved, what) -> dict[str, tuple[_Part, list]]:
        """Checks every value before anything changes; registers parts of new keys."""
        if not isinstance(metadata, Mapping):
            raise SpecError(f"{what}_metadata", "a dict", type(metadata).__name__)
        checked = {}
        for key, value in metadata.items():
            part = parts.get(key)
            if part is None:
                if frozen:
                    raise UnknownKeyError(
                        key, f"one of the {what} metadata keys {sorted(parts)}", repr(key),
                        self._too_late_hint(what, f"{what}_metadata_info={{"
                                            f"{key!r}: {_declaration_example(value)}}}"))
                self._check_meta_key(key, reserved, what)
                part = self._part(_infer_spec(value, key, self._codec, self._codecs,
                                              self._float64_new), key)
            checked[key] = (part, part.check(value))
        new = [key for key in checked if key not in parts]
        for key, (part, _) in checked.items():
            parts[key] = part
        if new and parts is self._step_meta:
            self._update_block_rows()
        return checked

    def _too_late_hint(self, what: str, declaration: str) -> str:
        """Why a metadata key or the language instruction has no feature, and how to give it."""
        fixed = self._fixed_by[what]
        if fixed == "existing":
            return (f"the dataset being appended to in {self.directory} has no such feature; "
                    "log to another directory, or pass overwrite=True to replace it")
        why = ("the logger's declarations fixed the features" if fixed == "declared" else
               "the dataset's features were fixed by its first episode, which did not set it")
        how = (f"declare it when creating the logger: {declaration} (every logger takes it, "
               "AutoOXEEnvLogger too)")
        if fixed == "declared":
            return f"{why}; {how}"
        return f"{why}; {how}, or set it during the first episode"

    @staticmethod
    def _submit(checked: dict[str, tuple[_Part, list]]) -> dict[str, list]:
        return {key: part.submit_images(list(flat)) if part.has_images else flat
                for key, (part, flat) in checked.items()}

    def set_language_instruction(self, instruction: str, stream: _Stream | None = None) -> None:
        self._ensure_open()
        if self._language is False:
            raise SpecError("language_instruction", "no language instruction (the dataset has "
                            "no steps/language_instruction feature)", repr(instruction)[:80],
                            self._too_late_hint("language", "language_instruction=True"))
        if not isinstance(instruction, (str, bytes)):
            raise SpecError("language_instruction", "a str", type(instruction).__name__)
        if self._language is None:
            self._language = True
        value = instruction.encode("utf-8") if isinstance(instruction, str) else instruction
        for s in self._targets(stream):
            s.language_now = value

    # -- the episode stream ------------------------------------------------------------------------

    @property
    def in_episode(self) -> bool:
        return self._s0.pending_obs is not None

    @property
    def episode_ended(self) -> bool:
        return self._s0.ended

    @staticmethod
    def _check_can_step(s: _Stream) -> None:
        if s.ended:
            raise StepOrderError("step() after the episode ended (terminated or truncated); "
                                 "call reset() first")
        if s.pending_obs is None:
            raise StepOrderError("step() before reset(): the logger needs o_0 from reset()")

    def begin(self, obs: Any, stream: _Stream | None = None) -> None:
        """Starts an episode at o_0 (ending the one in progress, which counts as truncated)."""
        s = stream or self._s0
        self._ensure_open()
        flat = self.check_observation(obs)
        if s.pending_obs is not None:
            self.end(stream=s)
        s.part = 0
        s.ended = False  # (an episode handed over by flush() stays ended until here)
        s.pending_obs = self._obs.submit_images(flat)

    def step(self, action_flat: list, reward: Any, next_obs: Any, *, terminated: bool,
             truncated: bool, discount: Any = None, stream: _Stream | None = None) -> None:
        """Records a_t (from :meth:`check_action`, which also checked that the logger is open),
        r_t and o_{t+1}. This is the per-step hot path: checks, copies and list appends."""
        s = stream or self._s0
        if s.pending_obs is None or s.ended:
            self._check_can_step(s)
        r = reward if reward.__class__ is self._reward_fast else self._reward(reward)
        if discount is None:
            d = 0.0 if terminated else 1.0
        else:
            d = self._discount(discount)
        obs = self._obs
        obs_flat = obs.check(next_obs)
        act = self._act
        pending = obs.submit_images(obs_flat) if obs.has_images else obs_flat
        # One extend (a step's values go straight into the episode's list, so that no
        # container per step outlives the collector's first pass), then the new pending
        # observation: an interrupt between the two leaves rows[-_ROW] is s.pending_obs,
        # which close() detects and undoes.
        rows = s.rows
        rows.extend((s.pending_obs, act.submit_images(action_flat) if act.has_images
                     else action_flat, r, d, s.step_meta_now, s.language_now))
        s.pending_obs = pending
        if terminated or truncated:
            s.ended = True
            s.terminal = bool(terminated)
        elif not len(rows) % self._check_every:
            self._every_few_steps(s)

    def _update_block_rows(self) -> None:
        """Sizes the blocks for the step parts known now (see ``_MAX_BLOCK_ROWS``)."""
        per_step = 16  # reward and discount
        for part in (self._obs, self._act, *self._step_meta.values()):
            if part is not None:
                per_step += part.tensor_bytes
        rows = _MAX_BLOCK_ROWS
        while rows > 1 and rows * per_step > _BLOCK_BYTES:
            rows //= 2
        self._block_rows = rows
        self._check_every = _ROW * min(rows, _BUDGET_STEPS)  # in entries of a stream's rows

    def _every_few_steps(self, s: _Stream) -> None:
        if len(s.rows) >= _ROW * self._block_rows:
            self._pack_rows(s)
        if self._max_episode_bytes:
            self._split_if_over_budget(s)

    def _pack_rows(self, s: _Stream) -> None:
        """Packs the steps recorded since the last block into a new block (see ``_N``):
        the per-step tuples go, so memory, the garbage collector's work and the episode's
        hand-over do not grow with the episode."""
        block = self._pack(s.rows, list(self._step_meta.items()))
        with lifecycle.signals_deferred():  # the steps are in the rows or in a block, once
            s.blocks.append(block)
            s.packed += block[_N]
            # (emptied, not replaced: the values of a step enter an old list, which the
            # collector does not scan with them, so they leave its tracking at once)
            del s.rows[:]

    def _pack(self, rows: list, step_meta: list[tuple[str, _Part]]) -> tuple:
        obs_rows, act_rows, rewards, discounts, meta_rows, languages = (
            rows[i::_ROW] for i in range(_ROW))
        meta = tuple([(key, part.pack([m.get(key, part.zero) for m in meta_rows]))
                      for key, part in step_meta])
        return (len(obs_rows), self._obs.pack(obs_rows), self._act.pack(act_rows),
                np.asarray(rewards, self._reward_leaf.dtype),
                np.asarray(discounts, self._discount_leaf.dtype), meta, tuple(languages))

    def _step_bytes(self, s: _Stream) -> float:
        """Estimated serialized bytes per step: fixed-size values from the spec, images at the
        mean encoded size so far (their raw size before any frame is encoded)."""
        fixed = self._fixed_step_bytes
        if fixed is None:
            fixed = 64.0  # reward, discount, flags and framing
            for part in (self._obs, self._act, *self._step_meta.values()):
                for _, leaf in (part.leaves if part is not None else ()):
                    n = int(np.prod(leaf.shape))
                    if leaf.kind == "image":
                        self._frames_per_step += 1
                        self._raw_frame_bytes += n
                    elif leaf.kind == "tensor":
                        fixed += n * (leaf.dtype.itemsize if leaf.encoding == "bytes"
                                      else max(leaf.dtype.itemsize, 4)) + 8
                    else:
                        fixed += 64
            self._fixed_step_bytes = fixed
        encoder = self.writer.encoder
        if self._frames_per_step and encoder is not None and encoder.frames:
            images = self._frames_per_step * (encoder.bytes_out / encoder.frames + 8)
        else:
            images = float(self._raw_frame_bytes)
        return fixed + images + len(s.language_now)

    def _split_if_over_budget(self, s: _Stream) -> None:
        """Ends the episode here (truncated) once it reaches ``max_episode_bytes``; the next
        episode starts from the same observation and continues its episode id."""
        steps = s.packed + len(s.rows) // _ROW
        if steps * self._step_bytes(s) < self._max_episode_bytes:
            return
        pending = s.pending_obs
        part = s.part
        log.info("an episode reached max_episode_bytes (%d) after %d steps: continuing it as "
                 "part %d", self._max_episode_bytes, steps, part + 1)
        self.end(stream=s)
        self.writer.note_split()
        s.pending_obs = pending
        s.part = part + 1

    def end(self, *, invalid: bool = False, stream: _Stream | None = None) -> None:
        """Writes the episode in progress (if it has at least one step) and clears it."""
        s = stream or self._s0
        if s.pending_obs is None:
            return
        if s.rows and s.rows[-_ROW] is s.pending_obs:
            del s.rows[-_ROW:]  # step() was interrupted between its two updates
        if not s.rows and not s.blocks:
            log.debug("dropping an episode without steps")
            s.clear()
            return
        if not self.writer.started:
            self._freeze()
        with lifecycle.signals_deferred():  # hand over exactly once, even on Ctrl-C
            rows = self._build_rows(s, invalid=invalid)
            s.clear()
            if s.part == 0:  # the parts of a split episode share its index
                self._episode_index += 1
            self.writer.put(rows)

    def _freeze(self) -> None:
        """Fixes the features from what the first episode showed."""
        for what, fixed in self._fixed_by.items():
            if fixed is None:
                self._fixed_by[what] = "first episode"
        self._step_meta_frozen = True
        self._episode_meta_frozen = True
        if self._language is None:
            self._language = False
        self._start()

    def _build_rows(self, s: _Stream, *, invalid: bool) -> EpisodeRows:
        """Hands the episode's blocks and last rows over. Only references move here, on the
        control thread; the last rows are packed and the columns assembled in the writer
        thread."""
        rows = s.rows
        rows.extend((s.pending_obs, self._act.zero, 0.0, 0.0 if s.terminal else 1.0,
                     s.step_meta_now, s.language_now))
        blocks = s.blocks
        n = s.packed + len(rows) // _ROW
        terminal = s.terminal
        episode_meta = s.episode_meta_now
        if s.part == 0:
            s.base_index = self._episode_index
        episode_id = layout.episode_id(self.writer.writer_id, s.base_index, s.part)
        language = self._language
        step_meta = list(self._step_meta.items())
        episode_meta_parts = list(self._episode_meta.items())

        def columns() -> list[list]:
            every = [*blocks, self._pack(rows, step_meta)]
            rows.clear()

            def each(field: int, leaf: int | None = None) -> list:
                if leaf is None:
                    return [b[field] for b in every]
                return [b[field][leaf] for b in every]

            cols: list[list] = []
            cols.extend(each(_OBS, i) for i in range(len(self._obs.leaves)))
            cols.extend(each(_ACT, i) for i in range(len(self._act.leaves)))
            cols.append(each(_REWARD))
            cols.append(each(_DISCOUNT))
            for step, value in ((0, True), (-1, True), (-1, terminal)):  # first, last, terminal
                flags = np.zeros(n, np.bool_)  # (one chunk: columns need not share chunks)
                flags[step] = value
                cols.append([flags])
            if language:
                cols.append(each(_LANGUAGE))
            metas = [dict(m) for m in each(_META)]
            sizes = each(_N)
            for key, part in step_meta:
                packed = [m[key] if key in m else part.zeros(k) for m, k in zip(metas, sizes)]
                cols.extend([p[j] for p in packed] for j in range(len(part.leaves)))
            return cols

        def episode_values() -> list:
            out: list = [episode_id.encode(), invalid]
            for key, part in episode_meta_parts:
                out.extend(episode_meta.get(key, part.zero))
            return out

        return EpisodeRows(columns, episode_values, n, episode_id)

    def add_streams(self, n: int) -> list[_Stream]:
        """Makes the recorder hold ``n`` independent episode streams (vector envs)."""
        while len(self.streams) < n:
            self.streams.append(_Stream(len(self.streams)))
        return self.streams[:n]

    def flush(self, *, commit: bool = True) -> None:
        """Hands over every episode that has ended (so episode metadata set after this goes to
        the next episode), then waits for the writer (:meth:`DatasetWriter.flush`). Episodes
        still in progress are not touched."""
        self._ensure_open()
        for s in self.streams:
            if s.ended and s.pending_obs is not None:
                self.end(stream=s)
                s.ended = True  # still ended: step() needs a reset()
        self.writer.flush(commit=commit)

    def close(self) -> None:
        """Writes the episodes in progress (see ``incomplete``), flushes and commits. Idempotent."""
        if self._closed:
            return
        try:
            for s in self.streams:
                if s.pending_obs is None:
                    continue
                if s.ended:
                    self.end(stream=s)
                elif self._incomplete == "keep" and (s.rows or s.blocks):
                    self.end(invalid=True, stream=s)
                else:
                    s.clear()
            if not self.writer.started and self._ready_to_start():
                self._start()
        finally:
            self._closed = True
            self.writer.close()


class _Stream:
    """One sequence of episodes: the episode in progress and the sticky metadata values."""

    def __init__(self, index: int = 0):
        self.index = index
        self.step_meta_now: dict[str, list] = {}
        self.episode_meta_now: dict[str, list] = {}
        self.language_now: bytes = b""
        self.part = 0  # > 0: a continuation of a split episode (see max_episode_bytes)
        self.base_index = 0  # the episode index of its first part
        self.clear()

    def clear(self) -> None:
        # observation, action, reward, discount, step metadata, language (_ROW entries) per
        # step, for the steps since the last block; the blocks hold the earlier ones, packed.
        self.rows: list = []
        self.blocks: list[tuple] = []
        self.packed = 0  # steps in the blocks
        self.pending_obs: list | None = None
        self.ended = False
        self.terminal = False
