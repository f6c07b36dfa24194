"""Do the cameras matter? The camera BC config on the synthetic camera task with the block's and
the target's positions removed from the state, against the same config without cameras.

``oxe_envlogger/SyntheticCamera-v0``'s state holds the gripper (``state[0:4]``) and the block's
and target's positions (``state[4:8]``): with its full state a policy can ignore its cameras.
Here :class:`HideObjects` zeroes ``state[4:8]``, so only the images say where the block is
(placed at random each episode), and the images or the instruction where the target is (the
instruction names one of three fixed targets). The scripted expert acts on the true state while
the logger records the hidden one.

Two policies are trained on the same logged episodes with ``configs/bc/synthetic_camera.py``
(small CNNs per camera with spatial softmax, hashed-token language by FiLM, MSE head):
``cameras`` as shipped, and ``no_cameras``, its structure without images (the same trunk, state
and language only). Each is rolled out on the same new episodes (reset seeds from
``--eval_seed``) through the same wrapper, the instruction taken from the env's reset info::

    python -m openx_train.experiments.camera_images --path=runs/camera_images \\
        [--episodes=100] [--steps=3000] [--eval_episodes=50] [--seed=0]

writes ``data/`` (the logged dataset), ``cameras/`` and ``no_cameras/`` (the runs),
``cameras.mp4`` (the first evaluation episodes of the camera policy), ``results.json`` and
``results.png`` (success rates with 95% Wilson intervals), and prints ``results.json`` as one
JSON line. A rerun resumes the training runs and reuses the data.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np

from oxe_envlogger import AutoOXEEnvLogger
from oxe_envlogger.envs import ENV_ID, make_policy, run_episodes

log = logging.getLogger(__name__)

HIDDEN = slice(4, 8)  # the block's and the target's positions


class HideObjects(gym.ObservationWrapper):
    """The synthetic camera task with the block's and the target's positions (``state[4:8]``)
    zeroed: the cameras show them, the state does not."""

    def observation(self, observation: Mapping[str, Any]) -> dict[str, Any]:
        state = np.array(observation["state"], copy=True)
        state[HIDDEN] = 0.0
        return {**observation, "state": state}


def make_env(**kwargs: Any) -> gym.Env:
    """``SyntheticCamera-v0`` (default sizes: the config resizes) behind :class:`HideObjects`."""
    return HideObjects(gym.make(ENV_ID, **kwargs))


def collect(directory: str, episodes: int, *, seed: int = 0) -> dict[str, float]:
    """Logs ``episodes`` scripted episodes of :func:`make_env` (the expert sees the true
    state); returns the expert's success rate and mean return over them."""
    if os.path.exists(os.path.join(directory, "dataset_info.json")):
        with open(os.path.join(directory, "expert.json")) as f:
            return json.load(f)
    env = AutoOXEEnvLogger(make_env(), "camera_hidden_objects", directory)
    expert = make_policy("scripted", env)

    def act(observation):
        inner = env.unwrapped
        state = np.array(observation["state"], copy=True)
        state[4:6], state[6:8] = inner._object, inner._target
        return expert({**observation, "state": state})

    with env:
        results = run_episodes(env, episodes, policy=act, seed=seed * 1_000_000)
    out = {"success_rate": float(np.mean([r["terminated"] for r in results])),
           "return_mean": float(np.mean([r["return"] for r in results])),
           "episodes": len(results)}
    with open(os.path.join(directory, "expert.json"), "w") as f:
        json.dump(out, f)
    return out


def config(data: str, *, cameras: bool, steps: int, seed: int):
    """``configs/bc/synthetic_camera.py`` on ``data``; without its images when not
    ``cameras``."""
    base = importlib.import_module("openx_train.configs.bc.synthetic_camera").get_config()
    structure = dict(base.data.structure)
    if not cameras:
        structure.pop("images")
    base.data.structure = structure
    base.data.datasets = [{"path": data}]
    base.steps = steps
    base.optimizer.warmup_steps = min(base.optimizer.warmup_steps, steps // 10)  # short runs
    base.seed = seed
    return base


def run(path: str, *, episodes: int = 100, steps: int = 3000, eval_episodes: int = 50,
        seed: int = 0, eval_seed: int = 10_000, num_envs: int = 2) -> dict[str, Any]:
    """Collects, trains both policies, evaluates them; returns (and writes) the results."""
    from openx_train.eval import TaskInput, evaluate
    from openx_train.inference import load_policy
    from openx_train.training import loop

    os.makedirs(path, exist_ok=True)
    data = os.path.join(path, "data")
    expert = collect(data, episodes, seed=seed)
    results: dict[str, Any] = {"expert": expert, "episodes": episodes, "steps": steps,
                               "seed": seed, "eval_seed": eval_seed}
    for name, cameras in (("cameras", True), ("no_cameras", False)):
        run_dir = os.path.join(path, name)
        trained = loop.train(config(data, cameras=cameras, steps=steps, seed=seed), run_dir)
        policy = load_policy(run_dir)
        video = os.path.join(path, f"{name}.mp4") if cameras else None
        res = evaluate(policy, make_env, num_episodes=eval_episodes, num_envs=num_envs,
                       seed=eval_seed, vectorization="sync",
                       instruction=TaskInput(info_key="language_instruction"),
                       video_path=video, **policy.rollout_options())
        successes = round(res["success_rate"] * eval_episodes)
        lo, hi = res["success_ci95"]
        results[name] = {"success_rate": res["success_rate"], "success_ci95": [lo, hi],
                         "return_mean": res["return_mean"], "return_ci95": res["return_ci95"],
                         "length_mean": res["length_mean"], "num_episodes": eval_episodes,
                         "val_loss": trained.get("val_loss"),
                         "steps_per_sec": trained.get("steps_per_sec")}
        log.warning("%s: success %d/%d (95%% Wilson [%.2f, %.2f]), return %.2f +- %.2f", name,
                    successes, eval_episodes, lo, hi, res["return_mean"], res["return_ci95"])
    with open(os.path.join(path, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(path, "results.png"))
    return results


def plot(results: Mapping[str, Any], out: str) -> None:
    """Success rates with their 95% intervals (the expert's as a line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["cameras", "no_cameras"]
    rates = [results[n]["success_rate"] for n in names]
    lo = [r - results[n]["success_ci95"][0] for n, r in zip(names, rates)]
    hi = [results[n]["success_ci95"][1] - r for n, r in zip(names, rates)]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(["with cameras", "without cameras"], rates, yerr=[lo, hi], capsize=6,
           color=["tab:blue", "tab:gray"])
    ax.axhline(results["expert"]["success_rate"], color="tab:green", ls="--",
               label="scripted expert (sees the true state)")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"success rate ({results['cameras']['num_episodes']} episodes, 95% CI)")
    ax.set_title("Synthetic camera task, block and target hidden from the state", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--path", required=True)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--eval_episodes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = run(args.path, episodes=args.episodes, steps=args.steps,
                  eval_episodes=args.eval_episodes, seed=args.seed)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
