"""The Apache Beam resharder on the DirectRunner (several worker processes) gives the same
output as the single-process resharder: same shards, same bytes, same manifest but the runner.

Beam runs in whichever interpreter has it: this one, ``$OXE_BEAM_PYTHON``, or the virtual
environment ``.venv/beam`` (apache-beam 2.77 pins protobuf<7, pillow<13 and pyarrow<26, so it
cannot join an environment that holds newer ones). Create that one with::

    python3 -m venv .venv/beam && .venv/beam/bin/pip install apache-beam numpy gymnasium \\
        google-crc32c absl-py tqdm fpng simplejpeg
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from oxe_envlogger.datasets import reshard
from oxe_envlogger.datasets.reshard import ReshardOptions
from oxe_envlogger.datasets.validate import validate
from oxe_envlogger.format import layout
from tests.tools.datasets import (
    REPO,
    add_user_files,
    assert_user_files,
    make_w1,
    make_w2,
    run_tool,
)


def beam_python() -> str | None:
    if importlib.util.find_spec("apache_beam") is not None:
        return sys.executable
    candidates = [os.environ.get("OXE_BEAM_PYTHON"),
                  os.path.join(REPO, ".venv", "beam", "bin", "python")]
    return next((c for c in candidates if c and os.path.exists(c)), None)


BEAM_PYTHON = beam_python()
pytestmark = pytest.mark.skipif(
    BEAM_PYTHON is None,
    reason="apache-beam is not importable here, $OXE_BEAM_PYTHON is unset and .venv/beam is "
           "missing (see this module's docstring)")
DIRECT = ["--runner=DirectRunner", "--direct_num_workers=2",
          "--direct_running_mode=multi_processing"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("beam_sources")
    make_w2(str(root / "a"), 3, seed=0)
    make_w2(str(root / "b"), 2, seed=10, per_file=1)
    make_w2(str(root / "nested" / "c"), 3, seed=20, unfinished=True)
    return str(root)


def files(directory: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(directory)):
        if os.path.isfile(os.path.join(directory, name)):
            with open(os.path.join(directory, name), "rb") as f:
                out[name] = f.read()
    return out


def test_beam_direct_runner_equals_single_process(sources, tmp_path):
    lang_map = tmp_path / "labels.json"
    lang_map.write_text('{"1": "wipe the table", "6": "open the drawer"}')
    local = str(tmp_path / "local")
    reshard.reshard([sources], local, ReshardOptions(
        shard_bytes=30_000, drop_invalid=True, skip_episodes=(2,), validation_fraction=0.25,
        split_seed=7, language_map=reshard.load_language_map(lang_map)))
    beam = str(tmp_path / "beam")
    res = run_tool("reshard_rlds", f"--rlds_dirs={sources}", f"--output_rlds={beam}",
                   "--shard_bytes=30000", "--drop_invalid", "--skip_eps_indices=2",
                   "--validation_fraction=0.25", "--split_seed=7",
                   f"--relabel_lang_map={lang_map}", *DIRECT, python=BEAM_PYTHON)
    assert res.returncode == 0, res.stderr[-4000:]
    a, b = files(local), files(beam)
    assert a.keys() == b.keys()
    assert len([n for n in a if ".tfrecord-" in n]) > 2
    for name in a:
        if name not in (layout.METADATA, layout.RESHARD_MANIFEST):
            assert a[name] == b[name], name
    ma = layout.read_json(os.path.join(local, layout.RESHARD_MANIFEST))
    mb = layout.read_json(os.path.join(beam, layout.RESHARD_MANIFEST))
    assert ma.pop("runner") == "local" and mb.pop("runner") == "beam:DirectRunner"
    assert ma == mb
    changes = {row[-1] for row in ma["episodes"]}
    assert changes == {"", "language"}  # both paths (copied and re-assembled) were exercised
    assert layout.read_json(os.path.join(beam, layout.METADATA))["sessions"][-1]["runner"] == \
        "beam:DirectRunner"
    assert validate(beam).ok


def test_compacted_statistics_are_identical_across_runners(tmp_path):
    """Shards of more rows than a quantile sketch level holds, so the sketches compact (and the
    result depends on the merge order): two local workers and Beam write the same
    statistics.json, its quantiles within their stored bound of the data."""
    import numpy as np

    from oxe_envlogger import read_episodes
    from oxe_envlogger.format import stats
    from tests.helpers import check_quantiles

    source = make_w1(str(tmp_path / "w1"), 8, steps=1100)
    local = str(tmp_path / "local")
    reshard.reshard([source], local, ReshardOptions(shard_bytes=150_000, workers=2,
                                                    validation_fraction=0.25))
    beam = str(tmp_path / "beam")
    res = run_tool("reshard_rlds", f"--rlds_dirs={source}", f"--output_rlds={beam}",
                   "--shard_bytes=150000", "--validation_fraction=0.25", *DIRECT,
                   python=BEAM_PYTHON)
    assert res.returncode == 0, res.stderr[-4000:]
    assert files(local)[layout.STATISTICS] == files(beam)[layout.STATISTICS]
    train = stats.load_split(local, "train", current=True)
    assert len(layout.read_json(os.path.join(local, layout.STATISTICS))["covers"]["train"]) > 2
    for key in ("action", "observation"):
        data = np.concatenate([np.asarray(ep["steps"][key], np.float64)[:-1]
                               for ep in read_episodes(local, split="train", keys={key})])
        summary = train.keys[key].summary()
        assert max(summary["rank_error"]) > 0  # compacted: more than 1024 rows per shard
        check_quantiles(data, summary)


def test_beam_feature_mismatch_leaves_nothing(sources, tmp_path):
    w1 = make_w1(str(tmp_path / "w1"), 1, steps=10)
    out = str(tmp_path / "out")
    res = run_tool("reshard_rlds", f"--rlds_dirs={sources}", f"--rlds_dirs={w1}",
                   f"--output_rlds={out}", *DIRECT, python=BEAM_PYTHON)
    assert res.returncode == 1 and "features differ" in res.stderr
    assert not os.path.exists(out)
    assert not [e for e in os.listdir(tmp_path) if e.startswith(reshard.TMP_PREFIX)]


def test_beam_worker_failure_leaves_nothing(sources, tmp_path):
    import shutil

    root = shutil.copytree(os.path.join(sources, "a"), str(tmp_path / "a"))
    path = layout.shard_paths(root, layout.read_json(os.path.join(root, layout.DATASET_INFO)),
                              "train")[1][0]
    with open(path, "r+b") as f:  # a bad CRC, found by a worker while copying
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    out = str(tmp_path / "out")
    res = run_tool("reshard_rlds", f"--rlds_dirs={root}", f"--output_rlds={out}", *DIRECT,
                   python=BEAM_PYTHON)
    assert res.returncode != 0 and "CRC" in res.stderr
    assert not os.path.exists(out)
    assert not [e for e in os.listdir(tmp_path) if e.startswith(reshard.TMP_PREFIX)]


def test_beam_overwrite_keeps_the_users_files(sources, tmp_path):
    out = str(tmp_path / "out")
    reshard.reshard([os.path.join(sources, "b")], out)
    add_user_files(out)
    res = run_tool("reshard_rlds", f"--rlds_dirs={os.path.join(sources, 'a')}",
                   f"--output_rlds={out}", "--overwrite", *DIRECT, python=BEAM_PYTHON)
    assert res.returncode == 0, res.stderr[-4000:]
    assert_user_files(out)
    report = validate(out)
    assert report.ok and report.episodes == 3, report.format()
    assert not [e for e in os.listdir(tmp_path) if e.startswith(reshard.TMP_PREFIX)]


def test_beam_float64_conversion_equals_single_process(tmp_path):
    """--float64 on the Beam path: the same conversion, byte for byte, as in one process
    (float64 stored exactly converted, the input already stored as float32 copied)."""
    root = tmp_path / "in"
    make_w1(str(root / "exact"), 2, steps=10, float64="exact")
    make_w1(str(root / "f32"), 1, steps=10, seed=5)
    local = str(tmp_path / "local")
    reshard.reshard([str(root)], local, ReshardOptions(float64="float32", shard_episodes=1))
    beam = str(tmp_path / "beam")
    res = run_tool("reshard_rlds", f"--rlds_dirs={root}", f"--output_rlds={beam}",
                   "--float64=float32", "--shard_size=1", *DIRECT, python=BEAM_PYTHON)
    assert res.returncode == 0, res.stderr[-4000:]
    a, b = files(local), files(beam)
    assert a.keys() == b.keys()
    for name in a:
        if name not in (layout.METADATA, layout.RESHARD_MANIFEST):
            assert a[name] == b[name], name
    manifest = layout.read_json(os.path.join(beam, layout.RESHARD_MANIFEST))
    assert [row[-1] for row in manifest["episodes"]] == ["float64", "float64", ""]
    assert manifest["options"]["float64"] == "float32"
    assert validate(beam).ok
