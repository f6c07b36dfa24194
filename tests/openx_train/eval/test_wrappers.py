"""History and action chunking wrappers: stacking, pad masks across resets (the loader's
convention), receding horizon and temporal ensembling arithmetic, spaces and errors."""

from __future__ import annotations

from collections import deque

import gymnasium as gym
import numpy as np
import pytest

from openx_train.eval import (
    HistoryWrapper,
    RecedingHorizon,
    RecedingHorizonWrapper,
    TemporalEnsemble,
    TemporalEnsembleWrapper,
    stack_space,
    tree,
    wrap_env,
)
from tests.openx_train.eval.fake_envs import SeededEnv, episode_length, step_reward


class DictEnv(gym.Env):
    """Nested dict observations that count steps: ``{"state": [t, episode], "cam": {"image":
    HxWx1 filled with t}, "mode": Discrete}``; each episode is ``length`` steps."""

    def __init__(self, length: int = 4):
        self.observation_space = gym.spaces.Dict({
            "state": gym.spaces.Box(-np.inf, np.inf, (2,), np.float32),
            "cam": gym.spaces.Dict({"image": gym.spaces.Box(0, 255, (3, 3, 1), np.uint8)}),
            "mode": gym.spaces.Discrete(10),
        })
        self.action_space = gym.spaces.Box(-1, 1, (1,), np.float32)
        self.length, self.episode, self.t = length, -1, 0

    def _obs(self):
        return {"state": np.array([self.t, self.episode], np.float32),
                "cam": {"image": np.full((3, 3, 1), self.t, np.uint8)}, "mode": self.t % 10}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode += 1
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        return self._obs(), 1.0, self.t >= self.length, False, {}


def test_stack_space_every_kind():
    space = gym.spaces.Dict({
        "box": gym.spaces.Box(np.array([0, -1], np.float32), np.array([1, 2], np.float32)),
        "discrete": gym.spaces.Discrete(5, start=2),
        "multi": gym.spaces.MultiDiscrete([3, 4]),
        "binary": gym.spaces.MultiBinary(3),
        "tuple": gym.spaces.Tuple([gym.spaces.Discrete(2)]),
    })
    stacked = stack_space(space, 3)
    assert stacked["box"].shape == (3, 2)
    np.testing.assert_array_equal(stacked["box"].low, [[0, -1]] * 3)
    np.testing.assert_array_equal(stacked["box"].high, [[1, 2]] * 3)
    assert stacked["discrete"] == gym.spaces.MultiDiscrete([5, 5, 5], start=[2, 2, 2])
    assert stacked["multi"].shape == (3, 2)
    np.testing.assert_array_equal(stacked["multi"].nvec, [[3, 4]] * 3)
    assert stacked["binary"].shape == (3, 3)
    assert stacked["tuple"][0] == gym.spaces.MultiDiscrete([2, 2, 2])
    for _ in range(5):
        assert stacked.contains(tree.stack([space.sample()] * 3))


def test_stack_space_names_the_key_it_cannot_stack():
    space = gym.spaces.Dict({"ok": gym.spaces.Discrete(2),
                             "nested": gym.spaces.Dict({"text": gym.spaces.Text(5)})})
    with pytest.raises(TypeError, match=r"observation/nested/text: cannot stack a Text space"):
        stack_space(space, 2)


def test_history_stacks_nested_dicts_and_masks_the_padding_across_resets():
    env = HistoryWrapper(DictEnv(length=4), n_obs=3)
    assert env.observation_space["state"].shape == (3, 2)
    assert env.observation_space["cam"]["image"].shape == (3, 3, 3, 1)
    assert env.observation_space["pad_mask"].shape == (3,)
    for episode in range(3):  # resets must restart the window and the mask
        obs, _ = env.reset()
        seen = [0]
        for t in range(5):
            # The window is steps t-2..t, with the first observation where t-k < 0.
            window = [max(seen[-1] - k, 0) for k in (2, 1, 0)]
            np.testing.assert_array_equal(obs["state"][:, 0], window)
            np.testing.assert_array_equal(obs["state"][:, 1], [episode] * 3)
            np.testing.assert_array_equal(obs["cam"]["image"][:, 0, 0, 0], window)
            np.testing.assert_array_equal(obs["mode"], window)
            np.testing.assert_array_equal(obs["pad_mask"], [seen[-1] - k >= 0 for k in (2, 1, 0)])
            assert obs["pad_mask"].dtype == bool
            assert env.observation_space.contains(obs)
            if t == 4:
                break
            obs, _, terminated, _, _ = env.step(np.zeros(1, np.float32))
            seen.append(seen[-1] + 1)
            if terminated:
                break


