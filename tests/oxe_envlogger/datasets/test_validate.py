"""The validator: sound datasets pass; each kind of damage is found and named."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from oxe_envlogger.datasets import recovery, reshard
from oxe_envlogger.datasets.validate import validate
from oxe_envlogger.format import layout, record
from tests.tools.datasets import make_w1, make_w2


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    return {"w2": make_w2(str(root / "w2"), 4, seed=5),
            "w1": make_w1(str(root / "w1"), 2, steps=20)}


@pytest.fixture
def w2(pristine, tmp_path):
    """A private copy of the W2-like dataset to damage."""
    return shutil.copytree(pristine["w2"], str(tmp_path / "w2"))


def shards(directory):
    info = layout.read_json(os.path.join(directory, layout.DATASET_INFO))
    return [p for p, _ in layout.shard_paths(directory, info, "train")]


def rewrite_episode(path: str, index: int, fn) -> None:
    """Re-frames a shard with ``fn(features) -> features`` applied to one episode."""
    records = list(record.read_records(path))
    feats = {k: bytes(v) for k, v in record.split_example(records[index]).items()}
    records[index] = record.encode_raw_features(fn(feats))
    with open(path, "wb") as f:
        f.write(b"".join(record.frame(r) for r in records))


def checks(report, severity="error"):
    return {i.check for i in report.issues if i.severity == severity}


@pytest.mark.parametrize("name", ["w1", "w2"])
def test_sound_datasets_pass(pristine, name):
    report = validate(pristine[name])
    assert report.ok and report.num_warnings == 0, report.format()
    assert report.episodes == {"w1": 2, "w2": 4}[name]
    assert {"records", "flags", "features", "episode_id", "statistics", "leftovers"} <= \
        set(report.checks)


def test_bad_crc(w2):
    path = shards(w2)[0]
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 3)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x55]))
    report = validate(w2)
    assert not report.ok and "records" in checks(report)
    assert "CRC" in report.format() and os.path.basename(path) in report.format()


def test_truncated_shard_and_missing_shard(w2):
    first, second = shards(w2)[:2]
    os.truncate(first, os.path.getsize(first) - 100)
    os.unlink(second)
    text = validate(w2).format()
    assert "truncated record" in text and "1 records, dataset_info.json lists 2" in text
    assert "missing" in text


def test_shard_lengths_against_dataset_info(w2):
    info_path = os.path.join(w2, layout.DATASET_INFO)
    info = layout.read_json(info_path)
    info["splits"][0]["shardLengths"][0] = "3"
    layout.atomic_write_json(info_path, info)
    report = validate(w2)
    assert "2 records, dataset_info.json lists 3" in report.format()
    assert "statistics" in checks(report)  # the statistics no longer cover that shard as listed


def test_step_flags(w2):
    path = shards(w2)[0]

    def bad_flags(f):
        n = len(record.decode_feature(f["steps/is_first"])[1])
        f["steps/is_first"] = record.int64_list_payload([0] * n)
        terminal = [0] * n
        terminal[2] = 1
        f["steps/is_terminal"] = record.int64_list_payload(terminal)
        return f

    rewrite_episode(path, 1, bad_flags)
    report = validate(w2)
    errors = [str(i) for i in report.errors if i.check == "flags"]
    assert any("is_first must be set at step 0" in e for e in errors)
    assert any("is_terminal set before the last step, at [2]" in e for e in errors)
    assert all(f"{os.path.basename(path)}[1]" in e for e in errors)


def test_features_that_do_not_decode(w2):
    path = shards(w2)[1]

    def short_action(f):
        _, values = record.decode_feature(f["steps/action"])
        f["steps/action"] = record.float_list_payload(values[:-3])
        return f

    rewrite_episode(path, 0, short_action)
    report = validate(w2)
    assert "features" in checks(report)
    assert "steps/action" in report.format()


def test_images_of_the_wrong_size(w2):
    features_path = os.path.join(w2, layout.FEATURES)
    features = layout.read_json(features_path)
    obs = features["featuresDict"]["features"]["steps"]["sequence"]["feature"]["featuresDict"][
        "features"]["observation"]["featuresDict"]["features"]
    obs["wrist_image"]["image"]["shape"]["dimensions"] = ["20", "16", "3"]
    layout.atomic_write_json(features_path, features)
    report = validate(w2)
    assert "features" in checks(report)
    assert "declared 16x20" in report.format()


def test_duplicate_episode_ids_and_stale_statistics(w2):
    first = shards(w2)[0]
    info_path = os.path.join(w2, layout.DATASET_INFO)
    info = layout.read_json(info_path)
    shutil.copy(first, os.path.join(w2, "w2-train.tfrecord-00002"))
    entry = info["splits"][0]
    entry["shardLengths"].append("2")
    entry["numBytes"] = str(int(entry["numBytes"]) + os.path.getsize(first))
    layout.atomic_write_json(info_path, info)
    report = validate(w2)
    assert {"episode_id", "statistics"} <= checks(report)
    assert "also in w2-train.tfrecord-00000[0]" in report.format()


def test_leftovers_of_dead_and_live_writers(w2):
    stage = layout.staging_dir(w2)
    os.makedirs(stage, exist_ok=True)
    shutil.copy(shards(w2)[0], os.path.join(stage, "0123456789ab-train-00000.tfrecord"))
    live = layout.WriterRegistration(w2, "ba9876543210")
    try:
        shutil.copy(shards(w2)[0], os.path.join(stage, "ba9876543210-train-00000.tfrecord"))
        report = validate(w2)
    finally:
        live.release()
    text = report.format()
    assert not report.ok
    assert "dead writer 0123456789ab" in text and "recover" in text
    assert any(i.severity == "warning" and "ba9876543210 is live" in i.message
               for i in report.issues)
    os.unlink(os.path.join(stage, "ba9876543210-train-00000.tfrecord"))
    recovery.recover(w2)
    after = validate(w2)
    # recover committed the dead writer's shard: its episodes now repeat ids, which is found
    assert "leftovers" not in checks(after) and "episode_id" in checks(after)


def test_unlisted_shard(w2):
    shutil.copy(shards(w2)[0], os.path.join(w2, "w2-train.tfrecord-00002"))
    report = validate(w2)
    assert "leftovers" in checks(report) and "not listed" in report.format()


def test_manifest_of_a_resharded_dataset(w2, tmp_path):
    out = str(tmp_path / "out")
    reshard.reshard([w2], out, reshard.ReshardOptions(shard_episodes=2))
    assert validate(out).ok
    path = os.path.join(out, layout.RESHARD_MANIFEST)
    manifest = json.loads(open(path).read())
    manifest["splits"]["train"]["shards"][1]["sha256"] = "0" * 64
    layout.atomic_write_bytes(path, layout.dump_manifest(manifest))
    report = validate(out)
    assert checks(report) == {"manifest"} and "sha256 differs" in report.format()


def test_not_a_dataset(tmp_path):
    report = validate(str(tmp_path))
    assert not report.ok and "not a dataset directory" in report.format()


def test_many_issues_are_capped(w2):
    for path in shards(w2):
        records = list(record.read_records(path))
        with open(path, "wb") as f:
            for r in records:
                feats = {k: bytes(v) for k, v in record.split_example(r).items()}
                feats["episode_id"] = record.bytes_list_payload([b"same"])
                f.write(record.frame(record.encode_raw_features(feats)))
    report = validate(w2, max_per_check=2)
    assert len([i for i in report.issues if i.check == "episode_id"]) == 2
    assert report.num_errors == 3 and "1 more errors [episode_id]" in report.format()


def test_images_that_do_not_decode(w2):
    path = shards(w2)[0]

    def broken_image(f):
        _, frames = record.decode_feature(f["steps/observation/image"])
        frames[3] = frames[3][:40] + bytes(200)  # a PNG header, then garbage
        frames[4] = b"not an image"
        f["steps/observation/image"] = record.bytes_list_payload(frames)
        return f

    rewrite_episode(path, 0, broken_image)
    quick = validate(w2)
    # one error per key and episode: the first bad frame
    assert "steps/observation/image[3]: not a readable image" in quick.format()
    full = validate(w2, decode_images=True)
    assert "features" in checks(full) and not full.ok


def test_decoding_every_image_of_a_sound_dataset(pristine):
    assert validate(pristine["w2"], decode_images=True).ok


def test_features_stored_under_one_name_are_an_error(tmp_path):
    """features.json with "cam/left" and "cam" -> "left" (tfds cannot read it either): validate
    and read_episodes name the clash instead of failing on value counts."""
    from oxe_envlogger import CorruptDatasetError, read_episodes
    from tests.tools.datasets import make_slash_keys

    directory = make_slash_keys(str(tmp_path / "clash"))
    features_path = os.path.join(directory, layout.FEATURES)
    features = layout.read_json(features_path)
    obs = features["featuresDict"]["features"]["steps"]["sequence"]["feature"]["featuresDict"][
        "features"]["observation"]["featuresDict"]["features"]
    obs["cam"]["featuresDict"]["features"]["left"] = obs["cam/left"]
    layout.atomic_write_json(features_path, features)
    report = validate(directory)
    assert not report.ok
    errors = [str(i) for i in report.errors if i.check == "features"]
    assert len(errors) == 1 and "two features as 'steps/observation/cam/left'" in errors[0]
    with pytest.raises(CorruptDatasetError, match="steps/observation/cam/left"):
        next(read_episodes(directory))
