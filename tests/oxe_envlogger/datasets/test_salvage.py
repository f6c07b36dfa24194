"""Recovery of damaged datasets, on real logged data: bytes flipped inside a shard (in a
record's data and in a record's header), a shard cut short, a listed shard lost,
dataset_info.json deleted or garbled, features.json lost. After recovery tfds and our reader
read every intact episode with the values that were logged, validate passes, statistics.json
agrees with the shards, the damaged originals are kept, and a live writer is never disturbed."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from oxe_envlogger.datasets import inspection, recovery, reshard
from oxe_envlogger.datasets.validate import validate
from oxe_envlogger.errors import RecoveryError
from oxe_envlogger.format import layout, reader, record, stats
from tests.helpers import kill_when_ready, read_tfds
from tests.tools.datasets import REPO, make_w1, make_w2


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """W2-like: 10 episodes in one shard, and 10 in four shards; W1: HalfCheetah, 5 episodes;
    and a resharded W2 (train and val, -NNNNN-of-MMMMM names, a manifest)."""
    root = tmp_path_factory.mktemp("salvage")
    one = make_w2(str(root / "one"), 10, per_file=10)
    many = make_w2(str(root / "many"), 10, seed=3, per_file=3)
    w1 = make_w1(str(root / "w1"), 5, steps=20)
    merged = str(root / "merged")
    reshard.reshard([one], merged, reshard.ReshardOptions(shard_episodes=3,
                                                          validation_fraction=0.3))
    return {"one": one, "many": many, "w1": w1, "merged": merged}


@pytest.fixture(scope="module")
def logged(pristine):
    """What tfds reads of each pristine dataset, by episode id (per split)."""
    out = {}
    for name, d in pristine.items():
        info = layout.read_json(os.path.join(d, layout.DATASET_INFO))
        out[name] = {s: {e["episode_id"]: e for e in read_tfds(d, s)}
                     for s in layout.list_splits(info)}
    return out


def copy_of(pristine, tmp_path, name):
    return shutil.copytree(pristine[name], str(tmp_path / name))


def shard_list(directory, split="train"):
    info = layout.read_json(os.path.join(directory, layout.DATASET_INFO))
    return layout.shard_paths(directory, info, split)


def flip(path, offset, n=3):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(n)
        f.seek(offset)
        f.write(bytes(x ^ 0xFF for x in b))


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def assert_episodes_equal(got, want):
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if isinstance(value, dict):
            assert_episodes_equal(got[key], value)
        else:
            np.testing.assert_array_equal(got[key], value, err_msg=key)


def assert_readable(directory, logged_eps, expected_ids):
    """tfds and our reader read exactly ``expected_ids`` ({split: ids}) with the logged
    values; validate passes (only the quarantine warning); statistics.json equals a fresh
    computation; inspect and reshard work."""
    report = validate(directory)
    assert report.ok, report.format()
    assert {i.check for i in report.warnings} <= {"leftovers"}, report.format()
    for split, ids in expected_ids.items():
        got = read_tfds(directory, split)
        assert [e["episode_id"] for e in got] == ids
        for e in got:
            assert_episodes_equal(e, logged_eps[split][e["episode_id"]])
        ours = list(reader.read_episodes(directory, split))
        assert [e["episode_id"].decode() for e in ours] == [i.decode() for i in ids]
    assert stats.is_current(directory)
    fresh = str(directory) + "-fresh-stats"
    shutil.copytree(directory, fresh)
    os.unlink(os.path.join(fresh, layout.STATISTICS))
    stats.catch_up(fresh)
    ours, theirs = stats.load(directory)[0], stats.load(fresh)[0]
    assert (ours.num_episodes, ours.num_steps) == (theirs.num_episodes, theirs.num_steps)
    assert sorted(ours.keys) == sorted(theirs.keys)
    for key, st in ours.keys.items():  # exact moments (the quantiles come from samples)
        a, b = st.summary(), theirs.keys[key].summary()
        for m in ("count", "mean", "std", "min", "max"):
            np.testing.assert_allclose(a[m], b[m], rtol=1e-9, err_msg=f"{key} {m}")
    summary = inspection.summarize(directory)
    assert summary["episodes"] == sum(len(v) for v in expected_ids.values())
    out = reshard.reshard([directory], str(directory) + "-resharded")
    assert out.episodes == summary["episodes"]


def test_flipped_bytes_in_a_record_lose_only_that_record(pristine, logged, tmp_path):
    d = copy_of(pristine, tmp_path, "one")
    path = shard_list(d)[0][0]
    scan = record.scan_records(path)
    victim = scan.records[4]
    flip(path, victim[0] + 12 + victim[1] // 2)  # inside episode 4's data
    damaged = sha(path)
    report = recovery.recover(d)
    assert report["episodes"] == 9
    [salvaged] = report["salvaged_shards"]
    assert salvaged["records"] == 9 and salvaged["listed"] == 10
    assert salvaged["damaged"][0][2] == "bad data CRC"
    kept = os.path.join(d, salvaged["kept_as"])
    assert kept == os.path.join(d, layout.QUARANTINE, os.path.basename(path))
    assert sha(kept) == damaged  # the damaged original, byte for byte
    ids = list(logged["one"]["train"])
    assert_readable(d, logged["one"], {"train": ids[:4] + ids[5:]})
    again = recovery.recover(d)  # idempotent: nothing left to do
    assert again["episodes"] == 0 and not again["salvaged_shards"] and not again["updated"]
    assert os.listdir(os.path.join(d, layout.QUARANTINE)) == sorted(
        [os.path.basename(kept), os.path.basename(kept) + ".recovery.json"])


def _flip_a_header(path):
    flip(path, record.scan_records(path).records[6][0] + 1)  # episode 6's length


def _cut_short(path):
    os.truncate(path, os.path.getsize(path) - 5)


@pytest.mark.parametrize("name, shard, damage, what, lost", [
    ("one", 0, _flip_a_header, "bad length CRC", 6),  # the framing is lost from there: resync
    ("many", 2, _cut_short, "truncated record", 8),
])
def test_damage_loses_only_the_damaged_record(pristine, logged, tmp_path, name, shard, damage,
                                              what, lost):
    d = copy_of(pristine, tmp_path, name)
    damage(shard_list(d)[shard][0])
    report = recovery.recover(d)
    assert report["salvaged_shards"][0]["damaged"][0][2] == what
    ids = list(logged[name]["train"])
    assert_readable(d, logged[name], {"train": ids[:lost] + ids[lost + 1:]})


def test_several_damaged_shards_and_a_lost_one(pristine, logged, tmp_path):
    d = copy_of(pristine, tmp_path, "many")
    paths = [p for p, _ in shard_list(d)]
    flip(paths[0], os.path.getsize(paths[0]) // 2)
    os.unlink(paths[1])
    flip(paths[3], 30)
    report = recovery.recover(d)
    assert len(report["salvaged_shards"]) == 2
    assert report["missing_shards"] == [{"shard": os.path.basename(paths[1]), "listed": 3}]
    assert os.path.getsize(paths[1]) == 0  # empty: the later shards keep their names
    kept = {e["episode_id"] for e in read_tfds(d)}
    ids = list(logged["many"]["train"])
    assert set(ids[3:6]).isdisjoint(kept) and set(ids[6:9]) <= kept
    assert_readable(d, logged["many"], {"train": [i for i in ids if i in kept]})


@pytest.mark.parametrize("how", ["deleted", "garbled"])
def test_lost_dataset_info_is_rebuilt_from_the_shards(pristine, logged, tmp_path, how):
    d = copy_of(pristine, tmp_path, "many")
    before = layout.read_json(os.path.join(d, layout.DATASET_INFO))
    info_path = os.path.join(d, layout.DATASET_INFO)
    if how == "deleted":
        os.unlink(info_path)
    else:
        with open(info_path, "w") as f:
            f.write('{"name": "w2", "spl')
    assert recovery.needs_recovery(d)
    report = recovery.recover(d, verify=False)  # as a logger opening the directory would
    assert report["rebuilt"] == [layout.DATASET_INFO]
    after = layout.read_json(info_path)
    assert after["name"] == before["name"] and after["splits"] == before["splits"]
    assert_readable(d, logged["many"], {"train": list(logged["many"]["train"])})
    quarantined = os.listdir(os.path.join(d, layout.QUARANTINE)) if how == "garbled" else []
    assert (layout.DATASET_INFO in quarantined) == (how == "garbled")


def test_rebuilt_resharded_dataset_with_damage_and_manifest(pristine, logged, tmp_path):
    d = copy_of(pristine, tmp_path, "merged")
    before = layout.read_json(os.path.join(d, layout.DATASET_INFO))
    os.unlink(os.path.join(d, layout.DATASET_INFO))
    source = shard_list(pristine["merged"])[1][0]
    victim = record.split_example(next(record.read_records(source)))
    lost_id = record.decode_feature(victim["episode_id"])[1][0]
    path = os.path.join(d, os.path.basename(source))
    scan = record.scan_records(path)
    flip(path, scan.records[0][0] + 12 + scan.records[0][1] // 2)
    report = recovery.recover(d)
    assert report["rebuilt"] == [layout.DATASET_INFO]
    assert layout.RESHARD_MANIFEST in report["updated"]
    after = layout.read_json(os.path.join(d, layout.DATASET_INFO))
    assert [s["name"] for s in after["splits"]] == [s["name"] for s in before["splits"]]
    assert after["splits"][0]["filepathTemplate"] == layout.DEFAULT_TEMPLATE
    lengths = [int(n) for n in before["splits"][0]["shardLengths"]]
    lengths[1] -= 1
    assert [int(n) for n in after["splits"][0]["shardLengths"]] == lengths
    train = list(logged["merged"]["train"])
    assert_readable(d, logged["merged"], {"train": [i for i in train if i != lost_id],
                                         "val": list(logged["merged"]["val"])})
    manifest = layout.read_json(os.path.join(d, layout.RESHARD_MANIFEST))
    cols = manifest["episode_columns"]
    assert [r[cols.index("episode_id")] for r in manifest["lost"]] == [lost_id.decode()]


def test_lost_features_json_is_an_error_naming_it(pristine, tmp_path):
    d = copy_of(pristine, tmp_path, "w1")
    os.unlink(os.path.join(d, layout.FEATURES))
    os.unlink(os.path.join(d, layout.DATASET_INFO))
    files = sorted(os.listdir(d))
    with pytest.raises(RecoveryError, match=r"features\.json is missing"):
        recovery.recover(d)
    assert sorted(os.listdir(d)) == files  # nothing deleted, nothing made up
    d2 = copy_of(pristine, tmp_path / "b", "w1")
    path = shard_list(d2)[0][0]
    flip(path, os.path.getsize(path) // 2)
    os.unlink(os.path.join(d2, layout.FEATURES))
    with pytest.raises(RecoveryError, match=r"features\.json is missing") as err:
        recovery.recover(d2)
    assert len(err.value.report["salvaged_shards"]) == 1  # what could be done was done


def test_not_a_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="no dataset here"):
        recovery.recover(tmp_path / "empty")
    assert os.listdir(tmp_path / "empty") == []
    with pytest.raises(NotADirectoryError, match="a file, not a dataset directory"):
        recovery.recover(tmp_path / "file")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        recovery.recover(tmp_path / "missing")


_PAUSED_RECOVERY = """
import sys, time
from oxe_envlogger.datasets import salvage
from oxe_envlogger.format import layout
from oxe_envlogger.datasets import recovery

