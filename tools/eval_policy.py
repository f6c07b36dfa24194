#!/usr/bin/env python3
"""Evaluate a trained policy (a run of tools/train_bc.py) in a gymnasium env.

    python tools/eval_policy.py --path=runs/bc --env_name=Reacher-v5 --num_episodes=50
    python tools/eval_policy.py --path=runs/cam --env_name=oxe_envlogger/SyntheticCamera-v0 \\
        --num_episodes=20 --video=runs/cam/eval.mp4 --log_dir=logs/eval

Episodes run in a ``gymnasium.vector`` env (a process per sub-env), each reset with
``seed + k``; the policy reads the observations exactly as its training batches were made
(``openx_train.inference.load_policy``), with its history and action chunks. With
``--log_dir=DIR`` the rollouts are logged as RLDS (they can be trained on). The last line of stdout
is one JSON object: return_mean, return_ci95 (half-width of the 95% t-interval), return_std,
success_rate (null where the env reports no success), length_mean, num_episodes, and more.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags
from absl import logging as absl_logging  # noqa: F401  (defines --log_dir)

from oxe_envlogger import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("path", None, "The run directory (the --path of tools/train_bc.py).",
                    required=True)
flags.DEFINE_string("env_name", None, "A gymnasium env id, e.g. Reacher-v5.", required=True)
flags.DEFINE_integer("num_episodes", 50, "Episodes to run.")
flags.DEFINE_integer("num_envs", None, "Sub-envs run in parallel (default: the CPU count).")
flags.DEFINE_integer("seed", 0, "Episode k is reset with seed + k.")
flags.DEFINE_string("dataset", None, "The run's dataset whose keys and statistics the policy "
                    "uses (needed for a mixture normalized per dataset).")
flags.DEFINE_string("which", "latest", "Checkpoint: latest, best or a step number.")
flags.DEFINE_bool("ema", None, "Use the EMA parameters (default: when the run kept them).")
flags.DEFINE_integer("exec_horizon", None, "Actions of each chunk executed before asking the "
                     "policy again (default: the whole chunk).")
flags.DEFINE_float("temporal_ensemble", None, "Temporal ensembling of chunks with this "
                   "exp_weight instead of receding horizon.")
flags.DEFINE_integer("max_episode_steps", None, "Time limit (default: the env's).")
flags.DEFINE_string("env_kwargs", None, "Keyword arguments of gym.make as a JSON object, e.g. "
                    "'{\"image_size\": 64}'.")
flags.DEFINE_string("video", None, "Write the first --video_episodes episodes to this .mp4 or "
                    ".gif file.")
flags.DEFINE_integer("video_episodes", 3, "Episodes in the video.")
# --log_dir (log the rollouts as an RLDS dataset in this directory) is absl.logging's own flag,
# which only names where absl would write log files when asked to (never here): it is read, not
# defined again.
flags.DEFINE_enum("vectorization", "async", ["async", "sync"], "Sub-envs in processes or in "
                  "this one.")
flags.DEFINE_list("baselines", [], "Also evaluate these reference policies on the same episodes "
                  "(scripted: the env's scripted expert; random: random actions) and print the "
                  "returns side by side.")
flags.DEFINE_string("output", None, "Also write the full results (with every episode) to this "
                    "JSON file.")

_BASELINE_NAMES = {"scripted": "scripted expert", "random": "random actions"}


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tqdm import tqdm

    from openx_train.inference import SUMMARY_KEYS, evaluate_baseline, evaluate_run
    from openx_train.run import quiet_library_logs

    quiet_library_logs()

    env_kwargs = None
    if FLAGS.env_kwargs:
        try:
            env_kwargs = json.loads(FLAGS.env_kwargs)
        except ValueError:
            env_kwargs = None
        if not isinstance(env_kwargs, dict):
            print(f"error: --env_kwargs: expected a JSON object, given {FLAGS.env_kwargs!r}",
                  file=sys.stderr)
            sys.exit(1)
    which = int(FLAGS.which) if FLAGS.which.isdigit() else FLAGS.which
    with cli.errors_reported(), tqdm(total=FLAGS.num_episodes, unit="ep", desc="eval",
                                     file=sys.stderr) as bar:
        def on_episode(record):
            bar.update(1)
            bar.set_postfix(ret=f"{record['return']:.2f}")

        results = evaluate_run(
            FLAGS.path, FLAGS.env_name, num_episodes=FLAGS.num_episodes,
            num_envs=FLAGS.num_envs, dataset=FLAGS.dataset, which=which, ema=FLAGS.ema,
            seed=FLAGS.seed, exec_horizon=FLAGS.exec_horizon,
            temporal_ensemble=FLAGS.temporal_ensemble,
            max_episode_steps=FLAGS.max_episode_steps, vectorization=FLAGS.vectorization,
            video_path=FLAGS.video, video_episodes=FLAGS.video_episodes,
            log_dir=FLAGS.log_dir or None, env_kwargs=env_kwargs, on_episode=on_episode)
        baselines = {}
        for name in FLAGS.baselines:
            bar.reset(total=FLAGS.num_episodes)
            bar.set_description(name)
            baselines[name] = evaluate_baseline(
                name, FLAGS.env_name, num_episodes=FLAGS.num_episodes, num_envs=FLAGS.num_envs,
                seed=FLAGS.seed, max_episode_steps=FLAGS.max_episode_steps,
                vectorization=FLAGS.vectorization, env_kwargs=env_kwargs,
                on_episode=on_episode)
    summary = {k: results.get(k) for k in SUMMARY_KEYS}
    if baselines:
        results["baselines"] = baselines
        summary["baselines"] = {n: {k: b[k] for k in ("return_mean", "return_ci95",
                                                      "success_rate", "length_mean")}
                                for n, b in baselines.items()}
        rows = [(f"policy ({FLAGS.path}, step {results['checkpoint_step']})", results)]
        rows += [(_BASELINE_NAMES.get(n, n), b) for n, b in baselines.items()]
        width = max(len(r[0]) for r in rows)
        for label, r in rows:
            success = ("" if r["success_rate"] is None
                       else f", success {100 * r['success_rate']:.0f}%")
            print(f"{label:<{width}}  return {r['return_mean']:8.2f} +- "
                  f"{r['return_ci95'] or 0.0:.2f}{success} ({r['num_episodes']} episodes)")
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(results, f, indent=1)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    cli.run(main)
