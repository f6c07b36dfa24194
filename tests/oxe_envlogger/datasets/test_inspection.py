"""Summaries, episode videos and distribution plots, on our datasets (W1, W2-like) and on an
RLDS dataset written by TFDS itself (read through the tfds fallback)."""

from __future__ import annotations

import collections
import itertools
import subprocess
import sys

import numpy as np
import pytest

from oxe_envlogger.datasets import inspection, reshard, visualize
from oxe_envlogger.format import layout, reader, record
from tests.helpers import read_tfds
from tests.tools.datasets import REPO, make_foreign, make_w1, make_w2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    a = make_w2(str(root / "a"), 3, seed=0, steps=12, image_size=48, wrist_size=24,
                unfinished=True)
    b = make_w2(str(root / "b"), 2, seed=30, steps=6, image_size=48, wrist_size=24)
    merged = str(root / "merged")
    reshard.reshard([a, b], merged, reshard.ReshardOptions(validation_fraction=0.3))
    return {"w2": a, "b": b, "merged": merged, "w1": make_w1(str(root / "w1"), 2, steps=25),
            "foreign": make_foreign(str(root / "foreign")), "root": str(root)}


def test_summary_of_a_w2_dataset(data):
    s = inspection.summarize(data["w2"])
    assert s["reader"] == "oxe_envlogger"
    assert s["episodes"] == 4 and s["invalid_episodes"] == 1
    lengths = [len(ep["steps"]["is_first"]) for ep in reader.read_episodes(data["w2"], keys=())]
    assert s["steps"] == sum(lengths) and s["episode_length"]["max"] == max(lengths)
    assert sum(s["episode_length_histogram"]["counts"]) == 4
    rows = {r["key"]: r for r in s["feature_table"]}
    assert rows["steps/observation/image"]["codec"] == "png"
    assert rows["steps/observation/image"]["shape"] == [48, 48, 3]
    assert rows["steps/action"]["dtype"] == "float32" and rows["steps/action"]["shape"] == [7]
    assert rows["steps/reward"]["dtype"] == "float64"
    assert rows["steps/reward"]["encoding"] == "none"  # float64 stored as float32 by default
    # bytes per feature: the serialized payloads, every episode
    sizes = collections.Counter()
    for _, _, blob in layout.iter_serialized(data["w2"]):
        for key, payload in record.split_example(blob).items():
            sizes[key] += len(payload)
    assert {k: r["bytes"] for k, r in rows.items()} == dict(sizes)
    assert abs(sum(r["share"] for r in rows.values()) - 1) < 1e-9
    assert rows["steps/observation/image"]["share"] > 0.5
    want = collections.Counter()
    for ep in reader.read_episodes(data["w2"], keys={"language_instruction"}):
        want.update({x.decode() for x in ep["steps"]["language_instruction"]})
    assert s["language_instructions"] == dict(want)
    prov = s["provenance"]
    assert list(prov["envs"]) == ["oxe_envlogger/SyntheticCamera-v0(image_size=48, wrist_size=24)"]
    assert prov["sessions"] == 1 and prov["versions"]["oxe_envlogger"]
    assert s["statistics_current"] and set(s["statistics"]) == {"action", "observation/state"}
    assert len(s["statistics"]["action"]["mean"]) == 7
    text = inspection.format_summary(s)
    for part in ("episodes: 4 (1 invalid)", "steps/observation/image", "png", "provenance:",
                 "SyntheticCamera-v0", "statistics (current", "language instructions"):
        assert part in text, part


def test_summary_of_a_resharded_dataset_carries_the_sources(data):
    s = inspection.summarize(data["merged"])
    assert s["splits"] == {"train": 4, "val": 2} and s["episodes"] == 6
    assert s["provenance"]["resharded_from"] == [data["w2"], data["b"]]
    assert s["provenance"]["sessions"] == 3  # the reshard and the two writers
    val = inspection.summarize(data["merged"], "val")
    assert val["episodes"] == 2 and val["splits"] == {"val": 2}


