"""``RLDSLogger``: log steps by hand, one call per environment timestep.

Each call carries what a dm_env timestep carries: the action that led to this observation, the
observation, and the reward that came with it::

    logger(action, obs_0, 0.0, step_type=RLDSStepType.RESTART)       # o_0 (action ignored)
    logger(a_0, obs_1, r_0)                                           # TRANSITION
    ...
    logger(a_N-1, obs_N, r_N-1, step_type=RLDSStepType.TERMINATION)   # or TRUNCATION

``metadata`` given with a call belongs to that call's observation (its RLDS step). A RESTART
while an episode is in progress ends that episode as truncated.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np

from oxe_envlogger.envlogger import LoggerMixin
from oxe_envlogger.format import provenance
from oxe_envlogger.options import LoggerOptions


class RLDSStepType(enum.IntEnum):
    """What a call to :class:`RLDSLogger` is."""

    RESTART = 0
    TRANSITION = 1
    TRUNCATION = 2
    TERMINATION = 3


class RLDSLogger(LoggerMixin):
    """Logs manually given steps as RLDS episodes.

    Args:
      observation_space: gymnasium space of observations (see :func:`get_gym_space`), or None to
        infer it from the first observation.
      action_space: the same for actions.
      dataset_name: TFDS dataset name.
      directory: dataset directory.
      options, **keywords: the options (:class:`oxe_envlogger.LoggerOptions`), as for
        :class:`oxe_envlogger.OXEEnvLogger`. Metadata not declared, and whether there is a
        language instruction, are inferred from the first episode.

    Raises:
      UnknownOptionError: for a keyword that is not an option, naming the valid ones.
    """

    def __init__(self, observation_space: gym.Space | None, action_space: gym.Space | None,
                 dataset_name: str, directory: str | os.PathLike, *,
                 options: LoggerOptions | None = None, **keywords: Any):
        opts = LoggerOptions.from_keywords("RLDSLogger", keywords, options=options)
        self._recorder = opts.with_defaults(reward_dtype=np.float64).build_recorder(
            directory, dataset_name, observation=observation_space, action=action_space,
            session=provenance.session_info(None, {"front": "RLDSLogger"}),
            description="RLDS episodes logged by oxe_envlogger.RLDSLogger.")

    def __call__(self, action: Any, obs: Any, reward: Any, metadata: Mapping[str, Any] | None = None,
                 step_type: RLDSStepType = RLDSStepType.TRANSITION, *, discount: Any = None) -> None:
        """Logs one timestep (see the module docstring).

        Args:
          action: the action that led to ``obs`` (ignored for RESTART).
          obs: the observation.
          reward: the reward that came with ``obs`` (ignored for RESTART).
          metadata: step metadata for this observation's step (sticky).
          step_type: RESTART, TRANSITION, TRUNCATION or TERMINATION.
          discount: the discount that came with ``obs``; default 0 for TERMINATION, else 1.
        """
        rec = self._recorder
        step_type = RLDSStepType(step_type)
        if step_type == RLDSStepType.RESTART:
            rec.begin(obs)
        else:
            flat = rec.check_action(action)
            rec.step(flat, reward, obs, terminated=step_type == RLDSStepType.TERMINATION,
                     truncated=step_type == RLDSStepType.TRUNCATION, discount=discount)
        if metadata:
            rec.set_step_metadata(metadata)

    def close(self) -> None:
        """Writes the episode in progress, commits the dataset. Idempotent."""
        self.close_logger()

    def __enter__(self) -> RLDSLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
