"""Evaluation: run any policy in gymnasium envs, with the history and action chunking a trained
policy needs, and measure it.

* :func:`evaluate`: exactly ``num_episodes`` seeded episodes in a ``gymnasium.vector`` env
  (async by default), in any autoreset mode; returns, lengths, success, a 95% interval, a video
  of the first episodes and, optionally, the rollouts logged as RLDS.
* :class:`Policy` / :class:`StatefulPolicy`: what it runs (a batched call, an optional
  ``reset(env_indices)``); :func:`batch_policy` batches a one-observation policy.
* Env-side wrappers (:class:`HistoryWrapper`, :class:`RecedingHorizonWrapper`,
  :class:`TemporalEnsembleWrapper`, :func:`wrap_env`) and their policy-side twin
  :class:`StepwisePolicy`.

Importing it imports numpy and gymnasium only; the sub-env processes import it too.
"""

from openx_train.eval.policy import Policy, StatefulPolicy, StepwisePolicy, batch_policy
from openx_train.eval.rollout import TaskInput, evaluate
from openx_train.eval.wrappers import (
    HistoryWrapper,
    ObservationHistory,
    RecedingHorizon,
    RecedingHorizonWrapper,
    TemporalEnsemble,
    TemporalEnsembler,
    TemporalEnsembleWrapper,
    stack_space,
    wrap_env,
)

__all__ = [
    "HistoryWrapper",
    "ObservationHistory",
    "Policy",
    "RecedingHorizon",
    "RecedingHorizonWrapper",
    "StatefulPolicy",
    "StepwisePolicy",
    "TaskInput",
    "TemporalEnsemble",
    "TemporalEnsembleWrapper",
    "TemporalEnsembler",
    "batch_policy",
    "evaluate",
    "stack_space",
    "wrap_env",
]
