"""``python -m oxe_envlogger.tfds_summary DIR``: read a dataset with tfds and summarise it.

This is the proof that a dataset opens with ``tfds.builder_from_directory`` unchanged; it imports
TensorFlow, so it lives apart from the logging path.
"""

from __future__ import annotations

import sys

import numpy as np


def tfds_summary(directory: str, max_episodes: int = 3) -> str:
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(directory)
    lines = [f"tfds.builder_from_directory({directory!r}): {builder.info.name} "
             f"{builder.info.version}, splits {dict((k, v.num_examples) for k, v in builder.info.splits.items())}",
             str(builder.info.features)]
    ds = builder.as_dataset(split="train")
    for i, episode in enumerate(tfds.as_numpy(ds.take(max_episodes))):
        steps = list(episode["steps"])
        rewards = np.array([s["reward"] for s in steps])
        lines.append(f"episode {i}: id {episode['episode_id'].decode()}, {len(steps)} steps, "
                     f"return {rewards[:-1].sum():.3f}, is_terminal at end {bool(steps[-1]['is_terminal'])}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m oxe_envlogger.tfds_summary DIR", file=sys.stderr)
        return 2
    print(tfds_summary(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
