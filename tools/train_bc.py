#!/usr/bin/env python3
"""Train a behaviour-cloning policy on logged RLDS datasets.

    python tools/train_bc.py --config=openx_train/configs/bc/reacher_state.py --path=runs/bc
    python tools/train_bc.py --config=openx_train/configs/bc/reacher_state.py --path=runs/bc \\
        --data=logs/reacher,logs/more_reacher --config.steps=2000 --config.batch_size=64

Every config field can be overridden (``--config.model.head.kind=l1``). ``--data`` replaces
the config's datasets with logged dataset directories, one dataset each, mixed by the config's
weights. Rerunning the same command on the same ``--path`` resumes from the latest checkpoint;
SIGTERM/SIGINT save a checkpoint before exiting. The last line printed is one JSON object of the
final metrics.

Several processes (``jax.distributed``): run one command per process with
``--num_processes=N --process_id=I --coordinator_address=HOST:PORT`` (or the env vars
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, ``JAX_COORDINATOR_ADDRESS``).
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A get_config() file (e.g. "
                                "openx_train/configs/bc/reacher_state.py).", lock_config=True)
flags.DEFINE_string("path", None, "The run directory (checkpoints, metrics, config, statistics).")
flags.DEFINE_list("data", None, "Logged dataset directories replacing the config's datasets, "
                  "one dataset each.")
flags.DEFINE_string("name", None, "wandb run name (wandb is used only with --project and when "
                    "installed).")
flags.DEFINE_string("project", None, "wandb project: log the metrics to wandb too.")
flags.DEFINE_enum("wandb_mode", "offline", ["offline", "online", "disabled"], "wandb mode.")
flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator HOST:PORT.")
flags.DEFINE_integer("num_processes", None, "jax.distributed: number of processes.")
flags.DEFINE_integer("process_id", None, "jax.distributed: this process's index.")
flags.DEFINE_string("weights", None, "Domain weights to sample by (a Re-Mix run's "
                    "mixture_weights.json, 'size' or 'uniform'), replacing "
                    "config.data.loader.weights.")
flags.DEFINE_float("data_budget", None, "Keep this fraction of all training frames, each "
                   "domain's share by the weights (water-filling), whole episodes chosen from "
                   "the seed; the kept list goes to PATH/kept_episodes.json.")
flags.mark_flags_as_required(["config", "path"])



def main(argv):
    del argv
    from openx_train.run import quiet_library_logs

    quiet_library_logs()
    from openx_train.remix.final import apply_weights_and_budget
    from openx_train.training import loop

    config = loop.apply_flags(FLAGS.config, data=FLAGS.data, name=FLAGS.name, project=FLAGS.project,
                         wandb_mode=FLAGS.wandb_mode,
                         coordinator_address=FLAGS.coordinator_address,
                         num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    if FLAGS.weights is not None or FLAGS.data_budget is not None:
        config, _ = apply_weights_and_budget(config, FLAGS.path, weights=FLAGS.weights,
                                             data_budget=FLAGS.data_budget)
    result = loop.train(config, FLAGS.path)
    print(loop.report(result), flush=True)


if __name__ == "__main__":
    app.run(main)
