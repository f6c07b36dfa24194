"""Crashes, signals, exceptions and a full disk never lose a completed episode and never leave
a dataset that tfds cannot read (after recovery)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

import oxe_envlogger
from oxe_envlogger.datasets import recovery
from oxe_envlogger.format import layout, reader
from tests.helpers import (
    RecordingEnv,
    assert_observations_equal,
    float32_rounded,
    read_tfds,
    tmpfs,
)
from tests.oxe_envlogger.collect.crash_child import EPISODE_LEN, action, expected_obs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
QUEUE = oxe_envlogger.WriterOptions().queue_episodes


def _start(directory: str, mode: str, session: bool = False) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "tests.oxe_envlogger.collect.crash_child", directory,
                             mode], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=session)


def _communicate(proc, timeout: float = 180.0) -> tuple[str, str]:
    """The child's output once it has exited. A child still running after ``timeout`` (a hang:
    it exits within seconds on an idle host) is asked for every thread's stack, then killed,
    and the test fails with those stacks."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the child did not exit within {timeout} s; its threads:\n{err[-8000:]}")


def _read_lines_until(proc, predicate, timeout=60.0) -> list[str]:
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if predicate(lines):
            break
    return lines


def _check_episodes(directory: str) -> list[dict]:
    """Every episode tfds reads is exactly what the env produced; returns them."""
    episodes = read_tfds(directory)
    for e in episodes:
        steps = e["steps"]
        ep = int(steps["observation"]["state"][0, 0])
        n = len(steps["is_first"])
        for t in range(n):
            want = expected_obs(ep, t)
            np.testing.assert_array_equal(steps["observation"]["state"][t],
                                          float32_rounded(want["state"]))
            np.testing.assert_array_equal(steps["observation"]["image"][t], want["image"])
            if t < n - 1:
                np.testing.assert_array_equal(steps["action"][t], action(ep, t))
        assert steps["is_first"][0] and steps["is_last"][-1] and not steps["is_terminal"].any()
        if not e["invalid"]:
            assert n == EPISODE_LEN + 1
    return episodes


def _episode_numbers(episodes) -> list[int]:
    return sorted(int(e["steps"]["observation"]["state"][0, 0]) for e in episodes)


def _wait_gone(pids: list[int], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split()[2] != "Z":
                        alive.append(pid)
            except (ProcessLookupError, FileNotFoundError):
                pass
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("sig,runs,group", [
    (signal.SIGKILL, 5, False), (signal.SIGINT, 2, False), (signal.SIGTERM, 2, False),
    # Ctrl-C in a terminal, or a service manager stopping a job, signals the encoder workers
    # too: they must keep encoding until the logger has written what it holds.
    (signal.SIGINT, 2, True), (signal.SIGTERM, 1, True)])
def test_killed_at_random_moments(sig, runs, group, tmp_path):
    rng = random.Random(int(sig) * 1000 + group)
    for run in range(runs):
        directory = str(tmp_path / f"run{run}")
        proc = _start(directory, "forever", session=group)
        lines = _read_lines_until(proc, lambda ls: any(x.startswith("started 0") for x in ls))
        workers = [int(p) for p in lines[0].split()[1:]] if lines and lines[0].startswith("workers") else []
        assert workers or not group
        time.sleep(rng.uniform(0.2, 2.5))
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        out, err = _communicate(proc)
        lines += out.split("\n")
        started = [int(x.split()[1]) for x in lines if x.startswith("started")]
        completed = max(started)  # episodes 0..completed-1 were handed to the writer
        assert _wait_gone(workers), f"encoder workers left running: {workers}"
        report = oxe_envlogger.recover(directory)
        assert oxe_envlogger.recover(directory)["committed_shards"] == []  # idempotent
        episodes = _check_episodes(directory)
        valid = _episode_numbers([e for e in episodes if not e["invalid"]])
        invalid = _episode_numbers([e for e in episodes if e["invalid"]])
        assert valid == list(range(len(valid))), valid  # a prefix, in order, no gaps
        if sig == signal.SIGKILL:
            assert len(valid) >= completed - QUEUE - 1, (len(valid), completed, report)
            assert invalid == []
        else:  # a clean exit: everything completed, and the episode in flight, flagged
            assert proc.returncode != 0
            # A signal inside reset() may land after the episode was handed over and before
            # "started" was printed: then that episode is complete and nothing is in flight.
            assert len(valid) in (completed, completed + 1), (valid, completed, err[-2000:])
            assert invalid in ([], [len(valid)])
        assert not recovery.needs_recovery(directory)


@pytest.mark.slow
def test_ctrl_c_in_a_long_episode_keeps_every_step_once(tmp_path):
    """Ctrl-C at random moments of an episode longer than a block (1024 steps): the episode
    is kept, cut short, with each step once and in order, wherever the signal landed (in a
    step, or while steps were being packed into a block)."""
    rng = random.Random(11)
    for run in range(3):
        directory = str(tmp_path / f"run{run}")
        proc = _start(directory, "long")
        _read_lines_until(proc, lambda ls: any(x.startswith("started 0") for x in ls))
        time.sleep(rng.uniform(0.3, 1.2))
        proc.send_signal(signal.SIGINT)
        _, err = _communicate(proc)
        assert proc.returncode != 0
        (episode,) = reader.read_episodes(directory)
        assert episode["invalid"], err[-2000:]
        steps = episode["steps"]
        t = np.arange(len(steps["is_first"]))
        assert len(t) > 1024
        want = [expected_obs(0, 0)["state"], expected_obs(0, len(t) - 1)["state"]]
        state = steps["observation"]["state"]  # float64, stored at float32 precision
        np.testing.assert_array_equal(state[[0, -1]], float32_rounded(want))
        np.testing.assert_array_equal(state[:, 1], t)  # once, in order
        np.testing.assert_array_equal(state[:, 2], float32_rounded(np.sin(0.1 * t)))
        np.testing.assert_array_equal(steps["observation"]["image"],
                                      np.broadcast_to((t % 256).astype(np.uint8)[:, None, None, None],
                                                      (len(t), 16, 16, 3)))
        np.testing.assert_array_equal(steps["action"][:-1],
                                      np.stack([action(0, i) for i in t[:-1]]))
        assert steps["is_last"][-1] and not steps["is_terminal"].any()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["raise", "sys_exit", "fall_off"])
