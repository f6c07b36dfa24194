#!/usr/bin/env python3
"""Merge, filter, relabel, split and reshard RLDS datasets (see oxe_envlogger/datasets/reshard/).

    python tools/reshard_rlds.py --rlds_dirs logs/run1 logs/run2 --output_rlds merged
    python tools/reshard_rlds.py --rlds_dirs logs --output_rlds merged --overwrite \\
        --skip_eps_indices 4 5 --drop_invalid --shard_bytes 200MB --validation_fraction 0.05 \\
        --relabel_lang_map labels.json --rename_features steps/observation/image=steps/observation/image_0
    # The same as an Apache Beam pipeline; any other --flag goes to Beam:
    python tools/reshard_rlds.py --rlds_dirs logs --output_rlds merged --runner=DirectRunner \\
        --direct_num_workers=2 --direct_running_mode=multi_processing
    # float64 features stored exactly (raw bytes) as float lists, which loaders that skip tfds'
    # decoding (Open X-Embodiment, Octo) read as numbers; --float64=exact converts back:
    python tools/reshard_rlds.py --rlds_dirs logs/old --output_rlds logs/old_f32 --float64=float32

Episodes that pass unchanged are copied as serialized records (no decoding, no TensorFlow).
The output appears only when complete; ``reshard_manifest.json`` in it maps every output episode
to its source.
"""

from __future__ import annotations

import re
import sys

from absl import app, flags, logging

from oxe_envlogger import cli

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("rlds_dirs", None, "Input directories, searched recursively for "
                          "datasets: --rlds_dirs A B or --rlds_dirs=A --rlds_dirs=B.",
                          required=True)
flags.DEFINE_string("output_rlds", None, "Output dataset directory.", required=True)
flags.DEFINE_bool("overwrite", False, "Replace a dataset at --output_rlds.")
flags.DEFINE_multi_string("skip_eps_indices", [], "Indices (in the merged input order, as in "
                          "the manifest's global_index) of episodes to leave out: 4 5 or 4,5.")
flags.DEFINE_integer("shard_size", None, "At most this many episodes per output shard.")
flags.DEFINE_string("shard_bytes", "200MB", "Byte budget per output shard, e.g. 200MB, 1GiB.")
flags.DEFINE_string("relabel_lang", None, "New language instruction for every episode.")
flags.DEFINE_string("relabel_lang_map", None, "File mapping episode ids or global indices to "
                    "instructions: a JSON object, JSON lines, or 'key<TAB>instruction' lines.")
flags.DEFINE_string("language_key", "steps/language_instruction",
                    "Feature holding the instruction (added if missing).")
flags.DEFINE_bool("drop_invalid", False, "Leave out episodes flagged invalid.")
flags.DEFINE_float("validation_fraction", 0.0, "Fraction of episodes for the validation split.")
flags.DEFINE_string("validation_split", "val", "Name of the validation split.")
flags.DEFINE_integer("split_seed", 0, "Seed of the validation choice.")
flags.DEFINE_multi_string("rename_features", [], "OLD=NEW feature path, e.g. "
                          "steps/observation/image=steps/observation/image_0 (repeatable).")
flags.DEFINE_multi_string("drop_features", [], "Feature path to remove (repeatable).")
flags.DEFINE_enum("float64", None, ["float32", "exact"], "Convert every float64 feature: "
                  "'float32' stores it as a float list (rounded to float32; what loaders that "
                  "skip tfds' decoding read as numbers), 'exact' as raw float64 bytes (exact "
                  "where the input was; float32-stored values are widened). Default: as stored.")
flags.DEFINE_list("input_splits", None, "Splits read from the inputs (default: all).")
flags.DEFINE_string("dataset_name", None, "Output TFDS name (default: the first input's).")
flags.DEFINE_integer("workers", None, "Threads writing shards (single-process mode).")
flags.DEFINE_bool("verify", True, "Check the CRC of every copied record.")
flags.DEFINE_bool("fsync", True, "fsync the output before moving it into place.")
flags.DEFINE_string("runner", None, "Run as an Apache Beam pipeline on this runner "
                    "(DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, ...); unknown "
                    "--flags go to Beam.")

