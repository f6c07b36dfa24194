"""The operators experiment of issue 14 (workload W6): Reacher-v5 demonstrations from operators
of known quality, logged through the SDK into one dataset with ``operator`` episode metadata,
for Re-Mix to weight (``LoaderConfig(domain_key="episode_metadata/operator")``).

This module collects the data; training and evaluation come on top of it::

    python -m openx_train.experiments.operators --path=runs/operators [--size=tiny] [--seed=0]
    python -m openx_train.experiments.operators run --path=runs/remix_experiment  # everything

(``run``: the reference, Re-Mix and the final runs with their table, see
:mod:`openx_train.experiments.remix_operators`.)

writes ``runs/operators/data`` (the dataset) and ``runs/operators/operators.json`` (each
operator's settings, episodes, frames and mean return with its 95% interval), and prints the
table.

The operators, all from the scripted expert (``oxe_envlogger.envs.make_policy("scripted")``:
2-link inverse kinematics plus joint PD control, whose actions are small: mean |a| about 0.05):

* ``better_1``, ``better_2``: the expert plus Gaussian action noise (sd 0.03, 0.05).
* ``okay_1``, ``okay_2``: the expert plus Ornstein-Uhlenbeck noise (theta 0.15, sd 0.03, 0.05),
  executed 2 steps late.
* ``worse_1``, ``worse_2``: stronger OU noise (sd 0.07, 0.1), executed 4 steps late, and 30% of
  the steps paused (a zero action).
* ``noise``: the expert drives (the states are the expert's) but the logged actions are uniform
  random in [-1, 1]: a domain with nothing to learn.
* ``biased``: the expert plus a constant offset (+0.1, -0.1): consistent, and wrong.

Episode counts grow from better to worse (worse operators give more frames, as in the robomimic
operator data): by default 50 episodes per better operator, 75 per okay, 100 per worse, 50 for
noise and for biased (550 episodes of 50 steps). A delayed operator executes zeros until its
first command arrives; actions are clipped to the action space, and the logged action is the
executed one (except for ``noise``).

Why one dataset: the loader normalizes each dataset with its own statistics, so one dataset per
operator would centre away the biased operator's offset and rescale the noise domain's actions;
in one dataset every operator's actions share one normalization, as a policy's output must, and
the domains are the ``operator`` metadata values (the loader also finds it as
``episode_metadata/operator``).

Seeds: operator j's episode i resets the env with ``seed * 1_000_000 + 10_000 * j + i``; its
noise comes from ``numpy.random.default_rng([seed, j])``. The same seed gives the same dataset
(steps and metadata; episode ids are unique per logger session).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from openx_train.eval.rollout import t_interval
from oxe_envlogger import AutoOXEEnvLogger
from oxe_envlogger.envs import make_policy
from oxe_envlogger.format.layout import DATASET_INFO, atomic_write_json

log = logging.getLogger(__name__)

ENV_ID = "Reacher-v5"
DATASET_NAME = "reacher_operators"
DATA_DIR = "data"
SUMMARY_FILE = "operators.json"
QUALITIES = ("better", "okay", "worse", "noise", "biased")
#: Episodes per operator of each quality.
SIZES: dict[str, dict[str, int]] = {
    "full": {"better": 50, "okay": 75, "worse": 100, "noise": 50, "biased": 50},
    "tiny": {"better": 2, "okay": 3, "worse": 4, "noise": 2, "biased": 2},
}
_OU_THETA = 0.15
_MAX_EPISODES = 10_000  # per operator: the reset seeds of two operators never meet


@dataclasses.dataclass(frozen=True)
class Operator:
    """One operator: how its actions depart from the expert's.

    Attributes:
      name: the ``operator`` metadata value.
      quality: one of ``QUALITIES`` (the ``quality`` metadata value).
      episodes: episodes it logs.
      noise: ``"none"``, ``"gaussian"`` (independent per step) or ``"ou"``
        (Ornstein-Uhlenbeck, theta 0.15), added to the expert's action.
      scale: the noise's standard deviation per step.
      delay: steps between a command and its execution (zeros before the first arrives).
      pause: probability that a step is paused (a zero action executed).
      offset: constant added to the expert's action.
      random_logged: the expert's (clipped) action is executed but a uniform random action in
        the action space is logged.
    """

    name: str
    quality: str
    episodes: int
    noise: str = "none"
    scale: float = 0.0
    delay: int = 0
    pause: float = 0.0
    offset: tuple[float, float] = (0.0, 0.0)
    random_logged: bool = False

    def __post_init__(self):
        if self.quality not in QUALITIES:
            raise ValueError(f"operator {self.name!r} quality: expected one of {QUALITIES}, "
                             f"given {self.quality!r}")
        if self.noise not in ("none", "gaussian", "ou"):
            raise ValueError(f"operator {self.name!r} noise: expected 'none', 'gaussian' or "
                             f"'ou', given {self.noise!r}")
        if not 0 <= self.episodes <= _MAX_EPISODES:
            raise ValueError(f"operator {self.name!r} episodes: expected in [0, "
                             f"{_MAX_EPISODES}], given {self.episodes!r}")
        if self.delay < 0 or not 0 <= self.pause < 1 or self.scale < 0:
            raise ValueError(f"operator {self.name!r}: expected delay >= 0, pause in [0, 1) and "
                             f"scale >= 0, given {self.delay!r}, {self.pause!r}, {self.scale!r}")


def operators(size: str | Mapping[str, int] = "full") -> tuple[Operator, ...]:
    """The experiment's eight operators.

    Args:
      size: ``"full"``, ``"tiny"`` (a few episodes each, for tests) or episodes per operator of
        each quality (``{"better": 50, "okay": 75, "worse": 100, "noise": 50, "biased": 50}``).

    Raises:
      ValueError: for an unknown size or missing qualities.
    """
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"size: expected one of {sorted(SIZES)} or a mapping, given {size!r}")
        size = SIZES[size]
    missing = [q for q in QUALITIES if q not in size]
    if missing:
        raise ValueError(f"size: no episode count for {missing}")
    n = {q: int(size[q]) for q in QUALITIES}
    return (
        Operator("better_1", "better", n["better"], "gaussian", 0.03),
        Operator("better_2", "better", n["better"], "gaussian", 0.05),
        Operator("okay_1", "okay", n["okay"], "ou", 0.03, delay=2),
        Operator("okay_2", "okay", n["okay"], "ou", 0.05, delay=2),
        Operator("worse_1", "worse", n["worse"], "ou", 0.07, delay=4, pause=0.3),
        Operator("worse_2", "worse", n["worse"], "ou", 0.1, delay=4, pause=0.3),
        Operator("noise", "noise", n["noise"], random_logged=True),
        Operator("biased", "biased", n["biased"], offset=(0.1, -0.1)),
    )


class OperatorPolicy:
    """An operator's actions: ``(executed, logged)`` for each observation. ``reset()`` at
    every episode start; all randomness from the generator given."""

    def __init__(self, operator: Operator, expert, action_space: gym.spaces.Box,
                 rng: np.random.Generator):
        self.operator = operator
        self._expert = expert
        self._low, self._high = action_space.low, action_space.high
        self._shape = action_space.shape
        self._rng = rng
        self.reset()

    def reset(self) -> None:
        zero = np.zeros(self._shape)
        self._queue = collections.deque([zero] * self.operator.delay)
        self._ou = zero.copy()

    def __call__(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        op, rng = self.operator, self._rng
        command = np.asarray(self._expert(obs), np.float64) + np.asarray(op.offset)
        if op.noise == "gaussian":
            command = command + op.scale * rng.standard_normal(self._shape)
        elif op.noise == "ou":
            self._ou = self._ou - _OU_THETA * self._ou + op.scale * rng.standard_normal(
                self._shape)
            command = command + self._ou
        self._queue.append(command)
        action = self._queue.popleft()
        if op.pause and rng.random() < op.pause:
            action = np.zeros(self._shape)
        executed = np.clip(action, self._low, self._high).astype(np.float32)
        if op.random_logged:
            return executed, rng.uniform(self._low, self._high).astype(np.float32)
        return executed, executed


class _ExecutedAction(gym.Wrapper):
    """Executes ``executed`` (set before each step) instead of the action the logger above
    logged: the noise domain's states are the expert's, its logged actions random."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.executed: np.ndarray | None = None

    def step(self, action):
        return self.env.step(action if self.executed is None else self.executed)


