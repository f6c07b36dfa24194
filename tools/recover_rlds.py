#!/usr/bin/env python3
"""Recover RLDS datasets after a crash: commit every durable episode of dead writers.

    python tools/recover_rlds.py logs/half_cheetah [more dirs ...]

Runs oxe_envlogger.datasets.recovery.recover on each directory (idempotent; live writers are left
alone) and prints its report as one JSON line per directory. Every committed shard is checked: a damaged one
is replaced by a shard of its intact records (the original is kept under DIR/quarantine/), and a
lost dataset_info.json is rebuilt from features.json and the shards. Exits 1, naming what, when
something cannot be repaired (e.g. a lost features.json).
"""

from __future__ import annotations

from absl import app

from oxe_envlogger import cli


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        raise app.UsageError("usage: recover_rlds.py DIR [DIR ...]")
    return cli.recover_main(argv[1:])


if __name__ == "__main__":
    cli.run(main)
