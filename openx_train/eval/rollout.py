"""Rollouts of any policy in a ``gymnasium.vector`` env: exactly ``num_episodes`` episodes,
reproducible, in every autoreset mode, optionally filmed and logged as RLDS.

How episodes are counted. Episode ``k`` (``0 <= k < num_episodes``) runs on sub-env
``k % num_envs`` as that sub-env's ``k // num_envs``-th episode and is reset with the seed
``seed + k``. A small wrapper directly around each sub-env's env (below any wrapper the caller
adds) assigns those seeds at every reset, the caller's and the vector env's own autoresets
alike, and keeps each episode's return, length, success and frames from the env's own steps. So
an episode's result depends only on its seed and the policy: the same with 1 or 8 sub-envs, sync
or async, in any autoreset mode, and the same as a plain single-env loop resetting with
``seed + k``. The episodes are assigned before anything runs (not "the first ``num_episodes``
to finish"), so short episodes are not favoured. A sub-env that has run its share idles (its
observation held, reward 0, never done) until the others finish, so no episode beyond
``num_episodes`` is run, counted or logged.

Autoreset modes (``gymnasium.vector.AutoresetMode``): ``NEXT_STEP`` (default): the step after a
sub-env's last step resets it, ignoring its action; ``SAME_STEP``: the step that ends an episode
returns the next episode's first observation; ``DISABLED``: :func:`evaluate` resets ended
sub-envs itself (``reset_mask``). In each, the policy's ``reset`` hook and the task inputs
follow the observation that starts an episode.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

from openx_train.eval import tree
from openx_train.eval.policy import Policy, StepwisePolicy, reset_policy
from openx_train.eval.wrappers import Chunking, conform

log = logging.getLogger(__name__)

EnvSource = str | Callable[[], gym.Env]
_POP = "oxe_eval_pop_episodes"  # the monitor's method, called through the vector env


@dataclasses.dataclass(frozen=True)
class TaskInput:
    """Where a per-episode task input (a language instruction, a goal) comes from: exactly one
    of the fields.

    Attributes:
      info_key: a key of the ``info`` that ``reset()`` returns (``"language_instruction"`` for
        ``oxe_envlogger/SyntheticCamera-v0``).
      method: the name of a method of the sub-env (found through its wrappers) called after each
        reset, without arguments.
      value: one value for every episode.
    """

    info_key: str | None = None
    method: str | None = None
    value: Any = None

    def __post_init__(self):
        given = [f for f in ("info_key", "method", "value") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(f"TaskInput: expected exactly one of info_key, method, value; "
                             f"given {given or 'none'}")


class _EpisodeMonitor(gym.Wrapper):
    """The wrapper around each sub-env's own env: seeds episode ``k`` with ``seed + k``, keeps
    its return, length, success (and frames), and idles once its share of episodes is done."""

    def __init__(self, env: gym.Env, *, index: int, num_envs: int, num_episodes: int,
                 seed: int, video_episodes: int, success_at: str):
        super().__init__(env)
        self._index, self._num_envs, self._num_episodes = index, num_envs, num_episodes
        self._seed, self._video_episodes, self._success_at = seed, video_episodes, success_at
        self._local = -1  # this sub-env's episode count
        self._idle = False
        self._last_obs: Any = None
        self._episode: dict[str, Any] = {}
        self._frames: list[np.ndarray] | None = None
        self._done: list[dict[str, Any]] = []

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        self._local += 1
        k = self._index + self._local * self._num_envs
        if k >= self._num_episodes and self._last_obs is not None:
            self._idle = True
            return self._last_obs, {}
        seed = self._seed + k
        obs, info = self.env.reset(seed=seed, options=options)
        self._episode = {"index": k, "seed": seed, "return": 0.0, "length": 0, "success": None,
                         "terminated": False, "truncated": False}
        self._frames = [self._render()] if k < self._video_episodes else None
        self._last_obs = obs
        return obs, info

    def step(self, action):
        if self._idle:
            return self._last_obs, 0.0, False, False, {}
        obs, reward, terminated, truncated, info = self.env.step(action)
        ep = self._episode
        ep["return"] += float(reward)
        ep["length"] += 1
        success = _success(info)
        if self._success_at == "final":
            ep["success"] = success
        elif success is not None:
            ep["success"] = bool(ep["success"]) or success
        if self._frames is not None:
            self._frames.append(self._render())
        if terminated or truncated:
            ep["terminated"], ep["truncated"] = bool(terminated), bool(truncated)
            self._done.append({**ep, "frames": self._frames})
            self._frames = None
        self._last_obs = obs
        return obs, reward, terminated, truncated, info

    def _render(self) -> np.ndarray:
        frame = self.env.render()
        if not isinstance(frame, np.ndarray) or frame.ndim != 3:
            raise RuntimeError(f"video: render() of the env returned {type(frame).__name__}, "
                               f"expected an HxWx3 array; make the env with "
                               f"render_mode='rgb_array' (render_mode is "
                               f"{self.env.render_mode!r})")
        return frame

    def oxe_eval_pop_episodes(self) -> list[dict[str, Any]]:
        """The episodes that ended since the last call."""
        done, self._done = self._done, []
        return done


def _success(info: Mapping[str, Any]) -> bool | None:
    for key in ("success", "is_success"):
        if key in info:
            return bool(np.asarray(info[key]).any())
    return None


def _make_sub_env(env: gym.envs.registration.EnvSpec | Callable[[], gym.Env],
                  env_kwargs: Mapping[str, Any], max_episode_steps: int | None,
                  wrappers: Sequence[Callable[[gym.Env], gym.Env]], monitor: dict[str, Any]
                  ) -> gym.Env:
    if isinstance(env, gym.envs.registration.EnvSpec):
        made = gym.make(env, **env_kwargs)
    else:
        made = env()
        if max_episode_steps is not None:
            made = gym.wrappers.TimeLimit(made, max_episode_steps)
    out = _EpisodeMonitor(made, **monitor)
    for wrap in wrappers:
        out = wrap(out)
    return out


def _default_context() -> str | None:
    # Forking a process that runs JAX or TensorFlow threads can deadlock the child (JAX warns
    # that os.fork() is incompatible with its threads); a fresh forkserver process is safe.
    if any(m in sys.modules for m in ("jax", "tensorflow", "torch")):
        return "forkserver"
    return None


def _autoreset_mode(mode: AutoresetMode | str) -> AutoresetMode:
    if isinstance(mode, AutoresetMode):
        return mode
    for m in AutoresetMode:  # "NextStep" (gymnasium's value), "next_step", "NEXT_STEP"
        if str(mode).replace("_", "").lower() == m.value.lower():
            return m
    raise ValueError(f"autoreset_mode: expected one of {[m.value for m in AutoresetMode]}, given "
                     f"{mode!r}")


def t_interval(values: np.ndarray) -> float | None:
    """Half-width of the 95% t-interval of the mean (None for fewer than 2 values)."""
    if len(values) < 2:
        return None
    from scipy import stats

    sem = float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return float(stats.t.ppf(0.975, len(values) - 1)) * sem


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval ``(low, high)`` of a success rate of ``successes`` in
    ``n`` episodes (sound at 0 and at ``n`` successes, where the normal interval collapses)."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(centre - half, 0.0), min(centre + half, 1.0)


def _write_video(path: str, frames: Sequence[np.ndarray], fps: float) -> None:
    import imageio.v2 as imageio

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.lower().endswith(".gif"):
        import imageio.v3 as iio

        iio.imwrite(path, np.stack(frames), extension=".gif", duration=round(1000 / fps), loop=0)
        return
    with imageio.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", quality=8,
                            pixelformat="yuv420p", macro_block_size=16) as w:
        for frame in frames:
            w.append_data(frame)


class _Tasks:
    """Per-env task inputs, updated when sub-envs start an episode, batched for the policy."""

    def __init__(self, inputs: Mapping[str, TaskInput], num_envs: int):
        self.inputs = inputs
        self.values: dict[str, list[Any]] = {name: [None] * num_envs for name in inputs}
        self.batched: dict[str, Any] = {}

    def update(self, base: gym.vector.VectorEnv, rows: np.ndarray, info: Mapping[str, Any]
               ) -> None:
        for name, source in self.inputs.items():
            if source.method is not None:
                called = base.call(source.method)
            for i in rows:
                if source.value is not None:
                    value = source.value
                elif source.method is not None:
                    value = called[i]
                else:
                    key = source.info_key
                    if key not in info or not info[f"_{key}"][i]:
                        raise KeyError(f"{name}: the reset info of sub-env {i} has no key {key!r} "
                                       f"(keys: {sorted(k for k in info if not k.startswith('_'))})")
                    value = info[key][i]
                self.values[name][i] = value
        for name, values in self.values.items():
            if name == "instruction":
                self.batched[name] = np.array(
                    [v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)
            else:
                self.batched[name] = tree.stack(values)


def evaluate(policy: Policy, env: EnvSource, *, num_episodes: int, num_envs: int | None = None,
             seed: int = 0, vectorization: str = "async",
             autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
             context: str | None = None, env_kwargs: Mapping[str, Any] | None = None,
             max_episode_steps: int | None = None,
             wrappers: Sequence[Callable[[gym.Env], gym.Env]] = (),
             n_obs: int | None = None, chunking: Chunking | None = None,
             instruction: TaskInput | None = None, goal: TaskInput | None = None,
             success_at: str = "any", video_path: str | os.PathLike | None = None,
             video_episodes: int = 3, video_fps: float | None = None,
             log_dir: str | os.PathLike | None = None, log_name: str | None = None,
             log_options: Mapping[str, Any] | None = None,
             on_episode: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Runs ``policy`` for exactly ``num_episodes`` episodes in a vector env and summarizes them.

    Args:
      policy: a batched policy (see :mod:`openx_train.eval.policy`).
      env: a gymnasium env id, or a function that makes one env.
      num_episodes: episodes to run and report.
      num_envs: sub-envs (default: the CPU count), at most ``num_episodes``.
      seed: episode ``k`` resets with ``seed + k``.
      vectorization: ``"async"`` (a process per sub-env) or ``"sync"`` (all in this process).
      autoreset_mode: the vector env's autoreset mode (results do not depend on it).
      context: multiprocessing start method of the async sub-envs (default: the platform's,
        or ``"forkserver"`` once JAX, TensorFlow or torch is imported here).
      env_kwargs: keyword arguments of ``gym.make`` (an env id only).
      max_episode_steps: time limit per episode (default: the env's own).
      wrappers: functions ``env -> env`` applied to each sub-env above the episode bookkeeping
        (preprocessing, or env-side history/chunking: ``functools.partial(wrap_env, ...)``);
        returns, lengths, successes and frames are still those of the env's own steps.
      n_obs: policy-side history: the policy gets windows of ``n_obs`` observations with
        ``pad_mask`` (see :class:`StepwisePolicy`).
      chunking: policy-side action chunking: :class:`RecedingHorizon` or
        :class:`TemporalEnsemble`; the policy returns chunks.
      instruction: where each episode's language instruction comes from; passed to the policy
        as ``instruction=`` (an object array of strings) and logged as
        ``language_instruction``.
      goal: where each episode's goal comes from; passed as ``goal=`` (batched).
      success_at: ``"any"`` (an episode succeeded if any step's ``info`` had a true ``success``
        or ``is_success``) or ``"final"`` (its last step's). Null where the env reports none.
      video_path: ``*.mp4`` or ``*.gif``: the first ``video_episodes`` episodes one after the
        other, ``render()`` after each reset and each step (``length + 1`` frames an episode).
        An env id is made with ``render_mode="rgb_array"``; a function must make it so.
      video_episodes: how many episodes the video shows.
      video_fps: frames per second (default: the env's ``render_fps``, else 30).
      log_dir: log the rollouts as RLDS there through
        :class:`oxe_envlogger.VectorOXEEnvLogger`: one RLDS episode per reported episode,
        with the observations and actions the vector env sees. Those are the env's own steps
        (so the dataset has the features of one collected from the env by ``run_gym.py``, and
        can append to it) unless ``wrappers`` change them: ask for history and chunking
        through ``n_obs`` and ``chunking`` (policy side) to log the executed actions.
      log_name: the dataset's name (default: the env id in snake case).
      log_options: other keyword options of the logger (``image_codec``, ``overwrite``, ...).
      on_episode: called with each episode's record as it ends (in the order they end).

    Returns:
      A JSON-serializable dict: ``return_mean``, ``return_ci95`` (half-width of the 95%
      t-interval; null for one episode), ``return_std``, ``success_rate`` (null where the env
      reports no success), ``success_ci95`` (its 95% Wilson interval ``[low, high]``, or
      null), ``length_mean``, ``num_episodes``, ``episodes`` (per episode, in
      order of ``index``: ``index``, ``seed``, ``return``, ``length``, ``success``,
      ``terminated``, ``truncated``), ``env_steps`` (of the reported episodes),
      ``env_steps_per_s`` (over the rollout loop), ``wall_time_s`` (the whole call), ``num_envs``,
      ``vectorization``, ``autoreset_mode``, ``seed``, ``video_path`` and ``log_dir`` (or null).

    Raises:
      ValueError: for a bad option, or a policy output that does not fit the action space
        (naming the key path, the expected and the given shape).
    """
    start = time.perf_counter()
    if num_episodes < 1:
        raise ValueError(f"num_episodes: expected >= 1, given {num_episodes}")
    if num_envs is None:
        num_envs = os.cpu_count() or 1
    if num_envs < 1:
        raise ValueError(f"num_envs: expected >= 1, given {num_envs}")
    if num_envs > num_episodes:
        log.info("num_envs: %d sub-envs for %d episodes; using %d", num_envs, num_episodes,
                 num_episodes)
        num_envs = num_episodes
    if vectorization not in ("async", "sync"):
        raise ValueError(f"vectorization: expected 'async' or 'sync', given {vectorization!r}")
    if success_at not in ("any", "final"):
        raise ValueError(f"success_at: expected 'any' or 'final', given {success_at!r}")
    mode = _autoreset_mode(autoreset_mode)
    video_path = os.fspath(video_path) if video_path is not None else None
    if video_path is not None and not video_path.lower().endswith((".mp4", ".gif")):
        raise ValueError(f"video_path: expected a .mp4 or .gif file, given {video_path!r}")
    video_episodes = min(video_episodes, num_episodes) if video_path is not None else 0
    env_kwargs = dict(env_kwargs or {})
    if isinstance(env, str):
        if video_episodes:
            env_kwargs.setdefault("render_mode", "rgb_array")
        if max_episode_steps is not None:
            env_kwargs["max_episode_steps"] = max_episode_steps
    elif env_kwargs:
        raise ValueError("env_kwargs: only for an env id; a function makes its env itself")
    log_options = dict(log_options or {})
    if "incomplete" in log_options:
        raise ValueError("log_options: 'incomplete' is set by evaluate (episodes beyond "
                         "num_episodes are never logged)")
    if n_obs is not None or chunking is not None:
        policy = StepwisePolicy(policy, n_obs=n_obs, chunking=chunking)
    inputs = {name: src for name, src in (("instruction", instruction), ("goal", goal))
              if src is not None}

    # An id travels as its spec: a sub-env started by forkserver or spawn has not imported the
    # module that registered it (oxe_envlogger.envs registers SyntheticCamera-v0 on import).
    source = gym.spec(env) if isinstance(env, str) else env
    fns = [functools.partial(_make_sub_env, source, env_kwargs, max_episode_steps, tuple(wrappers),
                             {"index": i, "num_envs": num_envs, "num_episodes": num_episodes,
                              "seed": seed, "video_episodes": video_episodes,
                              "success_at": success_at})
           for i in range(num_envs)]
    if vectorization == "async":
        base = gym.vector.AsyncVectorEnv(fns, context=context or _default_context(),
                                         autoreset_mode=mode)
    else:
        base = gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)
    venv: gym.vector.VectorEnv = base
    try:
        if log_dir is not None:
            from oxe_envlogger.format.layout import snake_name
            from oxe_envlogger.vector import VectorOXEEnvLogger

            if log_name is None:
                if not isinstance(env, str):
                    raise ValueError("log_name: required to log an env made by a function")
                log_name = snake_name(env.split("/")[-1])
            venv = VectorOXEEnvLogger(base, log_name, log_dir, incomplete="drop",
                                      language_instruction=instruction is not None,
                                      **log_options)
        loop_start = time.perf_counter()
        records = _run(policy, venv, base, mode, num_envs, num_episodes, _Tasks(inputs, num_envs),
                       on_episode)
        loop_time = time.perf_counter() - loop_start
        fps = video_fps or base.metadata.get("render_fps") or 30
    finally:
        venv.close()

    records.sort(key=lambda r: r["index"])
    if video_path is not None:
        _write_video(video_path, [f for r in records[:video_episodes] for f in r["frames"]], fps)
    episodes = [{k: v for k, v in r.items() if k != "frames"} for r in records]
    returns = np.array([e["return"] for e in episodes])
    successes = [e["success"] for e in episodes if e["success"] is not None]
    env_steps = int(sum(e["length"] for e in episodes))
    return {
        "return_mean": float(returns.mean()),
        "return_ci95": t_interval(returns),
        "return_std": float(returns.std(ddof=1)) if len(returns) > 1 else None,
        "success_rate": float(np.mean(successes)) if successes else None,
        "success_ci95": (list(wilson_interval(int(np.sum(successes)), len(successes)))
                         if successes else None),
        "length_mean": float(np.mean([e["length"] for e in episodes])),
        "num_episodes": len(episodes),
        "episodes": episodes,
        "env_steps": env_steps,
        "env_steps_per_s": env_steps / loop_time,
        "wall_time_s": time.perf_counter() - start,
        "num_envs": num_envs,
        "vectorization": vectorization,
        "autoreset_mode": mode.value,
        "seed": seed,
        "video_path": video_path,
        "log_dir": os.fspath(log_dir) if log_dir is not None else None,
    }


