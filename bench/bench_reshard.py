"""W3: merge and reshard (shared/WORKLOADS.md), as a ratio against copying the same input files
with ``cp`` in the same run, median of repetitions; one JSON line.

    python bench/bench_reshard.py                      # logs the inputs once into bench_out/w3
    python bench/bench_reshard.py --reps=5 --shard_mb=100

Inputs: four W2 datasets (oxe_envlogger/SyntheticCamera-v0, 256x256 + 128x128 cameras, PNG,
10 episodes of 200 steps, reset seeds 0.., 100.., 200.., 300.. and action seeds 0-3), merged
with a byte budget per shard. Each repetition first flushes dirty pages (``sync``, not timed),
then times ``cp -r`` of the four input directories, then the resharder (library call, no
progress bar); outputs are deleted between repetitions, so both start from the same state.
Neither side fsyncs in the headline figure (``cp`` does not); ``--fsync`` times the resharder
with fsync against ``cp`` followed by ``sync``.
Figures: reshard_over_copy = median reshard time / median cp time; episodes and bytes out;
byte_identical = every output episode equals its source record byte for byte. Also the CPU
seconds of each side and the load average: on a shared machine, other processes' load shows in
the wall times of the side that needs more than one core (the resharder's sha256 of every
output shard alone costs about 0.9 CPU-seconds per GB at OpenSSL's speed here).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

os.environ.setdefault("MUJOCO_GL", "egl")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gymnasium as gym

import oxe_envlogger.envs  # noqa: F401
from oxe_envlogger import AutoOXEEnvLogger
from oxe_envlogger.datasets import reshard
from oxe_envlogger.format import layout, record


def make_inputs(root: str, *, datasets: int, episodes: int, steps: int) -> list[str]:
    """Logs the W3 inputs once (kept across runs; a marker file says they are complete)."""
    dirs = []
    for k in range(datasets):
        directory = os.path.join(root, f"w2_seed{k}")
        dirs.append(directory)
        marker = os.path.join(directory, ".complete")
        if os.path.exists(marker):
            continue
        shutil.rmtree(directory, ignore_errors=True)
        env = AutoOXEEnvLogger(gym.make("oxe_envlogger/SyntheticCamera-v0",
                                        max_episode_steps=steps), "w2", directory)
        env.action_space.seed(k)
        for ep in range(episodes):
            _, info = env.reset(seed=100 * k + ep)
            env.set_language_instruction(info["language_instruction"])
            done = False
            while not done:
                _, _, term, trunc, _ = env.step(env.action_space.sample())
                done = term or trunc
        env.close()
        open(marker, "w").close()
    return dirs


def byte_identical(out: str) -> bool:
    """Every output episode equals, byte for byte, the source record the manifest names."""
    manifest = layout.read_json(os.path.join(out, layout.RESHARD_MANIFEST))
    sources = {s["index"]: s["directory"] for s in manifest["sources"]}
    cols = manifest["episode_columns"]
    cache: dict[str, list[bytes]] = {}
    info = layout.read_json(os.path.join(out, layout.DATASET_INFO))
    outputs = {}
    for split in layout.list_splits(info):
        for k, (path, _) in enumerate(layout.shard_paths(out, info, split)):
            outputs[(split, k)] = list(record.read_records(path))
    for row in manifest["episodes"]:
        r = dict(zip(cols, row))
        src = os.path.join(sources[r["source"]], r["source_shard"])
        if src not in cache:
            cache[src] = list(record.read_records(src))
        if r["changes"] or outputs[(r["split"], r["shard"])][r["index"]] != \
                cache[src][r["source_index"]]:
            return False
    return len(manifest["episodes"]) == sum(len(v) for v in outputs.values())


def timed(fn, cpu: list[float] | None = None) -> float:
    """Wall seconds of ``fn()``; appends the CPU seconds of this process (all threads) and of
    its children to ``cpu``."""
    os.sync()
    r0, c0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    r1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    if cpu is not None:
        cpu.append(sum(getattr(b, f) - getattr(a, f) for a, b in ((r0, r1), (c0, c1))
                       for f in ("ru_utime", "ru_stime")))
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench_out/w3")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--datasets", type=int, default=4)
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--shard_mb", type=float, default=200.0)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--fsync", action="store_true", help="fsync the reshard, sync after cp")
    args = p.parse_args()
    root = os.path.abspath(args.out)
    inputs = make_inputs(os.path.join(root, "inputs"), datasets=args.datasets,
                         episodes=args.episodes, steps=args.steps)
    input_bytes = sum(os.path.getsize(os.path.join(d, f)) for d in inputs for f in os.listdir(d)
                      if os.path.isfile(os.path.join(d, f)))
    copy_dir, out_dir = os.path.join(root, "copy"), os.path.join(root, "resharded")
    options = reshard.ReshardOptions(shard_bytes=int(args.shard_mb * 1e6), fsync=args.fsync,
                                     workers=args.workers)

    def cp():
        os.makedirs(copy_dir)
        subprocess.run(["cp", "-r", *inputs, copy_dir], check=True)
        if args.fsync:
            subprocess.run(["sync", "-f", copy_dir], check=True)

    def run():
        return reshard.reshard(inputs, out_dir, options)

    copies, reshards, copy_cpu, reshard_cpu = [], [], [], []
    load = os.getloadavg()[0]
    for _ in range(args.reps):
        shutil.rmtree(copy_dir, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
        copies.append(timed(cp, copy_cpu))
        reshards.append(timed(run, reshard_cpu))
    manifest = layout.read_json(os.path.join(out_dir, layout.RESHARD_MANIFEST))
    splits = manifest["splits"]
    identical = byte_identical(out_dir)
    shutil.rmtree(copy_dir, ignore_errors=True)
    copy_s, reshard_s = statistics.median(copies), statistics.median(reshards)
    print(json.dumps({
        "bench": "W3 merge and reshard",
        "inputs": len(inputs), "input_bytes": input_bytes,
        "shard_bytes": options.shard_bytes, "fsync": args.fsync,
        "copy_s": round(copy_s, 4), "reshard_s": round(reshard_s, 4),
        "reshard_over_copy": round(reshard_s / copy_s, 3),
        "copy_runs_s": [round(t, 4) for t in copies],
        "reshard_runs_s": [round(t, 4) for t in reshards],
        "best_reshard_over_best_copy": round(min(reshards) / min(copies), 3),
        "copy_cpu_s": round(statistics.median(copy_cpu), 3),
        "reshard_cpu_s": round(statistics.median(reshard_cpu), 3),
        "loadavg_before": round(load, 2), "loadavg_after": round(os.getloadavg()[0], 2),
        "reshard_MB_per_s": round(sum(v["bytes"] for v in splits.values()) / reshard_s / 1e6, 1),
        "episodes_out": sum(v["episodes"] for v in splits.values()),
        "bytes_out": sum(v["bytes"] for v in splits.values()),
        "shards_out": sum(len(v["shards"]) for v in splits.values()),
        "byte_identical": identical,
        "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