def pause(*args):
    print("ready", flush=True)
    time.sleep(600)

if sys.argv[2] == "after_keep_aside":
    keep_aside = salvage.keep_aside
    salvage.keep_aside = lambda *args: (keep_aside(*args), pause())[0]
else:  # before the manifest and the statistics are brought in line
    salvage.reconcile_manifest = pause
recovery.recover(sys.argv[1])
"""


@pytest.mark.parametrize("name, where", [("one", "after_keep_aside"),
                                         ("merged", "before_manifest")])
def test_recovery_killed_midway_resumes(pristine, tmp_path, name, where):
    """SIGKILL after the damaged shard was kept aside but before it was replaced, or after the
    new listing but before the manifest and statistics: the next recovery finishes the job, and
    keeps the original once."""
    d = copy_of(pristine, tmp_path, name)
    path = shard_list(d)[0][0]
    listed = shard_list(d)[0][1]
    flip(path, os.path.getsize(path) // 2)
    damaged = sha(path)
    total = validate(pristine[name]).episodes
    kill_when_ready([sys.executable, "-c", _PAUSED_RECOVERY, d, where], cwd=REPO,
                    env={**os.environ, "PYTHONPATH": REPO})
    assert not validate(d).ok
    report = recovery.recover(d)
    if where == "after_keep_aside":
        assert sha(path) != damaged and report["episodes"] == listed - 1
    else:
        assert layout.RESHARD_MANIFEST in report["updated"] and report["episodes"] == 0
    kept = os.path.join(d, layout.QUARANTINE, os.path.basename(path))
    assert sorted(os.listdir(os.path.join(d, layout.QUARANTINE))) == [
        os.path.basename(kept), os.path.basename(kept) + ".recovery.json"]
    assert sha(kept) == damaged
    assert not [e for e in os.listdir(os.path.join(d, layout.INTERNAL)) if ".tmp-" in e]
    result = validate(d)
    assert result.ok and result.episodes == total - 1, result.format()
    assert stats.is_current(d)
    assert len(read_tfds(d)) + len(read_tfds(d, "val") if name == "merged" else []) == total - 1


_WRITER = """
import sys
import gymnasium as gym
import oxe_envlogger.envs
from oxe_envlogger import AutoOXEEnvLogger
from oxe_envlogger.envs import random_policy, run_episodes
seed = int(sys.argv[2])
env = AutoOXEEnvLogger(gym.make("oxe_envlogger/SyntheticCamera-v0", image_size=32, wrist_size=16,
                                 max_episode_steps=6), "w2", sys.argv[1])