def test_exception_and_exit_without_close(mode, tmp_path):
    directory = str(tmp_path / "ds")
    proc = _start(directory, mode)
    _, err = proc.communicate(timeout=120)
    assert (proc.returncode == 0) == (mode == "fall_off"), err[-2000:]
    assert not recovery.needs_recovery(directory)  # written by the exit handler, no recovery
    episodes = _check_episodes(directory)
    assert _episode_numbers([e for e in episodes if not e["invalid"]]) == [0, 1, 2, 3, 4]
    cut = [e for e in episodes if e["invalid"]]
    assert len(cut) == 1 and len(cut[0]["steps"]["is_first"]) == 4  # 3 steps + final obs


@pytest.mark.parametrize("commit", [True, False])
def test_flush_makes_completed_episodes_durable(commit, tmp_path):
    """After ``flush()`` returns, the completed episodes survive SIGKILL; with ``commit`` tfds
    reads them at once, while the logger is still open."""
    directory = str(tmp_path / "ds")
    proc = _start(directory, "flush_commit" if commit else "flush_nocommit")
    try:
        lines = _read_lines_until(proc, lambda lines: "flushed" in lines)
        if "flushed" not in lines:
            proc.kill()
            pytest.fail(f"the logger did not flush: {proc.communicate()[1][-2000:]}")
        visible = _episode_numbers(_check_episodes(directory))
        # max_episodes_per_file=2 committed episodes 0 and 1; flush() commits episode 2 or not
        assert visible == ([0, 1, 2] if commit else [0, 1])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    oxe_envlogger.recover(directory)
    episodes = _check_episodes(directory)
    assert _episode_numbers(episodes) == [0, 1, 2]
    assert not any(e["invalid"] for e in episodes)


def _raw_camera_logger(directory: str, side: int, episode_len: int, **options):
    space = spaces.Dict({"x": spaces.Box(0, 255, (side, side, 3), np.uint8)})
    return oxe_envlogger.OXEEnvLogger(RecordingEnv(space, spaces.Discrete(2),
                                                   episode_len=episode_len),
                                      "full", directory, image_codec="raw", **options)


def _log_episode(env, seed: int, steps: int) -> None:
    env.reset(seed=seed)
    for _ in range(steps):
        env.step(0)


