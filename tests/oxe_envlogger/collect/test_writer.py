"""The writer: byte-budget shards, statistics merged across writers and appends, records too
large for the format, image encoders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from gymnasium import spaces

import oxe_envlogger
from oxe_envlogger import OXEEnvLogger, RecordTooLargeError, WriterOptions
from oxe_envlogger.format import layout, record, stats
from tests.helpers import RecordingEnv, assert_observations_equal, read_tfds, run_episodes, tmpfs

BOX = spaces.Box(-5, 5, (4,), np.float32)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def test_shards_close_at_the_byte_budget(dataset_dir):
    space = spaces.Dict({"x": spaces.Box(-1, 1, (64,), np.float64)})
    env = OXEEnvLogger(RecordingEnv(space, BOX, episode_len=10), "budget", dataset_dir,
                       shard_bytes=20_000)
    run_episodes(env, 12)
    env.close()
    info = layout.read_json(os.path.join(dataset_dir, layout.DATASET_INFO))
    shards = layout.shard_paths(dataset_dir, info, "train")
    assert len(shards) > 2
    sizes = [os.path.getsize(p) for p, _ in shards]
    one = max(sizes) / max(n for _, n in shards)
    for size in sizes:
        assert size <= 20_000 + one  # closed at the first episode that would cross the budget
    assert sum(n for _, n in shards) == 12
    assert int(info["splits"][0]["numBytes"]) == sum(sizes)
    for (path, n) in shards:
        assert sum(1 for _ in record.read_records(path)) == n
    assert len(read_tfds(dataset_dir)) == 12


def test_statistics_merge_across_appends_and_match_the_data(dataset_dir):
    for run in range(3):
        env = OXEEnvLogger(RecordingEnv(BOX, BOX, episode_len=6, seed=run), "stats", dataset_dir,
                           max_episodes_per_file=2)
        run_episodes(env, 3, seed=run * 10)
        env.close()
    assert stats.is_current(dataset_dir)
    loaded, covers = stats.load(dataset_dir)
    episodes = read_tfds(dataset_dir)
    obs = np.concatenate([e["steps"]["observation"][:-1] for e in episodes]).astype(np.float64)
    act = np.concatenate([e["steps"]["action"][:-1] for e in episodes]).astype(np.float64)
    for key, data in (("observation", obs), ("action", act)):
        summary = loaded.keys[key].summary()
        np.testing.assert_allclose(summary["mean"], data.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(summary["std"], data.std(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(summary["min"], data.min(0))
        np.testing.assert_array_equal(summary["max"], data.max(0))
        assert summary["count"] == [len(data)] * 4
        q50 = np.asarray(summary["q50"])  # exact here: fewer rows than the sample keeps
        np.testing.assert_allclose(q50, np.quantile(data, 0.5, axis=0))
    assert loaded.num_episodes == 9
    assert sum(len(v) for v in covers.values()) == len(
        layout.shard_paths(dataset_dir, layout.read_json(os.path.join(dataset_dir, layout.DATASET_INFO)), "train"))


def test_statistics_are_kept_per_split(dataset_dir):
    """Two splits written by separate loggers (and an append to the first): each split's own
    statistics match its data, the totals match all of it."""
    for run, split in enumerate(("train", "val", "train")):
        env = OXEEnvLogger(RecordingEnv(BOX, BOX, episode_len=5 + run, seed=run), "splits",
                           dataset_dir, writer_options=WriterOptions(split=split))
        run_episodes(env, 2 + run, seed=run * 10)
        env.close()
    data = {}
    for split in ("train", "val"):
        episodes = read_tfds(dataset_dir, split)
        data[split] = np.concatenate([e["steps"]["action"][:-1] for e in episodes]).astype(np.float64)
        assert stats.is_current(dataset_dir, split)
        own = stats.load_split(dataset_dir, split)
        assert own.num_episodes == len(episodes)
        summary = own.keys["action"].summary()
        np.testing.assert_allclose(summary["mean"], data[split].mean(0), rtol=1e-9)
        np.testing.assert_array_equal(summary["max"], data[split].max(0))
        assert summary["count"] == [len(data[split])] * 4
    total, covers = stats.load(dataset_dir)
    assert set(covers) == {"train", "val"}
    both = np.concatenate([data["train"], data["val"]])
    np.testing.assert_allclose(total.keys["action"].summary()["mean"], both.mean(0), rtol=1e-9)
    assert total.num_episodes == 2 + 3 + 4
    assert stats.load_split(dataset_dir, "test") is None


def test_running_stats_merge_equals_one_pass():
    rng = np.random.default_rng(0)
    data = rng.normal(3, 2, (5000, 3))
    data[7, 1] = np.nan
    whole = stats.RunningStats((3,), seed=1)
    whole.update(data)
    parts = [stats.RunningStats((3,), seed=i) for i in range(4)]
    for part, chunk in zip(parts, np.array_split(data, 4)):
        part.update(chunk)
    merged = parts[0]
    for p in parts[1:]:
        merged.merge(stats.RunningStats.from_json(p.to_json()))
    a, b = whole.summary(), merged.summary()
    np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-12)
    np.testing.assert_allclose(a["std"], b["std"], rtol=1e-12)
    assert a["count"] == b["count"] == [5000, 4999, 5000]
    finite = np.where(np.isfinite(data), data, np.nan)
    for s in (a, b):  # the masked path (chunk 0, whole) and the all-finite one (chunks 1-3)
        np.testing.assert_allclose(s["mean"], np.nanmean(finite, 0), rtol=1e-12)
        np.testing.assert_allclose(s["std"], np.nanstd(finite, 0), rtol=1e-12)
        np.testing.assert_array_equal(s["min"], np.nanmin(finite, 0))
        np.testing.assert_array_equal(s["max"], np.nanmax(finite, 0))
    np.testing.assert_allclose(b["q50"], np.nanquantile(finite, 0.5, axis=0), atol=0.2)
    np.testing.assert_allclose(b["q95"], np.nanquantile(finite, 0.95, axis=0), atol=0.4)


def test_record_too_large_is_a_clear_error_and_the_logger_goes_on(dataset_dir, monkeypatch):
    monkeypatch.setattr(record, "MAX_RECORD_BYTES", 3000)
    space = spaces.Box(-1, 1, (40,), np.float64)
    env = OXEEnvLogger(RecordingEnv(space, BOX, episode_len=3), "large", dataset_dir)
    run_episodes(env, 1)  # 4 steps x 40 float64: fits
    env.reset(seed=5)
    env.unwrapped.episode_len = 30
    for _ in range(30):
        env.step(BOX.sample())
    env.reset(seed=6)  # hands the large episode over; the writer rejects it
    env.unwrapped.episode_len = 3
    with pytest.raises(RecordTooLargeError, match="2 GiB"):
        for _ in range(500):  # the error reaches the next call into the logger
            env._recorder.writer.check()
            time.sleep(0.01)
    for _ in range(3):
        env.step(BOX.sample())
    env.reset(seed=7)
    env.close()
    lengths = [len(e["steps"]["is_first"]) for e in read_tfds(dataset_dir)]
    assert lengths == [4, 4]


@pytest.mark.parametrize("processes", [0, 1, 3])
def test_image_encoders_threads_and_processes(processes, dataset_dir):
    space = spaces.Dict({"cam": spaces.Box(0, 255, (32, 24, 3), np.uint8),
                         "gray": spaces.Box(0, 255, (8, 8, 1), np.uint8)})
    env = OXEEnvLogger(RecordingEnv(space, BOX, episode_len=5), "enc", dataset_dir,
                       writer_options=WriterOptions(encode_processes=processes,
                                                    max_pending_frames=8))
    run_episodes(env, 4)
    kind = env._recorder.writer.encoder.kind
    env.close()
    assert kind == ("threads" if processes == 0 else "processes")
    for got, want in zip(read_tfds(dataset_dir), env.unwrapped.episodes):
        np.testing.assert_array_equal(got["steps"]["observation"]["cam"],
                                      np.stack([o["cam"] for o in want["obs"]]))
        np.testing.assert_array_equal(got["steps"]["observation"]["gray"],
                                      np.stack([o["gray"] for o in want["obs"]]))


def _broken_package(parent) -> str:
    """A directory holding an ``oxe_envlogger`` package that fails to import."""
    package = parent / "oxe_envlogger"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('the wrong oxe_envlogger')\n")
    return str(parent)


def _log_camera_episodes(dataset_dir: str) -> str:
    """Logs two small camera episodes with one encoder process requested, checks them with
    tfds, and returns the kind of encoders that did the work."""
    space = spaces.Dict({"cam": spaces.Box(0, 255, (16, 16, 3), np.uint8)})
    env = OXEEnvLogger(RecordingEnv(space, BOX, episode_len=4), "cam", dataset_dir,
                       writer_options=WriterOptions(encode_processes=1))
    run_episodes(env, 2)
    kind = env._recorder.writer.encoder.kind
    env.close()
    logged = read_tfds(dataset_dir)
    assert len(logged) == 2
    assert_observations_equal(logged, env.unwrapped.episodes, "cam")
    return kind


def test_encoder_workers_ignore_another_copy_in_the_working_directory(tmp_path, monkeypatch,
                                                                      dataset_dir):
    """The user's working directory holds another ``oxe_envlogger`` (an old checkout, say):
    the encoder processes still run this package's code, not that copy."""
    monkeypatch.chdir(_broken_package(tmp_path / "cwd"))
    assert _log_camera_episodes(dataset_dir) == "processes"


