"""``python -m oxe_envlogger.datasets.tfds_summary DIR``: read a dataset with tfds and summarise it.

This is the proof that a dataset opens with ``tfds.builder_from_directory`` unchanged; it imports
TensorFlow, so it lives apart from the logging path. Every record of a tfrecord dataset is checked
first (framing and CRCs, without TensorFlow), so that damage anywhere is reported, by file.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from oxe_envlogger import cli
from oxe_envlogger.datasets import inspection
from oxe_envlogger.format import layout


def tfds_summary(directory: str, max_episodes: int = 3) -> str:
    """The dataset as tfds reads it: name, version, splits, features and the first episodes.

    Raises:
      FileNotFoundError, NotADirectoryError: when ``directory`` is not a dataset directory.
      DamagedShardError: when a shard is damaged, naming the file and the damage.
    """
    import tensorflow_datasets as tfds

    layout.check_directory(directory)
    info = layout.read_json(os.path.join(directory, layout.DATASET_INFO))
    if info is None:
        raise layout.no_dataset_error(directory)
    records = None
    if layout.is_tfrecord(info):
        records = layout.verify_records(directory)
    builder = inspection.tfds_builder(directory)
    lines = [f"tfds.builder_from_directory({directory!r}): {builder.info.name} "
             f"{builder.info.version}, splits {dict((k, v.num_examples) for k, v in builder.info.splits.items())}",
             str(builder.info.features)]
    if records is not None:
        lines.insert(1, f"records (framing and CRCs checked): {records}")
    ds = builder.as_dataset(split="train")
    with inspection.tfds_damage_reported(directory):
        for i, episode in enumerate(tfds.as_numpy(ds.take(max_episodes))):
            steps = list(episode["steps"])
            rewards = np.array([s["reward"] for s in steps])
            lines.append(f"episode {i}: id {episode['episode_id'].decode()}, {len(steps)} steps, "
                         f"return {rewards[:-1].sum():.3f}, is_terminal at end {bool(steps[-1]['is_terminal'])}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m oxe_envlogger.datasets.tfds_summary DIR", file=sys.stderr)
        return 2
    with cli.errors_reported():
        print(tfds_summary(argv[1]))
    return 0


if __name__ == "__main__":
    with cli.quiet_broken_pipe():
        sys.exit(main(sys.argv))
