"""The logger options every front shares: one frozen bundle, :class:`LoggerOptions`.

Every front (``OXEEnvLogger``, ``AutoOXEEnvLogger``, ``RLDSLogger``, ``VectorOXEEnvLogger``,
``DmEnvLogger``, ``RLDSBackendWriter``) takes the same flat keyword options, read through
:meth:`LoggerOptions.from_keywords` (an unknown one is an error naming the valid ones), or a whole
bundle as ``options=LoggerOptions(...)``; the bundle builds the episode recorder.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from oxe_envlogger.collect import lifecycle
from oxe_envlogger.collect.recorder import EpisodeRecorder
from oxe_envlogger.collect.writer import WriterOptions
from oxe_envlogger.errors import UnknownOptionError
from oxe_envlogger.format import layout
from oxe_envlogger.format.codecs import ImageCodec

MetadataInfo = Mapping[str, Any]
DocField = Mapping[str, str]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoggerOptions:
    """How a logger records and writes; the same for every front.

    Attributes:
      step_metadata_info: ``{key: declaration}`` of step metadata: tfds FeatureConnectors (as
        the original oxe_envlogger took), gymnasium spaces, dm_env specs, numpy dtypes,
        ``str``/``float``/... None: the front's default (declared empty for ``OXEEnvLogger``,
        inferred from the first episode for the others).
      episode_metadata_info: the same for episode metadata.
      language_instruction: whether steps carry ``language_instruction``. None: the front's
        default (False for ``OXEEnvLogger``, inferred from the first episode for the others).
      doc_field: ``{key path or leaf name: description}`` for ``features.json``.
      version: dataset version.
      max_episodes_per_file: close a shard after this many episodes.
      shard_bytes: close a shard once it holds this many serialized bytes (default 200 MiB).
      image_codec: codec of uint8 HxWx{1,3,4} observations: ``"png"`` (lossless, default),
        ``"jpeg"`` / ``"jpeg:90"`` or ``"raw"``.
      image_codecs: per key path codecs, e.g. ``{"observation/wrist": "jpeg"}``.
      float64: how float64 values (observations, actions, ``reward``, metadata) are stored:
        ``"float32"`` as tfds stores a float64 ``Tensor``, a float list rounded to float32, which
        every RLDS loader reads as numbers, also one that skips tfds' decoding (the Open
        X-Embodiment and Octo pipelines); ``"exact"`` as raw float64 bytes, read back bit for
        bit by tfds and our readers but as ``tf.string`` by a loader that skips decoding. None
        (default): ``"float32"`` for a new dataset, and what a dataset being appended to has.
        Under ``"float32"`` a finite value beyond float32's range is a :class:`SpecError`;
        NaN and infinities stay (counted, or refused with ``strict_finite``).
      reward_dtype: dtype of ``reward`` (stored as ``float64`` says when float64). None: the
        front's default (float64; a dm_env env's ``reward_spec()`` dtype).
      strict_finite: raise on NaN/Inf in float values instead of counting them.
      strict_bounds: raise :class:`OutOfBoundsError` on an observation or action outside its
        space (a Box's bounds, a Discrete's range) instead of counting it (counts are reported
        at close and kept in ``oxe_envlogger.json``; gymnasium's own bounds are often loose).
      incomplete: ``"keep"`` (default) writes an episode cut short by ``close()``, an exception
        or a signal as truncated with ``invalid=True``; ``"drop"`` discards it.
      overwrite: replace an existing dataset in the directory.
      fsync: fsync each episode (default True).
      writer_options: a full :class:`WriterOptions` (``shard_bytes``, ``max_episodes_per_file``
        and ``fsync``, when given, take precedence over its fields).
      description: for ``dataset_info.json`` (default: a sentence naming the env and front).
      handle_signals: turn SIGTERM into a clean exit that writes what is buffered.
    """

    step_metadata_info: MetadataInfo | None = None
    episode_metadata_info: MetadataInfo | None = None
    language_instruction: bool | None = None
    doc_field: DocField | None = None
    version: str = layout.DEFAULT_VERSION
    max_episodes_per_file: int | None = None
    shard_bytes: int | None = None
    image_codec: str | ImageCodec = "png"
    image_codecs: Mapping[str, str | ImageCodec] | None = None
    float64: str | None = None
    reward_dtype: Any = None
    strict_finite: bool = False
    strict_bounds: bool = False
    incomplete: str = "keep"
    overwrite: bool = False
    fsync: bool | None = None
    writer_options: WriterOptions | None = None
    description: str = ""
    handle_signals: bool = True

    def __post_init__(self):
        if self.incomplete not in ("keep", "drop"):
            raise ValueError(f"incomplete: expected 'keep' or 'drop', given {self.incomplete!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_keywords(cls, front: str, keywords: Mapping[str, Any], *,
                      options: LoggerOptions | None = None) -> LoggerOptions:
        """The options of a front called with ``options`` and flat keywords (which win).

        Args:
          front: the front's name, for the error message.
          keywords: the flat keyword options a front was called with.
          options: a bundle to start from (default: every option at its default).

        Raises:
          UnknownOptionError: for a keyword that is not an option, naming the valid ones.
        """
        valid = cls.names()
        unknown = [k for k in keywords if k not in valid]
        if unknown:
            raise UnknownOptionError(front, unknown, valid)
        base = options if options is not None else cls()
        if not isinstance(base, LoggerOptions):
            raise TypeError(f"{front}: options: expected a LoggerOptions, given "
                            f"{type(base).__name__}")
        return dataclasses.replace(base, **keywords) if keywords else base

    def with_defaults(self, **defaults: Any) -> LoggerOptions:
        """These options with each of ``defaults`` filled in where the option is None (a front's
        own defaults, e.g. ``language_instruction=False``)."""
        changes = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        return dataclasses.replace(self, **changes) if changes else self

    def writer(self) -> WriterOptions:
        """The :class:`WriterOptions`: ``writer_options`` with ``shard_bytes``,
        ``max_episodes_per_file`` and ``fsync`` applied where given."""
        opts = self.writer_options or WriterOptions()
        changes: dict[str, Any] = {}
        if self.shard_bytes is not None:
            changes["shard_bytes"] = int(self.shard_bytes)
        if self.max_episodes_per_file is not None:
            changes["max_episodes_per_file"] = int(self.max_episodes_per_file)
        if self.fsync is not None:
            changes["fsync"] = bool(self.fsync)
        return dataclasses.replace(opts, **changes) if changes else opts

    def build_recorder(self, directory: str | os.PathLike, dataset_name: str, *,
                       observation: Any, action: Any, session: Mapping[str, Any],
                       description: str, discount_dtype: Any = None,
                       image_codecs: Mapping[str, str | ImageCodec] | None = None
                       ) -> EpisodeRecorder:
        """Builds the episode recorder these options describe, registered for a clean exit.

        Args:
          directory, dataset_name: where and what to write.
          observation, action: the front's declarations (spaces, specs) or None to infer.
          session: provenance for ``oxe_envlogger.json``.
          description: the front's default description (``self.description`` wins when set).
          discount_dtype: dtype of ``discount`` (None: float32).
          image_codecs: the codecs as the front resolved them (default ``self.image_codecs``).
        """
        recorder = EpisodeRecorder(
            directory, dataset_name, observation=observation, action=action,
            reward_dtype=np.float64 if self.reward_dtype is None else self.reward_dtype,
            **({"discount_dtype": discount_dtype} if discount_dtype is not None else {}),
            step_metadata=self.step_metadata_info, episode_metadata=self.episode_metadata_info,
            language=self.language_instruction, image_codec=self.image_codec,
            image_codecs=self.image_codecs if image_codecs is None else image_codecs,
            float64=self.float64, docs=self.doc_field, strict_finite=self.strict_finite,
            strict_bounds=self.strict_bounds, incomplete=self.incomplete, options=self.writer(),
            overwrite=self.overwrite, session=session,
            description=self.description or description, version=self.version)
        lifecycle.register(recorder, handle_signals=self.handle_signals)
        return recorder