def test_encoders_fall_back_to_threads_when_workers_cannot_start(tmp_path, monkeypatch,
                                                                 dataset_dir, caplog):
    """Worker processes that die at start-up (here: made to import a broken package) leave the
    logger on encoder threads, with a warning, and nothing lost."""
    from oxe_envlogger.collect import encoders

    monkeypatch.setattr(encoders, "_PACKAGE_PARENT", _broken_package(tmp_path / "broken"))
    assert _log_camera_episodes(dataset_dir) == "threads"
    assert "encoder worker exited at start-up" in caplog.text


def test_encoded_frames_larger_than_the_result_buffer(dataset_dir):
    """Noise does not compress: each PNG is larger than the 1 MiB buffer results are read
    into, and several workers deliver them at once."""
    space = spaces.Dict({"cam": spaces.Box(0, 255, (720, 640, 3), np.uint8)})
    env = OXEEnvLogger(RecordingEnv(space, BOX, episode_len=6), "big", dataset_dir,
                       writer_options=WriterOptions(encode_processes=2, max_pending_frames=8))
    run_episodes(env, 2)
    env.close()
    for got, want in zip(read_tfds(dataset_dir), env.unwrapped.episodes, strict=True):
        np.testing.assert_array_equal(got["steps"]["observation"]["cam"],
                                      np.stack([o["cam"] for o in want["obs"]]))