def reset_seed(seed: int, operator_index: int, episode: int) -> int:
    """The env seed of an operator's episode."""
    return seed * 1_000_000 + _MAX_EPISODES * operator_index + episode


def _summary(values: Sequence[float]) -> tuple[float | None, float | None]:
    v = np.asarray(values, np.float64)
    return (float(v.mean()) if len(v) else None), t_interval(v)


def collect(directory: str | os.PathLike, ops: Sequence[Operator] | None = None, *,
            seed: int = 0, overwrite: bool = False) -> list[dict[str, Any]]:
    """Logs every operator's episodes into one dataset, ``operator`` and ``quality`` episode
    metadata on each.

    Args:
      directory: the dataset directory.
      ops: the operators (default :func:`operators` ``("full")``).
      seed: seeds the resets and the operators' noise (see the module docstring).
      overwrite: replace a dataset already in ``directory``.

    Returns:
      Per operator: its settings, ``episodes``, ``frames`` (env steps), ``return_mean`` and
      ``return_ci95`` (the half-width of the 95% t-interval) of the logged rollouts; for an
      operator whose logged actions are not the executed ones, also
      ``logged_actions_return_mean`` and ``..._ci95``: the logged actions executed open loop
      from the same resets (not logged).

    Raises:
      FileExistsError: when ``directory`` holds a dataset and ``overwrite`` is False (the
        logger would append to it).
    """
    directory = os.fspath(directory)
    ops = tuple(ops if ops is not None else operators())
    if not overwrite and os.path.exists(os.path.join(directory, DATASET_INFO)):
        raise FileExistsError(f"{directory} holds a dataset already; pass overwrite=True to "
                              "replace it")
    inner = _ExecutedAction(gym.make(ENV_ID))
    env = AutoOXEEnvLogger(inner, DATASET_NAME, directory, overwrite=overwrite)
    expert = make_policy("scripted", env)
    results = []
    with env:
        for j, op in enumerate(ops):
            policy = OperatorPolicy(op, expert, env.action_space,
                                    np.random.default_rng([seed, j]))
            returns, frames, replays = [], 0, []
            for i in range(op.episodes):
                obs, _ = env.reset(seed=reset_seed(seed, j, i))
                env.set_episode_metadata({"operator": op.name, "quality": op.quality})
                policy.reset()
                total, done, actions = 0.0, False, []
                while not done:
                    inner.executed, logged = policy(obs)
                    obs, reward, terminated, truncated, _ = env.step(logged)
                    total += float(reward)
                    frames += 1
                    actions.append(logged)
                    done = terminated or truncated
                returns.append(total)
                if op.random_logged:
                    replays.append((reset_seed(seed, j, i), actions))
            mean, ci = _summary(returns)
            row = {**dataclasses.asdict(op), "frames": frames, "return_mean": mean,
                   "return_ci95": ci}
            log.info("operator %s: %d episodes, return %s +- %s", op.name, op.episodes, mean, ci)
            if op.random_logged:
                mean, ci = _summary(_replay_returns(replays))
                row.update(logged_actions_return_mean=mean, logged_actions_return_ci95=ci)
            results.append(row)
    return results


