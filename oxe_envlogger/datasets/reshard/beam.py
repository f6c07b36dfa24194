"""The resharder as an Apache Beam pipeline: the same stages as :func:`oxe_envlogger.datasets.reshard.reshard`
(and so the same output, byte for byte), distributed by Beam.

::

    input shards ─► Reshuffle ─► scan_shard ─► ToList ─► build_plan ─► shard tasks ─► Reshuffle
        ─► write_shard ─► ToList ─► finalize            (then, in the launching process: move
                                                          the finished directory into place)

Runners come from the usual Beam options: ``--runner=DirectRunner --direct_num_workers=4
--direct_running_mode=multi_processing`` here, ``--runner=DataflowRunner --project=...
--region=... --temp_location=gs://...`` (or Flink/Spark) at cluster scale. The input and output
paths are read and written with POSIX file calls, so on a cluster they must be on a file system
every worker mounts (NFS, Lustre, a gcsfuse/s3fs mount). Beam is imported only here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from oxe_envlogger.datasets.reshard import ReshardReport
from oxe_envlogger.datasets.reshard.inputs import Inputs, discover
from oxe_envlogger.datasets.reshard.options import ReshardOptions
from oxe_envlogger.datasets.reshard.output import (
    check_output,
    commit_output,
    discard_staging,
    finalize,
    make_staging,
)
from oxe_envlogger.datasets.reshard.plan import Plan, ShardTask, build_plan
from oxe_envlogger.datasets.reshard.scan import scan_shard
from oxe_envlogger.datasets.reshard.transform import Transform, make_transform
from oxe_envlogger.datasets.reshard.write import ShardResult, write_shard
from oxe_envlogger.format import layout

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


def _plan(refs: list, inputs: Inputs, options: ReshardOptions, transform: Transform,
          features: dict) -> Plan:
    return build_plan(inputs, refs, options, transform, features)


def _tasks(plan: Plan) -> tuple[ShardTask, ...]:
    return plan.tasks


def _write(task: ShardTask, staging: str, transform: Transform, features: dict,
           options: ReshardOptions) -> ShardResult:
    return write_shard(task, staging, transform=transform, features=features, options=options)


def _finalize(results: list[ShardResult], plan: Plan, staging: str, runner: str) -> int:
    finalize(plan, results, staging, runner)
    return len(results)


def runner_name(pipeline_options) -> str:
    from apache_beam.options.pipeline_options import StandardOptions

    runner = pipeline_options.view_as(StandardOptions).runner or "DirectRunner"
    return runner if isinstance(runner, str) else type(runner).__name__


def reshard_beam(rlds_dirs: Sequence[PathLike], output_dir: PathLike,
                 options: ReshardOptions | None = None, *,
                 beam_args: Sequence[str] | None = None, pipeline_options=None) -> ReshardReport:
    """Runs :func:`oxe_envlogger.datasets.reshard.reshard` as a Beam pipeline.

    Args:
      rlds_dirs, output_dir, options: as for :func:`oxe_envlogger.datasets.reshard.reshard`
        (``options.workers`` does not apply: Beam decides).
      beam_args: Beam command-line options, e.g. ``["--runner=DirectRunner",
        "--direct_num_workers=2", "--direct_running_mode=multi_processing"]``.
      pipeline_options: a ``PipelineOptions`` instead of ``beam_args``.

    Returns:
      The report; the manifest's ``runner`` is ``"beam:<runner>"``.

    Raises:
      ImportError: when apache-beam is not installed.
      The errors of :func:`oxe_envlogger.datasets.reshard.reshard`.
    """
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    options = options or ReshardOptions()
    if pipeline_options is None:
        pipeline_options = PipelineOptions(list(beam_args or []))
    runner = f"beam:{runner_name(pipeline_options)}"
    out = check_output(output_dir, overwrite=options.overwrite)
    # Discovery and the feature check only read JSON files: done here, so that a mismatch is
    # reported before any worker starts.
    inputs = discover(rlds_dirs, output_dir=out, input_splits=options.input_splits,
                      float64=options.float64)
    transform, features = make_transform(inputs.features, options)
    staging = make_staging(out)
    try:
        with beam.Pipeline(options=pipeline_options) as p:
            refs = (p
                    | "InputShards" >> beam.Create(list(inputs.shards))
                    | "SpreadShards" >> beam.Reshuffle()
                    | "Scan" >> beam.FlatMap(scan_shard, transform))
            plan = (refs
                    | "AllRefs" >> beam.combiners.ToList()
                    | "Plan" >> beam.Map(_plan, inputs, options, transform, features))
            results = (plan
                       | "Tasks" >> beam.FlatMap(_tasks)
                       | "SpreadTasks" >> beam.Reshuffle()
                       | "Write" >> beam.Map(_write, staging, transform, features, options))
            _ = (results
                 | "AllResults" >> beam.combiners.ToList()
                 | "Finalize" >> beam.Map(_finalize, beam.pvalue.AsSingleton(plan), staging,
                                          runner))
        if not layout.is_dataset(staging):
            raise RuntimeError(f"the pipeline finished without finalizing {staging}")
        manifest = layout.read_json(os.path.join(staging, layout.RESHARD_MANIFEST))
        commit_output(staging, out, overwrite=options.overwrite, fsync=options.fsync)
    except BaseException:
        discard_staging(staging)
        raise
    splits = manifest["splits"]
    report = ReshardReport(out, manifest, sum(v["episodes"] for v in splits.values()),
                           sum(v["bytes"] for v in splits.values()), len(manifest["skipped"]),
                           len(manifest["sources"]))
    log.info("%s (%s)", report.format(), runner)
    return report