# Flags that, as in the original tool, take several space-separated values.
_NARGS = ("rlds_dirs", "skip_eps_indices")
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def expand_nargs(argv: list[str]) -> list[str]:
    """``--rlds_dirs A B --x`` -> ``--rlds_dirs=A --rlds_dirs=B --x``."""
    out, i = [argv[0]], 1
    while i < len(argv):
        arg = argv[i]
        name = arg[2:] if arg.startswith("--") else None
        if name in _NARGS:
            i += 1
            while i < len(argv) and not argv[i].startswith("-"):
                out.append(f"--{name}={argv[i]}")
                i += 1
            continue
        out.append(arg)
        i += 1
    return out


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing that leaves unknown --flags to Beam (checked in main)."""
    return FLAGS(expand_nargs(argv), known_only=True)


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.e+]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise app.UsageError(f"--shard_bytes: expected a size like 200MB or 1GiB, given {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_indices(values: list[str]) -> tuple[int, ...]:
    out = []
    for v in values:
        for part in v.split(","):
            if part.strip():
                if not part.strip().isdigit():
                    raise app.UsageError(f"--skip_eps_indices: expected indices >= 0, given {part!r}")
                out.append(int(part))
    return tuple(out)


def parse_renames(values: list[str]) -> dict[str, str]:
    out = {}
    for v in values:
        old, sep, new = v.partition("=")
        if not sep or not old or not new:
            raise app.UsageError(f"--rename_features: expected OLD=NEW, given {v!r}")
        out[old.strip("/")] = new.strip("/")
    return out


class TqdmProgress:
    """Episodes and MB/s on a tqdm bar."""

    def __init__(self):
        self.bar = None
        self.episodes = self.total = 0

    def start(self, episodes: int, num_bytes: int) -> None:
        from tqdm import tqdm

        self.total = episodes
        self.bar = tqdm(total=num_bytes, unit="B", unit_scale=True, desc="reshard",
                        dynamic_ncols=True)

    def update(self, episodes: int, num_bytes: int) -> None:
        self.episodes += episodes
        self.bar.set_postfix_str(f"{self.episodes}/{self.total} episodes", refresh=False)
        self.bar.update(num_bytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: list[str]) -> int:
    from oxe_envlogger.datasets import reshard

    extra = argv[1:]
    if extra and not FLAGS.runner:
        raise app.UsageError(f"unknown arguments {extra} (Beam options need --runner)")
    language_map = None
    if FLAGS.relabel_lang_map:
        try:
            language_map = reshard.load_language_map(FLAGS.relabel_lang_map)
        except (OSError, ValueError) as e:
            raise app.UsageError(f"--relabel_lang_map: {e}") from e
    try:
        options = reshard.ReshardOptions(
            dataset_name=FLAGS.dataset_name, shard_bytes=parse_size(FLAGS.shard_bytes),
            shard_episodes=FLAGS.shard_size,
            skip_episodes=parse_indices(FLAGS.skip_eps_indices), drop_invalid=FLAGS.drop_invalid,
            relabel_language=FLAGS.relabel_lang, language_map=language_map,
            language_key=FLAGS.language_key.strip("/"),
            validation_fraction=FLAGS.validation_fraction,
            validation_split=FLAGS.validation_split, split_seed=FLAGS.split_seed,
            rename_features=parse_renames(FLAGS.rename_features),
            drop_features=tuple(p.strip("/") for p in FLAGS.drop_features),
            float64=FLAGS.float64,
            input_splits=tuple(FLAGS.input_splits) if FLAGS.input_splits else None,
            overwrite=FLAGS.overwrite, verify=FLAGS.verify, fsync=FLAGS.fsync,
            workers=FLAGS.workers)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    with cli.errors_reported():
        if FLAGS.runner:
            try:
                import apache_beam  # noqa: F401
            except ImportError as e:
                print(f"error: --runner needs Apache Beam (pip install apache-beam): {e}",
                      file=sys.stderr)
                return 2
            from oxe_envlogger.datasets.reshard import beam

            try:
                report = beam.reshard_beam(FLAGS.rlds_dirs, FLAGS.output_rlds, options,
                                           beam_args=[f"--runner={FLAGS.runner}", *extra])
            except RuntimeError as e:  # Beam wraps a worker's error, with its traceback
                print(f"error: the pipeline failed: {e}", file=sys.stderr)
                return 1
        else:
            report = reshard.reshard(FLAGS.rlds_dirs, FLAGS.output_rlds, options,
                                     progress=TqdmProgress())
    print(report.format())
    return 0


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    cli.run(main, flags_parser=parse_flags)