def test_history_matches_the_training_loaders_windows():
    """The window and pad mask at step t equal what openx_train.data.ops.history_indices
    gathers from the logged episode (the same positions, the same repeats, the same mask)."""
    tf = pytest.importorskip("tensorflow")
    from openx_train.data.ops import history_indices

    n_obs, length = 4, 6
    env = HistoryWrapper(SeededEnv(), n_obs=n_obs)
    obs, _ = env.reset(seed=length - 1 + 6 * 3)  # seed -> episode length 6 (see fake_envs)
    seed = int(obs["observation"][-1, 0])
    assert episode_length(seed) == length
    windows, masks = [obs["observation"]], [obs["pad_mask"]]
    for _ in range(length):
        obs, *_ = env.step(np.zeros(2, np.float32))
        windows.append(obs["observation"])
        masks.append(obs["pad_mask"])
    episode = np.array([[seed, t] for t in range(length + 1)], np.float64)  # o_0 .. o_N
    idx, mask = (x.numpy() for x in history_indices(tf.range(length + 1), n_obs))
    np.testing.assert_array_equal(np.stack(windows), episode[idx])
    np.testing.assert_array_equal(np.stack(masks), mask)


def test_history_of_an_array_observation_goes_under_observation():
    env = HistoryWrapper(SeededEnv(), n_obs=2)
    assert set(env.observation_space.spaces) == {"observation", "pad_mask"}
    obs, _ = env.reset(seed=4)
    np.testing.assert_array_equal(obs["observation"], [[4, 0], [4, 0]])
    np.testing.assert_array_equal(obs["pad_mask"], [False, True])


def test_history_refuses_an_observation_with_a_pad_mask_key():
    class Masked(DictEnv):
        def __init__(self):
            super().__init__()
            self.observation_space = gym.spaces.Dict(
                {"pad_mask": gym.spaces.Box(0, 1, (1,), np.float32)})

    with pytest.raises(ValueError, match="observation/pad_mask"):
        HistoryWrapper(Masked(), n_obs=2)


def test_receding_horizon_executes_the_first_actions_and_sums_rewards():
    inner = SeededEnv()
    env = RecedingHorizonWrapper(inner, n_action=4, exec_horizon=3)
    assert env.action_space.shape == (4, 2)
    seed = 5  # episode_length(5) == 6: two full chunks of 3
    env.reset(seed=seed)
    chunk = np.arange(8, dtype=np.float32).reshape(4, 2)
    obs, reward, terminated, truncated, info = env.step(chunk)
    assert info["executed_steps"] == 3
    assert reward == pytest.approx(sum(step_reward(seed, t) for t in (1, 2, 3)))
    np.testing.assert_array_equal(obs, [seed, 3])
    assert not (terminated or truncated)
    np.testing.assert_array_equal(inner.episodes[-1]["actions"], chunk[:3])
    _, reward, _, truncated, info = env.step(chunk + 10)
    assert truncated and info["executed_steps"] == 3
    np.testing.assert_array_equal(inner.episodes[-1]["actions"][3:], chunk[:3] + 10)


def test_receding_horizon_stops_at_the_episode_end():
    inner = SeededEnv()
    env = RecedingHorizonWrapper(inner, n_action=4, exec_horizon=4)
    seed = 2  # episode_length(2) == 3: ends inside the first chunk
    env.reset(seed=seed)
    chunk = np.ones((4, 2), np.float32)
    _, reward, terminated, _, info = env.step(chunk)
    assert terminated and info["executed_steps"] == 3
    assert reward == pytest.approx(sum(step_reward(seed, t) for t in (1, 2, 3)))
    assert len(inner.episodes[-1]["actions"]) == 3  # the 4th action was never executed