def _replay_returns(replays: Sequence[tuple[int, Sequence[np.ndarray]]]) -> list[float]:
    """The returns of logged actions executed open loop from the same resets (for an operator
    whose logged actions are not the ones it executed)."""
    env = gym.make(ENV_ID)
    returns = []
    for reset, actions in replays:
        env.reset(seed=reset)
        returns.append(sum(float(env.step(a)[1]) for a in actions))
    env.close()
    return returns


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
    """The collection's results as a text table."""
    lines = [f"{'operator':<10} {'episodes':>8} {'frames':>7}  return (95% interval)"]
    for r in results:
        ci = r["return_ci95"]
        text = f"{r['return_mean']:8.2f} ± {ci:.2f}" if ci is not None else \
            f"{r['return_mean']:8.2f}"
        if "logged_actions_return_mean" in r:
            lci = r["logged_actions_return_ci95"]
            text += (f"   (its logged actions executed: {r['logged_actions_return_mean']:.2f}"
                     + (f" ± {lci:.2f})" if lci is not None else ")"))
        lines.append(f"{r['name']:<10} {r['episodes']:>8} {r['frames']:>7}  {text}")
    return "\n".join(lines)


def run_collection(path: str | os.PathLike, *, size: str | Mapping[str, int] = "full",
                   seed: int = 0, overwrite: bool = False) -> list[dict[str, Any]]:
    """Collects into ``<path>/data`` and writes ``<path>/operators.json``.

    Returns:
      :func:`collect`'s results.
    """
    path = os.fspath(path)
    results = collect(os.path.join(path, DATA_DIR), operators(size), seed=seed,
                      overwrite=overwrite)
    atomic_write_json(os.path.join(path, SUMMARY_FILE),
                      {"env_id": ENV_ID, "seed": seed, "dataset": DATA_DIR,
                       "domain_key": "episode_metadata/operator", "operators": results})
    return results


