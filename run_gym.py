"""Run a gymnasium env with a random or scripted policy, optionally logging RLDS.

    python run_gym.py --env_name=HalfCheetah-v5 --enable_envlogger --output_dir=logs/half_cheetah
    python run_gym.py --env_name=HalfCheetah-v5 --render --enable_envlogger   # + camera images
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from oxe_envlogger import AutoOXEEnvLogger
from oxe_envlogger.envs import make_policy, run_episodes  # registers SyntheticCamera-v0 too
from oxe_envlogger.inspection import format_summary, summarize
from oxe_envlogger.layout import snake_name

FLAGS = flags.FLAGS
flags.DEFINE_string("env_name", "HalfCheetah-v5", "Any gymnasium env id.")
flags.DEFINE_integer("num_episodes", 5, "Episodes to run.")
flags.DEFINE_integer("max_episode_steps", None, "Time limit per episode (default: the env's).")
flags.DEFINE_bool("enable_envlogger", False, "Log the episodes as RLDS.")
flags.DEFINE_string("output_dir", None, "Dataset directory (default ./logs/<dataset_name>).")
flags.DEFINE_string("dataset_name", None, "TFDS dataset name (default: from --env_name).")
flags.DEFINE_enum("policy", "random", ["random", "scripted"], "Policy to run.")
flags.DEFINE_bool("render", False, "Add camera images (render()) to the observation as 'image'.")
flags.DEFINE_integer("image_size", 128, "Rendered image width and height (MuJoCo envs).")
flags.DEFINE_string("image_codec", "png", "png, jpeg, jpeg:<quality> or raw.")
flags.DEFINE_string("language_instruction", None,
                    "Instruction stored with every episode (else info['language_instruction'] from "
                    "reset, where the env gives one).")
flags.DEFINE_integer("seed", 0, "Seed of the first reset and of the random policy.")
flags.DEFINE_bool("overwrite", False, "Replace an existing dataset in --output_dir.")


def make_env() -> gym.Env:
    kwargs = {}
    if FLAGS.max_episode_steps:
        kwargs["max_episode_steps"] = FLAGS.max_episode_steps
    if FLAGS.render:
        kwargs["render_mode"] = "rgb_array"
        if gym.spec(FLAGS.env_name).entry_point.startswith("gymnasium.envs.mujoco"):
            kwargs.update(width=FLAGS.image_size, height=FLAGS.image_size)
    env = gym.make(FLAGS.env_name, **kwargs)
    if FLAGS.render:
        env = gym.wrappers.AddRenderObservation(env, render_only=False, render_key="image",
                                                obs_key="state")
    return env


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    env = make_env()
    policy = make_policy(FLAGS.policy, env, FLAGS.seed)
    if FLAGS.enable_envlogger:
        name = FLAGS.dataset_name or snake_name(FLAGS.env_name.split("/")[-1])
        env = AutoOXEEnvLogger(env, name, FLAGS.output_dir, image_codec=FLAGS.image_codec,
                               overwrite=FLAGS.overwrite)
        logging.info("logging to %s", env.directory)
    with env, tqdm(total=FLAGS.num_episodes, unit="episode") as bar:

        def progress(episode):
            bar.update(1)
            bar.set_postfix(steps=episode["steps"], ret=f"{episode['return']:.1f}")

        results = run_episodes(env, FLAGS.num_episodes, policy=policy, seed=FLAGS.seed,
                               language_instruction=FLAGS.language_instruction,
                               on_episode=progress)
    returns = [r["return"] for r in results]
    print(f"{len(returns)} episodes, mean return {np.mean(returns):.2f}")
    if FLAGS.enable_envlogger:
        print(format_summary(summarize(env.directory)))


if __name__ == "__main__":
    app.run(main)