def test_summary_of_w1(data):
    s = inspection.summarize(data["w1"])
    assert s["episodes"] == 2 and s["steps"] == 52
    rows = {r["key"]: r for r in s["feature_table"]}
    assert rows["steps/observation"]["shape"] == [17] and rows["steps/observation"]["dtype"] == \
        "float64"
    assert s["language_instructions"] == {}
    before = read_tfds(data["w1"])
    returns = [float(ep["steps"]["reward"][:-1].sum()) for ep in before]
    assert s["episode_return"]["mean"] == pytest.approx(np.mean(returns))


def test_summary_of_a_tfds_written_dataset_falls_back_to_tfds(data):
    s = inspection.summarize(data["foreign"])
    assert s["reader"].startswith("tensorflow_datasets")
    assert s["episodes"] == 3 and s["steps"] == 5 + 6 + 7
    assert s["language_instructions"] == {"task 0": 2, "task 1": 1}
    rows = {r["key"]: r for r in s["feature_table"]}
    assert rows["steps/observation/rgb"]["kind"] == "image"
    assert rows["steps/observation/rgb"]["codec"] == "jpeg"
    assert rows["steps/observation/joints"]["shape"] == [-1]
    assert rows["steps/observation/rgb"]["bytes"] > 0  # sizes read from the raw records
    assert "read with: tensorflow_datasets" in inspection.format_summary(s)


def test_episode_frames_show_cameras_and_a_moving_cursor(data):
    episode = visualize.load_episode(data["w2"], 1)
    frames, desc = visualize.episode_frames(episode)
    frames = list(frames)
    n = len(episode["steps"]["is_first"])
    assert len(frames) == desc["frames"] == n
    assert desc["cameras"] == ["observation/image", "observation/wrist_image"]
    h, w = frames[0].shape[:2]
    assert h % 16 == 0 and w % 16 == 0 and w >= 512
    # The cameras, enlarged (nearest neighbour) to a common height, side by side under the title.
    from PIL import Image

    top = visualize._HEADER + 16
    height = -(-48 * (512 - 4) // (48 + 48))  # enlarged to fill 512 pixels
    x = 0
    for key in ("image", "wrist_image"):
        for t in (0, n - 1):
            want = np.asarray(Image.fromarray(episode["steps"]["observation"][key][t]).resize(
                (height, height), Image.NEAREST))
            np.testing.assert_array_equal(frames[t][top: top + height, x: x + height], want)
        x += height + 4
    red = [np.flatnonzero((f[..., 0] > 200) & (f[..., 1] < 60) & (f[..., 2] < 60)).size
           for f in frames]
    assert all(r > 0 for r in red)
    cursor_cols = [np.flatnonzero(((f[..., 0] > 200) & (f[..., 1] < 60)).any(0)).min()
                   for f in frames]
    assert cursor_cols == sorted(cursor_cols) and cursor_cols[0] < cursor_cols[-1]


@pytest.mark.parametrize("ext", ["mp4", "gif"])
def test_render_episode_writes_a_video(data, tmp_path, ext):
    import imageio.v3 as iio

    out = str(tmp_path / f"ep.{ext}")
    result = visualize.render_episode(data["w2"], 0, out, fps=8)
    if ext == "mp4":
        import imageio.v2 as imageio

        with imageio.get_reader(out) as r:
            frames = [f for f in r]
    else:
        frames = list(iio.imread(out, index=None))
    want, _ = visualize.episode_frames(visualize.load_episode(data["w2"], 0),
                                       title="a train[0]")
    want = list(want)
    assert len(frames) == result["frames"] == len(want)
    assert frames[0].shape[:2] == (result["height"], result["width"])
    for got, ref in ((frames[0], want[0]), (frames[-1], want[-1])):
        assert np.mean(np.abs(got[..., :3].astype(int) - ref.astype(int))) < 12


def test_render_errors(data, tmp_path):
    with pytest.raises(ValueError, match=r"\.mp4 or \.gif"):
        visualize.render_episode(data["w2"], 0, str(tmp_path / "x.avi"))
    with pytest.raises(IndexError, match="no episode 9"):
        visualize.render_episode(data["w2"], 9, str(tmp_path / "x.gif"))
    with pytest.raises(ValueError, match="no image"):
        visualize.render_episode(data["w1"], 0, str(tmp_path / "x.gif"))


def test_distributions_match_the_data(data, tmp_path):
    got = visualize.collect_distributions(data["w2"])
    actions = np.concatenate([ep["steps"]["action"][:-1]
                              for ep in reader.read_episodes(data["w2"], keys={"action"})])
    np.testing.assert_array_equal(got["keys"]["action"], actions.astype(np.float64))
    assert list(got["keys"]) == ["action", "observation/state"]
    out = str(tmp_path / "dist.png")
    result = visualize.plot_distributions(data["w2"], out)
    assert result["keys"] == {"action": 7, "observation/state": 8}
    from PIL import Image

    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] >= 900 and im.size[1] >= 3 * 270


