"""Looking at datasets: an episode as a video, and the dataset's action/state distributions.

:func:`render_episode` writes one episode's camera images side by side, frame by frame, with the
action and reward traces drawn under them (a cursor marks the current step) to an MP4 (ffmpeg
from imageio-ffmpeg) or a GIF (Pillow). :func:`plot_distributions` draws, for every numeric
action key and every float observation key, the distribution of each dimension over all steps
of the dataset (violins with mean and 5/95% marks), above the episode length and return
histograms.

Episodes are read with the TF-free reader, or with ``tfds.builder_from_directory`` for datasets
it cannot decode, so any RLDS dataset works. matplotlib, imageio and Pillow are imported inside
the functions (they are in the ``tools`` extra, not needed for logging).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from oxe_envlogger.datasets import inspection
from oxe_envlogger.errors import OXEEnvLoggerError
from oxe_envlogger.format import layout, reader
from oxe_envlogger.format.specs import is_image_shape

PathLike = str | os.PathLike
_MIN_WIDTH = 512
_MAX_CAMERA_HEIGHT = 320
_HEADER = 42  # two lines: episode, step and reward; the language instruction
_TRACE_HEIGHT = 260


# ---------------------------------------------------------------------------------------------
# Reading


def _ours(directory: str) -> bool:
    """Whether the TF-free reader can decode this dataset."""
    layout.check_directory(directory)
    info = layout.read_json(os.path.join(directory, layout.DATASET_INFO))
    if info is None:
        raise layout.no_dataset_error(directory)
    if not layout.is_tfrecord(info):
        return False
    try:
        reader.read_spec(directory)
    except (OXEEnvLoggerError, KeyError, ValueError):
        return False
    return True


def load_episode(directory: PathLike, index: int, *, split: str = layout.DEFAULT_SPLIT
                 ) -> dict[str, Any]:
    """Episode ``index`` of a split as nested numpy dicts (``steps`` stacked over steps),
    images decoded.

    Raises:
      IndexError: when the split has fewer episodes.
    """
    directory = os.fspath(directory)
    if _ours(directory):
        info = layout.read_json(os.path.join(directory, layout.DATASET_INFO))
        spec = reader.read_spec(directory)
        first = 0
        for path, n in layout.shard_paths(directory, info, split):
            if index < first + n:  # read only the shard that holds it
                for i, episode in enumerate(reader.read_shard(path, spec)):
                    if first + i == index:
                        return episode
            first += n
        raise IndexError(f"{directory}: split {split!r} has {first} episodes; no episode {index}")
    builder = inspection.tfds_builder(directory)
    total = builder.info.splits[split].num_examples
    if not 0 <= index < total:
        raise IndexError(f"{directory}: split {split!r} has {total} episodes; no episode {index}")
    return next(inspection.tfds_episodes(directory, f"{split}[{index}:{index + 1}]"))


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def camera_keys(steps: dict[str, Any]) -> list[str]:
    """Step keys holding images: uint8 arrays of shape (T, H, W, 1|3|4)."""
    return [k for k, v in _flat(steps).items()
            if isinstance(v, np.ndarray) and v.ndim == 4 and is_image_shape(v.shape[1:], v.dtype)]


def numeric_columns(steps: dict[str, Any], prefix: str) -> tuple[np.ndarray, list[str]]:
    """The numeric step arrays under ``prefix`` (e.g. ``action``) as one (T, D) float array,
    with a label per column."""
    cols, labels = [], []
    for k, v in _flat(steps).items():
        if not (k == prefix or k.startswith(prefix + "/")):
            continue
        if not isinstance(v, np.ndarray) or v.dtype.kind not in "biuf" or v.ndim == 0:
            continue
        if v.dtype == np.uint8 and v.ndim == 4:
            continue
        flat = v.reshape(len(v), -1).astype(np.float64)
        cols.append(flat)
        labels += [f"{k}[{i}]" if flat.shape[1] > 1 else k for i in range(flat.shape[1])]
    if not cols:
        return np.zeros((0, 0)), []
    return np.concatenate(cols, axis=1), labels


def _texts(episode: dict[str, Any]) -> list[str]:
    flat = _flat(episode)
    keys = inspection.language_keys([(k, "text") for k, v in flat.items()
                                     if isinstance(v, (bytes, str)) or (
                                         isinstance(v, np.ndarray) and v.dtype.kind in "OSU")])
    out: list[str] = []
    for k in keys:
        for v in np.asarray(flat[k], dtype=object).reshape(-1):
            t = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
            if t and t not in out:
                out.append(t)
    return out


# ---------------------------------------------------------------------------------------------
# Episode video


def _to_rgb(frame: np.ndarray) -> np.ndarray:
    if frame.shape[-1] == 1:
        return np.repeat(frame, 3, axis=-1)
    return frame[..., :3]


def _camera_strip(images: Sequence[np.ndarray], height: int) -> tuple[list[np.ndarray], int]:
    """Each camera's frames resized to ``height`` (Pillow; nearest when enlarging)."""
    from PIL import Image

    out = []
    for frames in images:
        h, w = frames.shape[1:3]
        width = max(1, round(w * height / h))
        resample = Image.NEAREST if height >= h else Image.BILINEAR
        out.append(np.stack([np.asarray(Image.fromarray(_to_rgb(f)).resize((width, height),
                                                                           resample))
                             for f in frames]))
    return out, sum(a.shape[2] for a in out) + 4 * (len(out) - 1)


