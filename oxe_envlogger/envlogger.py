"""gymnasium wrappers that log every episode as RLDS: ``AutoOXEEnvLogger`` and ``OXEEnvLogger``.

Both only record: ``reset()``, ``step()``, ``info`` and keyword arguments pass through unchanged,
and the agent sees exactly what is logged. See :mod:`oxe_envlogger.collect.recorder` for where each value
lands in the RLDS steps.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np

from oxe_envlogger.collect import lifecycle
from oxe_envlogger.collect.recorder import EpisodeRecorder
from oxe_envlogger.collect.writer import DEFAULT_SHARD_BYTES, WriterOptions
from oxe_envlogger.format import layout, provenance
from oxe_envlogger.format.specs import ImageCodec

MetadataInfo = Mapping[str, Any]
DocField = Mapping[str, str]


class LoggerMixin:
    """What every logger offers besides its stepping interface."""

    _recorder: EpisodeRecorder

    def set_step_metadata(self, metadata: Mapping[str, Any]) -> None:
        """Sets step metadata values (sticky: they stay until set again).

        A value set before ``step(a_t)`` lands in RLDS step t (with o_t and a_t); a value set after
        the last ``step()`` of an episode lands in its final step.
        """
        self._recorder.set_step_metadata(metadata)

    def set_episode_metadata(self, metadata: Mapping[str, Any]) -> None:
        """Sets episode metadata values (sticky) for the episode in progress, or just ended."""
        self._recorder.set_episode_metadata(metadata)

    def set_language_instruction(self, instruction: str) -> None:
        """Sets the language instruction stored in ``steps/language_instruction`` (sticky).

        Call it after ``reset()`` (or before it) to give the episode's instruction; every step
        records the instruction in effect when it is completed."""
        self._recorder.set_language_instruction(instruction)

    @property
    def directory(self) -> str:
        return self._recorder.directory

    @property
    def writer_stats(self) -> dict[str, Any]:
        """Episodes, steps, bytes and stalls written so far by this logger."""
        return self._recorder.writer._session_json()

    def flush(self, *, commit: bool = True) -> None:
        """Makes every episode completed so far durable and, with ``commit``, readable now
        (tfds, ``load_dataset``, ``statistics.json``), while logging goes on. Blocks until the
        writer has written them (images encoded, fsynced).

        An episode that has ended is handed over here, so episode metadata set after ``flush()``
        goes to the next episode. The episode in progress is not touched. Each commit closes a
        shard: flushing after every episode makes one shard per episode; flush every few minutes
        or at checkpoints (a crash loses at most the episodes queued since, see
        ``WriterOptions.queue_episodes``, even without flushing).

        Args:
          commit: also commit the open shard into the dataset. Without it the episodes are
            written and fsynced but reach readers only at the next commit or ``close()``, or
            through recovery after a crash.

        Raises:
          LoggerClosedError: after the logger was closed.
          WriterError: when writing failed.
        """
        self._recorder.flush(commit=commit)

    def close_logger(self) -> None:
        """Flushes and closes the logger (not the env). Idempotent."""
        rec = getattr(self, "_recorder", None)
        if rec is None:
            return
        try:
            rec.close()
        finally:
            lifecycle.unregister(rec)


def _writer_options(options: WriterOptions | None, shard_bytes: int | None,
                    max_episodes_per_file: int | None, fsync: bool | None) -> WriterOptions:
    import dataclasses

    opts = options or WriterOptions()
    changes: dict[str, Any] = {}
    if shard_bytes is not None:
        changes["shard_bytes"] = int(shard_bytes)
    if max_episodes_per_file is not None:
        changes["max_episodes_per_file"] = int(max_episodes_per_file)
    if fsync is not None:
        changes["fsync"] = bool(fsync)
    return dataclasses.replace(opts, **changes) if changes else opts


class _GymLogger(gym.Wrapper, LoggerMixin):
    def __init__(self, env: gym.Env, dataset_name: str, directory: str | os.PathLike, *,
                 step_metadata: MetadataInfo | None, episode_metadata: MetadataInfo | None,
                 language: bool | None, doc_field: DocField | None, version: str,
                 max_episodes_per_file: int | None, shard_bytes: int | None,
                 image_codec: str | ImageCodec, image_codecs: Mapping[str, str | ImageCodec] | None,
                 float64: str | None, reward_dtype: Any, strict_finite: bool, strict_bounds: bool, incomplete: str,
                 overwrite: bool,
                 fsync: bool | None, writer_options: WriterOptions | None, description: str,
                 handle_signals: bool):
        super().__init__(env)
        self._seeds: list[Any] = []
        self._recorder = EpisodeRecorder(
            directory, dataset_name,
            observation=env.observation_space, action=env.action_space,
            reward_dtype=reward_dtype, step_metadata=step_metadata,
            episode_metadata=episode_metadata, language=language,
            image_codec=image_codec, image_codecs=image_codecs, float64=float64, docs=doc_field,
            strict_finite=strict_finite, strict_bounds=strict_bounds, incomplete=incomplete,
            options=_writer_options(writer_options, shard_bytes, max_episodes_per_file, fsync),
            overwrite=overwrite, session=provenance.session_info(env, {"reset_seeds": self._seeds}),
            description=description or f"RLDS episodes of {provenance.env_info(env).get('id', 'an environment')} logged by oxe_envlogger.",
            version=version)
        lifecycle.register(self._recorder, handle_signals=handle_signals)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._recorder.begin(obs)
        self._seeds.append(seed)
        return obs, info

    def step(self, action, **kwargs) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        recorder = self._recorder
        flat_action = recorder.check_action(action)
        out = self.env.step(action, **kwargs) if kwargs else self.env.step(action)
        recorder.step(flat_action, out[1], out[0], terminated=bool(out[2]), truncated=bool(out[3]))
        return out

    def close(self) -> None:
        """Writes the last episode, commits the dataset, then closes the env. Idempotent."""
        try:
            self.close_logger()
        finally:
            if not getattr(self, "_env_closed", False):
                self._env_closed = True
                self.env.close()


class OXEEnvLogger(_GymLogger):
    """Logs a gymnasium env to RLDS with explicitly declared features.

    Args:
      env: the environment; its observation and action spaces define those features.
      dataset_name: TFDS dataset name (letters, digits, underscores).
      directory: dataset directory; an existing dataset with the same features is appended to.
      step_metadata_info: ``{key: declaration}`` of step metadata: tfds FeatureConnectors (as
        the original oxe_envlogger took), gymnasium spaces, numpy dtypes, ``str``/``float``/...
      episode_metadata_info: the same for episode metadata.
      language_instruction: whether steps carry ``language_instruction``.
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
      reward_dtype: dtype of ``reward`` (stored as ``float64`` says when float64).
      strict_finite: raise on NaN/Inf in float values instead of counting them.
      strict_bounds: raise :class:`OutOfBoundsError` on an observation or action outside its
        space (a Box's bounds, a Discrete's range) instead of counting it (counts are reported
        at close and kept in ``oxe_envlogger.json``; gymnasium's own bounds are often loose).
      incomplete: ``"keep"`` (default) writes an episode cut short by ``close()``, an exception
        or a signal as truncated with ``invalid=True``; ``"drop"`` discards it.
      overwrite: replace an existing dataset in ``directory``.
      fsync: fsync each episode (default True).
      writer_options: a full :class:`WriterOptions`.
      description: for ``dataset_info.json``.
      handle_signals: turn SIGTERM into a clean exit that writes what is buffered.
    """

    def __init__(self, env: gym.Env, dataset_name: str, directory: str | os.PathLike, *,
                 step_metadata_info: MetadataInfo | None = None,
                 episode_metadata_info: MetadataInfo | None = None,
                 language_instruction: bool = False, doc_field: DocField | None = None,
                 version: str = layout.DEFAULT_VERSION,
                 max_episodes_per_file: int | None = None, shard_bytes: int | None = None,
                 image_codec: str | ImageCodec = "png",
                 image_codecs: Mapping[str, str | ImageCodec] | None = None,
                 float64: str | None = None,
                 reward_dtype: Any = np.float64, strict_finite: bool = False,
                 strict_bounds: bool = False,
                 incomplete: str = "keep", overwrite: bool = False, fsync: bool | None = None,
                 writer_options: WriterOptions | None = None, description: str = "",
                 handle_signals: bool = True):
        super().__init__(
            env, dataset_name, directory, step_metadata=step_metadata_info or {},
            episode_metadata=episode_metadata_info or {}, language=language_instruction,
            doc_field=doc_field, version=version, max_episodes_per_file=max_episodes_per_file,
            shard_bytes=shard_bytes, image_codec=image_codec, image_codecs=image_codecs,
            float64=float64, reward_dtype=reward_dtype, strict_finite=strict_finite,
            strict_bounds=strict_bounds, incomplete=incomplete,
            overwrite=overwrite, fsync=fsync, writer_options=writer_options,
            description=description, handle_signals=handle_signals)


class AutoOXEEnvLogger(_GymLogger):
    """Logs a gymnasium env to RLDS, inferring what is not declared.

    Observation and action features come from the env's spaces (each value is checked against
    them). Step and episode metadata features, and whether there is a language instruction, are
    inferred from the values given (``set_step_metadata`` ...) during the first episode, unless
    declared. Nothing is replayed or held back: the first episode is written like every other
    one, and it fixes the dataset's features: a metadata key first set later, or a language
    instruction first given later, is an error. Declare those up front when the first episode
    may not show them.

    Args:
      env: the environment.
      dataset_name: TFDS dataset name.
      directory: dataset directory (default ``./logs/<dataset_name>``).
      optimal_shard_size: shard size in MB (the original's option; same as ``shard_bytes``).
      step_metadata_info: ``{key: declaration}`` of every step metadata key (as for
        :class:`OXEEnvLogger`, e.g. ``{"speed": float, "grasp": gym.spaces.Discrete(2)}``);
        None (default) infers them from the first episode.
      episode_metadata_info: the same for episode metadata.
      language_instruction: True or False to declare whether steps carry
        ``language_instruction``; None (default) infers it from the first episode.
      **options: the other keyword options of :class:`OXEEnvLogger`, with the same meaning.
    """

    def __init__(self, env: gym.Env, dataset_name: str, directory: str | os.PathLike | None = None,
                 *, optimal_shard_size: float | None = None,
                 step_metadata_info: MetadataInfo | None = None,
                 episode_metadata_info: MetadataInfo | None = None,
                 language_instruction: bool | None = None, doc_field: DocField | None = None,
                 version: str = layout.DEFAULT_VERSION,
                 max_episodes_per_file: int | None = None, shard_bytes: int | None = None,
                 image_codec: str | ImageCodec = "png",
                 image_codecs: Mapping[str, str | ImageCodec] | None = None,
                 float64: str | None = None,
                 reward_dtype: Any = np.float64, strict_finite: bool = False,
                 strict_bounds: bool = False,
                 incomplete: str = "keep", overwrite: bool = False, fsync: bool | None = None,
                 writer_options: WriterOptions | None = None, description: str = "",
                 handle_signals: bool = True):
        if directory is None:
            directory = os.path.join(os.getcwd(), "logs", dataset_name)
        if optimal_shard_size is not None and shard_bytes is None:
            shard_bytes = int(optimal_shard_size * 2**20)
        super().__init__(
            env, dataset_name, directory, step_metadata=step_metadata_info,
            episode_metadata=episode_metadata_info, language=language_instruction,
            doc_field=doc_field, version=version, max_episodes_per_file=max_episodes_per_file,
            shard_bytes=shard_bytes, image_codec=image_codec, image_codecs=image_codecs,
            float64=float64, reward_dtype=reward_dtype, strict_finite=strict_finite,
            strict_bounds=strict_bounds, incomplete=incomplete,
            overwrite=overwrite, fsync=fsync, writer_options=writer_options,
            description=description, handle_signals=handle_signals)


__all__ = ["DEFAULT_SHARD_BYTES", "AutoOXEEnvLogger", "LoggerMixin", "OXEEnvLogger"]