def test_receding_horizon_checks_the_chunk():
    env = RecedingHorizonWrapper(SeededEnv(), n_action=4, exec_horizon=2)
    env.reset(seed=1)
    with pytest.raises(ValueError, match=r"action: expected shape \(4, 2\), given \(2,\)"):
        env.step(np.zeros(2, np.float32))
    with pytest.raises(ValueError, match=r"exec_horizon: expected 1\.\.n_action=4, given 5"):
        RecedingHorizon(4, 5)


def test_receding_horizon_of_discrete_actions_refuses_fractions():
    env = RecedingHorizonWrapper(gym.make("CartPole-v1"), n_action=2, exec_horizon=2)
    assert env.action_space == gym.spaces.MultiDiscrete([2, 2])
    env.reset(seed=0)
    env.step(np.array([1.0, 0.0]))  # integral floats are fine
    with pytest.raises(ValueError, match="action: expected integers"):
        env.step(np.array([0.5, 1.0]))


def _octo_ensemble(chunks: list[np.ndarray], horizon: int, exp_weight: float) -> np.ndarray:
    """Octo's TemporalEnsembleWrapper formula, written out: the last ``horizon`` chunks oldest
    first; chunk i of num predicts this step at position num-1-i; weights exp(-w * i)."""
    history = deque(chunks[-horizon:], maxlen=horizon)
    num = len(history)
    preds = np.stack([c[num - 1 - i] for i, c in enumerate(history)])
    weights = np.exp(-exp_weight * np.arange(num))
    weights = weights / weights.sum()
    return np.sum(weights[:, None] * preds, axis=0)


@pytest.mark.parametrize("exp_weight", [0.0, 0.5, -0.3, 40.0])
def test_temporal_ensembling_averages_the_overlapping_predictions(exp_weight):
    inner = SeededEnv()
    env = TemporalEnsembleWrapper(inner, n_action=3, exp_weight=exp_weight)
    assert env.action_space.shape == (3, 2)
    rng = np.random.default_rng(0)
    for seed in (5, 11):  # two episodes of 6 steps: the reset forgets the old chunks
        env.reset(seed=seed)
        chunks = []
        for _ in range(episode_length(seed)):
            chunks.append(rng.uniform(-1, 1, (3, 2)).astype(np.float32))
            env.step(chunks[-1])
        executed = np.stack(inner.episodes[-1]["actions"])
        want = np.stack([_octo_ensemble(chunks[: t + 1], 3, exp_weight)
                         for t in range(len(chunks))]).astype(np.float32)
        np.testing.assert_allclose(executed, want, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(executed[0], chunks[0][0])  # alone at the first step


def test_temporal_ensembling_by_hand():
    inner = SeededEnv(action_dim=1)
    env = TemporalEnsembleWrapper(inner, n_action=2, exp_weight=np.log(3.0))
    env.reset(seed=5)
    env.step(np.array([[1.0], [2.0]], np.float32))  # step 0: 1
    env.step(np.array([[10.0], [20.0]], np.float32))  # step 1: (3 * 2 + 1 * 10) / 4 = 4
    env.step(np.array([[100.0], [0.0]], np.float32))  # step 2: (3 * 20 + 100) / 4 = 40
    np.testing.assert_allclose(np.concatenate(inner.episodes[-1]["actions"]), [1.0, 4.0, 40.0])


def test_temporal_ensembling_needs_float_actions():
    with pytest.raises(TypeError, match="float Box action space"):
        TemporalEnsembleWrapper(gym.make("CartPole-v1"), n_action=2)
    with pytest.raises(ValueError, match="exp_weight"):
        TemporalEnsemble(2, float("nan"))


def test_wrap_env_puts_the_history_inside_the_chunking():
    env = wrap_env(SeededEnv(), n_obs=2, chunking=RecedingHorizon(3, 2))
    assert isinstance(env, RecedingHorizonWrapper)
    assert isinstance(env.env, HistoryWrapper)
    env.reset(seed=5)
    obs, *_ = env.step(np.zeros((3, 2), np.float32))
    np.testing.assert_array_equal(obs["observation"], [[5, 1], [5, 2]])  # every step entered
    with pytest.raises(TypeError, match="chunking"):
        wrap_env(SeededEnv(), chunking=3)