policy = random_policy(env, seed)
run_episodes(env, 3, policy=policy, seed=seed)
env.flush()                       # three episodes committed
run_episodes(env, 1, policy=policy, seed=seed + 3)
env.flush(commit=False)           # a fourth one durable in this writer's staging shard
print("ready", flush=True)
sys.stdin.readline()
run_episodes(env, 2, policy=policy, seed=seed + 4)
env.close()
print("done", flush=True)
"""


def _writer(directory, seed):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, directory, str(seed)], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": REPO, "MUJOCO_GL": "egl"})
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_live_writer_is_left_alone(tmp_path):
    """While a writer logs into a directory: the automatic recovery of a second logger opening
    it (committing a killed writer's staging shard) and a recovery by hand (salvaging a damaged
    committed shard) leave the live writer's staging shard untouched, and every episode is
    there at the end."""
    import gymnasium as gym

    import oxe_envlogger.envs  # noqa: F401  (registers the env)
    from oxe_envlogger import AutoOXEEnvLogger
    from oxe_envlogger.envs import random_policy, run_episodes

    d = str(tmp_path / "live")
    live = _writer(d, 0)
    try:
        stage = layout.staging_dir(d)
        staged = {f: sha(os.path.join(stage, f)) for f in os.listdir(stage)}
        assert len(staged) == 1 and not recovery.needs_recovery(d)
        killed = _writer(d, 100)
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
        assert recovery.needs_recovery(d)
        second = AutoOXEEnvLogger(gym.make("oxe_envlogger/SyntheticCamera-v0", image_size=32,
                                           wrist_size=16, max_episode_steps=6), "w2", d)
        assert set(os.listdir(stage)) == set(staged)  # the killed writer's shard is committed
        run_episodes(second, 1, policy=random_policy(second, 9), seed=9)
        second.close()
        assert {f: sha(os.path.join(stage, f)) for f in staged} == staged
        assert not os.path.exists(os.path.join(d, layout.QUARANTINE))
        committed = shard_list(d)[0][0]
        flip(committed, os.path.getsize(committed) // 2)
        report = recovery.recover(d)
        assert report["committed_shards"] == [] and len(report["salvaged_shards"]) == 1
        assert {f: sha(os.path.join(stage, f)) for f in staged} == staged
        live.stdin.write("go\n")
        live.stdin.flush()
        assert live.stdout.readline().strip() == "done"
        assert live.wait(timeout=60) == 0
    finally:
        if live.poll() is None:
            live.kill()
    result = validate(d)
    assert result.ok, result.format()
    assert result.episodes == 6 + 4 + 1 - 1  # one lost to the damage
    assert stats.is_current(d)
    assert len(read_tfds(d)) == result.episodes
    [done] = layout.read_json(os.path.join(d, layout.METADATA))["recoveries"]
    assert done["salvaged_shards"][0]["records"] == 2


def test_a_dataset_written_by_tfds(tmp_path):
    """A sound TFDS-written dataset (features our reader does not decode) is left as it is;
    damaged, its intact episodes are salvaged and tfds reads them."""
    from tests.tools.datasets import make_foreign

    d = make_foreign(str(tmp_path / "foreign"), episodes=5)

    def files():
        return {n: sha(os.path.join(d, n)) for n in sorted(os.listdir(d))
                if os.path.isfile(os.path.join(d, n))}

    before = files()
    logged = {bytes(e["episode_metadata"]["file_path"]): e for e in read_tfds(d)}
    report = recovery.recover(d)
    assert not any(report[k] for k in ("salvaged_shards", "missing_shards", "relisted",
                                       "rebuilt", "updated"))
    assert files() == before  # (and only recovery's lock, .oxe/lock, was added)
    assert sorted(os.listdir(d)) == sorted([*before, layout.INTERNAL])
    path = shard_list(d)[1][0]
    flip(path, os.path.getsize(path) // 3)
    report = recovery.recover(d)
    assert [s["records"] for s in report["salvaged_shards"]] == [1]
    got = read_tfds(d)
    assert len(got) == 4
    for e in got:
        assert_episodes_equal(e, logged[bytes(e["episode_metadata"]["file_path"])])