def main(argv: Sequence[str]) -> None:
    from absl import app, flags

    f = flags.FLAGS
    if len(argv) == 2 and argv[1] in ("run", "table"):
        import logging as std_logging

        from openx_train.experiments import remix_operators as exp

        std_logging.getLogger("absl").addFilter(exp.QuietOrbax())

        options = exp.ExperimentOptions(
            size=f.size, data_seed=f.seed, seeds=tuple(int(s) for s in f.seeds),
            budgets=tuple(float(b) for b in f.budgets), weightings=tuple(f.weightings),
            episodes=f.episodes, steps=f.steps, remix_steps=f.remix_steps,
            batch_size=f.batch_size, num_envs=f.num_envs)
        if argv[1] == "table":  # the finished runs so far
            print(exp.format_results(exp.collect_results(f.path, options)))
            return
        results = exp.run_experiment(f.path, options)
        print(exp.format_results(results))
        print(f"results: {os.path.join(f.path, exp.RESULTS_JSON)}, "
              f"{os.path.join(f.path, exp.RESULTS_PLOT)}")
        return
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {list(argv[1:])} (the commands are "
                             "'run': the whole Re-Mix experiment, and 'table': its finished "
                             "runs so far)")
    results = run_collection(f.path, size=f.size, seed=f.seed, overwrite=f.overwrite)
    print(format_table(results))
    print(f"dataset: {os.path.join(f.path, DATA_DIR)}; summary: "
          f"{os.path.join(f.path, SUMMARY_FILE)}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("path", None, "Run directory (the dataset goes to <path>/data).",
                        required=True)
    flags.DEFINE_enum("size", "full", sorted(SIZES), "Episodes per operator: full or tiny.")
    flags.DEFINE_integer("seed", 0, "Seeds the resets and the operators' noise.")
    flags.DEFINE_bool("overwrite", False, "Replace a dataset already in <path>/data.")
    # `run`: the Re-Mix experiment (openx_train.experiments.remix_operators).
    flags.DEFINE_list("seeds", ["0", "1", "2"], "run: seeds of the final BC runs.")
    flags.DEFINE_list("budgets", ["1.0", "0.25"], "run: data budgets of the final BC runs.")
    flags.DEFINE_list("weightings", ["size", "uniform", "remix", "better_only"],
                      "run: the weightings compared.")
    flags.DEFINE_integer("episodes", 50, "run: evaluation episodes per final policy.")
    flags.DEFINE_integer("steps", None, "run: train steps of every BC run (default: the "
                         "config's).")
    flags.DEFINE_integer("remix_steps", None, "run: Re-Mix steps (default: --steps).")
    flags.DEFINE_integer("batch_size", None, "run: every run's batch (default: the config's).")
    flags.DEFINE_integer("num_envs", 4, "run: evaluation sub-envs.")
    app.run(main)