def test_encoder_workers_outlive_a_terminal_interrupt(dataset_dir):
    """Ctrl-C in a terminal signals the whole process group: the workers must keep encoding
    what the logger still holds (they exit when the logger closes their pipe)."""
    import signal

    space = spaces.Dict({"cam": spaces.Box(0, 255, (16, 16, 3), np.uint8)})
    env = OXEEnvLogger(RecordingEnv(space, BOX, episode_len=5), "sig", dataset_dir,
                       writer_options=WriterOptions(encode_processes=1, max_pending_frames=8))
    run_episodes(env, 1)
    workers = env._recorder.writer.encoder.worker_processes()
    assert len(workers) == 1
    for proc in workers:
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGTERM)
    for proc in workers:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)
    run_episodes(env, 2, seed=10)
    env.close()
    episodes = read_tfds(dataset_dir)
    assert len(episodes) == 3
    for got, want in zip(episodes, env.unwrapped.episodes):
        np.testing.assert_array_equal(got["steps"]["observation"]["cam"],
                                      np.stack([o["cam"] for o in want["obs"]]))


def test_encoder_worker_death_is_reported(dataset_dir):
    space = spaces.Dict({"cam": spaces.Box(0, 255, (16, 16, 3), np.uint8)})
    env = OXEEnvLogger(RecordingEnv(space, BOX, episode_len=50), "dead", dataset_dir,
                       writer_options=WriterOptions(encode_processes=1, max_pending_frames=8))
    run_episodes(env, 1)
    env.reset(seed=1)  # hands the first episode over

    while env._recorder.writer.episodes_written < 1:
        time.sleep(0.01)
    for proc in env._recorder.writer.encoder.worker_processes():
        proc.kill()
    with pytest.raises(oxe_envlogger.WriterError, match="encod"):
        for _ in range(50):
            env.step(BOX.sample())
        env.reset(seed=2)
    # close() writes what was recorded; it reports the failure again if a recorded frame was
    # lost (whether one was depends on timing), and is idempotent.
    try:
        env.close()
    except oxe_envlogger.WriterError as e:
        assert "encod" in str(e)
    env.close()
    episodes = read_tfds(dataset_dir)
    assert 1 <= len(episodes) <= 2  # the episode written before stays readable
    assert not episodes[0]["invalid"] and len(episodes[0]["steps"]["is_first"]) == 51


