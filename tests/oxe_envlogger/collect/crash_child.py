"""A logging process for the crash tests: ``python -m tests.oxe_envlogger.collect.crash_child DIR MODE``.

Logs a deterministic env (state + a small camera image) episode after episode and prints
``started <episode>`` after each reset. MODE is ``forever`` (until a signal), ``raise`` (an
uncaught exception mid-episode), ``fall_off`` (the script ends without close()), or
``sys_exit``; ``flush_commit`` / ``flush_nocommit`` log 3 episodes, call ``flush()`` (with or
without ``commit``), print ``flushed`` and wait to be killed; ``long`` logs one endless episode
as fast as it can (until a signal), so that the signal lands anywhere in its packed blocks.
"""

from __future__ import annotations

import faulthandler
import signal
import sys
import time

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from oxe_envlogger import OXEEnvLogger

EPISODE_LEN = 20


def expected_obs(ep: int, t: int) -> dict:
    return {"state": np.array([ep, t, np.sin(ep + 0.1 * t)], np.float64),
            "image": np.full((16, 16, 3), (ep * 7 + t) % 256, np.uint8)}


class Deterministic(gym.Env):
    observation_space = spaces.Dict({"state": spaces.Box(-np.inf, np.inf, (3,), np.float64),
                                     "image": spaces.Box(0, 255, (16, 16, 3), np.uint8)})
    action_space = spaces.Box(-1, 1, (2,), np.float32)

    def __init__(self, episode_len: int = EPISODE_LEN):
        self.episode_len = episode_len

    def reset(self, *, seed=None, options=None):
        self.ep, self.t = seed, 0
        return expected_obs(self.ep, 0), {}

    def step(self, action):
        self.t += 1
        return expected_obs(self.ep, self.t), float(self.t), False, self.t >= self.episode_len, {}


def action(ep: int, t: int) -> np.ndarray:
    return np.array([ep / 1000, t / 100], np.float32)


def main(directory: str, mode: str) -> None:
    episode_len = 10**9 if mode == "long" else EPISODE_LEN
    env = OXEEnvLogger(Deterministic(episode_len), "crash", directory, max_episodes_per_file=2)
    encoder = env._recorder.writer.encoder
    workers = encoder.worker_processes() if encoder is not None else []
    print("workers " + " ".join(str(proc.pid) for proc in workers), flush=True)
    for ep in range(100000):
        if mode.startswith("flush") and ep == 3:
            env.flush(commit=mode == "flush_commit")  # episode 2 has ended: handed over here
            print("flushed", flush=True)
            time.sleep(600)
        env.reset(seed=ep)
        print(f"started {ep}", flush=True)
        for t in range(episode_len):
            if mode in ("raise", "sys_exit", "fall_off") and ep == 5 and t == 3:
                if mode == "raise":
                    raise RuntimeError("the user's loop failed")
                if mode == "sys_exit":
                    sys.exit(3)
                return  # fall_off: the script ends, close() never called
            env.step(action(ep, t))
            if mode != "long":
                time.sleep(0.002)


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for stacks on a hang
    # Ctrl-C as in a terminal, however the test run was started: a shell starts background
    # jobs with SIGINT ignored, and Python then leaves it ignored in its children.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main(sys.argv[1], sys.argv[2])
