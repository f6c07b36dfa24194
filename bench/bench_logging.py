"""W1 and W2 logging overhead (shared/WORKLOADS.md), each as a ratio against the raw loop
measured in the same process, median of repetitions; one JSON line per figure set.

    python bench/bench_logging.py                 # W1 (ours and envlogger 1.2's TFDS writer), W2
    python bench/bench_logging.py --workloads=w2 --reps=3
    python bench/bench_logging.py --workloads=long   # memory over one long episode
    python bench/bench_logging.py --workloads=long_state   # 1M and 10M state-only steps

W1: HalfCheetah-v5, random actions seeded 0, 20 episodes of 1000 steps.
W2: oxe_envlogger/SyntheticCamera-v0 (two cameras + state, language), 10 episodes of 200 steps,
    seed 0, PNG (default) and JPEG; plus encode time per frame for each codec next to the
    fastest encoder available for it.
Figures: overhead = logged wall time (including close()) / raw wall time, steps/s, bytes on disk,
the longest single step()/reset() call, peak resident memory above the raw loop (each measured
in a fresh process); W1 also with float64 stored exactly (``float64="exact"``, the
``float64_exact_*`` figures, each run against a raw run of its own). ``--workloads=long``: one long W2 episode, with and without the episode
byte budget (WriterOptions.max_episode_bytes). ``--workloads=long_state``: one state-only
episode (17 float32 observations, 6 float32 actions) of 1M and of 10M steps, with the default
budget and with 64 MiB, each in a fresh process: the longest step() against the raw loop's
longest, peak memory against the budget and the bytes on disk, and close() against writing
its last part's bytes to a plain file.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gymnasium as gym
import numpy as np

import oxe_envlogger.envs
from oxe_envlogger import AutoOXEEnvLogger, WriterOptions
from oxe_envlogger.collect import encoders


def dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


class RSSSampler:
    """Samples this process's resident memory every few ms; reports the peak."""

    def __init__(self):
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def run_episode(env, seed: int, *, language: bool = False) -> tuple[int, float]:
    """One episode of ``env`` with random actions from its (seeded) action space; returns the
    steps taken and the longest single ``reset()``/``step()`` call."""
    t0 = time.perf_counter()
    _, info = env.reset(seed=seed)
    longest = time.perf_counter() - t0
    if language and hasattr(env, "set_language_instruction"):
        env.set_language_instruction(info["language_instruction"])
    steps = 0
    done = False
    while not done:
        action = env.action_space.sample()
        t0 = time.perf_counter()
        _, _, terminated, truncated, _ = env.step(action)
        longest = max(longest, time.perf_counter() - t0)
        steps += 1
        done = terminated or truncated
    return steps, longest


def run_loop(env, episodes: int, seed: int, *, language: bool = False) -> dict:
    """Steps ``env`` with seeded random actions; times every call."""
    env.action_space.seed(seed)
    longest = 0.0
    steps = 0
    for ep in range(episodes):
        n, slowest = run_episode(env, seed + ep, language=language)
        steps += n
        longest = max(longest, slowest)
    return {"steps": steps, "longest_call_s": longest}


