"""Run a gymnasium env with a random or scripted policy, optionally logging RLDS.

    python run_gym.py --env_name=HalfCheetah-v5 --enable_envlogger    # -> logs/half_cheetah_v5
    python run_gym.py --env_name=HalfCheetah-v5 --render --enable_envlogger \
        --output_dir=logs/half_cheetah_camera                            # + camera images
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from oxe_envlogger import AutoOXEEnvLogger, DatasetExistsError, FeatureMismatchError, SpecError
from oxe_envlogger.datasets.inspection import format_summary, summarize
from oxe_envlogger.envs import make_policy, run_episodes  # registers SyntheticCamera-v0 too
from oxe_envlogger.format.layout import DATASET_INFO, read_json, snake_name

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
flags.DEFINE_integer("shadow_size", None,
                     "MuJoCo shadow map size in pixels with --render (default: 8 x --image_size, "
                     "at least 1024, at most the model's own, 4096). On a CPU renderer the "
                     "model's 4096 costs about 55 ms a frame; 1024 looks the same at 128 px.")
flags.DEFINE_string("image_codec", "png", "png, jpeg, jpeg:<quality> or raw.")
flags.DEFINE_enum("float64", None, ["float32", "exact"], "How float64 values (MuJoCo "
                  "observations, rewards) are stored: float32 (a float list, what every RLDS "
                  "loader reads as numbers) or exact (raw bytes). Default: float32 for a new "
                  "dataset, what an existing one has when appending.")
flags.DEFINE_string("language_instruction", None,
                    "Instruction stored with every episode (else info['language_instruction'] from "
                    "reset, where the env gives one).")
flags.DEFINE_integer("seed", 0, "Seed of the first reset and of the random policy.")
flags.DEFINE_bool("overwrite", False, "Replace an existing dataset in --output_dir.")


def make_env() -> gym.Env:
    kwargs = {}
    if FLAGS.max_episode_steps:
        kwargs["max_episode_steps"] = FLAGS.max_episode_steps
    is_mujoco = FLAGS.render and gym.spec(FLAGS.env_name).entry_point.startswith(
        "gymnasium.envs.mujoco")
    if FLAGS.render:
        kwargs["render_mode"] = "rgb_array"
        if is_mujoco:  # render at the logged size: no larger frame rendered and then resized
            kwargs.update(width=FLAGS.image_size, height=FLAGS.image_size)
    env = gym.make(FLAGS.env_name, **kwargs)
    if is_mujoco:
        # The shadow map is rendered every frame; at the model's 4096x4096 it is most of a CPU
        # renderer's time per frame. Set before the first render, which creates the context.
        quality = env.unwrapped.model.vis.quality
        quality.shadowsize = FLAGS.shadow_size or min(quality.shadowsize,
                                                      max(1024, 8 * FLAGS.image_size))
    if FLAGS.render:
        # The wrapper resets and renders once to learn the image shape; seeded, so that the
        # logged images follow from --seed (MuJoCo's tracking cameras keep an offset from the
        # first frame they render).
        env.reset(seed=FLAGS.seed)
        env = gym.wrappers.AddRenderObservation(env, render_only=False, render_key="image",
                                                obs_key="state")
    return env


def _clash(directory: str, name: str, error: Exception) -> str:
    """One line for a dataset in ``directory`` that this run cannot append to, naming the flags
    that resolve it."""
    existing = (read_json(os.path.join(directory, DATASET_INFO)) or {}).get("name")
    fixes = "pass --overwrite to replace it or another --output_dir"
    if isinstance(error, DatasetExistsError) and existing and existing != name:
        return (f"{directory} already holds dataset {existing!r}, not {name!r}; {fixes} "
                f"(or --dataset_name={existing} to append to it)")
    if isinstance(error, FeatureMismatchError):
        keys = sorted({d.split(":")[0] for d in error.differences})
        return (f"{directory} already holds dataset {existing!r} with other features than this "
                f"run logs (differences in {', '.join(keys)}); {fixes}")
    return f"{error}; {directory} already holds dataset {existing!r}: {fixes}"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    env = make_env()
    policy = make_policy(FLAGS.policy, env, FLAGS.seed)
    limit = FLAGS.max_episode_steps or (env.spec.max_episode_steps if env.spec else None)
    existed = False
    if FLAGS.enable_envlogger:
        name = FLAGS.dataset_name or snake_name(FLAGS.env_name.split("/")[-1])
        directory = os.path.abspath(FLAGS.output_dir or os.path.join("logs", name))
        existed = not FLAGS.overwrite and os.path.exists(os.path.join(directory, DATASET_INFO))
        try:
            env = AutoOXEEnvLogger(env, name, directory, image_codec=FLAGS.image_codec,
                                   float64=FLAGS.float64, overwrite=FLAGS.overwrite)
        except (DatasetExistsError, FeatureMismatchError) as e:
            env.close()
            print(f"error: {_clash(directory, name, e)}", file=sys.stderr)
            return 1
        logging.info("logging to %s", env.directory)
    # A bar over steps, not episodes: a rendered MuJoCo step takes tens of milliseconds on a
    # CPU, so an episode can take a minute, and the time per step is what tells why.
    with env, tqdm(total=FLAGS.num_episodes * limit if limit else None, unit="step") as bar:
        done, last = 0, time.perf_counter()

        def progress(episode):
            nonlocal done, last
            now, done = time.perf_counter(), done + 1
            if limit and episode["steps"] < limit:  # ended early: keep the total (and ETA) honest
                bar.total -= limit - episode["steps"]
            per_step = 1e3 * (now - last) / max(1, episode["steps"])
            bar.set_postfix_str(f"episode {done}/{FLAGS.num_episodes}, return "
                                f"{episode['return']:.1f}, {per_step:.3g} ms/step")
            last = now

        clash = None
        try:
            results = run_episodes(env, FLAGS.num_episodes, policy=policy, seed=FLAGS.seed,
                                   language_instruction=FLAGS.language_instruction,
                                   on_step=bar.update, on_episode=progress)
        except SpecError as e:  # e.g. a language instruction for a dataset logged without one
            if not existed:
                raise
            clash = e
    if clash is not None:  # after the bar has closed, so that the line stands alone
        print(f"error: {_clash(env.directory, name, clash)}", file=sys.stderr)
        return 1
    returns = np.array([r["return"] for r in results])
    line = f"{len(returns)} episodes, mean return {returns.mean():.2f}"
    if len(returns) > 1:  # normal approximation
        line += f" ± {1.96 * returns.std(ddof=1) / np.sqrt(len(returns)):.2f} (95% interval)"
    print(line)
    if FLAGS.enable_envlogger:
        print(format_summary(summarize(env.directory)))


if __name__ == "__main__":
    app.run(main)