def test_foreign_dataset_renders_and_plots_through_tfds(data, tmp_path):
    result = visualize.render_episode(data["foreign"], 2, str(tmp_path / "f.gif"), fps=4)
    assert result["cameras"] == ["observation/rgb"] and result["frames"] == 7
    assert result["language"] == ["task 0"]
    plot = visualize.plot_distributions(data["foreign"], str(tmp_path / "f.png"))
    assert plot["keys"] == {"action": 4, "observation/joints": 3}
    assert plot["samples"]["action"] == 4 + 5 + 6


def test_summary_does_not_import_tensorflow(data):
    code = (
        "import sys\n"
        "from oxe_envlogger.datasets import inspection\n"
        f"s = inspection.summarize({data['merged']!r})\n"
        "assert s['reader'] == 'oxe_envlogger'\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'matplotlib', 'jax')]\n"
        "assert not bad, bad\n"
        "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         timeout=120, check=False)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def _overlaps(a, b) -> bool:
    from matplotlib.transforms import Bbox

    cut = Bbox.intersection(a, b)
    return cut is not None and cut.width > 0 and cut.height > 0


@pytest.mark.parametrize("dims", [1, 2, 7, 12, 20])
def test_video_action_legend_covers_no_trace(dims):
    rng = np.random.default_rng(dims)
    actions = rng.uniform(-1, 1, size=(60, dims))
    actions[:, 0] = 1.0  # a trace along the top edge, where an inside legend would sit
    labels = [f"action[{i}]" for i in range(dims)] if dims > 1 else ["action"]
    fig, axes, _ = visualize.trace_figure(actions, labels, rng.normal(size=60), 512, 260)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = axes[0].get_legend()
    if dims == 1:  # the panel's label says it all
        assert legend is None
        return
    assert [t.get_text() for t in legend.get_texts()] == [f"[{i}]" for i in range(dims)]
    box = legend.get_window_extent(renderer)
    for ax in axes:  # the data area of every panel, action and reward
        assert not _overlaps(box, ax.bbox), (dims, box, ax.bbox)
    assert fig.bbox.contains(box.x0, box.y0) and fig.bbox.contains(box.x1, box.y1)


@pytest.mark.parametrize("lengths", [[61] * 4, [10, 11, 11, 12, 40, 61], list(range(1, 201)),
                                     [5, 500]])
def test_episode_length_histogram_has_integer_bins(lengths):
    data = {"keys": {"action": np.random.default_rng(0).normal(size=(50, 3))},
            "labels": {"action": ["0", "1", "2"]}, "lengths": lengths,
            "returns": [float(n) for n in lengths]}
    fig = visualize.distributions_figure(data, "x")
    fig.canvas.draw()
    ax = fig.axes[0]
    bars = sorted(ax.patches, key=lambda p: p.get_x())
    edges = np.array([p.get_x() for p in bars] + [bars[-1].get_x() + bars[-1].get_width()])
    widths = np.diff(edges)
    # Every bin spans the same whole number of lengths, centred on them (edges at k - 0.5).
    np.testing.assert_allclose(edges + 0.5, np.round(edges + 0.5), atol=1e-9)
    assert np.allclose(widths, widths[0]) and widths[0] == round(widths[0]) >= 1
    assert len(bars) <= 30
    counts = [sum(lo < n < hi for n in lengths) for lo, hi in itertools.pairwise(edges)]
    assert [p.get_height() for p in bars] == counts and sum(counts) == len(lengths)
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(t == round(t) for t in ticks)


def test_distribution_legends_cover_no_violin(data):
    fig = visualize.distributions_figure(visualize.collect_distributions(data["w2"]), "w2")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 2  # action and observation/state
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            assert not _overlaps(box, ax.bbox), (box, ax.bbox)
