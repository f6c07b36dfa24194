"""The OpenX baseline bench's parsing of their trainer's progress (no trainer runs here)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.bench_openx_baseline import OPENX_CONFIG, openx_interval_rates, progress_updates

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_progress_updates_count_each_refresh_once_when_its_count_is_complete():
    chunks = [(1.0, b"\r  0%|  | 0/10 [00"), (2.0, b":00<?]\r 10%|  | 1"),
              (3.0, b"/10 [00:01<00:09]\r 50%|  | 5/10 [00:02]"),
              (4.0, b"more text\r100%|  | 10/10 [00:03]\n")]
    assert progress_updates(chunks) == [(1.0, 0), (3.0, 1), (3.0, 5), (4.0, 10)]


def test_progress_updates_ignore_other_output():
    assert progress_updates([(1.0, b"I1208 reader.py:261] 1 files\n# 3/4 done\n")]) == []


def test_interval_rates_drop_the_first_interval_and_the_final_update():
    # Step 1 after 5 s of compile, then 50 steps/s; the final update (200) comes 10 s later,
    # after the checkpoint save, and must not count.
    samples = [(0.0, 0), (5.0, 1)] + [(5.0 + 0.1 * k, 1 + 5 * k) for k in range(1, 40)]
    samples.append((samples[-1][0] + 10.0, 200))
    rates = openx_interval_rates(samples, steps=200, log_freq=50)
    assert rates == pytest.approx([50.0, 50.0, 50.0])


def test_openx_config_text_formats():
    text = OPENX_CONFIG.format(data="/d", steps=1000, log_freq=200, never=10001)
    compile(text, "oxe_reacher_openx.py", "exec")
    assert "hidden_dims=(512, 512, 512)" in text and "n_action_bins=48" in text
    assert "path='/d'" in text and "decay_steps=1000" in text


def test_without_their_trainer_it_exits_with_a_message():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_openx_baseline.py")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "--openx_root" in proc.stderr
