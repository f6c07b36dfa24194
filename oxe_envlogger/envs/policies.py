"""Policies for demos and benchmarks: random (seeded) and scripted where an env has one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

Policy = Callable[[Any], Any]


def random_policy(env: gym.Env, seed: int = 0) -> Policy:
    env.action_space.seed(seed)
    return lambda obs: env.action_space.sample()


def _cartpole(obs):
    _, _, angle, velocity = obs
    return int(angle + 0.5 * velocity > 0)


def _pendulum(obs):
    cos, sin, vel = obs
    angle = np.arctan2(sin, cos)
    energy = 0.5 * vel**2 + 10.0 * (cos - 1)
    if cos > 0.9:
        u = -10.0 * angle - 1.0 * vel
    else:
        u = 2.0 * np.sign(vel * cos if vel != 0 else 1.0) * (1 if energy < 0 else -1)
    return np.clip(np.array([u], np.float32), -2.0, 2.0)


def _oscillator(action_space: gym.spaces.Box) -> Policy:
    """An open-loop gait for MuJoCo locomotion: phase-shifted sines per joint."""
    n = action_space.shape[0]
    phases = np.linspace(0, np.pi, n, dtype=np.float32)
    state = {"t": 0}
    low, high = action_space.low, action_space.high

    def act(obs):
        state["t"] += 1
        a = np.sin(0.25 * state["t"] + phases).astype(np.float32)
        return np.clip(a, low, high)

    return act


# Reacher-v5 (gymnasium/envs/mujoco/assets/reacher.xml): the elbow is 0.1 from the shoulder at the
# origin, the fingertip 0.11 from the elbow; each joint is driven by a motor with gear 200 and has
# an armature of 1 and a damping of 1.
_REACHER_LINKS = (0.1, 0.11)
# PD gains on the joint-angle error (per unit of action): after the gear, a stiffness of 60 and a
# damping of 11 on an inertia of about 1, i.e. about 7.7 rad/s and a damping ratio of 0.7. Stiffer
# gains reach the target sooner but pay more in the reward's control cost (sum of squared actions)
# than they save in distance.
_REACHER_KP, _REACHER_KD = 0.3, 0.05


def _wrap(angle):
    return (angle + np.pi) % (2 * np.pi) - np.pi


def reacher_joint_targets(target: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Reacher's joint angles that put the fingertip on a target: closed-form 2-link inverse
    kinematics.

    Args:
      target: the target's (x, y), the shoulder at the origin.
      q: the current (shoulder, elbow) angles; of the two elbow solutions, the one nearer to
        them is taken (the shoulder angle is unwrapped to the turn nearest ``q[0]``).

    Returns:
      (shoulder, elbow) angles. A target out of reach gives the arm stretched towards it (or
      folded, if too near the shoulder).
    """
    l1, l2 = _REACHER_LINKS
    x, y = float(target[0]), float(target[1])
    cos_elbow = np.clip((x * x + y * y - l1 * l1 - l2 * l2) / (2 * l1 * l2), -1.0, 1.0)
    best, best_move = q, np.inf
    for elbow in (np.arccos(cos_elbow), -np.arccos(cos_elbow)):
        shoulder = np.arctan2(y, x) - np.arctan2(l2 * np.sin(elbow), l1 + l2 * np.cos(elbow))
        solution = np.array([q[0] + _wrap(shoulder - q[0]), elbow])
        move = np.abs(solution - q).sum()
        if move < best_move:
            best, best_move = solution, move
    return best


def _reacher(obs):
    # obs: cos q (2), sin q (2), target x y, joint velocities (2), fingertip - target x y; a dict
    # when run_gym --render added the camera image beside it as "state".
    s = obs["state"] if isinstance(obs, dict) else obs
    q = np.arctan2(s[2:4], s[0:2])
    error = reacher_joint_targets(s[4:6], q) - q
    return np.clip(_REACHER_KP * error - _REACHER_KD * s[6:8], -1.0, 1.0).astype(np.float32)


def _synthetic_camera(obs):
    s = obs["state"]
    gripper, opened, obj, target = s[:3], s[3], s[4:6], s[6:8]
    a = np.zeros(7, np.float32)
    held = np.linalg.norm(gripper[:2] - obj) < 0.02 and opened < 0.5
    goal = np.array([*target, 0.05]) if held else np.array([*obj, 0.05])
    a[:3] = np.clip((goal - gripper) * 10.0, -1, 1)
    close_enough = np.linalg.norm(gripper[:2] - obj) < 0.04 and gripper[2] < 0.1
    at_target = held and np.linalg.norm(gripper[:2] - target) < 0.03
    a[6] = -1.0 if (close_enough or held) and not at_target else 1.0
    return a


def make_policy(name: str, env: gym.Env, seed: int = 0) -> Policy:
    """``"random"`` or ``"scripted"`` (CartPole, Pendulum, Reacher, MuJoCo locomotion,
    SyntheticCamera).

    Raises:
      ValueError: for an unknown policy, or ``"scripted"`` on an env without one.
    """
    if name == "random":
        return random_policy(env, seed)
    if name != "scripted":
        raise ValueError(f"policy: expected 'random' or 'scripted', given {name!r}")
    env_id = env.spec.id if env.spec is not None else ""
    if env_id.startswith("CartPole"):
        return _cartpole
    if env_id.startswith("Pendulum"):
        return _pendulum
    if env_id.startswith("Reacher"):
        return _reacher
    if "SyntheticCamera" in env_id:
        return _synthetic_camera
    if isinstance(env.action_space, gym.spaces.Box) and any(
            k in env_id for k in ("Cheetah", "Ant", "Hopper", "Walker", "Swimmer", "Humanoid")):
        return _oscillator(env.action_space)
    raise ValueError(f"policy: no scripted policy for {env_id!r}; use --policy=random")


def run_episodes(env: gym.Env, num_episodes: int, *, policy: Policy | None = None, seed: int = 0,
                 max_steps: int | None = None, language_instruction: str | None = None,
                 on_episode: Callable[[dict[str, Any]], None] | None = None,
                 on_step: Callable[[], Any] | None = None) -> list[dict[str, Any]]:
    """Runs ``num_episodes`` episodes, resetting with seeds ``seed``, ``seed + 1``, ...

    A logger's language instruction is ``language_instruction`` if given, else
    ``info["language_instruction"]`` from reset where the env gives one. ``max_steps`` cuts episodes short (a logger then keeps the last one as invalid at
    close). ``on_step()`` is called after every step (a progress bar's ``update``).
    Returns ``{"steps", "return", "terminated"}`` per episode.
    """
    policy = policy or random_policy(env, seed)
    results = []
    for ep in range(num_episodes):
        obs, info = env.reset(seed=seed + ep)
        instruction = language_instruction or (
            info.get("language_instruction") if isinstance(info, dict) else None)
        if instruction is not None and hasattr(env, "set_language_instruction"):
            env.set_language_instruction(instruction)
        total, steps, done, terminated = 0.0, 0, False, False
        while not done:
            obs, reward, terminated, truncated, info = env.step(policy(obs))
            total += float(reward)
            steps += 1
            if on_step is not None:
                on_step()
            done = terminated or truncated or (max_steps is not None and steps >= max_steps)
        results.append({"steps": steps, "return": total, "terminated": bool(terminated)})
        if on_episode is not None:
            on_episode(results[-1])
    return results