def test_results_left_unparsed_by_an_interrupt_are_parsed_later():
    """Ctrl-C can land while the control thread parses encoded frames it has read from a
    worker; those bytes must still be parsed later, although the worker sends nothing more
    (before, close() then waited forever for the frame)."""
    import threading

    from oxe_envlogger.collect import encoders
    from oxe_envlogger.format import codecs

    pool = encoders.make_pool(1, 8, 16 * 16 * 3, encoders.Stalls())
    assert isinstance(pool, encoders.ProcessEncodePool)
    image = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    codec = codecs.ImageCodec.parse("png")
    parse = pool._parse

    def interrupted(worker):
        pool._parse = parse
        raise KeyboardInterrupt

    pool._parse = interrupted
    (frame,) = pool.submit_many([(image, codec)])
    with pytest.raises(KeyboardInterrupt):
        while pool._parse is interrupted:  # until the result arrives and its parse is cut
            pool._drain(0.05)
    waiter = threading.Thread(target=frame.result, daemon=True)
    waiter.start()
    waiter.join(60)  # (a deadlock guard, not a timing figure: the result is read already)
    hung = waiter.is_alive()
    pool.shutdown()
    assert not hung, "the frame whose result was read before the interrupt never completed"
    assert frame.result() == codecs.encode(image, codec)


def test_a_metadata_image_larger_than_the_encoder_slots(dataset_dir):
    """The encoders are sized for the observation's frames when the logger starts; a larger
    image that appears later (inferred step metadata) is encoded in the control thread."""
    space = spaces.Dict({"cam": spaces.Box(0, 255, (8, 8, 3), np.uint8)})
    env = oxe_envlogger.AutoOXEEnvLogger(
        RecordingEnv(space, BOX, episode_len=4), "big_meta", dataset_dir,
        writer_options=WriterOptions(encode_processes=1, max_pending_frames=8))
    snapshots = []
    env.reset(seed=0)
    for t in range(4):
        snap = np.full((40, 40, 3), 10 * t, np.uint8)
        snapshots.append(snap)
        env.set_step_metadata({"snapshot": snap})
        env.step(BOX.sample())
    assert env._recorder.writer.encoder.slot_bytes < snap.size
    env.close()
    (episode,) = read_tfds(dataset_dir)
    got = episode["steps"]["snapshot"]
    np.testing.assert_array_equal(got[:4], np.stack(snapshots))
    np.testing.assert_array_equal(got[4], snapshots[-1])  # sticky: the final step keeps it


def test_flush_commits_completed_episodes_while_logging_goes_on(dataset_dir):
    """A real camera env (images through the encoder processes): after ``flush()`` tfds reads
    every completed episode exactly and ``statistics.json`` covers them, while the logger is
    open; the episode that ended stays ended until ``reset()``; logging then continues."""
    import gymnasium as gym

    import oxe_envlogger.envs

    env = oxe_envlogger.AutoOXEEnvLogger(
        gym.make(oxe_envlogger.envs.ENV_ID, image_size=32, wrist_size=16, max_episode_steps=6),
        "flush", dataset_dir)
    env.action_space.seed(0)
    seen = []  # (observations, actions) per episode, as the agent saw them

    def episode(seed):
        obs, _ = env.reset(seed=seed)
        observations, actions, done = [obs], [], False
        while not done:
            actions.append(env.action_space.sample())
            obs, _, te, tr, _ = env.step(actions[-1])
            observations.append(obs)
            done = te or tr
        seen.append((observations, actions))

    def check(episodes):
        assert len(episodes) == len(seen)
        for e, (observations, actions) in zip(episodes, seen):
            for key in ("image", "wrist_image", "state"):
                np.testing.assert_array_equal(e["steps"]["observation"][key],
                                              np.stack([o[key] for o in observations]))
            np.testing.assert_array_equal(e["steps"]["action"][:-1], np.stack(actions))

    episode(0)
    episode(1)
    env.flush()
    check(read_tfds(dataset_dir))
    assert stats.is_current(dataset_dir, "train")
    assert stats.load_split(dataset_dir, "train").num_episodes == 2
    with pytest.raises(oxe_envlogger.StepOrderError, match="reset"):
        env.step(env.action_space.sample())  # episode 1 ended; flush() did not start another
    episode(2)
    env.flush()  # commits episode 2 in a shard of its own
    assert len(read_tfds(dataset_dir)) == 3
    env.flush()  # nothing to write: a no-op
    episode(3)
    env.close()
    check(read_tfds(dataset_dir))
    assert stats.load_split(dataset_dir, "train", current=True).num_episodes == 4
    with pytest.raises(oxe_envlogger.LoggerClosedError):
        env.flush()


