"""W5 against the OpenX/Re-Mix trainer in the same run: state BC on Reacher-v5, ours
(``tools/train_bc.py``) and theirs (jhejna/openx ``scripts/train_bc.py``), alternating. Prints
one JSON line.

Both trainers fit the same model to the same 100 scripted Reacher-v5 episodes logged by our
SDK (``log_reacher`` of ``bench/bench_train_loop.py``): one 10-dim state observation, one
2-dim action, an MLP 512x512x512 trunk, a 48-bin uniformly discretized action head, batch 256,
AdamW (weight decay 1e-4 on the kernels, gradients clipped at norm 1, learning rate warmed up
from 0 to 1e-3 over 200 steps, then cosine to 1e-6), 5% of the episodes held out, no
validation and no evaluation during training, one checkpoint at the end. Ours runs
``openx_train/configs/bc/reacher_state.py --config.model.head.kind=discrete`` (the flags of
``bench_train_loop``); theirs runs a config this script writes into its work directory at run
time (``OPENX_CONFIG`` below) with a small transform module beside it (``OPENX_TRANSFORM``,
found through ``PYTHONPATH``) that maps our RLDS steps to their structure: the observation as
their ``state`` (``MISC``, Gaussian normalization), the action as ``desired_absolute``
(``MISC``, bounds normalization to [-1, 1], which their discrete head bins). This script does
not import their code; it runs their trainer with their interpreter as a subprocess.

Per trainer and repetition (the order of the two alternates between repetitions):

* ``steps_per_s``: the steady state, the median over the log intervals after the first (the
  first holds the compile). Ours: ``steps_per_sec`` of ``metrics.csv``. Theirs: their loop
  writes no per-interval timing, so this script timestamps their tqdm progress (``n/total``
  on stderr, flushed by tqdm at each refresh, about every 0.1 s) as it arrives, interpolates
  the time at each multiple of ``--log_freq`` and takes the same median; their last interval
  ends at the last progress update before the final step (that update comes after their
  checkpoint save).
* ``first_step_s``: from starting the command to the end of the first train step. Ours: the
  ``first_step_unix`` it reports. Theirs: the arrival of the first ``1/N`` progress update
  (JAX 0.4.26 runs CPU computations synchronously, so the step has finished). Both with a
  cold persistent compilation cache: ours gets a fresh ``--config.compilation_cache``, theirs
  a fresh ``HOME`` (their script hard-codes ``~/.jax_compilation_cache``). Their config
  recomputes the dataset statistics at start (``recompute_statistics=True``,
  ``save_statistics=False``: their trainer cannot read our ``statistics.json`` and would
  otherwise write its cache into our dataset directory); ours reads the logger's.
* ``peak_rss_mb``: the peak of the summed resident memory of the process tree, sampled every
  0.1 s with psutil, and ``ru_maxrss`` of the child from ``wait4``.

``ours_over_openx``: the median over repetitions of the per-repetition ratios ours/theirs
(steps/s: higher is better; first step and RSS: lower is better).

Their trainer runs with ``WANDB_DISABLED=true``, which wandb 0.17 honours by running offline
(no network, no account; its files go to the run's fresh ``HOME``) although their script calls
``wandb.init(mode="online")``: newer wandb (0.28 here) lets that argument win over
``WANDB_MODE=disabled`` and then asks for an API key. Also
``PYTHONUNBUFFERED=1``, ``TF_CPP_MIN_LOG_LEVEL=2``. Nothing of theirs is patched.

Setup of their trainer (outside this repository, once; Python 3.11; only the package
registries are needed)::

    mkdir -p /work/openx_baseline/openx
    git -C <snapshot of github.com/jhejna/openx> archive HEAD | tar -x -C /work/openx_baseline/openx
    python3 -m venv /work/openx_baseline/.venv
    /work/openx_baseline/.venv/bin/pip install "tensorflow==2.15.0" \\
        "tensorflow_datasets==4.9.4" "tensorflow_probability==0.23.0" "jax[cpu]==0.4.26" \\
        "jaxlib==0.4.26" "flax==0.8.2" "optax==0.2.1" "distrax==0.1.5" numpy scipy gymnasium \\
        ml_collections absl-py tqdm scikit-learn psutil
    # pip's newest tensorflow-metadata needs protobuf 5, which TF 2.15 does not allow; wandb
    # 0.17 (their code's time) runs offline under WANDB_DISABLED (see above):
    /work/openx_baseline/.venv/bin/pip install "tensorflow-metadata==1.15.0" "wandb==0.17.9"
    /work/openx_baseline/.venv/bin/pip install --no-deps -e /work/openx_baseline/openx

(robosuite, robomimic and torch are not needed: no evaluation env runs.)

Usage::

    python bench/bench_openx_baseline.py --openx_root /work/openx_baseline/openx \\
        --openx_python /work/openx_baseline/.venv/bin/python [--reps 3] [--steps 1000] \\
        [--log_freq 200] [--work DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.bench_train_loop import (  # noqa: E402
    STATE_CONFIG,
    _head_overrides,
    _interval_figures,
    log_reacher,
    train_bc_command,
)

HEAD = "discrete"  # the 48-bin head of the OpenX figures

# Their config: a get_config() for jhejna/openx scripts/train_bc.py (ModuleSpec trees of
# their classes). Filled with str.format: {data}, {steps}, {log_freq}, {never}.
OPENX_CONFIG = '''"""Reacher-v5 state BC for jhejna/openx scripts/train_bc.py (written at run time by
oxe_envlogger's bench/bench_openx_baseline.py): MLP 512x512x512, 48-bin discrete head,
batch 256, one observation, one action, no images, no validation or evaluation."""

import optax
from ml_collections import ConfigDict

from openx.data.utils import NormalizationType, StateEncoding
from openx.networks.action_heads import DiscreteActionHead
from openx.networks.core import Model
from openx.networks.mlp import MLP, Concatenate
from openx.utils.spec import ModuleSpec


def get_config():
    structure = {{
        "observation": {{"state": {{StateEncoding.MISC: NormalizationType.GAUSSIAN}}}},
        "action": {{"desired_absolute": {{StateEncoding.MISC: NormalizationType.BOUNDS}}}},
    }}
    dataloader = dict(
        datasets=dict(
            reacher=dict(
                path={data!r},
                train_split="train[:95%]",
                transform=ModuleSpec.create("oxe_reacher_transform:reacher_to_openx"),
            ),
        ),
        n_obs=1,
        n_action=1,
        augment_kwargs=dict(),
        chunk_img=True,
        goal_conditioned=False,
        batch_size=256,
        recompute_statistics=True,
        save_statistics=False,
    )
    model = ModuleSpec.create(
        Model,
        encoders={{"observation->state": None}},
        trunk=ModuleSpec.create(Concatenate, flatten_time=True),
        action_head=ModuleSpec.create(
            DiscreteActionHead,
            model=ModuleSpec.create(MLP, hidden_dims=(512, 512, 512), activate_final=True),
            n_action_bins=48,
            bin_type="uniform",
        ),
    )
    lr_schedule = ModuleSpec.create(
        optax.warmup_cosine_decay_schedule,
        init_value=0.0,
        peak_value=1e-3,
        warmup_steps=200,
        decay_steps={steps},
        end_value=1e-6,
    )
    optimizer = ModuleSpec.create(optax.adamw, weight_decay=1e-4)
    return ConfigDict(
        dict(
            structure=structure,
            model=model,
            dataloader=dataloader,
            optimizer=optimizer,
            lr_schedule=lr_schedule,
            clip_gradient=1.0,
            steps={steps},
            log_freq={log_freq},
            val_freq={never},
            eval_freq={never},
            save_freq={steps},
            val_steps=0,
            n_eval_proc=0,
            eval_ep=0,
            seed=0,
        )
    )
'''

# Our RLDS steps (observation: float64 [T, 10], action: float32 [T, 2]) in their structure;
# float32 because their normalization and statistics are float32.
OPENX_TRANSFORM = '''"""Maps oxe_envlogger's Reacher-v5 RLDS steps to jhejna/openx's structure."""

import tensorflow as tf

from openx.data.utils import StateEncoding


def reacher_to_openx(ep):
    return {
        "observation": {"state": {StateEncoding.MISC: tf.cast(ep["observation"], tf.float32)}},
        "action": {"desired_absolute": {StateEncoding.MISC: tf.cast(ep["action"], tf.float32)}},
        "is_first": ep["is_first"],
        "is_last": ep["is_last"],
        "is_terminal": ep["is_terminal"],
        "ep_len": ep["ep_len"],
        "ep_idx": ep["ep_idx"],
        "step_idx": ep["step_idx"],
    }
'''

_PROGRESS = re.compile(rb"(\d+)/(\d+) \[")
_LINE_BREAK = re.compile(rb"[\r\n]")


class Run:
    """A subprocess whose output is read as it arrives (each chunk timestamped) and whose
    process tree's resident memory is polled until it exits."""

    def __init__(self, cmd: list[str], *, env: dict | None = None, cwd: str | None = None):
        import psutil

        self.t0 = time.time()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=env, cwd=cwd)
        self.chunks: list[tuple[float, bytes]] = []
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        root = psutil.Process(self.proc.pid)
        self.peak_tree_rss = 0
        while True:
            # wait4 (not Popen.poll, which would reap the child first) gives its ru_maxrss.
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                break
            with contextlib.suppress(psutil.Error):
                rss = 0
                for p in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        rss += p.memory_info().rss
                self.peak_tree_rss = max(self.peak_tree_rss, rss)
            time.sleep(0.1)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.maxrss_mb = usage.ru_maxrss / 1024.0
        reader.join()
        self.output = b"".join(c for _, c in self.chunks)

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            self.chunks.append((time.time(), chunk))

    def check(self, what: str) -> None:
        if self.proc.returncode != 0:
            tail = self.output[-4000:].decode(errors="replace")
            raise RuntimeError(f"{what} failed (exit {self.proc.returncode}):\n{tail}")

    def progress(self) -> list[tuple[float, int]]:
        """(arrival time, n) of each tqdm ``n/total`` update, in order."""
        return progress_updates(self.chunks)