@pytest.mark.slow
@pytest.mark.parametrize("flush_every", [None, 2])
def test_disk_full(flush_every, tmp_path):
    """Also with ``flush()`` (which commits, so the disk may fill while metadata is written)."""
    with tmpfs(tmp_path / "small_disk", "3m") as mnt:
        directory = os.path.join(mnt, "ds")
        env = _raw_camera_logger(directory, 64, 10, max_episodes_per_file=3)
        assert isinstance(env, gym.Env)
        written = flushed = 0
        with pytest.raises(oxe_envlogger.WriterError, match="No space left"):
            for ep in range(1000):
                _log_episode(env, ep, 10)
                if flush_every and ep % flush_every == flush_every - 1:
                    env.flush()
                    flushed = ep + 1  # committed: readable without recovery
                written = ep
        with pytest.raises(oxe_envlogger.WriterError):
            env.close()
        env.close()  # idempotent after the error
        if flush_every:
            assert flushed >= 2 and len(read_tfds(directory)) >= flushed
        oxe_envlogger.recover(directory)
        episodes = read_tfds(directory)
        assert len(episodes) >= written - QUEUE - 1 >= 3
        assert_observations_equal(episodes, env.unwrapped.episodes, "x")


@pytest.mark.parametrize("commit_by", ["flush", "close"])
def test_commit_on_a_full_disk(commit_by, tmp_path):
    """The disk fills between writing episodes and committing them: ``flush()`` (then the
    logger stops) or ``close()`` raises a ``WriterError`` naming the cause, and once there is
    room again recovery commits every episode that was written."""
    with tmpfs(tmp_path / "small_disk", "2m") as mnt:
        directory = os.path.join(mnt, "ds")
        env = _raw_camera_logger(directory, 32, 5,
                                 writer_options=oxe_envlogger.WriterOptions(commit_every_s=None))
        for ep in range(3):
            _log_episode(env, ep, 5)
        env.flush(commit=False)  # written and fsynced in staging
        filler = os.path.join(mnt, "filler")
        with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        if commit_by == "flush":
            with pytest.raises(oxe_envlogger.WriterError, match="No space left"):
                env.flush()
            with pytest.raises(oxe_envlogger.WriterError):
                env.reset(seed=3)  # the writer stopped
            with pytest.raises(oxe_envlogger.WriterError, match="No space left"):
                env.close()
        else:
            with pytest.raises(oxe_envlogger.WriterError,
                               match=r"committing .* at close failed: .*No space left"):
                env.close()
        env.close()  # idempotent
        os.unlink(filler)
        oxe_envlogger.recover(directory)
        episodes = read_tfds(directory)
        assert len(episodes) == 3
        assert_observations_equal(episodes, env.unwrapped.episodes, "x")


def _parallel_child(directory: str, worker: int, episodes: int) -> None:
    from gymnasium import spaces

    from tests.helpers import RecordingEnv

    space = spaces.Box(-1, 1, (3,), np.float32)
    env = oxe_envlogger.OXEEnvLogger(RecordingEnv(space, space, episode_len=7, seed=worker),
                                     "parallel", directory, max_episodes_per_file=3)
    for ep in range(episodes):
        env.reset(seed=1000 * worker + ep)
        for _ in range(7):
            _, _, te, tr, _ = env.step(space.sample())
            if te or tr:
                break
    env.close()


@pytest.mark.slow
def test_four_processes_write_one_dataset(tmp_path):
    directory = str(tmp_path / "ds")
    code = ("import sys; sys.path.insert(0, {root!r});"
            "from tests.oxe_envlogger.collect.test_durability import _parallel_child;"
            "_parallel_child({d!r}, {w}, 10)")
    procs = [subprocess.Popen([sys.executable, "-c", code.format(root=ROOT, d=directory, w=w)],
                              cwd=ROOT, stderr=subprocess.PIPE, text=True) for w in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    episodes = read_tfds(directory)
    assert len(episodes) == 40
    assert len({e["episode_id"] for e in episodes}) == 40
    # Each episode is intact: its observations are one writer's, in order.
    firsts = sorted(float(e["steps"]["observation"][0, 0]) for e in episodes)
    assert len(set(firsts)) == 40
    for e in episodes:
        assert len(e["steps"]["is_first"]) == 8 and e["steps"]["is_first"].sum() == 1
    meta = layout.read_json(os.path.join(directory, layout.METADATA))
    assert sorted(s["episodes"] for s in meta["sessions"]) == [10, 10, 10, 10]
    assert oxe_envlogger.format.stats.is_current(directory)
    assert not recovery.needs_recovery(directory)
