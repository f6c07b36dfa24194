#!/usr/bin/env python3
"""Inspect an RLDS dataset directory (ours or any TFDS-layout RLDS dataset).

    python tools/inspect_rlds.py logs/w2                         # the summary
    python tools/inspect_rlds.py logs/w2 --json                  # the summary as JSON
    python tools/inspect_rlds.py logs/w2 --episode 3             # one episode, in numbers
    python tools/inspect_rlds.py logs/w2 --episode 3 --out ep3.mp4   # or .gif: cameras + traces
    python tools/inspect_rlds.py logs/w2 --plot dist.png         # action/state distributions
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags

from oxe_envlogger import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("split", None, "Split to inspect (default: all for the summary and --plot, "
                    "train for --episode).")
flags.DEFINE_bool("json", False, "Print the summary as JSON.")
flags.DEFINE_integer("episode", None, "Index of an episode (in --split) to describe or render.")
flags.DEFINE_string("out", None, "With --episode: write a video, FILE.mp4 or FILE.gif.")
flags.DEFINE_float("fps", 10.0, "Frames per second of --out.")
flags.DEFINE_integer("stride", 1, "With --out: keep every n-th step.")
flags.DEFINE_list("cameras", None, "With --out: the image keys to show (default: all).")
flags.DEFINE_string("plot", None, "Write the action and state distributions to FILE.png.")
flags.DEFINE_integer("max_episodes", None, "With --plot: read at most this many episodes.")


def describe_episode(episode: dict) -> str:
    from oxe_envlogger.datasets.visualize import _flat, camera_keys

    steps = episode["steps"]
    flat = _flat(steps)
    n = len(next(iter(flat.values())))
    lines = [f"{n} steps"]
    for key in ("episode_id", "invalid"):
        if key in episode:
            value = episode[key]
            lines.append(f"  {key}: {value.decode() if isinstance(value, bytes) else value}")
    cams = set(camera_keys(steps))
    with np.printoptions(precision=3, suppress=True, linewidth=160, threshold=20):
        for key, value in flat.items():
            arr = np.asarray(value)
            if key in cams:
                lines.append(f"  steps/{key}: images {arr.shape[1:]} {arr.dtype}")
            elif arr.dtype.kind in "OSU":
                texts = sorted({v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                                for v in arr.reshape(-1)})
                lines.append(f"  steps/{key}: {texts[:5]}")
            elif arr.dtype.kind in "biuf":
                a = arr.reshape(n, -1).astype(np.float64)
                lines.append(f"  steps/{key} {arr.shape[1:]} {arr.dtype}: "
                             f"first {a[0]}, mean {a.mean(0)}, last {a[-1]}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        raise app.UsageError("usage: inspect_rlds.py DIR [--episode K [--out FILE.mp4|.gif]] "
                             "[--plot FILE.png] [--json]")
    directory = argv[1]
    if FLAGS.out and FLAGS.episode is None:
        raise app.UsageError("--out needs --episode")
    if FLAGS.out and os.path.splitext(FLAGS.out)[1].lower() not in (".mp4", ".gif"):
        raise app.UsageError(f"--out: expected FILE.mp4 or FILE.gif, given {FLAGS.out}")
    if FLAGS.plot and not FLAGS.plot.lower().endswith(".png"):
        raise app.UsageError(f"--plot: expected FILE.png, given {FLAGS.plot}")
    from oxe_envlogger.datasets import inspection, visualize

    with cli.errors_reported(IndexError):
        if FLAGS.episode is not None:
            split = FLAGS.split or "train"
            if FLAGS.out:
                result = visualize.render_episode(directory, FLAGS.episode, FLAGS.out,
                                                  split=split, fps=FLAGS.fps,
                                                  cameras=FLAGS.cameras, stride=FLAGS.stride)
                print(f"wrote {result['path']}: {result['frames']} frames "
                      f"{result['width']}x{result['height']}, cameras {result['cameras']}")
            else:
                episode = visualize.load_episode(directory, FLAGS.episode, split=split)
                print(f"{directory} {split}[{FLAGS.episode}]: {describe_episode(episode)}")
        if FLAGS.plot:
            result = visualize.plot_distributions(directory, FLAGS.plot, split=FLAGS.split,
                                                  max_episodes=FLAGS.max_episodes)
            print(f"wrote {result['path']}: {result['episodes']} episodes, keys {result['keys']}")
        if FLAGS.episode is None and not FLAGS.plot:
            summary = inspection.summarize(directory, FLAGS.split)
            print(json.dumps(summary, indent=2, default=str) if FLAGS.json
                  else inspection.format_summary(summary))
    return 0


if __name__ == "__main__":
    cli.run(main)
