"""The single-process resharder on real logged data (W2-like camera datasets, W1 HalfCheetah):
byte-identical copies, manifests, determinism, filters, relabelling, splits, feature renames,
errors that leave nothing behind, and reading the output back with tfds."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

from oxe_envlogger import RLDSLogger, RLDSStepType
from oxe_envlogger.datasets import reshard
from oxe_envlogger.datasets.reshard import ReshardOptions
from oxe_envlogger.datasets.validate import validate
from oxe_envlogger.errors import (
    CorruptDatasetError,
    DatasetExistsError,
    FeatureMismatchError,
    SpecError,
)
from oxe_envlogger.format import layout, reader, record, stats
from tests.helpers import float32_rounded, kill_when_ready, read_tfds, read_tfds_skip_decoding
from tests.tools.datasets import (
    REPO,
    USER_FILES,
    add_user_files,
    assert_user_files,
    make_w1,
    make_w2,
)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three W2-like datasets under one root (one nested), 9 episodes, one of them invalid."""
    root = tmp_path_factory.mktemp("sources")
    make_w2(str(root / "a"), 3, seed=0)
    make_w2(str(root / "b"), 3, seed=10, per_file=3)
    make_w2(str(root / "runs" / "c"), 2, seed=20, unfinished=True)
    return str(root)


@pytest.fixture(scope="module")
def w1(tmp_path_factory):
    return make_w1(str(tmp_path_factory.mktemp("w1") / "half_cheetah"), 3)


@pytest.fixture(scope="module")
def merged(sources, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("merged") / "out")
    report = reshard.reshard([sources], out, ReshardOptions(shard_bytes=40_000))
    return out, report


def source_records(root: str) -> list[tuple[str, str, int, bytes]]:
    """(dataset dir, shard name, index, serialized episode) in the merged order."""
    out = []
    for d in layout.find_datasets(root):
        for path, i, data in layout.iter_serialized(d):
            out.append((d, os.path.basename(path), i, data))
    return out


def output_records(directory: str) -> dict[tuple[str, int, int], bytes]:
    info = layout.read_json(os.path.join(directory, layout.DATASET_INFO))
    out = {}
    for split in layout.list_splits(info):
        for k, (path, _) in enumerate(layout.shard_paths(directory, info, split)):
            for i, data in enumerate(record.read_records(path)):
                out[(split, k, i)] = data
    return out


def manifest_rows(directory: str) -> list[dict]:
    m = layout.read_json(os.path.join(directory, layout.RESHARD_MANIFEST))
    return [dict(zip(m["episode_columns"], row)) for row in m["episodes"]]