def steal_seconds() -> float:
    """CPU time the hypervisor gave to other guests, summed over this machine's CPUs
    (``/proc/stat``; 0 where not reported). A run with much steal measured a busy host, not us."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def timed(make_env, episodes, seed, *, language=False, close=True, memory=False) -> dict:
    """Runs and times the loop; ``memory``: also samples this process's peak memory (only in a
    fresh process, see :func:`fresh_process_memory`: the sampling thread would share the GIL
    with the timed loop)."""
    env = make_env()
    gc.collect()
    with RSSSampler() if memory else contextlib.nullcontext() as rss:
        base_rss = rss.peak if memory else 0
        s0 = steal_seconds()
        c0 = time.process_time()
        t0 = time.perf_counter()
        out = run_loop(env, episodes, seed, language=language)
        t1 = time.perf_counter()
        if close:
            env.close()
        t2 = time.perf_counter()
    out.update(wall_s=t2 - t0, close_s=t2 - t1, cpu_s=time.process_time() - c0,
               steal_fraction=(steal_seconds() - s0) / (len(os.sched_getaffinity(0)) * (t2 - t0)))
    if memory:
        out["rss_above_start_mb"] = (rss.peak - base_rss) / 2**20
    return out


def interleaved(make_raw, make_logged, episodes: int, seed: int, *, language=False) -> float:
    """Logged over raw wall time with the two loops taking turns episode by episode, so both
    see the same host (its speed drifts by tens of percent over seconds here). Each logged
    episode is followed by ``flush(commit=False)``, timed with it: whatever the writer and the
    encoders still had to do for it counts against the logger at once, instead of overlapping
    the next episode as in a plain run (so this figure is, if anything, pessimistic); the final
    ``close()`` counts too."""
    raw_env, log_env = make_raw(), make_logged()
    raw_env.action_space.seed(seed)
    log_env.action_space.seed(seed)
    raw_s = log_s = 0.0
    gc.collect()
    for ep in range(episodes):
        t0 = time.perf_counter()
        run_episode(raw_env, seed + ep, language=language)
        t1 = time.perf_counter()
        run_episode(log_env, seed + ep, language=language)
        log_env.flush(commit=False)
        t2 = time.perf_counter()
        raw_s += t1 - t0
        log_s += t2 - t1
    t0 = time.perf_counter()
    log_env.close()
    log_s += time.perf_counter() - t0
    raw_env.close()
    return log_s / raw_s


# ---------------------------------------------------------------------------------------------
# The peer: envlogger 1.2's TFDS writer, the path the original oxe_envlogger used.


def make_envlogger_peer(gym_env, directory: str):
    import dm_env
    import envlogger
    import tensorflow_datasets as tfds
    from dm_env import specs as dm_specs
    from envlogger.backends import tfds_backend_writer

    class GymAsDmEnv(dm_env.Environment):
        """The original's adapter: gymnasium calls as dm_env timesteps."""

        def __init__(self, env):
            self.env = env
            self.reset_kwargs = {}

        def reset(self):
            obs, _ = self.env.reset(**self.reset_kwargs)
            return dm_env.restart(obs)

        def step(self, action):
            obs, reward, terminated, truncated, _ = self.env.step(action)
            if terminated:
                return dm_env.termination(np.float64(reward), obs)
            if truncated:
                return dm_env.truncation(np.float64(reward), obs, np.float64(1.0))
            return dm_env.transition(np.float64(reward), obs, np.float64(1.0))

        def observation_spec(self):
            space = self.env.observation_space
            if isinstance(space, gym.spaces.Dict):
                return {k: dm_specs.Array(v.shape, v.dtype, k) for k, v in space.spaces.items()}
            return dm_specs.Array(space.shape, space.dtype, "observation")

        def action_spec(self):
            space = self.env.action_space
            return dm_specs.BoundedArray(space.shape, space.dtype, space.low, space.high, "action")

    obs_space, act_space = gym_env.observation_space, gym_env.action_space

    def feature(space):  # as the original oxe_envlogger mapped spaces
        if isinstance(space, gym.spaces.Dict):
            return tfds.features.FeaturesDict({k: feature(v) for k, v in space.spaces.items()})
        if space.dtype == np.uint8 and len(space.shape) == 3:
            return tfds.features.Image(shape=space.shape)
        return tfds.features.Tensor(shape=space.shape, dtype=space.dtype)

    config = tfds.rlds.rlds_base.DatasetConfig(
        name="peer",
        observation_info=feature(obs_space),
        action_info=tfds.features.Tensor(shape=act_space.shape, dtype=act_space.dtype),
        reward_info=np.float64, discount_info=np.float64)
    os.makedirs(directory, exist_ok=True)
    writer = tfds_backend_writer.TFDSBackendWriter(
        data_directory=directory, split_name="train", max_episodes_per_file=100,
        ds_config=config)
    dm = GymAsDmEnv(gym_env)
    logged = envlogger.EnvLogger(dm, backend=writer)

    class GymFacade:
        """Lets the same loop drive the dm_env logger."""

        action_space = act_space

        def reset(self, seed=None):
            dm.reset_kwargs = {"seed": seed}
            ts = logged.reset()
            return ts.observation, {}

        def step(self, action):
            ts = logged.step(action)
            last = ts.last()
            terminated = last and ts.discount == 0
            return ts.observation, ts.reward, terminated, last and not terminated, {}

        def close(self):
            logged.close()

    return GymFacade()


