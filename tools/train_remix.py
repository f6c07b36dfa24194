#!/usr/bin/env python3
"""Learn data-mixture weights over the domains of logged datasets with Re-Mix (a proxy policy
trained against a reference BC run), for the final BC run to train on.

    python tools/train_remix.py --config=openx_train/configs/remix/reacher_operators.py \\
        --reference=runs/ref --path=runs/remix [--data=DIR,...] [--config.remix.eta=1.0]

The reference is a ``tools/train_bc.py`` run on the same config (same datasets, structure,
normalization and head: a config that differs is refused, every difference listed). Writes
``alpha_<step>.json`` every ``save_freq`` steps, ``mixture_weights.json`` (the average weights,
for ``train_bc.py --weights``) and ``weights.png`` into ``--path``; TensorBoard curves of every
domain's weight and excess loss. ``--data`` and ``--config.x=y`` work as in ``train_bc.py``;
rerunning the same command resumes. The last line printed is one JSON object: the final
metrics, the domains and their weights.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A get_config() file with a remix section "
                                "(e.g. openx_train/configs/remix/reacher_operators.py).",
                                lock_config=True)
flags.DEFINE_string("reference", None, "The reference BC run directory (train_bc.py --path).")
flags.DEFINE_string("path", None, "The Re-Mix run directory.")
flags.DEFINE_list("data", None, "Logged dataset directories replacing the config's datasets, "
                  "one dataset each.")
flags.DEFINE_string("name", None, "wandb run name (with --project, when installed).")
flags.DEFINE_string("project", None, "wandb project: log the metrics to wandb too.")
flags.DEFINE_enum("wandb_mode", "offline", ["offline", "online", "disabled"], "wandb mode.")
flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator HOST:PORT.")
flags.DEFINE_integer("num_processes", None, "jax.distributed: number of processes.")
flags.DEFINE_integer("process_id", None, "jax.distributed: this process's index.")
flags.mark_flags_as_required(["config", "reference", "path"])



def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from openx_train.run import quiet_library_logs

    quiet_library_logs()
    from openx_train.remix.train import train_remix
    from openx_train.training.loop import apply_flags, report

    config = apply_flags(FLAGS.config, data=FLAGS.data, name=FLAGS.name, project=FLAGS.project,
                         wandb_mode=FLAGS.wandb_mode,
                         coordinator_address=FLAGS.coordinator_address,
                         num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    result = train_remix(config, FLAGS.reference, FLAGS.path)
    print(report(result), flush=True)


if __name__ == "__main__":
    app.run(main)
