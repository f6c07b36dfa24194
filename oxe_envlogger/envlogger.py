"""gymnasium wrappers that log every episode as RLDS: ``AutoOXEEnvLogger`` and ``OXEEnvLogger``.

Both only record: ``reset()``, ``step()``, ``info`` and keyword arguments pass through unchanged,
and the agent sees exactly what is logged. See :mod:`oxe_envlogger.collect.recorder` for where each value
lands in the RLDS steps.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np

from oxe_envlogger.collect import lifecycle
from oxe_envlogger.collect.recorder import EpisodeRecorder
from oxe_envlogger.collect.writer import WriterOptions
from oxe_envlogger.format import provenance
from oxe_envlogger.format.layout import DEFAULT_SHARD_BYTES
from oxe_envlogger.options import LoggerOptions


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
    def writer_options(self) -> WriterOptions:
        """The :class:`WriterOptions` this logger writes with (the ``writer_options`` option with
        ``shard_bytes``, ``max_episodes_per_file`` and ``fsync`` applied)."""
        return self._recorder.writer.options

    @property
    def writer_stats(self) -> dict[str, Any]:
        """Episodes, steps, bytes and stalls written so far by this logger."""
        return self._recorder.writer.session_json()

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

    def _close_logger_and_env(self, env: Any, **kwargs: Any) -> None:
        """Closes the logger, then the env it wraps (once, even when closing the logger fails)."""
        try:
            self.close_logger()
        finally:
            if not getattr(self, "_env_closed", False):
                self._env_closed = True
                env.close(**kwargs)

    def close_logger(self) -> None:
        """Flushes and closes the logger (not the env). Idempotent."""
        rec = getattr(self, "_recorder", None)
        if rec is None:
            return
        try:
            rec.close()
        finally:
            lifecycle.unregister(rec)


class _GymLogger(gym.Wrapper, LoggerMixin):
    def __init__(self, env: gym.Env, dataset_name: str, directory: str | os.PathLike,
                 options: LoggerOptions):
        super().__init__(env)
        self._seeds: list[Any] = []
        env_id = provenance.env_info(env).get("id", "an environment")
        self._recorder = options.build_recorder(
            directory, dataset_name, observation=env.observation_space,
            action=env.action_space,
            session=provenance.session_info(env, {"reset_seeds": self._seeds}),
            description=f"RLDS episodes of {env_id} logged by oxe_envlogger.")

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
        self._close_logger_and_env(self.env)


class OXEEnvLogger(_GymLogger):
    """Logs a gymnasium env to RLDS with explicitly declared features.

    Args:
      env: the environment; its observation and action spaces define those features.
      dataset_name: TFDS dataset name (letters, digits, underscores).
      directory: dataset directory; an existing dataset with the same features is appended to.
      options: a :class:`LoggerOptions` bundle; the flat keywords below override its fields.
      **keywords: the options of :class:`LoggerOptions`, flat (``step_metadata_info``,
        ``episode_metadata_info``, ``language_instruction``, ``doc_field``, ``version``,
        ``max_episodes_per_file``, ``shard_bytes``, ``image_codec``, ``image_codecs``,
        ``float64``, ``reward_dtype``, ``strict_finite``, ``strict_bounds``, ``incomplete``,
        ``overwrite``, ``fsync``, ``writer_options``, ``description``, ``handle_signals``).
        Metadata not declared is empty here, and there is no language instruction unless
        ``language_instruction=True``.

    Raises:
      UnknownOptionError: for a keyword that is not an option, naming the valid ones.
    """

    def __init__(self, env: gym.Env, dataset_name: str, directory: str | os.PathLike, *,
                 options: LoggerOptions | None = None, **keywords: Any):
        opts = LoggerOptions.from_keywords("OXEEnvLogger", keywords, options=options)
        super().__init__(env, dataset_name, directory, opts.with_defaults(
            step_metadata_info={}, episode_metadata_info={}, language_instruction=False,
            reward_dtype=np.float64))


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
      options, **keywords: the other options, as for :class:`OXEEnvLogger`
        (:class:`LoggerOptions`).
    """

    def __init__(self, env: gym.Env, dataset_name: str, directory: str | os.PathLike | None = None,
                 *, optimal_shard_size: float | None = None,
                 options: LoggerOptions | None = None, **keywords: Any):
        if directory is None:
            directory = os.path.join(os.getcwd(), "logs", dataset_name)
        opts = LoggerOptions.from_keywords("AutoOXEEnvLogger", keywords, options=options)
        if optimal_shard_size is not None and opts.shard_bytes is None:
            opts = dataclasses.replace(opts, shard_bytes=int(optimal_shard_size * 2**20))
        super().__init__(env, dataset_name, directory, opts.with_defaults(reward_dtype=np.float64))


__all__ = ["DEFAULT_SHARD_BYTES", "AutoOXEEnvLogger", "LoggerMixin", "OXEEnvLogger"]
