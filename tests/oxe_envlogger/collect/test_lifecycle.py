"""The SIGTERM handler the loggers install lives exactly as long as an open logger."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import gymnasium as gym

from oxe_envlogger import AutoOXEEnvLogger


def test_sigterm_handler_installed_while_a_logger_is_open(tmp_path):
    # In a fresh process: a logger another test left open would keep the handler installed here.
    code = textwrap.dedent(f"""
        import signal
        import gymnasium as gym
        from oxe_envlogger import AutoOXEEnvLogger
        from oxe_envlogger.collect import lifecycle
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        first = AutoOXEEnvLogger(gym.make("CartPole-v1"), "a", {str(tmp_path / "a")!r})
        second = AutoOXEEnvLogger(gym.make("CartPole-v1"), "b", {str(tmp_path / "b")!r})
        assert signal.getsignal(signal.SIGTERM) is lifecycle._on_sigterm
        first.close()
        assert signal.getsignal(signal.SIGTERM) is lifecycle._on_sigterm, "one is still open"
        second.close()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, signal.getsignal(signal.SIGTERM)
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_a_handler_of_the_users_is_left_alone(tmp_path):
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        env = AutoOXEEnvLogger(gym.make("CartPole-v1"), "a", str(tmp_path / "a"))
        assert signal.getsignal(signal.SIGTERM) is mine
        env.close()
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_after_close_kills_as_before(tmp_path):
    """A program that closed its loggers and later gets SIGTERM dies of the signal (no SystemExit
    raised into whatever it is doing then)."""
    code = textwrap.dedent(f"""
        import os, signal, time
        import gymnasium as gym
        from oxe_envlogger import AutoOXEEnvLogger
        env = AutoOXEEnvLogger(gym.make("CartPole-v1"), "a", {str(tmp_path / "a")!r})
        env.reset(seed=0)
        env.step(env.action_space.sample())
        env.close()
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        except SystemExit:
            print("SystemExit")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert "SystemExit" not in proc.stdout