def progress_updates(chunks: list[tuple[float, bytes]]) -> list[tuple[float, int]]:
    """(arrival time, n) of each tqdm ``n/total [`` update in timestamped output chunks.

    tqdm starts each refresh with ``\\r``; an update counts once, at the arrival of the chunk
    that completes its ``n/total [`` (a number split across chunks waits for the rest).
    """
    out: list[tuple[float, int]] = []
    line, counted = b"", False
    for t, chunk in chunks:
        for i, part in enumerate(_LINE_BREAK.split(chunk)):
            if i:
                line, counted = b"", False
            line += part
            if not counted and (m := _PROGRESS.search(line)):
                out.append((t, int(m.group(1))))
                counted = True
    return out


def _time_at(samples: list[tuple[float, int]], n: int) -> float:
    """The time at which step ``n`` ended, linearly interpolated between progress updates."""
    for (t_a, n_a), (t_b, n_b) in itertools.pairwise(samples):
        if n_a <= n <= n_b:
            return t_a if n_b == n_a else t_a + (t_b - t_a) * (n - n_a) / (n_b - n_a)
    raise ValueError(f"no progress update around step {n}")


def openx_interval_rates(samples: list[tuple[float, int]], steps: int,
                         log_freq: int) -> list[float]:
    """Steps/s of each log interval after the first, from their progress updates; the last
    interval ends at the last update before the final step (the final one follows the save)."""
    before_end = [s for s in samples if s[1] < steps]
    last_t, last_n = before_end[-1]
    rates = []
    for start in range(log_freq, steps, log_freq):
        end = min(start + log_freq, last_n)
        if end <= start:
            break
        t_end = last_t if end == last_n else _time_at(before_end, end)
        rates.append((end - start) / (t_end - _time_at(before_end, start)))
    return rates


