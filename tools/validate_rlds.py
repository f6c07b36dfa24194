#!/usr/bin/env python3
"""Validate RLDS dataset directories (see oxe_envlogger/validate.py for what is checked).

    python tools/validate_rlds.py logs/half_cheetah [more dirs ...] [--decode_images] [--json]

Exits 0 when every dataset is sound, 1 when any has an error (2 for bad usage). Warnings (a live
writer, a missing statistics.json, ...) do not fail unless --strict.
"""

from __future__ import annotations

import json

from absl import app, flags

from oxe_envlogger import cli

FLAGS = flags.FLAGS
flags.DEFINE_bool("decode_images", False, "Decode every image (slow) instead of checking its "
                  "header and size.")
flags.DEFINE_bool("json", False, "Print one JSON report per dataset instead of text.")
flags.DEFINE_bool("strict", False, "Fail on warnings too.")
flags.DEFINE_integer("max_issues", 20, "Issues listed per kind of check (the rest are counted).")


def main(argv: list[str]) -> int:
    from oxe_envlogger.datasets.validate import validate

    if len(argv) < 2:
        raise app.UsageError("usage: validate_rlds.py DIR [DIR ...]")
    failed = False
    for directory in argv[1:]:
        report = validate(directory, decode_images=FLAGS.decode_images,
                          max_per_check=FLAGS.max_issues)
        print(json.dumps(report.to_json()) if FLAGS.json else report.format())
        failed |= not report.ok or (FLAGS.strict and report.num_warnings > 0)
    return 1 if failed else 0


if __name__ == "__main__":
    cli.run(main)