@pytest.mark.parametrize("commit_every_s", [0.0, None])
def test_commit_every_s_makes_episodes_visible_while_logging(commit_every_s, dataset_dir):
    """With a commit age of 0 every episode is committed as soon as it is written, so tfds
    reads it while the logger runs; with None, written episodes wait for the shard budget."""
    import gymnasium as gym

    env = oxe_envlogger.AutoOXEEnvLogger(
        gym.make("CartPole-v1", max_episode_steps=20), "visible", dataset_dir,
        writer_options=WriterOptions(commit_every_s=commit_every_s))
    run_episodes(env, 3)
    env.flush(commit=False)  # hands episode 2 over; written and fsynced, committed only by age
    info = layout.read_json(os.path.join(dataset_dir, layout.DATASET_INFO))
    committed = sum(n for _, n in layout.shard_paths(dataset_dir, info, "train"))
    visible = read_tfds(dataset_dir) if committed else []
    shards = len(env.writer_stats["shards"])
    env.close()
    final = read_tfds(dataset_dir)
    assert len(final) == 3
    if commit_every_s is None:
        assert committed == 0 and shards == 0
    else:
        assert committed == 3 and shards == 3  # one shard per episode at age 0
        for got, want in zip(visible, final, strict=True):
            np.testing.assert_array_equal(got["steps"]["observation"], want["steps"]["observation"])


def test_writer_options_reject_a_negative_commit_age():
    with pytest.raises(ValueError, match="commit_every_s"):
        WriterOptions(commit_every_s=-1)


_SMALL_SHM_CHILD = """
import json, sys
import numpy as np
from gymnasium import spaces
import oxe_envlogger
from oxe_envlogger.collect import encoders
from tests.helpers import RecordingEnv, run_episodes
if sys.argv[1] != "memfd":
    encoders._USE_MEMFD = False  # the ring as a file in this directory
    encoders._shm_dir = lambda: sys.argv[1]
space = spaces.Dict({"cam": spaces.Box(0, 255, (256, 256, 3), np.uint8)})
env = oxe_envlogger.OXEEnvLogger(RecordingEnv(space, spaces.Discrete(2), episode_len=40), "shm",
                                 sys.argv[2], writer_options=oxe_envlogger.WriterOptions(
                                     encode_processes=1))
enc = env._recorder.writer.encoder
run_episodes(env, 3)
env.close()
np.savez(sys.argv[2] + ".npz", *[np.stack([o["cam"] for o in e["obs"]])
                                 for e in env.unwrapped.episodes])
print(json.dumps({"kind": enc.kind, "slots": len(getattr(enc, "_free", []))}))
"""


