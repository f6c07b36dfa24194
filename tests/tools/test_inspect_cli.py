"""tools/inspect_rlds.py as a real subprocess."""

from __future__ import annotations

import json

import pytest

from tests.tools.datasets import make_w2, run_tool


@pytest.fixture(scope="module")
def w2(tmp_path_factory):
    return make_w2(str(tmp_path_factory.mktemp("inspect_cli") / "w2"), 2, seed=4)


def test_summary_text_and_json(w2):
    res = run_tool("inspect_rlds", w2)
    assert res.returncode == 0, res.stderr[-2000:]
    for part in ("episodes: 2", "steps/observation/wrist_image", "png", "provenance:",
                 "statistics (current", "language instructions"):
        assert part in res.stdout, part
    res = run_tool("inspect_rlds", "--json", w2)
    summary = json.loads(res.stdout)
    assert summary["episodes"] == 2 and summary["steps"] == 18


def test_episode_video_and_plot(w2, tmp_path):
    video, plot = tmp_path / "ep.mp4", tmp_path / "dist.png"
    res = run_tool("inspect_rlds", w2, "--episode=1", f"--out={video}", f"--plot={plot}",
                   "--fps=5")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "9 frames" in res.stdout and "observation/image" in res.stdout
    assert video.stat().st_size > 0 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = run_tool("inspect_rlds", w2, "--episode=0")
    assert res.returncode == 0 and "9 steps" in res.stdout and "episode_id" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["--out=x.mp4"], "--out needs --episode"),
    (["--episode=0", "--out=x.avi"], "FILE.mp4 or FILE.gif"),
    (["--episode=7"], "no episode 7"),
])
def test_errors(w2, args, message):
    res = run_tool("inspect_rlds", w2, *args)
    assert res.returncode != 0 and message in res.stderr