# ---------------------------------------------------------------------------------------------


def _median_ratio(num: list[dict], den: list[dict], digits: int = 3, key: str = "wall_s") -> float:
    return round(statistics.median(a[key] / b[key] for a, b in zip(num, den)), digits)


def _noise(raw: list[dict], ours: list[dict]) -> dict:
    """How much the host interfered: the hypervisor's steal during the raw and logged runs
    (fraction of all CPU time, median over reps) and the spread of the raw loop's wall time."""
    walls = [x["wall_s"] for x in raw]
    return {"steal_fraction_raw": round(statistics.median(x["steal_fraction"] for x in raw), 3),
            "steal_fraction_logged": round(statistics.median(x["steal_fraction"] for x in ours), 3),
            "raw_wall_spread": round(max(walls) / min(walls), 3)}


def bench_w1(reps: int, episodes: int, steps: int, with_peer: bool) -> dict:
    def make_raw():
        return gym.make("HalfCheetah-v5", max_episode_steps=steps)

    raw, ours, peer, turns, exact, exact_raw = [], [], [], [], [], []
    ours_bytes = peer_bytes = exact_bytes = 0
    for _ in range(reps):
        tmp = tempfile.mkdtemp(prefix="w1_")
        try:
            raw.append(timed(make_raw, episodes, 0))
            r = timed(lambda tmp=tmp: AutoOXEEnvLogger(make_raw(), "w1", os.path.join(tmp, "ours")),
                      episodes, 0)
            ours.append(r)
            ours_bytes = dir_bytes(os.path.join(tmp, "ours"))
            # float64 stored exactly (raw bytes) instead of as float32, against its own raw run
            exact_raw.append(timed(make_raw, episodes, 0))
            exact.append(timed(lambda tmp=tmp: AutoOXEEnvLogger(
                make_raw(), "w1", os.path.join(tmp, "exact"), float64="exact"), episodes, 0))
            exact_bytes = dir_bytes(os.path.join(tmp, "exact"))
            turns.append(interleaved(make_raw, lambda tmp=tmp: AutoOXEEnvLogger(
                make_raw(), "w1", os.path.join(tmp, "turns")), episodes, 0))
            if with_peer:
                p = timed(lambda tmp=tmp: make_envlogger_peer(make_raw(), os.path.join(tmp, "peer")),
                          episodes, 0)
                peer.append(p)
                peer_bytes = dir_bytes(os.path.join(tmp, "peer"))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raw_s = statistics.median(x["wall_s"] for x in raw)
    ours_s = statistics.median(x["wall_s"] for x in ours)
    longest_ours = max(x["longest_call_s"] for x in ours)
    out = {
        "bench": "W1 state logging (HalfCheetah-v5, 20x1000 steps)",
        "reps": reps,
        "raw_steps_per_s": round(raw[0]["steps"] / raw_s),
        # each rep's logged run is divided by the raw run just before it, then the median
        "overhead": _median_ratio(ours, raw),
        # raw and logged episodes taking turns (see interleaved()), median over reps
        "overhead_interleaved": round(statistics.median(turns), 3),
        "steps_per_s": round(ours[0]["steps"] / ours_s),
        "bytes_on_disk": ours_bytes,
        "longest_call_ms": round(longest_ours * 1e3, 2),
        "raw_longest_call_ms": round(max(x["longest_call_s"] for x in raw) * 1e3, 2),
        "close_ms": round(statistics.median(x["close_s"] for x in ours) * 1e3, 1),
        # CPU time (all threads of the process) of the logged run over the raw run's: what the
        # logger costs in work, which the host's steal does not inflate the way it does wall time
        "cpu_overhead": _median_ratio(ours, raw, key="cpu_s"),
        **_noise(raw, ours),
        "float64_exact_overhead": _median_ratio(exact, exact_raw),
        "float64_exact_cpu_overhead": _median_ratio(exact, exact_raw, key="cpu_s"),
        "float64_exact_bytes_on_disk": exact_bytes,
    }
    if with_peer:
        peer_s = statistics.median(x["wall_s"] for x in peer)
        longest_peer = max(x["longest_call_s"] for x in peer)
        out.update({
            "envlogger12_overhead": _median_ratio(peer, raw),
            "envlogger12_steps_per_s": round(peer[0]["steps"] / peer_s),
            "envlogger12_bytes_on_disk": peer_bytes,
            "envlogger12_longest_call_ms": round(longest_peer * 1e3, 2),
            "speedup_vs_envlogger12": _median_ratio(peer, ours, 2),
        })
    return out


