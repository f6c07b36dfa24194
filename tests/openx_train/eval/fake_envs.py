"""Small deterministic envs for the evaluation tests: every value tells which episode and step
it belongs to, so a step attributed to the wrong episode changes a result."""

from __future__ import annotations

import gymnasium as gym
import numpy as np


def episode_length(seed: int) -> int:
    """The length of the episode reset with ``seed``: 1 to 6 steps."""
    return 1 + (seed * 7) % 6


def step_reward(seed: int, t: int) -> float:
    """The reward of step ``t`` (1-based) of the episode reset with ``seed``."""
    return seed * 100.0 + t + 0.1


def episode_return(seed: int) -> float:
    total = 0.0
    for t in range(1, episode_length(seed) + 1):
        total += step_reward(seed, t)
    return total


def frame_level(seed: int, t: int) -> int:
    """The gray level of the frame rendered at step ``t`` of the episode reset with ``seed``:
    consecutive frames always differ (a GIF writer merges equal ones)."""
    return (seed * 37 + t * 5) % 256


class SeededEnv(gym.Env):
    """Observation ``[seed, t]``; episode length :func:`episode_length` (terminated when the
    seed is even, truncated when odd); reward :func:`step_reward`; ``info["success"]`` at every
    step, True only at the first step of episodes whose seed is divisible by 3 (absent with
    ``success=False``); the reset info carries ``language_instruction`` and ``goal``. Keeps every
    action it was given."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, *, success: bool = True, render_mode: str | None = None,
                 action_dim: int = 2):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
        self.action_space = gym.spaces.Box(-100.0, 100.0, (action_dim,), np.float32)
        self.render_mode = render_mode
        self._success = success
        self.seed_now: int | None = None
        self.t = 0
        self.episodes: list[dict] = []  # {"seed", "actions"} per reset

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is None:
            raise AssertionError("evaluate must seed every episode")
        self.seed_now, self.t = seed, 0
        self.episodes.append({"seed": seed, "actions": []})
        return self._obs(), {"language_instruction": f"task {seed}",
                             "goal": np.array([seed, -1.0])}

    def instruction(self) -> str:
        return f"method {self.seed_now}"

    def _obs(self) -> np.ndarray:
        return np.array([self.seed_now, self.t], np.float64)

    def step(self, action):
        if self.t >= episode_length(self.seed_now):
            raise AssertionError("stepped past the end of an episode")
        self.t += 1
        self.episodes[-1]["actions"].append(np.array(action))
        last = self.t == episode_length(self.seed_now)
        info = {}
        if self._success:
            info["success"] = self.seed_now % 3 == 0 and self.t == 1
        even = self.seed_now % 2 == 0
        return (self._obs(), step_reward(self.seed_now, self.t), last and even,
                last and not even, info)

    def render(self):
        return np.full((16, 16, 3), frame_level(self.seed_now, self.t), np.uint8)
