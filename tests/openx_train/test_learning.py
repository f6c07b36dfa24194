"""Learning tests (slow): BC trained on logged scripted-expert episodes, then evaluated in the env
by ``load_policy`` (the whole path: collect, train, evaluate).

* Reacher-v5: 100 expert episodes, the shipped ``configs/bc/reacher_state.py``; over 50 new
  episodes the policy must reach 90% of the expert's return gap over random actions (expert
  about -3.5, random about -43: return >= -7.4).
* Language: the synthetic camera task with the target's position removed from the state
  (``HideTarget``) and no cameras read, so that the instruction ("put the red block in the left
  bin") is the only thing that says where to go; the same state MLP with hashed-token language
  must succeed clearly more often than without (a one-sided two-proportion z-test at 1%). The
  env itself draws only the named block and target, so with its full state or its images the
  instruction adds nothing a policy could not see.
"""

from __future__ import annotations

import importlib
import logging
import math
import os

import gymnasium as gym
import numpy as np
import pytest

from oxe_envlogger import AutoOXEEnvLogger
from oxe_envlogger.envs import ENV_ID, make_policy, run_episodes

loop = pytest.importorskip("openx_train.training.loop")

log = logging.getLogger(__name__)

EXPERT_REACHER, RANDOM_REACHER = -3.5, -43.0


@pytest.mark.slow
def test_bc_reacher_reaches_most_of_the_expert_gap(tmp_path):
    from openx_train.inference import evaluate_run

    reacher_state = importlib.import_module("openx_train.configs.bc.reacher_state")

    data = os.fspath(tmp_path / "reacher")
    env = AutoOXEEnvLogger(gym.make("Reacher-v5"), "reacher_v5", data)
    with env:
        run_episodes(env, 100, policy=make_policy("scripted", env), seed=0)
    config = reacher_state.get_config()
    config.data.datasets = [{"path": data}]
    loop.train(config, os.fspath(tmp_path / "run"))
    # New episodes: seeds 10000.. (the data used 0..99).
    res = evaluate_run(tmp_path / "run", "Reacher-v5", num_episodes=50, num_envs=2, seed=10000)
    bar = EXPERT_REACHER - 0.1 * (EXPERT_REACHER - RANDOM_REACHER)
    log.warning("reacher BC: return %.2f +- %.2f over %d episodes (bar %.2f)",
                res["return_mean"], res["return_ci95"], res["num_episodes"], bar)
    assert res["num_episodes"] == 50
    assert res["return_mean"] >= bar, res


class HideTarget(gym.ObservationWrapper):
    """The synthetic camera task with the target's position (``state[6:8]``) zeroed."""

    def observation(self, observation):
        state = observation["state"].copy()
        state[6:8] = 0.0
        return {**observation, "state": state}


def make_hidden_target_env() -> gym.Env:
    return HideTarget(gym.make(ENV_ID, image_size=32, wrist_size=16, max_episode_steps=60))


def _collect_hidden_target(directory: str, episodes: int) -> None:
    env = AutoOXEEnvLogger(make_hidden_target_env(), "hidden_target", directory)
    expert = make_policy("scripted", env)

    def act(observation):  # the expert knows the target; the logged state does not
        state = observation["state"].copy()
        state[6:8] = env.unwrapped._target
        return expert({**observation, "state": state})

    with env:
        run_episodes(env, episodes, policy=act, seed=0)


def _hidden_target_config(data: str, language: bool):
    reacher_state = importlib.import_module("openx_train.configs.bc.reacher_state")
    config = reacher_state.get_config()  # the state MLP recipe, on the camera task's state
    config.data.datasets = [{"path": data}]
    config.data.structure = {"state": ["observation/state"], "action": ["action"],
                             "language": "language_instruction" if language else None}
    config.model.task.language = "tokens" if language else "none"
    config.model.trunk.hidden_dims = (256, 256)
    config.steps = 3000
    config.val_freq = config.save_freq = 1000
    return config


@pytest.mark.slow
def test_bc_with_language_beats_without_when_only_the_instruction_names_the_target(tmp_path):
    from openx_train.eval import TaskInput, evaluate
    from openx_train.eval.rollout import wilson_interval
    from openx_train.inference import load_policy

    data = os.fspath(tmp_path / "hidden_target")
    _collect_hidden_target(data, 100)
    rates = {}
    num_episodes = 50
    for language in (True, False):
        path = os.fspath(tmp_path / f"run_{language}")
        loop.train(_hidden_target_config(data, language), path)
        policy = load_policy(path)
        res = evaluate(policy, make_hidden_target_env, num_episodes=num_episodes, num_envs=2,
                       seed=10000, vectorization="sync",
                       instruction=TaskInput(info_key="language_instruction") if language
                       else None, **policy.rollout_options())
        successes = round(res["success_rate"] * num_episodes)
        rates[language] = successes
        lo, hi = wilson_interval(successes, num_episodes)
        log.warning("hidden-target camera task, language=%s: success %d/%d (95%% Wilson "
                    "[%.2f, %.2f]), return %.2f +- %.2f", language, successes, num_episodes,
                    lo, hi, res["return_mean"], res["return_ci95"])
    p1, p0 = rates[True] / num_episodes, rates[False] / num_episodes
    pooled = (rates[True] + rates[False]) / (2 * num_episodes)
    se = math.sqrt(max(pooled * (1 - pooled) * 2 / num_episodes, 1e-12))
    z = (p1 - p0) / se
    log.warning("language minus none: %.2f (z = %.2f)", p1 - p0, z)
    assert z > 2.33, (rates, z)
    assert np.isfinite(z)