def run_openx(args, work: str, data: str, rep: int) -> dict:
    """One run of their scripts/train_bc.py; its figures."""
    cfg_dir = os.path.join(work, "openx_config")
    os.makedirs(cfg_dir, exist_ok=True)
    config = os.path.join(cfg_dir, "oxe_reacher_openx.py")
    with open(config, "w") as f:
        f.write(OPENX_CONFIG.format(data=data, steps=args.steps, log_freq=args.log_freq,
                                    never=10 * args.steps + 1))
    with open(os.path.join(cfg_dir, "oxe_reacher_transform.py"), "w") as f:
        f.write(OPENX_TRANSFORM)
    home = os.path.join(work, f"openx_home_{rep}")  # a fresh HOME: a cold compilation cache
    path = os.path.join(work, f"openx_run_{rep}")
    for d in (home, path):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(home)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HOME=home, PYTHONPATH=cfg_dir, WANDB_DISABLED="true", PYTHONUNBUFFERED="1",
               TF_CPP_MIN_LOG_LEVEL="2")
    cmd = [args.openx_python, os.path.join(args.openx_root, "scripts", "train_bc.py"),
           f"--config={config}", f"--path={path}", "--name=bench"]
    run = Run(cmd, env=env, cwd=home)
    run.check("their scripts/train_bc.py")
    samples = run.progress()
    first = next((t for t, n in samples if n >= 1), None)
    if first is None or not any(n == args.steps for _, n in samples):
        raise RuntimeError("their train_bc.py printed no tqdm progress to the last step:\n"
                           + run.output[-3000:].decode(errors="replace"))
    rates = openx_interval_rates(samples, args.steps, args.log_freq)
    return {"steps_per_s": statistics.median(rates), "first_step_s": first - run.t0,
            "peak_tree_rss_mb": run.peak_tree_rss / 2**20, "maxrss_mb": run.maxrss_mb,
            "wall_s": run.chunks[-1][0] - run.t0, "intervals": [round(r, 2) for r in rates]}