def bench_w2_peer(reps: int, episodes: int, steps: int) -> dict:
    """W2 through envlogger 1.2's TFDS writer (PNG, encoded by TensorFlow in the env loop)."""

    def make_raw():
        return gym.make(oxe_envlogger.envs.ENV_ID, max_episode_steps=steps)

    raw, peer = [], []
    for _ in range(reps):
        tmp = tempfile.mkdtemp(prefix="w2peer_")
        try:
            raw.append(timed(make_raw, episodes, 0))
            peer.append(timed(lambda tmp=tmp: make_envlogger_peer(make_raw(), os.path.join(tmp, "p")),
                              episodes, 0))
            nbytes = dir_bytes(os.path.join(tmp, "p"))
        finally:
            gc.collect()
            shutil.rmtree(tmp, ignore_errors=True)
    peer_s = statistics.median(x["wall_s"] for x in peer)
    return {
        "bench": "W2 camera logging through envlogger 1.2's TFDS writer (png)",
        "reps": reps,
        "overhead": _median_ratio(peer, raw),
        "steps_per_s": round(peer[0]["steps"] / peer_s),
        "bytes_on_disk": nbytes,
        "longest_call_ms": round(max(x["longest_call_s"] for x in peer) * 1e3, 2),
    }


def bench_w2(reps: int, episodes: int, steps: int, codec: str) -> dict:
    def make_raw():
        return gym.make(oxe_envlogger.envs.ENV_ID, max_episode_steps=steps)

    raw, ours, turns = [], [], []
    nbytes = 0
    for _ in range(reps):
        tmp = tempfile.mkdtemp(prefix="w2_")
        try:
            raw.append(timed(make_raw, episodes, 0))
            ours.append(timed(lambda tmp=tmp: AutoOXEEnvLogger(make_raw(), "w2", os.path.join(tmp, "ours"),
                                                       image_codec=codec),
                              episodes, 0, language=True))
            nbytes = dir_bytes(os.path.join(tmp, "ours"))
            with open(os.path.join(tmp, "ours", "oxe_envlogger.json")) as f:
                session = json.load(f)["sessions"][-1]
            ours[-1]["cpu_s"] += session.get("encoder_cpu_seconds", 0.0)
            turns.append(interleaved(make_raw, lambda tmp=tmp: AutoOXEEnvLogger(
                make_raw(), "w2", os.path.join(tmp, "turns"), image_codec=codec),
                episodes, 0, language=True))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raw_s = statistics.median(x["wall_s"] for x in raw)
    ours_s = statistics.median(x["wall_s"] for x in ours)
    steps_n = raw[0]["steps"]
    raw_cpu = statistics.median(x["cpu_s"] for x in raw) / steps_n
    encode_cpu = w2_encode_seconds_per_step(codec)
    cpus = len(os.sched_getaffinity(0))
    workers = max(1, encoders.default_processes())  # threads on one CPU: one encoder
    return {
        "bench": f"W2 camera logging (2 cameras + state, 10x200 steps), codec {codec}",
        "reps": reps,
        "raw_steps_per_s": round(raw[0]["steps"] / raw_s),
        "overhead": _median_ratio(ours, raw),
        "overhead_interleaved": round(statistics.median(turns), 3),
        "steps_per_s": round(ours[0]["steps"] / ours_s),
        "bytes_on_disk": nbytes,
        "longest_call_ms": round(max(x["longest_call_s"] for x in ours) * 1e3, 2),
        "raw_longest_call_ms": round(max(x["longest_call_s"] for x in raw) * 1e3, 2),
        "close_ms": round(statistics.median(x["close_s"] for x in ours) * 1e3, 1),
        "rss_above_raw_mb": round(fresh_process_memory(f"w2:{codec}:{episodes}:{steps}")
                                  - fresh_process_memory(f"w2:raw:{episodes}:{steps}"), 1),
        # What the CPUs allow. Encoding one step's two frames, alone, costs encode_over_raw
        # times the raw loop's CPU per step. With no other logging work and perfect overlap,
        # the loop cannot beat max(1, encode CPU / (workers x raw wall time)) with the default
        # encoder workers (CPU count - 1), nor (raw CPU + encode CPU) / (CPUs x raw wall time)
        # however the work is spread over every CPU.
        "raw_cpu_us_per_step": round(raw_cpu * 1e6),
        "encode_cpu_us_per_step": round(encode_cpu * 1e6),
        "encode_over_raw": round(encode_cpu / raw_cpu, 2),
        "cpus": cpus,
        "encoder_workers": workers,
        "overhead_floor_workers": round(max(1.0, encode_cpu * steps_n / (workers * raw_s)), 3),
        "overhead_floor_all_cpus": round(max(1.0, (raw_cpu + encode_cpu) * steps_n
                                             / (cpus * raw_s)), 3),
        # all CPU the logged run used (env process with its threads + encoder processes)
        "logged_cpu_us_per_step": round(statistics.median(x["cpu_s"] for x in ours)
                                        / steps_n * 1e6),
        "cpu_busy_fraction": round(statistics.median(x["cpu_s"] / (cpus * x["wall_s"])
                                                     for x in ours), 2),
        "cpu_overhead": _median_ratio(ours, raw, key="cpu_s"),  # encoder processes included
        **_noise(raw, ours),
    }


