"""tools/reshard_rlds.py as a real subprocess: the original tool's flags, the new ones, errors."""

from __future__ import annotations

import json
import os

import pytest

from oxe_envlogger.datasets import reshard
from oxe_envlogger.datasets.validate import validate
from oxe_envlogger.format import layout, reader
from tests.tools.datasets import add_user_files, assert_user_files, make_w1, make_w2, run_tool


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"a": make_w2(str(root / "logs" / "a"), 3, seed=0),
            "b": make_w2(str(root / "logs" / "b"), 2, seed=7, unfinished=True),
            "w1": make_w1(str(root / "w1"), 2, steps=15),
            "root": str(root)}


def rows(directory):
    m = layout.read_json(os.path.join(directory, layout.RESHARD_MANIFEST))
    return [dict(zip(m["episode_columns"], r)) for r in m["episodes"]]


def test_original_flags(inputs, tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)  # an empty directory may be written into
    res = run_tool("reshard_rlds", "--rlds_dirs", inputs["a"], inputs["b"], "--output_rlds", out,
                   "--overwrite", "--skip_eps_indices", "1", "2", "--shard_size", "2",
                   "--relabel_lang", "stack the blocks")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "wrote" in res.stdout and "episodes" in res.stderr  # the progress bar
    got = rows(out)
    assert [r["global_index"] for r in got] == [0, 3, 4, 5]
    assert [r["shard"] for r in got] == [0, 0, 1, 1]
    langs = {x for ep in reader.read_episodes(out, keys={"language_instruction"})
             for x in ep["steps"]["language_instruction"]}
    assert langs == {b"stack the blocks"}
    assert validate(out).ok


def test_new_flags(inputs, tmp_path):
    out = str(tmp_path / "out")
    lang_map = tmp_path / "labels.tsv"
    lang_map.write_text("0\tfirst\n4\tfifth\n")
    res = run_tool("reshard_rlds", f"--rlds_dirs={inputs['root']}/logs", f"--output_rlds={out}",
                   "--drop_invalid", "--shard_bytes=20KB", "--validation_fraction=0.4",
                   "--split_seed=3", f"--relabel_lang_map={lang_map}",
                   "--rename_features=steps/observation/state=steps/observation/proprio",
                   "--drop_features=steps/observation/wrist_image", "--dataset_name=merged",
                   "--workers=2")
    assert res.returncode == 0, res.stderr[-3000:]
    got = rows(out)
    assert sorted(r["global_index"] for r in got) == [0, 1, 2, 3, 4]  # 5 is invalid
    assert sum(r["split"] == "val" for r in got) == 2
    info = layout.read_json(os.path.join(out, layout.DATASET_INFO))
    assert info["name"] == "merged" and layout.list_splits(info) == ["train", "val"]
    paths = reshard.feature_paths(layout.read_json(os.path.join(out, layout.FEATURES)))
    assert "steps/observation/proprio" in paths and "steps/observation/wrist_image" not in paths
    by_index = {r["global_index"]: r for r in got}
    assert by_index[0]["changes"] == "features+language"
    assert all(os.path.getsize(os.path.join(out, s["file"])) <= 20_000 or s["episodes"] == 1
               for split in json.load(open(os.path.join(out, layout.RESHARD_MANIFEST)))["splits"].values()
               for s in split["shards"])
    assert validate(out).ok


def test_feature_mismatch_exits_non_zero_listing_the_differences(inputs, tmp_path):
    out = str(tmp_path / "out")
    res = run_tool("reshard_rlds", "--rlds_dirs", inputs["a"], inputs["w1"], "--output_rlds", out)
    assert res.returncode == 1
    assert "features differ" in res.stderr and "steps/action" in res.stderr
    assert "Traceback" not in res.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args, message", [
    (["--shard_bytes=lots"], "--shard_bytes"),
    (["--rename_features=steps/action"], "OLD=NEW"),
    (["--validation_fraction=1.5"], "validation_fraction"),
    (["--no_such_flag=1"], "need --runner"),
    (["--float64=float16"], "--float64"),
])
def test_bad_flags_are_usage_errors(inputs, tmp_path, args, message):
    res = run_tool("reshard_rlds", f"--rlds_dirs={inputs['a']}",
                   f"--output_rlds={tmp_path / 'out'}", *args)
    assert res.returncode != 0 and message in res.stderr
    assert not os.path.exists(tmp_path / "out")


def test_runner_without_beam_is_a_clear_error(inputs, tmp_path):
    import importlib.util

    if importlib.util.find_spec("apache_beam") is not None:
        pytest.skip("apache-beam is installed here (tests/oxe_envlogger/datasets/test_reshard_beam.py)")
    res = run_tool("reshard_rlds", f"--rlds_dirs={inputs['a']}",
                   f"--output_rlds={tmp_path / 'out'}", "--runner=DirectRunner",
                   "--direct_num_workers=2")
    assert res.returncode == 2 and "pip install apache-beam" in res.stderr
    assert not (tmp_path / "out").exists()


def test_overwrite_keeps_the_users_files(inputs, tmp_path):
    out = str(tmp_path / "out")
    assert run_tool("reshard_rlds", f"--rlds_dirs={inputs['a']}", f"--output_rlds={out}"
                    ).returncode == 0
    add_user_files(out)
    res = run_tool("reshard_rlds", f"--rlds_dirs={inputs['b']}", f"--output_rlds={out}",
                   "--overwrite")
    assert res.returncode == 0, res.stderr[-2000:]
    assert_user_files(out)
    report = validate(out)
    assert report.ok and report.episodes == 3, report.format()
    assert not [e for e in os.listdir(tmp_path) if e.startswith(reshard.TMP_PREFIX)]