def _run_shm_child(command: list[str], dataset_dir: str) -> tuple[dict, str]:
    """Runs ``_SMALL_SHM_CHILD`` (``command`` ends with its ring-location argument), checks the
    three episodes it logged against the frames it saved, and returns its report and stderr."""
    proc = subprocess.run([*command, dataset_dir], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = np.load(dataset_dir + ".npz")
    got = read_tfds(dataset_dir)
    assert len(got) == 3
    for i, e in enumerate(got):
        np.testing.assert_array_equal(e["steps"]["observation"]["cam"], want[f"arr_{i}"])
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_the_frame_ring_is_not_limited_by_dev_shm(dataset_dir):
    """The ring is a memfd, so a container's small /dev/shm (here a 1 MiB tmpfs mounted over it
    in a mount namespace of the logger's own) leaves it whole: 64 frames of 192 KiB."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespaces here (needs root and unshare)")
    script = ('mount -t tmpfs -o size=1m tmpfs /dev/shm && df -k /dev/shm >&2 && '
              'exec "$0" -c "$1" memfd "$2"')
    out, err = _run_shm_child(["unshare", "-m", "sh", "-c", script, sys.executable,
                               _SMALL_SHM_CHILD], dataset_dir)
    assert " 1024 " in err  # the child saw a 1 MiB /dev/shm
    assert out == {"kind": "processes", "slots": 64}
    assert "has room for" not in err


@pytest.mark.parametrize("shm_size,kind", [("4m", "processes"), ("512k", "threads")])
def test_a_small_shared_memory_never_kills_the_logger(shm_size, kind, tmp_path, dataset_dir):
    """Where the ring is a file in /dev/shm (no memfd): it used to be sized lazily, and the
    first write past the end of a small tmpfs killed the logger with SIGBUS. Now it is reserved
    up front, with fewer slots when room is short (4 MiB: 16 of 64 frames of 192 KiB) and
    encoder threads when not even 4 frames fit; every episode is logged either way."""
    with tmpfs(tmp_path / "shm", shm_size) as shm:
        out, err = _run_shm_child([sys.executable, "-c", _SMALL_SHM_CHILD, shm], dataset_dir)
        assert out["kind"] == kind
        if kind == "processes":
            assert 4 <= out["slots"] < 64
            assert "has room for" in err
        assert os.listdir(shm) == []  # the ring file is gone


def test_a_forked_child_does_not_keep_the_encoders_alive(dataset_dir):
    """A child forked after the logger started (multiprocessing, an async vector env) used to
    hold the encoders' job pipe open, so they outlived the logger as long as the child lived.
    Now the child drops it, and its copy of the encoders refuses work with a clear error."""

    space = spaces.Dict({"cam": spaces.Box(0, 255, (16, 16, 3), np.uint8)})
    env = OXEEnvLogger(RecordingEnv(space, BOX, episode_len=3), "fork", dataset_dir,
                       writer_options=WriterOptions(encode_processes=1))
    run_episodes(env, 2)
    pool = env._recorder.writer.encoder
    procs = pool.worker_processes()
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            os.close(w)
            try:
                pool.submit_many([(np.zeros((16, 16, 3), np.uint8), oxe_envlogger.ImageCodec())])
            except oxe_envlogger.WriterError as e:
                code = 0 if "forked child" in str(e) else 2
            os.read(r, 1)  # lives until the parent closes its end (EOF)
        finally:
            os._exit(code)
    os.close(r)
    try:
        env.close()
        deadline = time.monotonic() + 20
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(p.poll() is not None for p in procs), "encoders outlived the logger"
    finally:
        os.close(w)  # lets the child finish
        _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(read_tfds(dataset_dir)) == 2


def test_a_run_without_a_step_leaves_a_readable_dataset_or_none(tmp_path):
    """Declared features are written when the logger is built, so tfds opens a dataset of zero
    episodes; features still to be inferred leave no directory behind (it could not be opened),
    and nothing a directory already held is touched."""
    import tensorflow_datasets as tfds

    from oxe_envlogger import AutoOXEEnvLogger, read_episodes
    from oxe_envlogger.datasets.validate import validate

    declared = str(tmp_path / "declared")
    env = OXEEnvLogger(RecordingEnv(BOX, BOX), "empty", declared)
    env.reset(seed=0)
    env.close()
    builder = tfds.builder_from_directory(declared)
    assert builder.info.splits["train"].num_examples == 0
    assert set(builder.info.features["steps"].feature) >= {"observation", "action", "is_first"}
    assert list(read_episodes(declared)) == []
    assert validate(declared).ok

    inferred = str(tmp_path / "inferred")
    env = AutoOXEEnvLogger(RecordingEnv(BOX, BOX), "empty", inferred)
    env.reset(seed=0)
    env.set_step_metadata({"speed": 1.0})
    env.close()
    assert not os.path.exists(inferred)
    env = AutoOXEEnvLogger(RecordingEnv(BOX, BOX), "empty", inferred)  # features not fixed
    env.reset(seed=0)
    env.set_step_metadata({"speed": 2.0})
    env.step(BOX.sample())
    env.close()
    assert read_tfds(inferred)[0]["steps"]["speed"].tolist() == [2.0, 2.0]

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    env = AutoOXEEnvLogger(RecordingEnv(BOX, BOX), "empty", str(kept))
    env.close()
    assert os.listdir(kept) == ["notes.txt"]


def test_encoder_workers_start_in_the_directory_holding_the_package():
    """``python -m`` looks in the working directory first: the workers run from the directory
    that holds this very ``oxe_envlogger`` (not from inside it, which a move into collect/
    once made it)."""
    from oxe_envlogger.collect import encoders

    assert os.path.dirname(os.path.dirname(oxe_envlogger.__file__)) == encoders._PACKAGE_PARENT
