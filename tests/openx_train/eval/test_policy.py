"""The policy-side history and chunking (StepwisePolicy, evaluate's n_obs/chunking) execute
exactly the actions of the env-side wrappers on a single env, in every autoreset mode, while
the vector env's sub-envs end their episodes at different steps."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

from openx_train.eval import (
    RecedingHorizon,
    StepwisePolicy,
    TemporalEnsemble,
    batch_policy,
    evaluate,
    wrap_env,
)
from tests.openx_train.eval.fake_envs import SeededEnv, episode_length

N_OBS, NUM_EPISODES, SEED = 3, 9, 20
CHUNKINGS = [RecedingHorizon(4, 3), RecedingHorizon(3, 1), RecedingHorizon(2, 2),
             TemporalEnsemble(3), TemporalEnsemble(4, exp_weight=0.7)]


def window_policy(n_action: int):
    """Chunks that depend on every element of the window and its mask."""

    def policy(obs, **_):
        o, mask = obs["observation"], obs["pad_mask"]
        weights = 10.0 ** np.arange(o.shape[1])
        base = ((o[..., 0] + o[..., 1] * 0.1 + mask) * weights).sum(axis=1)  # [B]
        offsets = np.arange(n_action)[:, None] * 0.5 + np.array([0.0, 0.25])  # [n_action, 2]
        return (base[:, None, None] + offsets[None]).astype(np.float32)

    return policy


def env_side_actions(chunking) -> dict[int, np.ndarray]:
    """Each episode run alone on one env with the env-side wrappers: the actions the env got."""
    policy = window_policy(chunking.n_action)
    out = {}
    for k in range(NUM_EPISODES):
        inner = SeededEnv()
        env = wrap_env(inner, n_obs=N_OBS, chunking=chunking)
        obs, _ = env.reset(seed=SEED + k)
        done = False
        while not done:
            batched = {key: value[None] for key, value in obs.items()}
            obs, _, terminated, truncated, _ = env.step(policy(batched)[0])
            done = terminated or truncated
        out[SEED + k] = np.stack(inner.episodes[-1]["actions"])
    return out


def sync_made(made: list):
    def make():
        made.append(SeededEnv())
        return made[-1]
    return make


def executed(made: list[SeededEnv]) -> dict[int, np.ndarray]:
    return {e["seed"]: np.stack(e["actions"]) for env in made for e in env.episodes}


@pytest.mark.parametrize("chunking", CHUNKINGS, ids=repr)
@pytest.mark.parametrize("mode", list(AutoresetMode), ids=lambda m: m.value)
def test_policy_side_and_env_side_execute_the_same_actions(chunking, mode):
    want = env_side_actions(chunking)
    assert len({episode_length(s) for s in want}) > 3  # sub-envs fall out of step
    made: list[SeededEnv] = []
    evaluate(window_policy(chunking.n_action), sync_made(made), num_episodes=NUM_EPISODES,
             num_envs=3, seed=SEED, vectorization="sync", autoreset_mode=mode, n_obs=N_OBS,
             chunking=chunking)
    got = executed(made)
    assert sorted(got) == sorted(want)
    for seed in want:
        np.testing.assert_array_equal(got[seed], want[seed], err_msg=f"seed {seed}")
    # The env-side wrappers inside evaluate's sub-envs (macro steps) agree too.
    made = []
    evaluate(window_policy(chunking.n_action), sync_made(made), num_episodes=NUM_EPISODES,
             num_envs=3, seed=SEED, vectorization="sync", autoreset_mode=mode,
             wrappers=[functools.partial(wrap_env, n_obs=N_OBS, chunking=chunking)])
    got = executed(made)
    for seed in want:
        np.testing.assert_array_equal(got[seed], want[seed], err_msg=f"seed {seed}")


def test_receding_horizon_asks_for_a_chunk_only_when_one_runs_out():
    calls = []

    def policy(obs, **_):
        calls.append(obs["observation"][:, -1, 1].tolist())  # each row's step t
        return np.zeros((len(obs["pad_mask"]), 4, 2), np.float32)

    seed = 5  # one episode of 6 steps: chunks at t = 0 and 3
    evaluate(policy, SeededEnv, num_episodes=1, num_envs=1, seed=seed, vectorization="sync",
             n_obs=2, chunking=RecedingHorizon(4, 3))
    assert episode_length(seed) == 6 and calls == [[0.0], [3.0]]


def test_stepwise_policy_checks_chunks_and_forwards_reset():
    resets = []

    class Inner:
        def __call__(self, obs):
            return np.zeros((2, 3, 1))

        def reset(self, env_indices):
            resets.append(env_indices.tolist())

    policy = StepwisePolicy(Inner(), chunking=RecedingHorizon(3, 2))
    policy.reset(np.array([0, 1]))
    assert resets == [[0, 1]]
    policy(np.zeros((2, 4)))
    policy = StepwisePolicy(Inner(), chunking=TemporalEnsemble(4))
    with pytest.raises(ValueError, match=r"policy output: expected chunks of leading shape "
                                         r"\(2, 4\) \(num_envs, n_action\), given shape \(2, 3, 1\)"):
        policy(np.zeros((2, 4)))
    with pytest.raises(TypeError, match="chunking"):
        StepwisePolicy(Inner(), chunking=(4, 2))


def test_batch_policy_calls_the_one_env_policy_per_row():
    seen = []

    def one(obs, *, instruction):
        seen.append((obs["state"].tolist(), instruction))
        return obs["state"] * 2

    policy = batch_policy(one)
    out = policy({"state": np.array([[1.0], [2.0]])}, instruction=np.array(["a", "b"], object))
    np.testing.assert_array_equal(out, [[2.0], [4.0]])
    assert seen == [([1.0], "a"), ([2.0], "b")]
    with pytest.raises(ValueError, match="observation/state: expected a batch"):
        policy({"state": np.float32(1.0)}, instruction=np.array([]))


def test_a_stepwise_policy_can_be_reused_with_another_batch_size():
    made: list[SeededEnv] = []
    policy = StepwisePolicy(window_policy(3), n_obs=N_OBS, chunking=TemporalEnsemble(3))
    for num_envs in (3, 2):
        made.clear()
        evaluate(policy, sync_made(made), num_episodes=NUM_EPISODES, num_envs=num_envs,
                 seed=SEED, vectorization="sync")
        got, want = executed(made), env_side_actions(TemporalEnsemble(3))
        for seed in want:
            np.testing.assert_array_equal(got[seed], want[seed], err_msg=f"seed {seed}")
