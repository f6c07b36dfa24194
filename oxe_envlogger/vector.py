"""Logging ``gymnasium.vector`` environments: one RLDS episode per sub-environment episode.

Every autoreset mode is followed exactly:

* ``NEXT_STEP`` (the default): a sub-env that ended returns its final observation; on the next
  ``step()`` it resets (its action is ignored) and returns the new episode's first observation.
* ``SAME_STEP``: a sub-env that ends resets in the same step; its final observation comes in
  ``info["final_obs"]`` and the returned observation starts the next episode.
* ``DISABLED``: ended sub-envs are reset by ``reset(options={"reset_mask": mask})``.

Sub-env episodes are written as they end, so episodes from different sub-envs interleave in the
dataset; each is aligned exactly as a single env's would be (see :mod:`oxe_envlogger.collect.recorder`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import iterate

from oxe_envlogger.envlogger import LoggerMixin
from oxe_envlogger.errors import StepOrderError
from oxe_envlogger.format import provenance
from oxe_envlogger.options import LoggerOptions


class VectorOXEEnvLogger(gym.vector.VectorWrapper, LoggerMixin):
    """Logs every sub-environment of a vector env into one RLDS dataset.

    Args:
      env: a ``gymnasium.vector.VectorEnv`` (sync or async, any autoreset mode).
      dataset_name, directory: as for :class:`oxe_envlogger.OXEEnvLogger`.
      options, **keywords: the options (:class:`oxe_envlogger.LoggerOptions`), as for
        :class:`oxe_envlogger.OXEEnvLogger`; metadata not declared, and whether there is a
        language instruction, are inferred from the first episode.

    The metadata and language setters take ``env_index`` (default: every sub-env).
    """

    def __init__(self, env: gym.vector.VectorEnv, dataset_name: str,
                 directory: str | os.PathLike, *, options: LoggerOptions | None = None,
                 **keywords: Any):
        opts = LoggerOptions.from_keywords("VectorOXEEnvLogger", keywords, options=options)
        super().__init__(env)
        self._seeds: list[Any] = []
        mode = env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
        self._mode = AutoresetMode(mode) if not isinstance(mode, AutoresetMode) else mode
        self._recorder = opts.with_defaults(reward_dtype=np.float64).build_recorder(
            directory, dataset_name, observation=env.single_observation_space,
            action=env.single_action_space,
            session=provenance.session_info(env, {"reset_seeds": self._seeds,
                                                  "num_envs": env.num_envs,
                                                  "autoreset_mode": self._mode.value}),
            description="RLDS episodes of a gymnasium vector env logged by oxe_envlogger.")
        self._streams = self._recorder.add_streams(env.num_envs)
        self._autoreset = np.zeros(env.num_envs, dtype=bool)

    def _split(self, space: gym.Space, batch: Any) -> list[Any]:
        return list(iterate(space, batch))

    def reset(self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None):
        mask = None if not options else options.get("reset_mask")  # the env may pop it
        obs, info = self.env.reset(seed=seed, options=options)
        rec = self._recorder
        for i, o in enumerate(self._split(self.env.observation_space, obs)):
            if mask is None or mask[i]:
                rec.begin(o, stream=self._streams[i])
                self._autoreset[i] = False
        self._seeds.append(seed if not isinstance(seed, np.ndarray) else seed.tolist())
        return obs, info

    def step(self, actions):
        rec = self._recorder
        streams = self._streams
        # Check every action first: a bad one raises before the env steps.
        flat: list[list | None] = []
        for i, a in enumerate(self._split(self.env.action_space, actions)):
            s = streams[i]
            if self._autoreset[i] or (self._mode == AutoresetMode.DISABLED and s.ended):
                flat.append(None)  # this sub-env resets (NEXT_STEP) or waits for a reset
            else:
                flat.append(rec.check_action(a, stream=s))
        out = self.env.step(actions)
        obs, rewards, terminated, truncated, info = out
        obs_list = self._split(self.env.observation_space, obs)
        final_obs = info.get("final_obs") if self._mode == AutoresetMode.SAME_STEP else None
        for i, s in enumerate(streams):
            if self._autoreset[i]:
                rec.begin(obs_list[i], stream=s)  # the new episode's first observation
                self._autoreset[i] = False
                continue
            if flat[i] is None:
                continue
            done = bool(terminated[i]) or bool(truncated[i])
            if done and final_obs is not None:
                rec.step(flat[i], rewards[i], final_obs[i], terminated=bool(terminated[i]),
                         truncated=bool(truncated[i]), stream=s)
                rec.begin(obs_list[i], stream=s)
                continue
            rec.step(flat[i], rewards[i], obs_list[i], terminated=bool(terminated[i]),
                     truncated=bool(truncated[i]), stream=s)
            if done and self._mode == AutoresetMode.NEXT_STEP:
                self._autoreset[i] = True
        return out

    def _stream(self, env_index: int | None):
        if env_index is None:
            return None
        if not 0 <= env_index < len(self._streams):
            raise StepOrderError(f"env_index: expected 0..{len(self._streams) - 1}, given {env_index}")
        return self._streams[env_index]

    def set_step_metadata(self, metadata: Mapping[str, Any], env_index: int | None = None) -> None:
        """Sets step metadata (sticky) for one sub-env, or all (see :class:`LoggerMixin`)."""
        self._recorder.set_step_metadata(metadata, stream=self._stream(env_index))

    def set_episode_metadata(self, metadata: Mapping[str, Any],
                             env_index: int | None = None) -> None:
        self._recorder.set_episode_metadata(metadata, stream=self._stream(env_index))

    def set_language_instruction(self, instruction: str, env_index: int | None = None) -> None:
        self._recorder.set_language_instruction(instruction, stream=self._stream(env_index))

    def close(self, **kwargs) -> None:
        """Writes the episodes in progress, commits the dataset, closes the env. Idempotent."""
        self._close_logger_and_env(self.env, **kwargs)