def run_ours(args, work: str, data: str, rep: int) -> dict:
    """One run of our tools/train_bc.py (48-bin head, cold compilation cache); its figures."""
    import csv

    path = os.path.join(work, f"ours_run_{rep}")
    cache = os.path.join(work, f"ours_xla_{rep}")
    for d in (path, cache):
        shutil.rmtree(d, ignore_errors=True)
    overrides = _head_overrides(HEAD, args.steps, args.log_freq)[0]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    run = Run(train_bc_command(STATE_CONFIG, path, data, overrides, cache), env=env)
    run.check("tools/train_bc.py")
    result = json.loads(run.output.decode(errors="replace").strip().splitlines()[-1])
    with open(os.path.join(path, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    rate, wait = _interval_figures(rows)
    return {"steps_per_s": rate, "first_step_s": result["first_step_unix"] - run.t0,
            "peak_tree_rss_mb": run.peak_tree_rss / 2**20, "maxrss_mb": run.maxrss_mb,
            "data_wait_share": wait,
            "intervals": [round(float(r["steps_per_sec"]), 2) for r in rows
                          if r.get("steps_per_sec")][1:]}


def _summary(runs: list[dict]) -> dict:
    out = {k: round(statistics.median(r[k] for r in runs), 2)
           for k in ("steps_per_s", "first_step_s", "peak_tree_rss_mb", "maxrss_mb")}
    if "data_wait_share" in runs[0]:
        out["data_wait_share"] = round(statistics.median(r["data_wait_share"] for r in runs), 4)
    out["per_rep"] = [{k: (round(v, 4 if k == "data_wait_share" else 2)
                           if isinstance(v, float) else v) for k, v in r.items()} for r in runs]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--openx_root", default=None,
                        help="Checkout of jhejna/openx (holds scripts/train_bc.py).")
    parser.add_argument("--openx_python", default=None,
                        help="The Python of a venv with their requirements and their package "
                        "(default: <openx_root>/../.venv/bin/python).")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--log_freq", type=int, default=200,
                        help="Log interval of both trainers (a multiple of 8 keeps our loop's "
                        "8-step blocks).")
    parser.add_argument("--work", default=None,
                        help="Where to log the data and write runs (default: a temporary "
                        "directory).")
    args = parser.parse_args()
    if not args.openx_root:
        sys.exit("bench_openx_baseline: an optional baseline; it needs the OpenX trainer: "
                 "--openx_root <checkout of jhejna/openx> --openx_python <its venv's python> "
                 "(setup in this script's docstring).")
    args.openx_root = os.path.abspath(args.openx_root)
    if args.openx_python is None:
        args.openx_python = os.path.join(os.path.dirname(args.openx_root), ".venv", "bin",
                                         "python")
    script = os.path.join(args.openx_root, "scripts", "train_bc.py")
    if not os.path.isfile(script) or not os.access(args.openx_python, os.X_OK):
        sys.exit(f"bench_openx_baseline: no {script} or no executable {args.openx_python}")
    if args.steps < 3 * args.log_freq or args.steps <= 200:
        sys.exit("bench_openx_baseline: --steps must cover at least 3 log intervals (the "
                 "first is dropped) and exceed the 200 warmup steps of both schedules")
    load_start = os.getloadavg()[0]
    work = args.work or tempfile.mkdtemp(prefix="bench_openx_baseline_")
    os.makedirs(work, exist_ok=True)
    data = log_reacher(os.path.join(work, "reacher100"), 100)
    ours, theirs = [], []
    for rep in range(args.reps):
        # The trainers alternate, and which goes first alternates between repetitions.
        order = [("openx", run_openx, theirs), ("ours", run_ours, ours)]
        for _, fn, into in (order if rep % 2 == 0 else order[::-1]):
            into.append(fn(args, work, data, rep))

    def ratio(key: str) -> float:
        return round(statistics.median(a[key] / b[key] for a, b in zip(ours, theirs)), 3)

    print(json.dumps({
        "bench": "openx_baseline",
        "workload": "W5: state BC on Reacher-v5, ours vs jhejna/openx scripts/train_bc.py",
        "cpus": os.cpu_count(), "load_avg_1m_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "config": {"batch": 256, "trunk": [512, 512, 512], "head": "discrete, 48 bins",
                   "n_obs": 1, "n_action": 1, "data": "Reacher-v5, 100 scripted episodes",
                   "steps_per_run": args.steps, "log_freq": args.log_freq, "reps": args.reps},
        "ours": _summary(ours),
        "openx": _summary(theirs),
        "ours_over_openx": {"steps_per_s": ratio("steps_per_s"),
                            "first_step_s": ratio("first_step_s"),
                            "peak_tree_rss_mb": ratio("peak_tree_rss_mb")},
    }))


if __name__ == "__main__":
    main()
