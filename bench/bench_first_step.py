"""Issue 13's start-up figures for the state config, against a baseline checkout in the same
run: seconds from the command to the end of the first train step, and the command's peak
resident memory, for ``python tools/train_bc.py --config=openx_train/configs/bc/reacher_state.py``
(a short run: ``--config.steps=16``) on 100 scripted Reacher-v5 episodes. Prints one JSON line.

Each repetition runs this tree's command and the baseline's (``--baseline_root``: another
checkout, e.g. ``git worktree add /tmp/base <commit>``; its code is imported through
``PYTHONPATH``), alternately, each on a fresh ``--path`` with its own warm persistent
compilation cache (one unmeasured run primes each cache first) and a cold one (a fresh cache).
Medians over ``--reps``; ratios this / baseline per repetition, then their median.

Usage::

    python bench/bench_first_step.py --baseline_root /tmp/base [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.bench_train_loop import log_reacher  # noqa: E402

CONFIG = "openx_train/configs/bc/reacher_state.py"
SHORT = ["--config.steps=16", "--config.save_freq=16", "--config.log_freq=8",
         "--config.val_freq=0", "--config.optimizer.decay_steps=4000"]


def run(root: str, path: str, data: str, cache: str) -> dict:
    """One ``train_bc.py`` command of the tree at ``root``: seconds to its first step, peak
    RSS (MB, from wait4) and whether it loaded TensorFlow (its log says so)."""
    shutil.rmtree(path, ignore_errors=True)
    cmd = [sys.executable, os.path.join(root, "tools", "train_bc.py"),
           f"--config={os.path.join(root, CONFIG)}", f"--path={path}", f"--data={data}",
           f"--config.compilation_cache={cache}", *SHORT]
    env = {**os.environ, "PYTHONPATH": root, "TF_CPP_MIN_LOG_LEVEL": "0"}
    t0 = time.time()
    with open(path + ".out", "w") as out, open(path + ".err", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=root)
        _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        with open(path + ".err") as f:
            raise RuntimeError(f"train_bc failed ({root}):\n{f.read()[-3000:]}")
    with open(path + ".out") as f:
        result = json.loads(f.read().strip().splitlines()[-1])
    with open(path + ".err") as f:
        tf_loaded = "cpu_feature_guard" in f.read()  # TensorFlow's first log line
    return {"first_step_s": result["first_step_unix"] - t0, "rss_mb": usage.ru_maxrss / 1024,
            "tensorflow": tf_loaded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline_root", required=True)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="bench_first_step_")
    data = log_reacher(os.path.join(work, "reacher100"), 100)
    roots = {"this": ROOT, "baseline": os.path.abspath(args.baseline_root)}
    for name, root in roots.items():  # prime the warm caches
        run(root, os.path.join(work, f"{name}_prime"), data, os.path.join(work, f"xla_{name}"))
    figures: dict = {name: {"cold": [], "warm": [], "rss": [], "tf": []} for name in roots}
    for r in range(args.reps):
        for name, root in roots.items():
            f = figures[name]
            cold = os.path.join(work, f"xla_{name}_cold_{r}")
            res = run(root, os.path.join(work, f"{name}_cold_{r}"), data, cold)
            f["cold"].append(res["first_step_s"])
            res = run(root, os.path.join(work, f"{name}_warm_{r}"), data,
                      os.path.join(work, f"xla_{name}"))
            f["warm"].append(res["first_step_s"])
            f["rss"].append(res["rss_mb"])
            f["tf"].append(res["tensorflow"])
            shutil.rmtree(cold, ignore_errors=True)
    out = {"bench": "first_step", "workload": "W5 state config: tools/train_bc.py to its first "
           "step, 100 scripted Reacher-v5 episodes", "reps": args.reps,
           "load_avg_1m": round(os.getloadavg()[0], 1)}
    for name in roots:
        f = figures[name]
        out[name] = {"first_step_s_cold_cache": round(statistics.median(f["cold"]), 2),
                     "first_step_s_warm_cache": round(statistics.median(f["warm"]), 2),
                     "peak_rss_mb": round(statistics.median(f["rss"]), 1),
                     "loads_tensorflow": any(f["tf"])}
    this, base = figures["this"], figures["baseline"]
    for key in ("cold", "warm", "rss"):
        out[f"{key}_ratio_this_over_baseline"] = round(statistics.median(
            a / b for a, b in zip(this[key], base[key])), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
