"""What :func:`openx_train.eval.evaluate` runs: a policy over a batch of sub-envs.

The protocol is small so that anything can be evaluated: a trained checkpoint
(``load_policy``), a scripted expert, a random baseline, a remote model.

* ``policy(observation, **task) -> action``: ``observation`` is the vector env's batched
  observation (leaves ``[num_envs, ...]``, nested as the env's are); ``task`` holds the task
  inputs the evaluation was asked to pass (``instruction``: an object array of ``num_envs``
  strings; ``goal``: a batched observation). It returns one action per sub-env
  (``[num_envs, ...]``), or, where chunking is asked for, one chunk per sub-env
  (``[num_envs, n_action, ...]``). numpy, JAX or any array that ``np.asarray`` reads.
* ``policy.reset(env_indices)`` (optional): called with an int array of the sub-envs whose
  observation in hand starts a new episode, before the policy sees it (at the first reset every
  index; then whenever sub-envs reset). A policy with per-env state (a recurrent state, its own
  history) clears those rows here.

The policy is always called with every sub-env's observation, including sub-envs whose
output is not used at that step (a sub-env resetting under ``NEXT_STEP`` autoreset, one that has
finished its share of episodes, one still executing an earlier chunk), so ``__call__`` should
not advance per-env state that matters beyond what ``reset`` clears.

An episode's result depends only on its seed when a sub-env's action depends only on that
sub-env's inputs (a deterministic policy, or one that seeds its sampling per env in ``reset``);
a policy that samples the whole batch from one random stream gives results that also depend on
``num_envs``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

from openx_train.eval import tree
from openx_train.eval.wrappers import (
    Chunking,
    ObservationHistory,
    RecedingHorizon,
    TemporalEnsemble,
    TemporalEnsembler,
    with_pad_mask,
)


@runtime_checkable
class Policy(Protocol):
    """A batched policy: ``policy(observation, **task) -> action`` (see the module doc)."""

    def __call__(self, observation: Any, **task: Any) -> Any: ...


@runtime_checkable
class StatefulPolicy(Policy, Protocol):
    """A batched policy with per-env state, cleared by ``reset(env_indices)``."""

    def reset(self, env_indices: np.ndarray) -> None: ...


def reset_policy(policy: Policy, env_indices: np.ndarray) -> None:
    """Calls ``policy.reset(env_indices)`` where the policy has one."""
    reset = getattr(policy, "reset", None)
    if callable(reset):
        reset(np.asarray(env_indices, dtype=np.int64))


def batch_policy(fn: Callable[..., Any]) -> Policy:
    """A batched policy from a policy of one observation (a scripted expert, say).

    Args:
      fn: ``fn(observation, **task) -> action`` for one sub-env; task inputs arrive as that
        sub-env's row.

    Returns:
      A policy that calls ``fn`` on every row and stacks the actions.
    """

    def policy(observation: Any, **task: Any) -> np.ndarray:
        n = tree.batch_size(observation, "observation")
        return tree.stack([fn(tree.index(observation, i),
                              **{k: tree.index(v, i) for k, v in task.items()})
                           for i in range(n)])

    return policy


class StepwisePolicy:
    """A policy on observation windows that returns action chunks, run one env step at a time
    for a batch of sub-envs: the policy-side twin of :func:`openx_train.eval.wrap_env`.

    Each sub-env keeps its own window (as :class:`HistoryWrapper` builds it) and its own chunk
    state (as :class:`RecedingHorizonWrapper` or :class:`TemporalEnsembleWrapper` would), so a
    sub-env executes the same actions either way; here the vector env steps one action at a time,
    which logs the executed actions themselves and never leaves a sub-env idle while the others
    finish their chunks. With receding horizon control the inner policy is called, with every
    sub-env's window, whenever at least one sub-env needs a new chunk; the chunks of the others
    are dropped.

    Args:
      policy: the inner policy (see :class:`Policy`); gets windows with ``pad_mask`` if
        ``n_obs`` is set, and must return chunks ``[B, n_action, ...]`` if ``chunking`` is.
      n_obs: history length, or None to pass observations as they are.
      chunking: :class:`RecedingHorizon`, :class:`TemporalEnsemble`, or None (the inner
        policy returns single actions).

    Raises:
      TypeError: for another ``chunking``.
    """

    def __init__(self, policy: Policy, *, n_obs: int | None = None,
                 chunking: Chunking | None = None):
        if chunking is not None and not isinstance(chunking, RecedingHorizon | TemporalEnsemble):
            raise TypeError(f"chunking: expected RecedingHorizon, TemporalEnsemble or None, "
                            f"given {chunking!r}")
        self.policy = policy
        self.n_obs = n_obs
        self.chunking = chunking
        self._history = ObservationHistory(n_obs) if n_obs is not None else None
        self._ensembler = (TemporalEnsembler(chunking) if isinstance(chunking, TemporalEnsemble)
                           else None)
        self._fresh: np.ndarray | None = None  # rows whose next observation starts an episode
        self._queue: Any = None  # receding horizon: the chunk each row is executing
        self._pos: np.ndarray | None = None  # ... and the index of its next action

    def reset(self, env_indices: np.ndarray) -> None:
        """Forgets the windows and chunks of these sub-envs (and resets the inner policy's)."""
        if self._fresh is not None:  # before the first call every row is fresh anyway
            self._fresh[np.asarray(env_indices, dtype=np.int64)] = True
        reset_policy(self.policy, env_indices)

    def __call__(self, observation: Any, **task: Any) -> Any:
        n = tree.batch_size(observation, "observation")
        if self._fresh is None or len(self._fresh) != n:  # a first call, or another batch
            self._fresh, self._queue = np.ones(n, bool), None
        first, self._fresh = self._fresh, np.zeros(n, bool)
        x = observation
        if self._history is not None:
            x = with_pad_mask(*self._history(observation, first))
        if self.chunking is None:
            return self.policy(x, **task)
        if self._ensembler is not None:
            return self._ensembler(self._chunks(x, task, n), first)
        if self._queue is None:
            self._pos = np.zeros(n, np.int64)
        need = first | (self._pos >= self.chunking.exec_horizon)
        if need.any():
            chunks = self._chunks(x, task, n)
            if self._queue is None:
                self._queue = chunks
            else:
                def take(q, c):
                    q[need] = c[need]

                tree.map_structure(take, self._queue, chunks)
            self._pos[need] = 0
        rows = np.arange(n)
        action = tree.map_structure(lambda q: q[rows, self._pos].copy(), self._queue)
        self._pos += 1
        return action

    def _chunks(self, x: Any, task: dict[str, Any], n: int) -> Any:
        chunks = tree.map_structure(np.asarray, self.policy(x, **task))
        lead = (n, self.chunking.n_action)
        for path, leaf in tree.leaves(chunks):
            if leaf.shape[:2] != lead:
                name = f"policy output/{path}" if path else "policy output"
                raise ValueError(f"{name}: expected chunks of leading shape {lead} "
                                 f"(num_envs, n_action), given shape {leaf.shape}")
        return tree.map_structure(np.array, chunks)  # a copy the queue may write into