def _run(policy: Policy, venv: gym.vector.VectorEnv, base: gym.vector.VectorEnv,
         mode: AutoresetMode, num_envs: int, num_episodes: int, tasks: _Tasks,
         on_episode: Callable[[dict[str, Any]], None] | None) -> list[dict[str, Any]]:
    """Steps until ``num_episodes`` episodes ended; returns the monitors' records."""
    local = np.zeros(num_envs, np.int64)  # each sub-env's episode count, as its monitor counts
    logger = venv if venv is not base else None

    def started(rows: np.ndarray, info: Mapping[str, Any]) -> None:
        """Sub-envs ``rows`` hold the first observation of an episode."""
        counted = rows[rows + local[rows] * num_envs < num_episodes]  # not idling
        if len(counted) and tasks.inputs:
            tasks.update(base, counted, info)
            if logger is not None and "instruction" in tasks.inputs:
                for i in counted:
                    logger.set_language_instruction(tasks.values["instruction"][i], env_index=i)
        reset_policy(policy, rows)

    obs, info = venv.reset()
    started(np.arange(num_envs), info)
    resetting = np.zeros(num_envs, bool)  # NEXT_STEP: this step resets these sub-envs
    records: list[dict[str, Any]] = []
    while len(records) < num_episodes:
        actions = conform(policy(obs, **tasks.batched), venv.action_space,
                          what="policy output")
        obs, _, terminated, truncated, info = venv.step(actions)
        done = np.asarray(terminated) | np.asarray(truncated)
        if mode == AutoresetMode.NEXT_STEP:
            starting, resetting = resetting, done
        else:
            starting = done
        if done.any():
            ended = [r for rs in base.call(_POP) for r in rs]
            if len(ended) != done.sum():
                raise RuntimeError(
                    f"sub-envs {np.flatnonzero(done).tolist()} ended {done.sum()} episodes where "
                    f"their envs ended {len(ended)}: a wrapper in `wrappers` ends episodes (a time "
                    f"limit belongs in max_episode_steps)")
            for record in ended:
                records.append(record)
                if on_episode is not None:
                    on_episode({k: v for k, v in record.items() if k != "frames"})
            if len(records) >= num_episodes:
                break
            if mode == AutoresetMode.DISABLED:
                obs, info = venv.reset(options={"reset_mask": done})
        if starting.any():
            rows = np.flatnonzero(starting)
            local[rows] += 1
            started(rows, info)
    # Idle sub-envs never end an episode, so every record is one of the num_episodes.
    assert sorted(r["index"] for r in records) == list(range(num_episodes)), records
    return records
