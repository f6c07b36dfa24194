"""Rollout throughput of ``openx_train.eval.evaluate``: env steps per second of the scripted
Reacher-v5 expert in 1, 2 and 4 async sub-envs (and 1 sync), as ratios against a plain
single-env loop (``oxe_envlogger.envs.run_episodes``, run_gym's loop) in the same run; one JSON
line.

    python bench/bench_eval.py                 # 40 episodes (2000 steps) per run, 3 repetitions
    python bench/bench_eval.py --episodes=100 --reps=5

The expert costs about as much as a Reacher step (tens of microseconds each), so the figures
show what the vector env itself costs. The ``mlp_*`` figures repeat the runs with a policy that
also runs a jitted JAX MLP (3 x 512, ReLU) on the observations before acting as the expert (so
the episodes stay the same): a trained policy's cost per call, paid once per step by the plain
loop and once per vector step (for every sub-env together) by ``evaluate``. With JAX loaded,
``evaluate`` starts its sub-envs from a forkserver process, whose start-up (each sub-env imports
gymnasium and MuJoCo afresh) the ``mlp_*_wall_*`` figures include.

Each repetition runs every configuration once, in turn, on the same seeds (so the same
episodes); a ratio is taken within a repetition (drift between repetitions cancels) and the
median over repetitions is reported. ``*_over_plain`` counts the rollout loop only (from the
first reset to the last step, as ``env_steps_per_s`` does; the plain loop's env is made before
its clock starts too); ``*_wall_over_plain`` counts the whole ``evaluate`` call, starting the
sub-env processes included, against the plain loop with its env construction.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gymnasium as gym
import numpy as np

from openx_train.eval import batch_policy, evaluate
from oxe_envlogger.envs import make_policy, run_episodes

ENV = "Reacher-v5"
CONFIGS = {"async1": ("async", 1), "async2": ("async", 2), "async4": ("async", 4),
           "sync1": ("sync", 1)}


def plain(episodes: int, forward=None) -> tuple[float, float, int]:
    """(loop seconds, seconds with the env's construction, steps) of the plain loop."""
    start = time.perf_counter()
    env = gym.make(ENV)
    policy = make_policy("scripted", env)
    if forward is not None:
        policy = behind(forward, policy)
    loop_start = time.perf_counter()
    results = run_episodes(env, episodes, policy=policy, seed=0)
    end = time.perf_counter()
    env.close()
    return end - loop_start, end - start, sum(r["steps"] for r in results)


def mlp_forward():
    """A jitted MLP (3 x 512, ReLU) over Reacher's observations, compiled for batches 1, 2, 4."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    sizes = [10, 512, 512, 512, 2]
    weights = [jax.random.normal(k, (a, b)) / jnp.sqrt(a) for k, a, b in
               zip(keys, sizes[:-1], sizes[1:])]

    @jax.jit
    def forward(x):
        for w in weights[:-1]:
            x = jax.nn.relu(x @ w)
        return x @ weights[-1]

    for n in (1, 2, 4):  # compile every batch size before any clock starts
        forward(np.zeros((n, 10), np.float32)).block_until_ready()
    return forward


def behind(forward, policy):
    """``policy`` called after ``forward`` has run on the same observations."""

    def act(obs, **task):
        forward(np.asarray(obs, np.float32).reshape(-1, 10)).block_until_ready()
        return policy(obs, **task)

    return act


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    expert = batch_policy(make_policy("scripted", gym.make(ENV)))
    evaluate(expert, ENV, num_episodes=2, num_envs=2)  # warm: imports, page cache
    out: dict = {}
    returns = set()
    # JAX is imported only for the second pass: once it is, evaluate starts its sub-envs from
    # a forkserver process (see its `context`), which the *_wall_* figures then include.
    for prefix, make_forward in (("", lambda: None), ("mlp_", mlp_forward)):
        forward = make_forward()
        policy = behind(forward, expert) if forward is not None else expert
        ratios: dict[str, list[float]] = {f"{prefix}{k}{s}": [] for k in CONFIGS
                                          for s in ("_over_plain", "_wall_over_plain")}
        plain_rates = []
        for _ in range(args.reps):
            loop_s, wall_s, steps = plain(args.episodes, forward)
            plain_rates.append(steps / loop_s)
            for name, (vectorization, num_envs) in CONFIGS.items():
                start = time.perf_counter()
                res = evaluate(policy, ENV, num_episodes=args.episodes, num_envs=num_envs,
                               seed=0, vectorization=vectorization)
                wall = time.perf_counter() - start
                assert res["env_steps"] == steps  # the same episodes as the plain loop
                returns.add(res["return_mean"])
                ratios[f"{prefix}{name}_over_plain"].append(
                    res["env_steps_per_s"] / (steps / loop_s))
                ratios[f"{prefix}{name}_wall_over_plain"].append((steps / wall) / (steps / wall_s))
        out[f"{prefix}plain_steps_per_s"] = round(statistics.median(plain_rates))
        out.update({k: round(statistics.median(v), 3) for k, v in ratios.items()})
    print(json.dumps({
        "bench": "eval_rollouts",
        "env": ENV,
        "policy": "scripted expert",
        "episodes": args.episodes,
        "steps_per_run": steps,
        "reps": args.reps,
        "cpus": os.cpu_count(),
        **out,
        "same_returns_every_run": len(returns) == 1,
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
