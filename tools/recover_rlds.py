#!/usr/bin/env python3
"""Recover RLDS datasets after a crash: commit every durable episode of dead writers.

    python tools/recover_rlds.py logs/half_cheetah [more dirs ...]

Runs oxe_envlogger.layout.recover on each directory (idempotent; live writers are left alone) and
prints its report as one JSON line per directory.
"""

from __future__ import annotations

import json
import sys

from absl import app


def main(argv: list[str]) -> int:
    from oxe_envlogger.layout import recover

    if len(argv) < 2:
        raise app.UsageError("usage: recover_rlds.py DIR [DIR ...]")
    status = 0
    for directory in argv[1:]:
        try:
            report = recover(directory)
        except (OSError, ValueError) as e:
            print(f"error: {directory}: {e}", file=sys.stderr)
            status = 1
            continue
        print(json.dumps({"directory": directory, **report}))
    return status


if __name__ == "__main__":
    app.run(main)