def w2_frames(steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(image, wrist_image)`` of the first ``steps`` steps of a W2 episode (seed 0)."""
    env = gym.make(oxe_envlogger.envs.ENV_ID)
    env.action_space.seed(0)
    env.reset(seed=0)
    frames = []
    for _ in range(steps):
        obs, *_ = env.step(env.action_space.sample())
        frames.append((obs["image"], obs["wrist_image"]))
    return frames


def w2_encode_seconds_per_step(codec: str, steps: int = 60) -> float:
    """CPU seconds to encode one W2 step's frames (both cameras) with ``codec``, in this
    process with nothing else running: the encoders' own cost, without any logging."""
    from oxe_envlogger.format import codecs

    codec_ = codecs.ImageCodec.parse(codec)
    frames = w2_frames(steps)
    times = []
    for _ in range(3):
        c0 = time.process_time()
        for image, wrist in frames:
            codecs.encode(image, codec_)
            codecs.encode(wrist, codec_)
        times.append((time.process_time() - c0) / steps)
    return statistics.median(times)


def bench_codecs(n: int = 200) -> dict:
    """Encode time per W2 frame for each codec, ours next to every other encoder here."""
    import io

    from oxe_envlogger.format import codecs

    frames = [image for image, _ in w2_frames(8)]

    def per_frame(fn):
        fn(frames[0])
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for i in range(n):
                fn(frames[i % len(frames)])
            times.append((time.perf_counter() - t0) / n)
        return statistics.median(times)

    def pil(fmt, **kw):
        from PIL import Image

        def enc(a):
            b = io.BytesIO()
            Image.fromarray(a).save(b, format=fmt, **kw)
            return b.getvalue()
        return enc

    candidates = {
        "png": {"ours (fpng)": lambda a: codecs.encode_png(a),
                "pillow level 1": pil("PNG", compress_level=1)},
        "jpeg:95": {"ours (simplejpeg)": lambda a: codecs.encode_jpeg(a, quality=95),
                    "pillow": pil("JPEG", quality=95)},
    }
    try:
        import cv2

        candidates["png"]["opencv level 1"] = lambda a: cv2.imencode(
            ".png", a, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1]
        candidates["jpeg:95"]["opencv"] = lambda a: cv2.imencode(
            ".jpg", a, [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
    except ImportError:
        pass
    try:
        import imagecodecs

        candidates["png"]["imagecodecs level 1"] = lambda a: imagecodecs.png_encode(a, level=1)
    except ImportError:
        pass
    out = {"bench": "encode time per 256x256x3 W2 frame (ms)"}
    for codec, fns in candidates.items():
        times = {name: per_frame(fn) for name, fn in fns.items()}
        ours = next(v for k, v in times.items() if k.startswith("ours"))
        fastest = min(times.values())
        out[codec] = {k: round(v * 1e3, 3) for k, v in times.items()}
        out[codec]["ours_over_fastest"] = round(ours / fastest, 2)
    return out


@functools.cache  # the raw loop's figure serves every codec
def fresh_process_memory(config: str) -> float:
    """Peak resident memory above the start of the loop, in MB, of one run in a new process.

    Memory is measured in a fresh process because a process that already ran a loop reuses the
    heap it grew then, so a second run in it shows almost no growth."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--memory_child={config}"],
                         capture_output=True, text=True, timeout=1800, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_above_start_mb"]


def _memory_child(config: str) -> dict:

    kind, codec, *rest = config.split(":")
    tmp = tempfile.mkdtemp(prefix="mem_")
    try:
        if kind == "w2":
            episodes, steps = int(rest[0]), int(rest[1])
            budget = WriterOptions().max_episode_bytes
        else:  # long:<codec>:<steps>:<budget or none>
            episodes, steps = 1, int(rest[0])
            budget = None if rest[1] == "none" else int(rest[1])

        def make():
            env = gym.make(oxe_envlogger.envs.ENV_ID, max_episode_steps=steps)
            if codec == "raw":
                return env
            return AutoOXEEnvLogger(env, "mem", os.path.join(tmp, "ours"), image_codec=codec,
                                    writer_options=WriterOptions(max_episode_bytes=budget))

        r = timed(make, episodes, 0, language=True, memory=True)
        return {"config": config, "rss_above_start_mb": r["rss_above_start_mb"]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_long_episode(steps: int, budget: int) -> dict:
    """One long W2 episode (JPEG): peak resident memory with the episode byte budget (the
    episode is split into parts) and without it (held whole until it ends)."""
    with_budget = fresh_process_memory(f"long:jpeg:{steps}:{budget}")
    without = fresh_process_memory(f"long:jpeg:{steps}:none")
    raw = fresh_process_memory(f"w2:raw:1:{steps}")
    return {"bench": f"one long W2 episode ({steps} steps, jpeg): peak memory with "
                     f"max_episode_bytes={budget} and without it",
            "steps": steps,
            "rss_above_raw_mb_budget": round(with_budget - raw, 1),
            "rss_above_raw_mb_no_budget": round(without - raw, 1)}


# ---------------------------------------------------------------------------------------------
# Long state-only episodes


class StateEnv(gym.Env):
    """A state-only episode as a long teleoperation session logs it: 17 float32 observations,
    6 float32 actions, numpy only and cheap, so that the logger's own cost shows."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (17,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (6,), np.float32)

    def __init__(self, steps: int):
        self.steps = steps
        self.t = 0
        self._state = np.zeros(17, np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        self._state = self.np_random.standard_normal(17).astype(np.float32)
        return self._state.copy(), {}

    def step(self, action):
        self.t += 1
        self._state *= 0.999
        self._state[:6] += 0.01 * action
        return self._state.copy(), float(self._state[0]), False, self.t >= self.steps, {}


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` figure (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _time_steps(env, steps: int, actions: np.ndarray, on_first_step=None,
                ) -> tuple[float, float, int, int]:
    """Steps ``env`` through one episode of ``steps`` steps; returns the loop's wall time, its
    longest single step() call, the number of calls over 10 ms and the times the kernel took
    the CPU from the loop's thread (on a shared host most of the longest calls are the
    host's: compare with the raw loop's)."""
    import resource

    env.reset(seed=0)
    env.step(actions[0])
    gc.collect()  # (the collection that the imports left due, not the loop's)
    if on_first_step is not None:
        on_first_step()
    longest = 0.0
    slow = 0
    clock = time.perf_counter
    preempted = resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw
    start = clock()
    for i in range(1, steps):
        t0 = clock()
        env.step(actions[i & 4095])
        dt = clock() - t0
        if dt > longest:
            longest = dt
        if dt > 0.01:
            slow += 1
    wall = clock() - start
    return (wall, longest, slow,
            resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw - preempted)


def _long_state_child(config: str) -> dict:
    """One ``steps:budget`` configuration: the raw loop, then the logged loop, in this process.
    Peak memory is the kernel's high-water mark, reset at the logged loop's first step."""
    from oxe_envlogger.format import layout, record

    steps, budget = int(config.split(":")[0]), int(config.split(":")[1])
    actions = np.random.default_rng(0).uniform(-1, 1, (4096, 6)).astype(np.float32)
    raw_s, raw_longest, raw_slow, raw_preempted = _time_steps(StateEnv(steps), steps, actions)
    tmp = tempfile.mkdtemp(prefix="long_state_")
    try:
        env = AutoOXEEnvLogger(StateEnv(steps), "long_state", os.path.join(tmp, "ours"),
                               writer_options=WriterOptions(max_episode_bytes=budget))
        base = {}

        def start_memory():
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the high-water mark starts again from the current size
            base["rss"] = _status_bytes("VmRSS")
            base["full_gc"] = gc.get_stats()[2]["collections"]

        loop_s, longest, slow, preempted = _time_steps(env, steps, actions, start_memory)
        full_gc = gc.get_stats()[2]["collections"] - base["full_gc"]
        t0 = time.perf_counter()
        env.close()
        close_s = time.perf_counter() - t0
        peak = _status_bytes("VmHWM") - base["rss"]
        stalls = env.writer_stats["stalls"]  # step() blocked on a full queue of parts
        directory = os.path.join(tmp, "ours")
        info = layout.read_json(os.path.join(directory, layout.DATASET_INFO))
        sizes = [length for path, _ in layout.shard_paths(directory, info, "train")
                 for _, length in record.scan_records(path).records]
        part_write_s = statistics.median(_plain_write_seconds(tmp, sizes[-1]) for _ in range(3))
        return {"raw_s": raw_s, "raw_longest_s": raw_longest, "raw_calls_over_10ms": raw_slow,
                "raw_preempted_per_s": raw_preempted / raw_s, "loop_s": loop_s,
                "longest_s": longest, "calls_over_10ms": slow, "preempted_per_s": preempted / loop_s,
                "close_s": close_s, "part_write_s": part_write_s,
                "peak_bytes": peak, "bytes_on_disk": dir_bytes(directory), "parts": len(sizes),
                "last_part_bytes": sizes[-1], "largest_part_bytes": max(sizes),
                "full_gc_runs": full_gc, "queue_stalls": stalls["count"],
                "queue_stall_longest_s": stalls["longest_seconds"]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _plain_write_seconds(directory: str, n: int) -> float:
    """Seconds to write ``n`` bytes to a new file and fsync it (as the logger does a part)."""
    data = np.random.default_rng(0).integers(0, 256, min(n, 64 << 20), np.uint8).tobytes()
    path = os.path.join(directory, "plain")
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = n
        while left:
            left -= os.write(fd, memoryview(data)[:left])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    os.unlink(path)
    return seconds


def bench_long_state(steps: int, budget: int, reps: int) -> dict:
    """One state-only episode of ``steps`` steps with ``max_episode_bytes=budget``, each
    repetition in a fresh process (figures: medians over repetitions; the longest calls and
    the peak memory: the largest)."""
    runs = []
    for _ in range(reps):
        out = subprocess.run([sys.executable, os.path.abspath(__file__),
                              f"--long_state_child={steps}:{budget}"],
                             capture_output=True, text=True, timeout=3600, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))

    def med(key):
        return statistics.median(r[key] for r in runs)

    peak = max(r["peak_bytes"] for r in runs)
    return {
        "bench": f"one state-only episode (17 float32 obs, 6 float32 actions) of {steps} steps, "
                 f"max_episode_bytes={budget}",
        "reps": reps,
        "steps": steps,
        "overhead": round(statistics.median(r["loop_s"] / r["raw_s"] for r in runs), 3),
        "longest_call_ms": round(max(r["longest_s"] for r in runs) * 1e3, 2),
        "raw_longest_call_ms": round(max(r["raw_longest_s"] for r in runs) * 1e3, 2),
        # calls over 10 ms per million steps (median over reps), logged and raw
        "calls_over_10ms_per_1m": round(med("calls_over_10ms") * 1e6 / steps, 1),
        "raw_calls_over_10ms_per_1m": round(med("raw_calls_over_10ms") * 1e6 / steps, 1),
        # times per second the kernel preempted the loop's thread (other jobs on the host; in
        # the logged loop also the writer thread, on a machine with few CPUs)
        "preempted_per_s": round(med("preempted_per_s"), 1),
        "raw_preempted_per_s": round(med("raw_preempted_per_s"), 1),
        "full_gc_runs_while_logging": max(r["full_gc_runs"] for r in runs),
        # steps that waited for the writer (a full queue: it fell behind), and the longest wait
        "queue_stalls": max(r["queue_stalls"] for r in runs),
        "queue_stall_longest_ms": round(max(r["queue_stall_longest_s"] for r in runs) * 1e3, 1),
        "peak_rss_above_start_mb": round(peak / 2**20, 1),
        "bytes_on_disk": runs[0]["bytes_on_disk"],
        "parts": runs[0]["parts"],
        "largest_part_mb": round(runs[0]["largest_part_bytes"] / 2**20, 1),
        "peak_rss_over_budget": round(peak / budget, 3),
        "peak_rss_over_disk": round(peak / runs[0]["bytes_on_disk"], 3),
        "close_s": round(med("close_s"), 3),
        "last_part_mb": round(runs[0]["last_part_bytes"] / 2**20, 1),
        # close() against writing its last part's bytes to a plain file (with fsync) here
        "close_over_part_write": round(statistics.median(r["close_s"] / r["part_write_s"]
                                                         for r in runs), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="w1,w2,codecs")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--w1_episodes", type=int, default=20)
    parser.add_argument("--w1_steps", type=int, default=1000)
    parser.add_argument("--w2_episodes", type=int, default=10)
    parser.add_argument("--w2_steps", type=int, default=200)
    parser.add_argument("--long_steps", type=int, default=12000,
                        help="steps of the single episode of --workloads=long")
    parser.add_argument("--long_budget", type=int, default=64 * 2**20,
                        help="max_episode_bytes for --workloads=long")
    parser.add_argument("--long_state_steps", default="1000000,10000000",
                        help="episode lengths of --workloads=long_state")
    parser.add_argument("--long_state_budgets", default=f"{WriterOptions().max_episode_bytes},"
                                                        f"{64 * 2**20}",
                        help="max_episode_bytes values of --workloads=long_state")
    parser.add_argument("--long_state_reps", type=int, default=3)
    parser.add_argument("--no_peer", action="store_true", help="skip envlogger 1.2")
    parser.add_argument("--w2_peer_reps", type=int, default=1,
                        help="repetitions of W2 through envlogger 1.2 (slow: ~1 min each)")
    parser.add_argument("--memory_child", help=argparse.SUPPRESS)
    parser.add_argument("--long_state_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(_memory_child(args.memory_child)), flush=True)
        return 0
    if args.long_state_child:
        print(json.dumps(_long_state_child(args.long_state_child)), flush=True)
        return 0
    todo = args.workloads.split(",")
    if "w1" in todo:
        print(json.dumps(bench_w1(args.reps, args.w1_episodes, args.w1_steps, not args.no_peer)),
              flush=True)
    if "w2" in todo:
        for codec in ("png", "jpeg"):
            print(json.dumps(bench_w2(args.reps, args.w2_episodes, args.w2_steps, codec)),
                  flush=True)
        if not args.no_peer and args.w2_peer_reps > 0:
            print(json.dumps(bench_w2_peer(args.w2_peer_reps, args.w2_episodes, args.w2_steps)),
                  flush=True)
    if "codecs" in todo:
        print(json.dumps(bench_codecs()), flush=True)
    if "long" in todo:
        print(json.dumps(bench_long_episode(args.long_steps, args.long_budget)), flush=True)
    if "long_state" in todo:
        for steps in map(int, args.long_state_steps.split(",")):
            for budget in map(int, args.long_state_budgets.split(",")):
                print(json.dumps(bench_long_state(steps, budget, args.long_state_reps)),
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