def _figure(width_in: float, height_in: float, dpi: int = 100):
    """A matplotlib Figure on the Agg canvas (no pyplot, no display)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _action_legend_label(label: str) -> str:
    """``action[3]`` -> ``[3]``, ``action/arm[2]`` -> ``arm[2]``: the panel says "action"."""
    rest = label[len("action"):] if label.startswith("action") else label
    return rest.lstrip("/") or label


def trace_figure(actions: np.ndarray, action_labels: list[str], rewards: np.ndarray | None,
                 width: int, height: int):
    """The action and reward traces of an episode video as a matplotlib Figure of
    ``width`` x ``height`` pixels, one panel each, sharing the step axis.

    The action legend (for 2 to 20 dimensions, or one named by its key) sits right of the
    panels, outside the axes, so that it covers no trace.

    Returns:
      ``(figure, axes, steps)``: the panels' axes (action first) and the step numbers.
    """
    dpi = 100
    panels = [p for p in (("action", actions), ("reward", rewards)) if p[1] is not None
              and np.size(p[1])]
    fig = _figure(width / dpi, height / dpi, dpi)
    axes = fig.subplots(max(1, len(panels)), 1, sharex=True, squeeze=False)[:, 0]
    steps = np.arange(len(actions) if np.size(actions) else len(rewards if rewards is not None
                                                                     else []))
    for ax, (name, values) in zip(axes, panels):
        values = np.asarray(values, dtype=np.float64)
        if values.ndim == 1:
            ax.plot(steps, values, lw=1.2, color="tab:green")
        else:
            for i in range(values.shape[1]):
                label = action_labels[i] if i < len(action_labels) else None
                ax.plot(steps, values[:, i], lw=1.0,
                        label=_action_legend_label(label) if label else None)
            named = values.shape[1] > 1 or action_labels[:1] != ["action"]
            if named and values.shape[1] <= 20:
                # Outside the axes, right of the action panel; up to 8 rows fit its height.
                ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                          fontsize=6, ncol=math.ceil(values.shape[1] / 8), handlelength=1.2,
                          labelspacing=0.3, columnspacing=0.8, frameon=False)
        ax.set_ylabel(name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step", fontsize=8)
    if len(steps):
        axes[-1].set_xlim(-0.5, max(len(steps) - 0.5, 0.5))
    fig.tight_layout(pad=0.4)  # counts the legend, so the axes leave it room
    return fig, axes[: len(panels)], steps


def _trace_background(actions: np.ndarray, action_labels: list[str], rewards: np.ndarray | None,
                      width: int, height: int) -> tuple[np.ndarray, list[tuple[np.ndarray, int, int]]]:
    """The traces plot as an RGB image, and per axes the pixel column of each step and the
    axes' top and bottom rows (to draw the cursor)."""
    fig, axes, steps = trace_figure(actions, action_labels, rewards, width, height)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    fig_h = image.shape[0]
    cursors = []
    for ax in axes:
        xs = ax.transData.transform(np.stack([steps, np.zeros_like(steps)], 1))[:, 0]
        _, y0, _, y1 = ax.bbox.extents
        cursors.append((np.clip(np.round(xs).astype(int), 0, image.shape[1] - 2),
                        int(fig_h - y1), int(fig_h - y0)))
    return image, cursors


