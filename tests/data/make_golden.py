"""Writes ``tests/data/golden/``: a small dataset logged once and committed, which the reader,
the validator and the resharder must keep reading (``tests/oxe_envlogger/test_golden.py``), so
that a change of the format on disk shows up as a failing test.

Run it again only when the format changes on purpose, and say so in the commit::

    python tests/data/make_golden.py

Two episodes (3 and 2 env steps; one terminated, one truncated) with a float vector, a PNG
camera image, a discrete action component, a language instruction, step metadata and episode
metadata; every value is a function of the episode and step number (:func:`episodes`).
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
from gymnasium import spaces

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
NAME = "golden"

OBSERVATION = spaces.Dict({"state": spaces.Box(-10, 10, (2,), np.float32),
                           "cam": spaces.Box(0, 255, (4, 4, 3), np.uint8)})
ACTION = spaces.Dict({"move": spaces.Box(-1, 1, (2,), np.float32),
                      "grip": spaces.Discrete(2)})
LENGTHS = (3, 2)


def episodes() -> list[dict]:
    """What the dataset holds, episode by episode, as the RLDS steps the reader returns."""
    out = []
    for ep, n in enumerate(LENGTHS):
        obs = [{"state": np.array([ep + t / 4, -t / 8], np.float32),
                "cam": (np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * (t + 1) + ep * 50)
                .astype(np.uint8)} for t in range(n + 1)]
        actions = [{"move": np.array([t / 2 - 0.5, 0.25], np.float32), "grip": t % 2}
                   for t in range(n)]
        out.append({
            "operator": f"operator {ep}",
            "terminated": ep == 0,
            "language_instruction": f"move the block {ep}",
            "observation": obs,
            "action": actions,
            "reward": [float(t) + 0.5 for t in range(n)],
            "speed": [np.float32(t / 10) for t in range(n + 1)],
        })
    return out


def write(directory: str) -> None:
    """Logs :func:`episodes` into ``directory`` (a new dataset) as the golden dataset was."""
    from oxe_envlogger import RLDSLogger, RLDSStepType

    logger = RLDSLogger(OBSERVATION, ACTION, NAME, directory, language_instruction=True,
                        step_metadata_info={"speed": np.float32},
                        episode_metadata_info={"operator": str},
                        description="The golden dataset of oxe_envlogger's tests.",
                        handle_signals=False)
    for episode in episodes():
        n = len(episode["action"])
        logger(None, episode["observation"][0], 0.0, {"speed": episode["speed"][0]},
               step_type=RLDSStepType.RESTART)
        # (set after the RESTART: before it, they would still belong to the last episode)
        logger.set_language_instruction(episode["language_instruction"])
        logger.set_episode_metadata({"operator": episode["operator"]})
        for t in range(n):
            last = t == n - 1
            kind = (RLDSStepType.TRANSITION if not last else RLDSStepType.TERMINATION
                    if episode["terminated"] else RLDSStepType.TRUNCATION)
            logger(episode["action"][t], episode["observation"][t + 1], episode["reward"][t],
                   {"speed": episode["speed"][t + 1]}, step_type=kind)
    logger.close()
    shutil.rmtree(os.path.join(directory, ".oxe"))  # locks and staging: not part of the data


def main() -> None:
    sys.path.insert(0, ROOT)
    if os.path.exists(GOLDEN):
        shutil.rmtree(GOLDEN)
    write(GOLDEN)
    size = sum(os.path.getsize(os.path.join(GOLDEN, f)) for f in os.listdir(GOLDEN))
    print(f"wrote {GOLDEN} ({size} bytes)")


if __name__ == "__main__":
    main()
