"""Observation history and action chunking for any gymnasium env.

The training loader feeds a policy windows of the last ``n_obs`` observations with a
``pad_mask`` and trains it to predict chunks of ``n_action`` actions
(:mod:`openx_train.data`). Running such a policy takes the same two things at rollout time:

* :class:`HistoryWrapper`: the last ``n_obs`` observations stacked on a new leading axis
  (oldest first), plus ``pad_mask`` (bool ``[n_obs]``, False for the positions before the
  episode start, which repeat the first observation: the loader's convention).
* :class:`RecedingHorizonWrapper`: takes a chunk ``[n_action, ...]`` and executes its first
  ``exec_horizon`` actions (rewards summed; the chunk stops where the episode ends).
* :class:`TemporalEnsembleWrapper`: takes a new chunk every step and executes the weighted mean
  of every prediction made for this step (temporal ensembling, as in ACT and Octo).

The state is held by two batched cores, :class:`ObservationHistory` and
:class:`TemporalEnsembler`, shared with the policy-side adapter
(:class:`openx_train.eval.StepwisePolicy`) that does the same for a batch of sub-envs in a
vector env, so the env-side and the policy-side versions execute the same actions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np

from openx_train.eval import tree

PAD_MASK = "pad_mask"  # the loader's key: batch["observation"]["pad_mask"]
OBSERVATION = "observation"  # where a non-dict observation goes beside the pad mask


@dataclasses.dataclass(frozen=True)
class RecedingHorizon:
    """Receding horizon control: execute the first ``exec_horizon`` of ``n_action`` actions,
    then ask the policy again.

    Raises:
      ValueError: unless ``1 <= exec_horizon <= n_action``.
    """

    n_action: int
    exec_horizon: int

    def __post_init__(self):
        if not 1 <= self.exec_horizon <= self.n_action:
            raise ValueError(f"exec_horizon: expected 1..n_action={self.n_action}, given "
                             f"{self.exec_horizon}")


@dataclasses.dataclass(frozen=True)
class TemporalEnsemble:
    """Temporal ensembling: a new chunk of ``n_action`` every step; the executed action is the
    mean of the (up to ``n_action``) predictions made for this step, the one made ``a`` steps
    ago weighted by ``exp(exp_weight * a)``.

    ``exp_weight=0`` is the plain mean; ``exp_weight > 0`` favours older predictions (ACT's
    ``w_i = exp(-m i)`` with ``w_0`` the oldest; Octo's ``exp_weight``), ``< 0`` newer ones.

    Raises:
      ValueError: for ``n_action < 1`` or a non-finite ``exp_weight``.
    """

    n_action: int
    exp_weight: float = 0.0

    def __post_init__(self):
        if self.n_action < 1:
            raise ValueError(f"n_action: expected >= 1, given {self.n_action}")
        if not np.isfinite(self.exp_weight):
            raise ValueError(f"exp_weight: expected a finite number, given {self.exp_weight}")


Chunking = RecedingHorizon | TemporalEnsemble


def _space_leaves(space: gym.Space, path: str = "") -> list[tuple[str, gym.Space]]:
    if isinstance(space, gym.spaces.Dict):
        return [p for k, s in space.spaces.items()
                for p in _space_leaves(s, f"{path}/{k}" if path else k)]
    if isinstance(space, gym.spaces.Tuple):
        return [p for i, s in enumerate(space.spaces)
                for p in _space_leaves(s, f"{path}/{i}" if path else str(i))]
    return [(path, space)]


def stack_space(space: gym.Space, n: int, *, what: str = "observation") -> gym.Space:
    """The space of ``n`` values of ``space`` stacked on a new leading axis.

    Args:
      space: Box, Discrete, MultiDiscrete, MultiBinary, or a Dict/Tuple of them.
      n: the number of stacked values.
      what: the key path used in errors.

    Returns:
      A Box, MultiDiscrete or MultiBinary of shape ``(n, *shape)`` (Discrete becomes
      MultiDiscrete), nested as ``space`` is.

    Raises:
      TypeError: naming the key path of a space that cannot be stacked (Text, Graph, ...).
    """
    if isinstance(space, gym.spaces.Box):
        return gym.spaces.Box(np.repeat(space.low[None], n, axis=0),
                              np.repeat(space.high[None], n, axis=0), dtype=space.dtype)
    if isinstance(space, gym.spaces.Discrete):
        return gym.spaces.MultiDiscrete(np.full(n, space.n), dtype=space.dtype,
                                        start=np.full(n, space.start))
    if isinstance(space, gym.spaces.MultiDiscrete):
        return gym.spaces.MultiDiscrete(np.repeat(space.nvec[None], n, axis=0), dtype=space.dtype,
                                        start=np.repeat(space.start[None], n, axis=0))
    if isinstance(space, gym.spaces.MultiBinary):
        return gym.spaces.MultiBinary([n, *np.atleast_1d(space.n)])
    if isinstance(space, gym.spaces.Dict):
        return gym.spaces.Dict({k: stack_space(s, n, what=f"{what}/{k}")
                                for k, s in space.spaces.items()})
    if isinstance(space, gym.spaces.Tuple):
        return gym.spaces.Tuple([stack_space(s, n, what=f"{what}/{i}")
                                 for i, s in enumerate(space.spaces)])
    raise TypeError(f"{what}: cannot stack a {type(space).__name__} space (expected Box, "
                    f"Discrete, MultiDiscrete, MultiBinary, Dict or Tuple)")


def conform(value: Any, space: gym.Space, *, lead: tuple[int, ...] = (),
            what: str = "action") -> Any:
    """``value`` as numpy arrays of ``space``'s dtypes, checked leaf by leaf.

    Args:
      value: an array, or nested dicts/tuples of arrays, as ``space`` is nested.
      space: the space of one value (Box, Discrete, MultiDiscrete, MultiBinary; nested).
      lead: leading axes expected before each leaf's own shape (a batch, a chunk).
      what: the key path used in errors.

    Returns:
      ``value`` with every leaf an array of its space's dtype.

    Raises:
      ValueError: naming the key path of a missing or extra key, a leaf of another shape, or a
        non-integral value for an integer space (never rounded silently).
    """
    if isinstance(space, gym.spaces.Box) and not isinstance(value, Mapping | tuple):
        return _conform_leaf(value, space, lead, what)  # the common case, once per step
    expected = dict(_space_leaves(space))
    given = tree.leaves(value)
    missing = sorted(set(expected) - {p for p, _ in given})
    extra = sorted({p for p, _ in given} - set(expected))
    if missing or extra:
        raise ValueError(f"{what}: expected the keys {sorted(expected)}, given "
                         f"{sorted(p for p, _ in given)}")
    out = {path: _conform_leaf(leaf, expected[path], lead, f"{what}/{path}" if path else what)
           for path, leaf in given}
    paths = iter(p for p, _ in given)
    return tree.map_structure(lambda _: out[next(paths)], value)


def _conform_leaf(leaf: Any, space: gym.Space, lead: tuple[int, ...], name: str) -> Any:
    if space.shape is None or space.dtype is None:  # Text and other non-array spaces
        return leaf
    a = np.asarray(leaf)
    want = (*lead, *space.shape)
    if a.shape != want:
        raise ValueError(f"{name}: expected shape {want}, given {a.shape}")
    if (space.dtype.kind in "iu" and a.dtype.kind not in "iub"
            and not np.array_equal(a, np.round(a))):
        raise ValueError(f"{name}: expected integers ({space.dtype}), given non-integral "
                         f"values of dtype {a.dtype}")
    return a.astype(space.dtype, copy=False)


def with_pad_mask(stacked: Any, pad_mask: np.ndarray, *, what: str = "observation") -> dict:
    """A stacked observation with its pad mask beside it: ``{**stacked, "pad_mask": mask}`` for
    a dict observation, ``{"observation": stacked, "pad_mask": mask}`` otherwise.

    Raises:
      ValueError: if a dict observation already has a ``pad_mask`` key.
    """
    if isinstance(stacked, Mapping):
        if PAD_MASK in stacked:
            raise ValueError(f"{what}/{PAD_MASK}: the history adds this key; the observation "
                             f"already has it")
        return {**stacked, PAD_MASK: pad_mask}
    return {OBSERVATION: stacked, PAD_MASK: pad_mask}


class ObservationHistory:
    """The last ``n_obs`` observations of each of a batch of episodes, oldest first.

    Call it with every step's batched observation and a flag per row saying whether that
    observation starts an episode. A row's window starts filled with its first observation; the
    pad mask is False for the positions that precede the episode start (those repeats), as the
    training loader's windows are (``openx_train.data.ops.history_indices``).

    Args:
      n_obs: window length (>= 1).
    """

    def __init__(self, n_obs: int):
        if n_obs < 1:
            raise ValueError(f"n_obs: expected >= 1, given {n_obs}")
        self.n_obs = n_obs
        self._buffers: Any = None
        self._count: np.ndarray | None = None

    def __call__(self, observation: Any, is_first: np.ndarray) -> tuple[Any, np.ndarray]:
        """Adds one observation per row.

        Args:
          observation: batched observation (leaves ``[B, ...]``).
          is_first: bool ``[B]``: rows whose observation starts an episode.

        Returns:
          ``(stacked, pad_mask)``: leaves ``[B, n_obs, ...]`` (copies), and bool ``[B, n_obs]``.

        Raises:
          ValueError: on the first call unless every row starts an episode.
        """
        first = np.asarray(is_first, dtype=bool)
        n = self.n_obs
        if self._buffers is None or first.all():  # (a batch of another size must restart)
            if not first.all():
                raise ValueError("history: the first observation of every row must start an "
                                 f"episode, given is_first={first.tolist()}")
            self._buffers = tree.map_structure(
                lambda x: np.repeat(np.asarray(x)[:, None], n, axis=1), observation)
            self._count = np.zeros(len(first), np.int64)
        else:
            def push(buf, x):
                x = np.asarray(x)
                buf[:, :-1] = buf[:, 1:]
                buf[:, -1] = x
                buf[first] = x[first][:, None]

            tree.map_structure(push, self._buffers, observation)
        self._count[first] = 0
        self._count = np.minimum(self._count + 1, n)
        pad_mask = np.arange(n)[None, :] >= (n - self._count)[:, None]
        return tree.map_structure(np.copy, self._buffers), pad_mask


class TemporalEnsembler:
    """Temporal ensembling over a batch of episodes (see :class:`TemporalEnsemble`).

    Args:
      options: chunk length and weighting.
    """

    def __init__(self, options: TemporalEnsemble):
        self.options = options
        self._preds: np.ndarray | None = None  # [B, age, n_action, ...]: chunk made `age` ago
        self._count: np.ndarray | None = None

    def __call__(self, chunks: np.ndarray, is_first: np.ndarray) -> np.ndarray:
        """Takes this step's chunks and returns the actions to execute.

        Args:
          chunks: float ``[B, n_action, ...]``: the policy's chunk for each row, made now.
          is_first: bool ``[B]``: rows whose episode starts at this step (earlier chunks of
            that row are forgotten).

        Returns:
          float64 ``[B, ...]``: for each row, the weighted mean over ``a`` of the prediction
          for this step made ``a`` steps ago (``chunk[a]`` of that chunk).
        """
        chunks = np.asarray(chunks, np.float64)
        first = np.asarray(is_first, dtype=bool)
        n = self.options.n_action
        if self._preds is None or first.all():  # (a batch of another size must restart)
            self._preds = np.zeros((chunks.shape[0], n, *chunks.shape[1:]))
            self._count = np.zeros(chunks.shape[0], np.int64)
        self._preds[:, 1:] = self._preds[:, :-1]
        self._preds[:, 0] = chunks
        self._count[first] = 0
        self._count = np.minimum(self._count + 1, n)
        age = np.arange(n)
        for_now = self._preds[:, age, age]  # [B, age, ...]
        valid = age[None, :] < self._count[:, None]
        # Log-weights shifted by their maximum: exp() stays finite for any exp_weight.
        logw = np.where(valid, self.options.exp_weight * age[None, :], -np.inf)
        w = np.exp(logw - logw.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        return np.einsum("ba,ba...->b...", w, for_now)


def _single(x: Any) -> Any:
    return tree.map_structure(lambda v: np.asarray(v)[None], x)


class HistoryWrapper(gym.Wrapper):
    """Observations become the last ``n_obs`` observations stacked on a new leading axis, plus
    ``pad_mask`` (see :func:`with_pad_mask` for where it goes).

    Args:
      env: any env whose observation space :func:`stack_space` can stack.
      n_obs: window length (>= 1).
    """

    def __init__(self, env: gym.Env, n_obs: int):
        super().__init__(env)
        self.n_obs = n_obs
        self._history = ObservationHistory(n_obs)
        mask_space = gym.spaces.Box(0, 1, (n_obs,), dtype=bool)
        stacked = stack_space(env.observation_space, n_obs)
        if isinstance(stacked, gym.spaces.Dict):
            if PAD_MASK in stacked.spaces:
                raise ValueError(f"observation/{PAD_MASK}: the history adds this key; the "
                                 f"env's observation space already has it")
            self.observation_space = gym.spaces.Dict({**stacked.spaces, PAD_MASK: mask_space})
        else:
            self.observation_space = gym.spaces.Dict({OBSERVATION: stacked, PAD_MASK: mask_space})

    def _observe(self, obs: Any, first: bool) -> dict:
        stacked, mask = self._history(_single(obs), np.array([first]))
        return with_pad_mask(tree.index(stacked, 0), mask[0])

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        return self._observe(obs, True), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._observe(obs, False), reward, terminated, truncated, info


class RecedingHorizonWrapper(gym.Wrapper):
    """Actions become chunks of ``n_action``; a step executes the first ``exec_horizon`` of them.

    A step returns the last observation, the sum of the rewards, the flags and ``info`` of the
    last executed step, with ``info["executed_steps"]`` (fewer than ``exec_horizon`` where the
    episode ended inside the chunk: the rest of the chunk is dropped).

    Args:
      env: any env whose action space :func:`stack_space` can stack.
      n_action: chunk length.
      exec_horizon: actions executed per chunk (``1..n_action``).
    """

    def __init__(self, env: gym.Env, n_action: int, exec_horizon: int):
        super().__init__(env)
        self.options = RecedingHorizon(n_action, exec_horizon)
        self.action_space = stack_space(env.action_space, n_action, what="action")

    def step(self, action):
        chunk = conform(action, self.env.action_space, lead=(self.options.n_action,))
        total = 0.0
        for t in range(self.options.exec_horizon):
            obs, reward, terminated, truncated, info = self.env.step(tree.index(chunk, t))
            total += float(reward)
            if terminated or truncated:
                break
        return obs, total, terminated, truncated, {**info, "executed_steps": t + 1}


class TemporalEnsembleWrapper(gym.Wrapper):
    """Actions become chunks of ``n_action``; each step executes the temporal ensemble of this
    chunk and the earlier ones (see :class:`TemporalEnsemble`).

    Args:
      env: an env with a float Box action space.
      n_action: chunk length.
      exp_weight: weighting (0: plain mean).

    Raises:
      TypeError: for an action space other than a float Box (averaging needs real numbers).
    """

    def __init__(self, env: gym.Env, n_action: int, exp_weight: float = 0.0):
        super().__init__(env)
        _require_float_box(env.action_space)
        self._ensembler = TemporalEnsembler(TemporalEnsemble(n_action, exp_weight))
        self.action_space = stack_space(env.action_space, n_action, what="action")
        self._first = True

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        self._first = True
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        opts = self._ensembler.options
        chunk = conform(action, self.env.action_space, lead=(opts.n_action,))
        a = self._ensembler(chunk[None], np.array([self._first]))[0]
        self._first = False
        return self.env.step(a.astype(self.env.action_space.dtype))


def _require_float_box(space: gym.Space) -> None:
    if not (isinstance(space, gym.spaces.Box) and np.issubdtype(space.dtype, np.floating)):
        raise TypeError(f"action: temporal ensembling averages actions, so it needs a float Box "
                        f"action space, given {space}")


def wrap_env(env: gym.Env, *, n_obs: int | None = None,
             chunking: Chunking | None = None) -> gym.Env:
    """``env`` with a history and action chunking, in the order a policy needs them (the history
    inside, so every executed step's observation enters it).

    Args:
      env: any env.
      n_obs: history length, or None for none.
      chunking: :class:`RecedingHorizon`, :class:`TemporalEnsemble`, or None for single actions.

    Returns:
      The wrapped env.
    """
    if n_obs is not None:
        env = HistoryWrapper(env, n_obs)
    if isinstance(chunking, RecedingHorizon):
        env = RecedingHorizonWrapper(env, chunking.n_action, chunking.exec_horizon)
    elif isinstance(chunking, TemporalEnsemble):
        env = TemporalEnsembleWrapper(env, chunking.n_action, chunking.exp_weight)
    elif chunking is not None:
        raise TypeError(f"chunking: expected RecedingHorizon, TemporalEnsemble or None, given "
                        f"{chunking!r}")
    return env