def _text(image: np.ndarray, text: str, xy: tuple[int, int], size: int = 14) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    draw.text(xy, text, fill=(20, 20, 20), font=font)
    return np.asarray(pil)


def episode_frames(episode: dict[str, Any], *, title: str = "",
                   cameras: Sequence[str] | None = None, stride: int = 1
                   ) -> tuple[Iterator[np.ndarray], dict[str, Any]]:
    """The frames of :func:`render_episode` (an iterator, so long episodes stream), and a
    description (size, cameras, frame count)."""
    steps = episode["steps"]
    flat = _flat(steps)
    keys = list(cameras) if cameras else camera_keys(steps)
    missing = [k for k in keys if k not in flat]
    if missing:
        raise KeyError(f"no camera {missing}; image keys: {camera_keys(steps)}")
    if not keys:
        raise ValueError(f"the episode has no image (uint8 HxWxC) step keys; keys: {sorted(flat)}")
    n = len(flat[keys[0]])
    actions, labels = numeric_columns(steps, "action")
    rewards = flat.get("reward")
    if rewards is not None:
        rewards = np.asarray(rewards, dtype=np.float64).reshape(n, -1)[:, 0]
    height = min(_MAX_CAMERA_HEIGHT, max(flat[k].shape[1] for k in keys))
    gaps = 4 * (len(keys) - 1)
    widths = sum(flat[k].shape[2] * height / flat[k].shape[1] for k in keys)
    if widths + gaps < _MIN_WIDTH:  # small cameras: enlarge, so that the traces stay readable
        height = math.ceil(height * (_MIN_WIDTH - gaps) / widths)
    cams, width = _camera_strip([flat[k][::stride] for k in keys], height)
    trace, cursors = _trace_background(actions, labels, rewards, width, _TRACE_HEIGHT)
    total_h = _HEADER + 16 + height + trace.shape[0]
    out_h, out_w = -(-total_h // 16) * 16, -(-width // 16) * 16  # video codecs want /16
    lang = _texts(episode)
    header = np.full((_HEADER, out_w, 3), 255, np.uint8)
    if lang:
        header = _text(header, lang[0] + (f"  (+{len(lang) - 1} more)" if len(lang) > 1 else ""),
                       (6, 22), size=13)
    labels = np.full((16, out_w, 3), 255, np.uint8)
    x = 0
    for key, cam in zip(keys, cams):
        labels = _text(labels, key, (x + 3, 1), size=11)
        x += cam.shape[2] + 4
    desc = {"frames": len(cams[0]), "width": out_w, "height": out_h, "cameras": keys,
            "steps": n, "action_dims": actions.shape[1] if actions.size else 0,
            "language": lang}

    def frames() -> Iterator[np.ndarray]:
        for j in range(len(cams[0])):
            t = j * stride
            frame = np.full((out_h, out_w, 3), 255, np.uint8)
            top = _HEADER + 16
            frame[_HEADER:top] = labels
            x = 0
            for cam in cams:
                frame[top: top + height, x: x + cam.shape[2]] = cam[j]
                x += cam.shape[2] + 4
            plot = trace.copy()
            for xs, y0, y1 in cursors:
                plot[y0:y1, xs[t]: xs[t] + 2] = (220, 30, 30)
            frame[top + height: top + height + plot.shape[0], : plot.shape[1]] = plot
            r = f"  reward {rewards[t]:+.3f}" if rewards is not None else ""
            frame[:_HEADER] = _text(header, f"{title}   step {t}/{n - 1}{r}", (6, 3), size=13)
            yield frame

    return frames(), desc


def render_episode(directory: PathLike, episode: int, out_path: PathLike, *,
                   split: str = layout.DEFAULT_SPLIT, fps: float = 10.0,
                   cameras: Sequence[str] | None = None, stride: int = 1) -> dict[str, Any]:
    """Writes episode ``episode`` of ``split`` as a video: the cameras side by side over the
    action and reward traces.

    Args:
      directory: any RLDS dataset directory.
      episode: index of the episode in the split.
      out_path: ``*.mp4`` (H.264 through imageio-ffmpeg) or ``*.gif``.
      fps: frames per second.
      cameras: step keys of the cameras (default: every uint8 HxWxC step key).
      stride: keep every ``stride``-th step.

    Returns:
      ``{"path", "frames", "width", "height", "cameras", "steps", ...}``.

    Raises:
      ValueError: for another file type or an episode without images.
      IndexError: for an episode index beyond the split.
    """
    import imageio.v2 as imageio

    out_path = os.fspath(out_path)
    ext = os.path.splitext(out_path)[1].lower()
    if ext not in (".mp4", ".gif"):
        raise ValueError(f"{out_path}: expected a .mp4 or .gif file")
    data = load_episode(directory, episode, split=split)
    title = f"{os.path.basename(os.path.normpath(os.fspath(directory)))} {split}[{episode}]"
    frames, desc = episode_frames(data, title=title, cameras=cameras, stride=max(1, stride))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    if ext == ".mp4":
        with imageio.get_writer(out_path, format="FFMPEG", fps=fps, codec="libx264",
                                quality=8, pixelformat="yuv420p", macro_block_size=16) as w:
            for frame in frames:
                w.append_data(frame)
    else:
        import imageio.v3 as iio

        iio.imwrite(out_path, np.stack(list(frames)), extension=".gif",
                    duration=round(1000 / fps), loop=0)
    return {"path": out_path, "fps": fps, **desc}


# ---------------------------------------------------------------------------------------------
# Dataset distributions


def _episodes_for_plot(directory: str, splits: list[str], max_episodes: int | None
                       ) -> Iterator[dict[str, Any]]:
    if _ours(directory):
        spec = reader.read_spec(directory)
        keys = {p for p, leaf in reader.step_leaves(spec) if leaf.kind == "tensor"}
        source = (ep for s in splits
                  for ep in reader.read_episodes(directory, s, keys=keys, decode_images=False))
    else:
        source = (ep for s in splits for ep in inspection.tfds_episodes(directory, s))
    for count, ep in enumerate(source):
        if max_episodes is not None and count >= max_episodes:
            return
        yield ep


def collect_distributions(directory: PathLike, *, split: str | None = None,
                          max_episodes: int | None = None, max_dims: int = 32
                          ) -> dict[str, Any]:
    """Every step but the last of each episode (whose action is padding) of the action keys and
    the float observation keys, as ``{"keys": {key: (N, D) array}, "labels": {key: [...]},
    "lengths": [...], "returns": [...]}``. Keys wider than ``max_dims`` keep the first dims."""
    directory = os.fspath(directory)
    info = layout.read_json(os.path.join(directory, layout.DATASET_INFO))
    if info is None:
        raise layout.no_dataset_error(directory)
    splits = [split] if split else layout.list_splits(info)
    parts: dict[str, list[np.ndarray]] = {}
    labels: dict[str, list[str]] = {}
    lengths, returns = [], []
    for ep in _episodes_for_plot(directory, splits, max_episodes):
        steps = ep["steps"]
        flat = _flat(steps)
        n = len(next(iter(flat.values())))
        lengths.append(n)
        if "reward" in flat:
            returns.append(float(np.sum(np.asarray(flat["reward"], np.float64)[:-1])))
        for key, v in flat.items():
            if not isinstance(v, np.ndarray) or v.ndim == 0 or len(v) != n:
                continue
            is_action = key == "action" or key.startswith("action/")
            is_state = key.startswith("observation") and v.dtype.kind == "f"
            if not (is_action and v.dtype.kind in "biuf") and not is_state:
                continue
            if v.dtype == np.uint8 and v.ndim == 4:
                continue
            flat_v = v.reshape(n, -1)[:-1, :max_dims].astype(np.float64)
            parts.setdefault(key, []).append(flat_v)
            if key not in labels:
                labels[key] = [str(i) for i in range(flat_v.shape[1])]
    keys = {k: np.concatenate(v) for k, v in parts.items()}
    order = sorted(keys, key=lambda k: (not k.startswith("action"), k))
    return {"keys": {k: keys[k] for k in order}, "labels": labels, "lengths": lengths,
            "returns": returns}


def integer_bins(values: Sequence[int], max_bins: int = 30) -> np.ndarray:
    """Histogram bin edges for integer data: each bin spans the same whole number of integers
    and is centred on them (edges at ``k - 0.5``), so no bar straddles a value."""
    lo, hi = int(min(values)), int(max(values))
    width = max(1, math.ceil((hi - lo + 1) / max_bins))
    return np.arange(lo, hi + width + 1, width) - 0.5


def distributions_figure(data: dict[str, Any], name: str):
    """The figure :func:`plot_distributions` saves, from :func:`collect_distributions`'s
    ``data``: episode length and return histograms, then one row of violins per key.

    The legends sit above the axes' top right corner, outside the data area.
    """
    from matplotlib.ticker import MaxNLocator

    keys = data["keys"]
    rows = 1 + len(keys)
    widest = max([v.shape[1] for v in keys.values()] + [8])
    fig = _figure(max(9.0, 0.55 * widest + 2.5), 2.7 * rows)
    grid = fig.add_gridspec(rows, 2)
    ax = fig.add_subplot(grid[0, 0])
    if data["lengths"]:
        ax.hist(data["lengths"], bins=integer_bins(data["lengths"]), color="tab:blue")
    # min_n_ticks=1: where only one whole number is in view (every episode equally long), tick
    # it alone rather than fall back to fractional ticks.
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_title(f"{name}: episode length (RLDS steps; {len(data['lengths'])} episodes)",
                 fontsize=9)
    ax = fig.add_subplot(grid[0, 1])
    if data["returns"]:
        ax.hist(data["returns"], bins=min(30, max(1, len(data["returns"]))), color="tab:green")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_title("episode return (steps but the last)", fontsize=9)
    for row, (key, values) in enumerate(keys.items(), start=1):
        ax = fig.add_subplot(grid[row, :])
        dims = values.shape[1]
        positions = np.arange(dims)
        spread = values.std(axis=0) > 0
        if spread.any():
            parts = ax.violinplot([values[:, i] for i in np.flatnonzero(spread)],
                                  positions=positions[spread], widths=0.8, showextrema=False)
            for body in parts["bodies"]:
                body.set_alpha(0.55)
        lo, hi = np.percentile(values, [5, 95], axis=0)
        ax.scatter(positions, values.mean(axis=0), marker="o", s=14, color="black",
                   label="mean", zorder=3)
        ax.scatter(positions, lo, marker="_", s=80, color="tab:red", label="5% / 95%", zorder=3)
        ax.scatter(positions, hi, marker="_", s=80, color="tab:red", zorder=3)
        ax.set_xticks(positions)
        ax.set_xticklabels(data["labels"][key][:dims], fontsize=7)
        ax.set_title(f"steps/{key}: {dims} dims, {len(values)} steps", fontsize=9, loc="left")
        ax.grid(axis="y", alpha=0.3)
        # Above the top right corner, beside the left-aligned title: no violin under it.
        ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), borderaxespad=0.2, ncol=2,
                  fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def plot_distributions(directory: PathLike, out_path: PathLike, *, split: str | None = None,
                       max_episodes: int | None = None, max_dims: int = 32) -> dict[str, Any]:
    """Draws the action and state distributions of a dataset into a PNG.

    Returns:
      ``{"path", "keys": {key: dims}, "episodes", "samples"}``.
    """
    data = collect_distributions(directory, split=split, max_episodes=max_episodes,
                                 max_dims=max_dims)
    fig = distributions_figure(data, os.path.basename(os.path.normpath(os.fspath(directory))))
    out_path = os.fspath(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path)
    keys = data["keys"]
    return {"path": out_path, "keys": {k: v.shape[1] for k, v in keys.items()},
            "episodes": len(data["lengths"]), "samples": {k: len(v) for k, v in keys.items()}}