def dir_files(directory: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = f.read()
    return out


def no_leftovers(parent: str) -> bool:
    return not [e for e in os.listdir(parent) if e.startswith(reshard.TMP_PREFIX)]


def test_merge_copies_every_episode_byte_for_byte(sources, merged):
    out, report = merged
    src = source_records(sources)
    got = output_records(out)
    assert report.episodes == len(src) == len(got) == 9
    # In order: inputs sorted by path, stable order inside each.
    assert [got[k] for k in sorted(got)] == [r[3] for r in src]
    manifest = layout.read_json(os.path.join(out, layout.RESHARD_MANIFEST))
    sources_by_index = {s["index"]: s["directory"] for s in manifest["sources"]}
    assert sorted(sources_by_index.values()) == layout.find_datasets(sources)
    for row in manifest_rows(out):
        directory = sources_by_index[row["source"]]
        path = os.path.join(directory, row["source_shard"])
        want = list(record.read_records(path))[row["source_index"]]
        assert got[(row["split"], row["shard"], row["index"])] == want
        assert row["changes"] == ""
        assert src[row["global_index"]][3] == want
    for entry in manifest["splits"]["train"]["shards"]:
        with open(os.path.join(out, entry["file"]), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == entry["sha256"]


def test_output_is_valid_and_reads_with_tfds(sources, merged):
    out, _ = merged
    report = validate(out)
    assert report.ok, report.format()
    assert report.num_warnings == 0, report.format()
    episodes = read_tfds(out)
    ours = list(reader.read_episodes(out))
    assert len(episodes) == len(ours) == 9
    for got, want in zip(episodes, ours):
        assert got["episode_id"] == want["episode_id"]
        np.testing.assert_array_equal(got["steps"]["observation"]["image"],
                                      want["steps"]["observation"]["image"])
        np.testing.assert_array_equal(got["steps"]["action"], want["steps"]["action"])
        np.testing.assert_array_equal(got["steps"]["language_instruction"],
                                      want["steps"]["language_instruction"])


def test_byte_budget_packs_greedily_with_default_names(merged):
    out, _ = merged
    info = layout.read_json(os.path.join(out, layout.DATASET_INFO))
    entry = layout.split_entry(info, "train")
    assert entry["filepathTemplate"] == layout.DEFAULT_TEMPLATE
    paths = layout.shard_paths(out, info, "train")
    n = len(paths)
    assert n > 1
    sizes = []
    for k, (path, count) in enumerate(paths):
        assert os.path.basename(path) == f"w2-train.tfrecord-{k:05d}-of-{n:05d}"
        records = [record.framed_size(len(d)) for d in record.read_records(path)]
        assert len(records) == count
        assert sum(records) <= 40_000 or count == 1
        sizes.append(records)
    for cur, nxt in itertools.pairwise(sizes):  # greedy: the next episode did not fit
        assert sum(cur) + nxt[0] > 40_000
    assert int(entry["numBytes"]) == sum(os.path.getsize(p) for p, _ in paths)


def test_same_output_on_every_run(sources, merged, tmp_path):
    out, _ = merged
    again = str(tmp_path / "again")
    reshard.reshard([os.path.join(sources, "runs"), sources], again,
                    ReshardOptions(shard_bytes=40_000, workers=1))
    a, b = dir_files(out), dir_files(again)
    assert a.keys() == b.keys()
    for name in a:
        if name != layout.METADATA:  # provenance: creation time, host, argv
            assert a[name] == b[name], name


def test_statistics_equal_a_fresh_catch_up(merged, tmp_path):
    out, _ = merged
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    os.unlink(os.path.join(copy, layout.STATISTICS))
    with layout.dataset_lock(copy):
        stats.catch_up(copy)
    assert layout.read_json(os.path.join(copy, layout.STATISTICS)) == \
        layout.read_json(os.path.join(out, layout.STATISTICS))
    assert stats.is_current(out)


def test_provenance_records_the_sources(sources, merged):
    out, _ = merged
    meta = layout.read_json(os.path.join(out, layout.METADATA))
    assert [s["directory"] for s in meta["resharded_from"]] == layout.find_datasets(sources)
    assert all(s["metadata"]["sessions"] for s in meta["resharded_from"])
    assert meta["sessions"][-1]["tool"] == "reshard"
    assert meta["image_codecs"] == {"steps/observation/image": "png",
                                    "steps/observation/wrist_image": "png"}


def test_skip_indices_drop_invalid_and_shard_size(sources, tmp_path):
    out = str(tmp_path / "out")
    report = reshard.reshard([sources], out, ReshardOptions(
        skip_episodes=(0, 4), drop_invalid=True, shard_episodes=2))
    src = source_records(sources)
    invalid = [i for i, r in enumerate(src)
               if reader.decode_episode(r[3], reader.read_spec(r[0]), keys=())["invalid"]]
    assert invalid == [8]
    manifest = layout.read_json(os.path.join(out, layout.RESHARD_MANIFEST))
    skipped = {row[0]: row[-1] for row in manifest["skipped"]}
    assert skipped == {0: "skip_episodes", 4: "skip_episodes", 8: "invalid"}
    kept = [i for i in range(len(src)) if i not in skipped]
    rows = manifest_rows(out)
    assert [r["global_index"] for r in rows] == kept
    got = output_records(out)
    assert [got[k] for k in sorted(got)] == [src[i][3] for i in kept]
    assert [s["episodes"] for s in manifest["splits"]["train"]["shards"]] == [2, 2, 2]
    assert report.skipped == 3
    assert validate(out).ok


def test_skip_index_out_of_range_is_an_error(sources, tmp_path):
    with pytest.raises(ValueError, match="skip_episodes"):
        reshard.reshard([sources], str(tmp_path / "out"), ReshardOptions(skip_episodes=(99,)))
    assert no_leftovers(str(tmp_path))


def test_relabel_language_changes_only_the_language(sources, tmp_path):
    out = str(tmp_path / "out")
    reshard.reshard([sources], out, ReshardOptions(relabel_language="pick up the cube"))
    src = source_records(sources)
    got = output_records(out)
    for (_directory, _, _, before), after in zip(src, [got[k] for k in sorted(got)]):
        a, b = record.split_example(before), record.split_example(after)
        assert a.keys() == b.keys()
        for key in a:
            if key != "steps/language_instruction":
                assert bytes(a[key]) == bytes(b[key]), key
        _kind, values = record.decode_feature(b["steps/language_instruction"])
        assert set(values) == {b"pick up the cube"}
        assert len(values) == len(record.decode_feature(a["steps/is_first"])[1])
    assert {r["changes"] for r in manifest_rows(out)} == {"language"}
    episodes = read_tfds(out)
    assert all(set(e["steps"]["language_instruction"]) == {b"pick up the cube"} for e in episodes)
    assert validate(out).ok


def test_relabel_to_the_same_text_copies_unchanged(tmp_path):
    src = make_w2(str(tmp_path / "src"), 2, seed=3)
    first = next(reader.read_episodes(src, keys={"language_instruction"}))
    text = first["steps"]["language_instruction"][0].decode()
    out = str(tmp_path / "out")
    reshard.reshard([src], out, ReshardOptions(relabel_language=text))
    rows = manifest_rows(out)
    assert rows[0]["changes"] == ""  # already said so: copied as it was
    assert output_records(out)[("train", 0, 0)] == source_records(src)[0][3]


def test_language_map_by_id_and_by_index(sources, tmp_path):
    src = source_records(sources)
    first_id = reader.decode_episode(src[0][3], reader.read_spec(src[0][0]), keys=())["episode_id"]
    mapping = {first_id.decode(): "by id", "3": "by index", "nobody": "unused"}
    out = str(tmp_path / "out")
    report = reshard.reshard([sources], out, ReshardOptions(language_map=mapping))
    langs = [set(ep["steps"]["language_instruction"])
             for ep in reader.read_episodes(out, keys={"language_instruction"})]
    originals = [set(ep["steps"]["language_instruction"])
                 for d in layout.find_datasets(sources)
                 for ep in reader.read_episodes(d, keys={"language_instruction"})]
    assert langs[0] == {b"by id"} and langs[3] == {b"by index"}
    assert [lang for i, lang in enumerate(langs) if i not in (0, 3)] == \
        [lang for i, lang in enumerate(originals) if i not in (0, 3)]
    changes = [r["changes"] for r in manifest_rows(out)]
    assert changes[0] == changes[3] == "language" and changes[1] == ""
    assert report.manifest["unmatched_language_keys"] == ["nobody"]


@pytest.mark.parametrize("form", ["json", "jsonl", "tsv"])
def test_load_language_map(tmp_path, form):
    path = tmp_path / f"map.{form}"
    text = {"json": json.dumps({"abc-000001": "open the drawer", "7": "close it"}),
            "jsonl": '{"episode_id": "abc-000001", "language_instruction": "open the drawer"}\n'
                     '{"index": 7, "language_instruction": "close it"}\n',
            "tsv": "# comment\nabc-000001\topen the drawer\n7\tclose it\n"}[form]
    path.write_text(text)
    assert reshard.load_language_map(path) == {"abc-000001": "open the drawer", "7": "close it"}


def test_relabel_adds_a_language_feature_to_w1(w1, tmp_path):
    out = str(tmp_path / "out")
    reshard.reshard([w1], out, ReshardOptions(relabel_language="run forward",
                                              language_map={"1": "run backward"}))
    features = layout.read_json(os.path.join(out, layout.FEATURES))
    assert "steps/language_instruction" in reshard.feature_paths(features)
    episodes = read_tfds(out)
    before = read_tfds(w1)
    assert [set(e["steps"]["language_instruction"]) for e in episodes] == \
        [{b"run forward"}, {b"run backward"}, {b"run forward"}]
    for got, want in zip(episodes, before):
        np.testing.assert_array_equal(got["steps"]["observation"], want["steps"]["observation"])
        np.testing.assert_array_equal(got["steps"]["action"], want["steps"]["action"])
        np.testing.assert_array_equal(got["steps"]["reward"], want["steps"]["reward"])
    assert validate(out).ok


def test_w1_reshard_reads_back_identically(w1, tmp_path):
    out = str(tmp_path / "out")
    reshard.reshard([w1], out, ReshardOptions(shard_episodes=1))
    got, want = read_tfds(out), read_tfds(w1)
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        for key in ("observation", "action", "reward", "discount", "is_first", "is_last",
                    "is_terminal"):
            np.testing.assert_array_equal(a["steps"][key], b["steps"][key])
        assert a["episode_id"] == b["episode_id"]
    assert validate(out).ok


def test_validation_split_by_fraction_and_seed(sources, tmp_path):
    def run(seed, name):
        out = str(tmp_path / name)
        reshard.reshard([sources], out, ReshardOptions(validation_fraction=0.3, split_seed=seed))
        rows = manifest_rows(out)
        return out, sorted(r["global_index"] for r in rows if r["split"] == "val")

    out, val = run(0, "s0")
    _, val_again = run(0, "s0_again")
    choices = {tuple(run(seed, f"s{seed}")[1]) for seed in (1, 2, 3)}
    assert val == val_again and len(val) == 3  # round(0.3 * 9)
    assert len(choices | {tuple(val)}) > 1
    rows = manifest_rows(out)
    assert sorted(r["global_index"] for r in rows) == list(range(9))
    train = [r["global_index"] for r in rows if r["split"] == "train"]
    assert train == sorted(train)  # the merged order is kept inside each split
    info = layout.read_json(os.path.join(out, layout.DATASET_INFO))
    assert layout.list_splits(info) == ["train", "val"]
    assert len(read_tfds(out, "val")) == 3 and len(read_tfds(out, "train")) == 6
    assert validate(out).ok and stats.is_current(out)


def test_rename_and_drop_features(sources, tmp_path):
    out = str(tmp_path / "out")
    reshard.reshard([sources], out, ReshardOptions(
        rename_features={"steps/observation/image": "steps/observation/image_0"},
        drop_features=("steps/observation/wrist_image",), shard_bytes=30_000))
    paths = reshard.feature_paths(layout.read_json(os.path.join(out, layout.FEATURES)))
    assert "steps/observation/image_0" in paths
    assert "steps/observation/image" not in paths and "steps/observation/wrist_image" not in paths
    src = source_records(sources)
    got = output_records(out)
    for (_, _, _, before), after in zip(src, [got[k] for k in sorted(got)]):
        a, b = record.split_example(before), record.split_example(after)
        assert bytes(b["steps/observation/image_0"]) == bytes(a["steps/observation/image"])
        assert "steps/observation/wrist_image" not in b
        assert set(b) == set(a) - {"steps/observation/image", "steps/observation/wrist_image"} \
            | {"steps/observation/image_0"}
    assert {r["changes"] for r in manifest_rows(out)} == {"features"}
    meta = layout.read_json(os.path.join(out, layout.METADATA))
    assert meta["image_codecs"] == {"steps/observation/image_0": "png"}
    episodes = read_tfds(out)
    assert episodes[0]["steps"]["observation"]["image_0"].shape == (9, 32, 32, 3)
    assert validate(out).ok


@pytest.mark.parametrize("options, match", [
    (ReshardOptions(drop_features=("steps/observation/depth",)), "does not exist"),
    (ReshardOptions(drop_features=("steps/is_first",)), "cannot be renamed or dropped"),
    (ReshardOptions(rename_features={"steps/action": "steps/reward"}), "exists already"),
    (ReshardOptions(rename_features={"steps/action": "action"}), "inside steps/"),
])
def test_bad_feature_transformations_are_errors(sources, tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        reshard.reshard([sources], str(tmp_path / "out"), options)
    assert os.listdir(tmp_path) == []


def test_merging_different_features_lists_the_differences(sources, w1, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(FeatureMismatchError) as err:
        reshard.reshard([sources, w1], out)
    text = str(err.value)
    assert "steps/action" in text and "steps/observation/image" in text
    assert all(d.startswith(w1) or d.split(":")[0] in layout.find_datasets(sources)
               for d in err.value.differences)
    assert not os.path.exists(out) and no_leftovers(str(tmp_path))


def test_corrupt_input_leaves_no_output_and_keeps_the_old_one(sources, merged, tmp_path):
    root = str(tmp_path / "src")
    shutil.copytree(os.path.join(sources, "a"), root)
    path = layout.shard_paths(root, layout.read_json(os.path.join(root, layout.DATASET_INFO)),
                              "train")[1][0]
    with open(path, "r+b") as f:  # flip a byte in the middle of an image payload
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    out = str(tmp_path / "out")
    with pytest.raises(CorruptDatasetError, match="CRC"):
        reshard.reshard([root], out)
    assert not os.path.exists(out) and no_leftovers(str(tmp_path))
    # An existing output survives a failed overwrite untouched.
    existing = str(tmp_path / "existing")
    shutil.copytree(merged[0], existing)
    before = dir_files(existing)
    with pytest.raises(CorruptDatasetError):
        reshard.reshard([root], existing, ReshardOptions(overwrite=True))
    assert dir_files(existing) == before and no_leftovers(str(tmp_path))


def test_overwrite_rules(sources, merged, tmp_path):
    existing = str(tmp_path / "existing")
    shutil.copytree(merged[0], existing)
    with pytest.raises(DatasetExistsError, match="overwrite"):
        reshard.reshard([os.path.join(sources, "a")], existing)
    reshard.reshard([os.path.join(sources, "a")], existing, ReshardOptions(overwrite=True))
    assert len(output_records(existing)) == 3
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetExistsError, match="no dataset"):
        reshard.reshard([sources], str(other), ReshardOptions(overwrite=True))
    assert (other / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    reshard.reshard([os.path.join(sources, "a")], str(empty))
    assert validate(str(empty)).ok and no_leftovers(str(tmp_path))


def test_in_place_reshard_and_output_under_the_input_root(sources, tmp_path):
    root = str(tmp_path / "root")
    shutil.copytree(sources, root)
    a = os.path.join(root, "a")
    before = [r[3] for r in source_records(a)]
    reshard.reshard([a], a, ReshardOptions(overwrite=True, shard_episodes=1))
    assert [output_records(a)[k] for k in sorted(output_records(a))] == before
    assert validate(a).ok
    # A previous output under the input root is not read as an input again.
    out = os.path.join(root, "merged")
    reshard.reshard([root], out)
    report = reshard.reshard([root], out, ReshardOptions(overwrite=True))
    assert report.episodes == 9 and report.sources == 3


def test_reshard_does_not_import_tensorflow(merged, tmp_path):
    code = (
        "import sys\n"
        "from oxe_envlogger.datasets import reshard, validate\n"
        f"r = reshard.reshard([{merged[0]!r}], {str(tmp_path / 'out')!r},\n"
        "    reshard.ReshardOptions(relabel_language='x', drop_features=('steps/reward',)))\n"
        f"assert validate.validate({str(tmp_path / 'out')!r}).ok\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'jax', 'apache_beam')]\n"
        "assert not bad, bad\n"
        "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         timeout=120, check=False)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_a_tfds_written_dataset_reshards_with_transformations(tmp_path):
    from tests.tools.datasets import make_foreign

    src = make_foreign(str(tmp_path / "foreign"))
    out = str(tmp_path / "out")
    reshard.reshard([src], out, ReshardOptions(
        relabel_language="new task", language_map={"0": "first"},
        rename_features={"steps/observation/rgb": "steps/observation/image"}))
    before, after = read_tfds(src), read_tfds(out)
    assert [set(e["steps"]["language_instruction"]) for e in after] == \
        [{b"first"}, {b"new task"}, {b"new task"}]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a["steps"]["observation"]["rgb"],
                                      b["steps"]["observation"]["image"])
        np.testing.assert_array_equal(a["steps"]["observation"]["joints"],
                                      b["steps"]["observation"]["joints"])
        assert a["episode_metadata"] == b["episode_metadata"]
    report = validate(out)
    assert report.ok, report.format()
    assert not os.path.exists(os.path.join(out, layout.STATISTICS))  # features we cannot decode


# --overwrite replaces only what the resharder writes

def test_overwrite_keeps_files_the_resharder_did_not_write(sources, merged, tmp_path):
    existing = shutil.copytree(merged[0], str(tmp_path / "existing"))
    inodes = add_user_files(existing)
    for name in ("dataset_statistics_0123abcd.json", "dataset_info.json.tmp-1-deadbeef"):
        (tmp_path / "existing" / name).write_text("{}")  # the trainer's cache; a torn write
    old_shards = [n for n in os.listdir(existing) if ".tfrecord-" in n]
    reshard.reshard([os.path.join(sources, "a")], existing,
                    ReshardOptions(overwrite=True, dataset_name="renamed"))
    assert_user_files(existing)
    # the same files, not copies: hard-linked into the new output before it took the old's place
    assert {rel: os.stat(os.path.join(existing, rel)).st_ino for rel in USER_FILES} == inodes
    entries = set(os.listdir(existing))
    assert not entries & set(old_shards)
    assert entries - {"NOTES.txt", "eval", "latest.json"} == set(os.listdir(merged[0])) - set(
        old_shards) | {"renamed-train.tfrecord-00000-of-00001"}
    assert validate(existing).ok and len(read_tfds(existing)) == 3
    assert no_leftovers(str(tmp_path))


def test_overwrite_of_a_logged_dataset_keeps_user_files(sources, tmp_path):
    logged = shutil.copytree(os.path.join(sources, "b"), str(tmp_path / "logged"))
    add_user_files(logged)
    reshard.reshard([os.path.join(sources, "a")], logged, ReshardOptions(overwrite=True))
    assert_user_files(logged)
    assert not os.path.exists(os.path.join(logged, layout.INTERNAL))
    assert validate(logged).ok and no_leftovers(str(tmp_path))


def test_overwrite_refuses_a_user_file_named_like_a_new_shard(sources, merged, tmp_path):
    existing = shutil.copytree(merged[0], str(tmp_path / "existing"))
    add_user_files(existing)
    (tmp_path / "existing" / "renamed-train.tfrecord-00000-of-00001").write_text("mine")
    before = dir_files(existing)
    with pytest.raises(DatasetExistsError, match=re.escape("renamed-train.tfrecord-00000-of")):
        reshard.reshard([os.path.join(sources, "a")], existing,
                        ReshardOptions(overwrite=True, dataset_name="renamed"))
    assert dir_files(existing) == before and no_leftovers(str(tmp_path))
    assert_user_files(existing)


def test_overwrite_refuses_while_a_logger_writes(sources, tmp_path):
    logged = shutil.copytree(os.path.join(sources, "b"), str(tmp_path / "logged"))
    registration = layout.WriterRegistration(logged, "0123456789ab")  # a live writer's lock
    try:
        with pytest.raises(DatasetExistsError, match="0123456789ab"):
            reshard.reshard([os.path.join(sources, "a")], logged, ReshardOptions(overwrite=True))
    finally:
        registration.release()
    assert validate(logged).ok and no_leftovers(str(tmp_path))


def test_logger_overwrite_removes_the_reshard_files_and_keeps_the_user_files(merged, tmp_path):
    """overwrite=True of a logger on a resharded directory: the manifest and the trainer's
    caches describe the replaced data and go with it; the user's files stay."""
    import gymnasium as gym

    import oxe_envlogger.envs  # noqa: F401  (registers the env)
    from oxe_envlogger import AutoOXEEnvLogger
    from oxe_envlogger.envs import run_episodes

    existing = shutil.copytree(merged[0], str(tmp_path / "existing"))
    add_user_files(existing)
    (tmp_path / "existing" / "dataset_statistics_0123abcd.json").write_text("{}")
    env = AutoOXEEnvLogger(gym.make("oxe_envlogger/SyntheticCamera-v0", image_size=32,
                                    wrist_size=16, max_episode_steps=5), "w2", existing,
                           overwrite=True)
    run_episodes(env, 2, seed=0)
    env.close()
    assert_user_files(existing)
    assert not os.path.exists(os.path.join(existing, layout.RESHARD_MANIFEST))
    assert not os.path.exists(os.path.join(existing, "dataset_statistics_0123abcd.json"))
    report = validate(existing)
    assert report.ok and report.episodes == 2, report.format()


def test_exchange_paths(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("a")
    (tmp_path / "b").mkdir()
    if not layout.exchange_paths(tmp_path / "a", tmp_path / "b"):
        pytest.skip("no RENAME_EXCHANGE on this file system")
    assert os.listdir(tmp_path / "b") == ["x"] and os.listdir(tmp_path / "a") == []
    with pytest.raises(FileNotFoundError):
        layout.exchange_paths(tmp_path / "a", tmp_path / "missing")


_PAUSED_RESHARD = """
import os, sys, time
from oxe_envlogger.datasets import reshard
from oxe_envlogger.datasets.reshard import output
from oxe_envlogger.format import layout

def pause(*args):
    print("ready", flush=True)
    time.sleep(600)

where = sys.argv[3]
if where == "before_swap":
    layout.exchange_paths = pause
elif where == "after_swap":
    output._retire = pause
else:  # no RENAME_EXCHANGE: killed between the two renames
    layout.exchange_paths = lambda a, b: False
    rename = os.rename
    def paused_rename(a, b):
        rename(a, b)
        if os.path.basename(b).startswith(reshard.TMP_PREFIX + "old-"):
            pause()
    os.rename = paused_rename
reshard.reshard([sys.argv[1]], sys.argv[2],
                reshard.ReshardOptions(overwrite=True, dataset_name="renamed"))
"""


@pytest.mark.parametrize("where", ["before_swap", "after_swap", "between_renames"])
def test_overwrite_killed_midway(sources, merged, tmp_path, where):
    """SIGKILL during the replacement: the output is the old dataset or the new one, whole, with
    the user's files (only where the swap takes two renames is there a moment without an output
    at all); the next reshard into it finishes the job and the user's files stay."""
    existing = shutil.copytree(merged[0], str(tmp_path / "existing"))
    add_user_files(existing)
    a = os.path.join(sources, "a")
    kill_when_ready([sys.executable, "-c", _PAUSED_RESHARD, a, existing, where], cwd=REPO,
                    stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": REPO})
    if where == "between_renames":
        assert not os.path.exists(existing)
    else:
        assert validate(existing).ok
        assert_user_files(existing)
        name = layout.read_json(os.path.join(existing, layout.DATASET_INFO))["name"]
        assert name == {"before_swap": "w2", "after_swap": "renamed"}[where]
        assert len(read_tfds(existing)) == (9 if where == "before_swap" else 3)
    reshard.reshard([a], existing, ReshardOptions(overwrite=True, dataset_name="renamed"))
    assert_user_files(existing)
    assert validate(existing).ok and len(read_tfds(existing)) == 3
    left = [e for e in os.listdir(tmp_path) if e.startswith(reshard.TMP_PREFIX)]
    # no previous output is left behind; a killed run's staging directory (the new dataset and
    # links to the user's files) may be, as before: it cannot be told from a running one's
    assert all(not os.path.exists(os.path.join(tmp_path, e, layout.INTERNAL)) for e in left)
    assert len(left) <= (0 if where == "after_swap" else 1)


# ---------------------------------------------------------------------------------------------
# float64 storage conversion


@pytest.fixture(scope="module")
def w1_storages(tmp_path_factory):
    """The same HalfCheetah episodes (same seeds) logged with float64 stored exactly and with
    the default storage (float32)."""
    root = tmp_path_factory.mktemp("w1_storages")
    return {storage: make_w1(str(root / storage), 3, steps=20, float64=storage)
            for storage in ("exact", "float32")}


_W1_KEYS = ("observation", "action", "reward", "discount", "is_first", "is_last", "is_terminal")


def _steps_by_tfds(directory: str) -> list[dict]:
    return [e["steps"] for e in read_tfds(directory)]


def test_float64_exact_to_float32_and_back_through_tfds(w1_storages, tmp_path):
    """Exact float64 converted to float32 storage is what logging with float32 gives (and
    reaches a SkipDecoding loader as numbers); converted back it is float64 bytes again,
    holding the float32 values (widened; the precision dropped does not come back)."""
    exact, f32 = w1_storages["exact"], w1_storages["float32"]
    down, up = str(tmp_path / "down"), str(tmp_path / "up")
    reshard.reshard([exact], down, ReshardOptions(float64="float32"))
    reshard.reshard([down], up, ReshardOptions(float64="exact"))
    features = {d: {p: leaf.encoding for p, leaf in reader.step_leaves(reader.read_spec(d))}
                for d in (exact, f32, down, up)}
    assert features[down] == features[f32]
    assert features[up] == features[exact]
    assert features[down]["observation"] == "none" and features[up]["observation"] == "bytes"
    assert layout.read_json(os.path.join(down, layout.FEATURES)) == \
        layout.read_json(os.path.join(f32, layout.FEATURES))
    assert {r["changes"] for r in manifest_rows(down)} == {"float64"}
    original, logged32 = _steps_by_tfds(exact), _steps_by_tfds(f32)
    converted, back = _steps_by_tfds(down), _steps_by_tfds(up)
    for o, l32, c, b in zip(original, logged32, converted, back, strict=True):
        for key in _W1_KEYS:
            np.testing.assert_array_equal(c[key], l32[key], err_msg=key)
            np.testing.assert_array_equal(b[key], c[key], err_msg=key)
            assert c[key].dtype == b[key].dtype == o[key].dtype, key
        np.testing.assert_array_equal(c["observation"], float32_rounded(o["observation"]))
        assert not np.array_equal(c["observation"], o["observation"])
    raw = read_tfds_skip_decoding(down)
    assert {raw[0]["step_dtypes"][k].name for k in ("observation", "reward")} == {"float64"}
    assert read_tfds_skip_decoding(up)[0]["step_dtypes"]["observation"].name == "string"
    for directory in (down, up):
        assert validate(directory).ok
        assert [e["episode_id"] for e in reader.read_episodes(directory, keys=())] == \
            [e["episode_id"] for e in reader.read_episodes(exact, keys=())]
    # Statistics of the converted values, as a fresh pass over the output computes them.
    copy = shutil.copytree(down, str(tmp_path / "copy"))
    os.unlink(os.path.join(copy, layout.STATISTICS))
    with layout.dataset_lock(copy):
        stats.catch_up(copy)
    assert layout.read_json(os.path.join(copy, layout.STATISTICS)) == \
        layout.read_json(os.path.join(down, layout.STATISTICS))


def test_float64_conversion_copies_what_is_stored_so_already(w1_storages, tmp_path):
    f32 = w1_storages["float32"]
    out = str(tmp_path / "out")
    reshard.reshard([f32], out, ReshardOptions(float64="float32"))
    assert {r["changes"] for r in manifest_rows(out)} == {""}
    assert list(output_records(out).values()) == [r[3] for r in source_records(f32)]


def test_float64_conversion_merges_both_storages_with_other_changes(w1_storages, tmp_path):
    """Inputs that differ only in float64 storage: refused as they are (the error says how to
    convert), merged once converted, with renames and relabelling in the same pass."""
    inputs = [w1_storages["exact"], w1_storages["float32"]]
    with pytest.raises(FeatureMismatchError, match=r"float64 stored exactly vs .* stored as "
                                                   r"float32.* --float64 converts"):
        reshard.reshard(inputs, str(tmp_path / "refused"))
    out = str(tmp_path / "out")
    reshard.reshard(inputs, out, ReshardOptions(
        float64="float32", rename_features={"steps/observation": "steps/state"},
        relabel_language="run", shard_episodes=2))
    rows = manifest_rows(out)
    assert [r["changes"] for r in rows] == ["features+float64+language"] * 3 + \
        ["features+language"] * 3
    steps = _steps_by_tfds(out)
    for got, want in zip(steps, _steps_by_tfds(w1_storages["float32"]) * 2, strict=True):
        np.testing.assert_array_equal(got["state"], want["observation"])
        np.testing.assert_array_equal(got["reward"], want["reward"])
        assert set(got["language_instruction"]) == {b"run"}
    assert validate(out).ok


def test_float64_values_beyond_float32_are_refused(tmp_path):
    """An exact dataset holding 1e300 cannot be stored as float32: the error names the key,
    the value and the episode, and no output is left."""
    src = str(tmp_path / "src")
    space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
    logger = RLDSLogger(space, space, "big", src, float64="exact")
    logger(None, np.zeros(2), 0.0, step_type=RLDSStepType.RESTART)
    logger(np.zeros(2), np.array([1.0, 1e300]), 0.5, step_type=RLDSStepType.TRUNCATION)
    logger.close()
    episode_id = next(reader.read_episodes(src, keys=()))["episode_id"]
    out = str(tmp_path / "out")
    with pytest.raises(SpecError, match=r"^steps/observation: expected a value float32 can hold "
                                        r".*given 1e\+300 at index \[3\] .*in episode "
                                        + re.escape(episode_id.decode())):
        reshard.reshard([src], out, ReshardOptions(float64="float32"))
    assert not os.path.exists(out) and no_leftovers(str(tmp_path))


def test_float64_conversion_of_a_tfds_written_dataset(tmp_path):
    """A dataset tfds wrote itself: its fixed-shape float64 tensors stored as bytes (a step's
    and an episode field) become float lists (a Scalar float64 already is one), a zlib tensor
    of unknown shape is left as it is, and tfds reads every value back."""
    import tensorflow_datasets as tfds

    from tests.tools.datasets import _write_with_tfds

    f = tfds.features
    features = f.FeaturesDict({
        "steps": f.Dataset({
            "observation": f.FeaturesDict({
                "state": f.Tensor(shape=(3,), dtype=np.float64, encoding="bytes"),
                "history": f.Tensor(shape=(None,), dtype=np.float64, encoding="zlib")}),
            "action": f.Tensor(shape=(2,), dtype=np.float32),
            "reward": f.Scalar(dtype=np.float64),
            "is_first": f.Scalar(dtype=np.bool_), "is_last": f.Scalar(dtype=np.bool_),
            "is_terminal": f.Scalar(dtype=np.bool_)}),
        "score": f.Tensor(shape=(), dtype=np.float64, encoding="bytes"),
    })
    rng = np.random.default_rng(0)
    episodes = [{"steps": [{"observation": {"state": rng.normal(size=3),
                                            "history": rng.normal(size=e + 2)},
                            "action": rng.normal(size=2).astype(np.float32),
                            "reward": 0.1 * t, "is_first": t == 0, "is_last": t == 3,
                            "is_terminal": False} for t in range(4)],
                 "score": np.float64(e + 0.1)} for e in range(3)]
    src = _write_with_tfds(str(tmp_path / "tfds"), "tfds_f64", features, episodes)
    down, up = str(tmp_path / "down"), str(tmp_path / "up")
    reshard.reshard([src], down, ReshardOptions(float64="float32"))
    reshard.reshard([down], up, ReshardOptions(float64="exact"))
    def encodings(directory):  # (our spec reader does not take the tensor of unknown shape)
        features = layout.read_json(os.path.join(directory, layout.FEATURES))
        out = {}
        for path in reshard.feature_paths(features):
            node = features
            for key in path.split("/"):
                node = reshard.transform._node_children(node)[key]
            if "tensor" in node:
                out[path] = node["tensor"]["encoding"]
        return out

    assert encodings(src)["steps/reward"] == "none"
    assert encodings(down)["steps/observation/state"] == encodings(down)["score"] == "none"
    assert encodings(up)["steps/observation/state"] == encodings(up)["steps/reward"] == "bytes"
    assert encodings(down)["steps/observation/history"] == "zlib"
    assert encodings(up)["steps/observation/history"] == "zlib"
    raw = read_tfds_skip_decoding(down)[0]["step_dtypes"]
    assert raw["observation/state"].name == "float64"
    assert raw["observation/history"].name == "string"
    for directory in (down, up):
        for got, want in zip(read_tfds(directory), episodes, strict=True):
            steps = got["steps"]
            np.testing.assert_array_equal(
                steps["observation"]["state"],
                float32_rounded([s["observation"]["state"] for s in want["steps"]]))
            np.testing.assert_array_equal(steps["reward"],
                                          float32_rounded([s["reward"] for s in want["steps"]]))
            assert got["score"] == float32_rounded(want["score"])
            for t, s in enumerate(want["steps"]):
                np.testing.assert_array_equal(steps["observation"]["history"][t],
                                              s["observation"]["history"])
