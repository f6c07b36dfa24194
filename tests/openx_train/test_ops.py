"""The pure ops, each run eagerly and inside tf.data, element by element on hand-made data; the
index arithmetic, gathering and normalization also in numpy (``frames``, the state-only path)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from openx_train.data import AugmentConfig, KeyStatistics, Normalization, frames, ops

MODES = ["eager", "tf.data"]
# The functions of openx_train.data.frames: on numpy arrays, and on tensors through ops.
SHARED_MODES = ["numpy", *MODES]


def lib(mode: str):
    """The module whose functions a mode runs: ``frames`` (numpy) or ``ops`` (tensors)."""
    return frames if mode == "numpy" else ops


def run(mode: str, fn, *args):
    """``fn(*args)`` on numpy arrays, eagerly, or as a tf.data map over one element."""
    if mode == "numpy":
        return fn(*args)
    args = tuple(tf.nest.map_structure(tf.convert_to_tensor, a) for a in args)
    if mode == "eager":
        out = fn(*args)
    else:
        out = tf.data.Dataset.from_tensors(args).map(lambda *a: fn(*a)).get_single_element()
    return tf.nest.map_structure(lambda t: t.numpy(), out)


@pytest.mark.parametrize("mode", SHARED_MODES)
def test_history_window_at_episode_start(mode):
    idx, mask = run(mode, lambda t: lib(mode).history_indices(t, 3), np.arange(4, dtype=np.int64))
    np.testing.assert_array_equal(idx, [[0, 0, 0], [0, 0, 1], [0, 1, 2], [1, 2, 3]])
    np.testing.assert_array_equal(mask, [[False, False, True], [False, True, True],
                                         [True, True, True], [True, True, True]])


@pytest.mark.parametrize("mode", SHARED_MODES)
def test_action_chunk_at_episode_end(mode):
    # 5 RLDS steps: 4 real actions (steps 0..3), the final step's action is padding.
    idx, mask = run(mode, lambda t, n: lib(mode).chunk_indices(t, n, 3),
                    np.arange(4, dtype=np.int64), np.int64(4))
    np.testing.assert_array_equal(idx, [[0, 1, 2], [1, 2, 3], [2, 3, 3], [3, 3, 3]])
    np.testing.assert_array_equal(mask, [[True, True, True], [True, True, True],
                                         [True, True, False], [True, False, False]])


@pytest.mark.parametrize("mode", SHARED_MODES)
def test_chunk_of_one_and_window_of_one_are_the_step_itself(mode):
    t = np.arange(3, dtype=np.int64)
    (h, hm), (c, cm) = run(mode, lambda t: (lib(mode).history_indices(t, 1), lib(mode).chunk_indices(t, 3, 1)),
                           t)
    np.testing.assert_array_equal(h[:, 0], t)
    np.testing.assert_array_equal(c[:, 0], t)
    assert hm.all() and cm.all()


@pytest.mark.parametrize("mode", SHARED_MODES)
def test_goal_indices_are_in_the_future_of_the_step(mode):
    rng = np.random.default_rng(0)
    length = rng.integers(2, 40, 2000)
    t = (rng.random(2000) * (length - 1)).astype(np.int64)  # 0 .. L-2
    u = rng.random(2000)
    u[:10], u[10:20] = 0.0, np.nextafter(1.0, 0.0)
    goal = run(mode, lib(mode).goal_indices, t, length, u.astype(np.float32))
    assert (goal > t).all() and (goal <= length - 1).all()
    # The last frame's only future step is the final observation.
    last = run(mode, lib(mode).goal_indices, length - 2, length, u.astype(np.float32))
    np.testing.assert_array_equal(last, length - 1)
    # Every future step can be drawn: uniforms on a grid hit each of them.
    grid = (np.arange(7) + 0.5) / 7
    goals = run(mode, lib(mode).goal_indices, np.zeros(7, np.int64), np.full(7, 8), grid)
    np.testing.assert_array_equal(np.sort(goals), np.arange(1, 8))


def _reference_frames(lengths, n_obs, n_action):
    """Python loops: for each frame, its window rows/mask and chunk rows/mask."""
    out = []
    start = 0
    for length in lengths:
        for t in range(length - 1):
            hist = [max(t - k, 0) + start for k in range(n_obs - 1, -1, -1)]
            hmask = [t - k >= 0 for k in range(n_obs - 1, -1, -1)]
            chunk = [min(t + k, length - 2) + start for k in range(n_action)]
            cmask = [t + k <= length - 2 for k in range(n_action)]
            out.append((start + t, start, length, hist, hmask, chunk, cmask))
        start += length
    return out


@pytest.mark.parametrize("mode", SHARED_MODES)
def test_gather_frames_element_by_element(mode):
    lengths = [2, 3, 6]  # episodes of 1, 2 and 5 actions
    rows = np.arange(sum(lengths))
    table = {"state": np.stack([rows * 10.0, rows * 10.0 + 1], -1).astype(np.float32),
             "action": (rows[:, None] * 100.0).astype(np.float32),
             "language": np.array([f"s{r}".encode() for r in rows], object)}
    ref = _reference_frames(lengths, n_obs=3, n_action=4)
    frame_rows = np.array([r[0] for r in ref])
    starts = np.array([r[1] for r in ref])
    lens = np.array([r[2] for r in ref])
    out = run(mode, lambda tb, r, s, n: lib(mode).gather_frames(tb, r, s, n, n_obs=3, n_action=4),
              table, frame_rows, starts, lens)
    for i, (row, start, _, hist, hmask, chunk, cmask) in enumerate(ref):
        np.testing.assert_array_equal(out["observation"]["state"][i], table["state"][hist])
        np.testing.assert_array_equal(out["observation"]["pad_mask"][i], hmask)
        np.testing.assert_array_equal(out["action"][i], table["action"][chunk])
        np.testing.assert_array_equal(out["action_pad_mask"][i], cmask)
        assert out["step_index"][i] == row - start
        assert out["language_instruction"][i] == f"s{row}".encode()
    # Spot checks, written out: the 5-action episode starts at row 5.
    first = list(frame_rows).index(5)
    np.testing.assert_array_equal(out["observation"]["pad_mask"][first], [False, False, True])
    np.testing.assert_array_equal(out["observation"]["state"][first][:, 0], [50, 50, 50])
    last = list(frame_rows).index(9)  # t = 4, the last frame (step 5 is final)
    np.testing.assert_array_equal(out["action"][last][:, 0], [900, 900, 900, 900])
    np.testing.assert_array_equal(out["action_pad_mask"][last], [True, False, False, False])


@pytest.mark.parametrize("mode", SHARED_MODES)
def test_gather_frames_goals_stay_in_their_episode(mode):
    lengths = [3, 4, 2]
    ref = _reference_frames(lengths, 1, 1)
    rows = np.repeat([r[0] for r in ref], 50)
    starts = np.repeat([r[1] for r in ref], 50)
    lens = np.repeat([r[2] for r in ref], 50)
    total = sum(lengths)
    table = {"state": np.arange(total, dtype=np.float32)[:, None],
             "action": np.zeros((total, 1), np.float32)}
    u = np.random.default_rng(1).random(len(rows)).astype(np.float32)
    out = run(mode, lambda tb, r, s, n, u: lib(mode).gather_frames(tb, r, s, n, n_obs=1, n_action=1,
                                                             goal_uniform=u),
              table, rows, starts, lens, u)
    goal_rows = out["goal"]["state"][:, 0].astype(int)
    assert (goal_rows > rows).all() and (goal_rows < starts + lens).all()
    np.testing.assert_array_equal(goal_rows - starts, out["goal_step_index"])


def _stats(x: np.ndarray) -> KeyStatistics:
    q = {f"q{p:02d}": np.quantile(x, p / 100, axis=0) for p in (1, 5, 25, 50, 75, 95, 99)}
    return KeyStatistics(count=np.full(x.shape[1:], len(x)), mean=x.mean(0), std=x.std(0),
                         min=x.min(0), max=x.max(0), quantiles=q)


@pytest.mark.parametrize("mode", SHARED_MODES)
@pytest.mark.parametrize("norm", ["none", "gaussian", "bounds", "bounds_q99"])
def test_normalization_round_trip(mode, norm):
    rng = np.random.default_rng(2)
    x = np.stack([rng.normal(3, 2, 500), rng.uniform(-5, 1, 500), np.full(500, 7.0)], -1)
    stats = _stats(x)
    y = run(mode, lambda v: lib(mode).normalize(v, stats, norm), x.astype(np.float32))
    back = run(mode, lambda v: lib(mode).unnormalize(v, stats, norm), y)
    inside = np.ones(len(x), bool)
    if norm == "bounds_q99":
        inside = ((x >= stats.quantile("q01")) & (x <= stats.quantile("q99"))).all(-1)
        assert np.abs(y).max() <= 1.0
    np.testing.assert_allclose(back[inside], x[inside], rtol=1e-5, atol=1e-4)
    if norm == "gaussian":
        np.testing.assert_allclose(y[:, :2].mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(y[:, :2].std(0), 1, atol=1e-4)
    if norm == "bounds":
        np.testing.assert_allclose(y[:, :2].min(0), -1, atol=1e-6)
        np.testing.assert_allclose(y[:, :2].max(0), 1, atol=1e-6)
    if norm != "none":  # a constant dimension is centred, not divided by zero
        np.testing.assert_array_equal(y[:, 2], 0.0)


def test_normalization_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="expected one of"):
        ops.normalize(np.zeros(2), _stats(np.zeros((3, 2))), "minmax", key="action")
    assert Normalization.parse("bounds") is Normalization.BOUNDS


def _png(image: np.ndarray) -> bytes:
    return tf.io.encode_png(image).numpy()


@pytest.mark.parametrize("mode", MODES)
def test_resize_without_augmentation_is_bilinear(mode):
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    frames = np.array([_png(im) for im in images], object)
    out = run(mode, lambda f: ops.preprocess_frames(f, (16, 16)), frames)
    want = tf.image.resize(images, (16, 16), method="bilinear").numpy()
    assert out.dtype == np.uint8 and out.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(out, want, atol=0.51)
    same = run(mode, lambda f: ops.preprocess_frames(f, (32, 32)), frames)
    np.testing.assert_array_equal(same, images)
    as_float = run(mode, lambda f: ops.preprocess_frames(f, (32, 32), dtype="float32"), frames)
    np.testing.assert_allclose(as_float, images / 255.0, atol=1e-6)


def _coordinate_image(size: int, blue: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    return np.stack([x * 255 // (size - 1), y * 255 // (size - 1),
                     np.full_like(x, blue)], -1).astype(np.uint8)


@pytest.mark.parametrize("mode", MODES)
def test_one_crop_for_the_whole_history_window(mode):
    frames = np.array([_png(_coordinate_image(48, 10)), _png(_coordinate_image(48, 200))], object)
    crop_only = AugmentConfig(crop_scale=(0.3, 0.5), brightness=0, contrast=None,
                              saturation=None, hue=0)
    outs = [run(mode, lambda f, s: ops.preprocess_frames(f, (24, 24), augment=crop_only, seed=s),
                frames, np.array([seed, 7], np.int64)) for seed in range(4)]
    for out in outs:
        # The x/y coordinate channels agree across the window: the same crop.
        np.testing.assert_array_equal(out[0, ..., :2], out[1, ..., :2])
        assert (out[0, ..., 2] == 10).all() and (out[1, ..., 2] == 200).all()
        # A crop of at most half the area spans at most ~71% of each axis.
        assert out[0, :, -1, 0].max() - out[0, :, 0, 0].min() < 0.75 * 255
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("mode", MODES)
def test_color_jitter_identity_gray_and_luma(mode):
    rng = np.random.default_rng(5)
    images = rng.uniform(20, 230, (2, 8, 8, 3)).astype(np.float32)
    identity = {"color": np.eye(3, dtype=np.float32), "contrast": np.float32(1),
                "brightness": np.float32(0)}
    out = run(mode, ops.color_jitter, images, identity)
    np.testing.assert_allclose(out, images, atol=1e-3)
    gray = {"color": run(mode, ops.color_matrix, np.float32(0), np.float32(0)),
            "contrast": np.float32(1), "brightness": np.float32(0)}
    out = run(mode, ops.color_jitter, images, gray)
    np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-3)
    np.testing.assert_allclose(out[..., 1], out[..., 2], atol=1e-3)
    hue = {"color": run(mode, ops.color_matrix, np.float32(1), np.float32(0.3)),
           "contrast": np.float32(1), "brightness": np.float32(0)}
    luma = np.array([0.299, 0.587, 0.114])
    out = run(mode, ops.color_jitter, images, hue)
    inside = ((out > 0.01) & (out < 254.99)).all(-1)
    np.testing.assert_allclose((out @ luma)[inside], (images @ luma)[inside], atol=1e-2)
    assert np.abs(out - images).max() > 5  # the hue did change
    brighter = dict(identity, brightness=np.float32(25.5), contrast=np.float32(0.5))
    out = run(mode, ops.color_jitter, images, brighter)
    mean = images.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(out, np.clip(0.5 * images + 0.5 * mean + 25.5, 0, 255),
                               atol=1e-3)


@pytest.mark.parametrize("mode", MODES)
def test_sampled_augmentation_stays_in_its_ranges(mode):
    augment = AugmentConfig(crop_scale=(0.5, 0.9), crop_ratio=(0.8, 1.25), brightness=0.2,
                            contrast=(0.7, 1.3), saturation=(0.6, 1.4), hue=0.1)
    seeds = np.stack([np.arange(500), np.full(500, 3)], -1).astype(np.int64)
    p = run(mode, lambda s: ops.sample_augmentation(s, augment), seeds)
    area = p["crop"][:, 2] * p["crop"][:, 3]
    assert (area <= 0.9 + 1e-6).all() and (area >= 0.5 * 0.8 - 1e-6).all()
    assert ((p["crop"][:, :2] >= 0) & (p["crop"][:, :2] < 1)).all()
    assert (np.abs(p["brightness"]) <= 0.2 * 255 + 1e-3).all()
    assert ((p["contrast"] >= 0.7) & (p["contrast"] <= 1.3)).all()
    assert p["color"].shape == (500, 3, 3)
    assert np.std(p["brightness"]) > 10 and len(np.unique(p["contrast"])) > 400
    again = run(mode, lambda s: ops.sample_augmentation(s, augment), seeds)
    np.testing.assert_array_equal(again["crop"], p["crop"])


def test_augmentation_is_the_same_eagerly_and_in_tf_data():
    frames = np.array([_png(_coordinate_image(40, 50))] * 2, object)
    seed = np.array([11, 12], np.int64)
    outs = [run(mode, lambda f, s: ops.preprocess_frames(f, (20, 20), augment=AugmentConfig(),
                                                         seed=s), frames, seed)
            for mode in MODES]
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0][0], outs[0][1])


def test_raw_and_gray_frames_decode_to_rgb():
    rng = np.random.default_rng(6)
    gray = rng.integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    raw = np.array([g.tobytes() for g in gray], object)
    out = ops.decode_frames(tf.constant(raw), raw_shape=(8, 8, 1)).numpy()
    np.testing.assert_array_equal(out, np.repeat(gray, 3, axis=-1))
    png = tf.constant([_png(g) for g in gray])
    np.testing.assert_array_equal(ops.decode_frames(png).numpy(), np.repeat(gray, 3, axis=-1))
