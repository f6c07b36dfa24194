"""The refusal of a Re-Mix config whose data, normalization, inputs or head differ from its
reference run's, and the reference's statistics."""

from __future__ import annotations

import copy

import pytest

from openx_train.data import ConfigError
from openx_train.remix.reference import (
    check_reference,
    reference_differences,
    reference_statistics,
)


def _info():
    structure = {"state": ["state"], "action": ["action"], "state_normalization": "gaussian",
                 "action_normalization": "gaussian", "images": {}}
    return {"format_version": 1, "kind": "bc",
            "datasets": [{"name": "reacher", "path": "/data/reacher", "structure": structure,
                          "statistics": {"action": {"mean": [0.0]}}, "frames": 100,
                          "episodes": 2},
                         {"name": "cheetah", "path": "/data/cheetah",
                          "structure": copy.deepcopy(structure),
                          "statistics": {"action": {"mean": [1.0]}}, "frames": 50,
                          "episodes": 1}],
            "input_spec": {"inputs": [["observation/state", [1, 10], "float32"]],
                           "action": [[1, 2], "float32"]},
            "model": {"trunk": {"hidden_dims": [512, 512]},
                      "head": {"kind": "discrete", "num_bins": 48, "bin_type": "gaussian"}},
            "domain_key": "dataset", "domain_names": ["cheetah", "reacher"],
            "pooled_statistics": False}


def test_the_same_config_is_accepted_and_what_may_differ_does():
    reference = _info()
    current = _info()
    current["kind"] = "remix"
    current["domain_key"] = "episode_metadata/operator"  # domains are Re-Mix's choice
    current["model"]["trunk"]["hidden_dims"] = [64]  # the proxy may be another size
    for d in current["datasets"]:  # the Re-Mix run reuses the reference's statistics
        d["frames"] = 0
    assert reference_differences(reference, current) == []
    check_reference(reference, current, path="runs/ref")


def test_every_difference_is_listed():
    reference, current = _info(), _info()
    current["datasets"][1]["path"] = "/data/other"
    current["datasets"][0]["structure"]["action_normalization"] = "bounds"
    current["model"]["head"]["num_bins"] = 32
    current["input_spec"]["action"] = [[4, 2], "float32"]
    current["pooled_statistics"] = True
    diffs = reference_differences(reference, current)
    assert diffs == [
        "datasets[0].structure.action_normalization: the reference 'gaussian', this config "
        "'bounds'",
        "datasets[1].path: the reference '/data/cheetah', this config '/data/other'",
        "input_spec.action[0][0]: the reference 1, this config 4",
        "model.head.num_bins: the reference 48, this config 32",
        "pooled_statistics: the reference False, this config True",
    ]
    with pytest.raises(ConfigError) as info:
        check_reference(reference, current, path="runs/ref")
    message = str(info.value)
    assert message.startswith("remix reference runs/ref: the config differs from the "
                              "reference's in 5 place(s)")
    assert all(d in message for d in diffs)


def test_missing_and_extra_datasets_and_fields():
    reference, current = _info(), _info()
    current["datasets"].pop()
    current["model"]["head"]["bin_std"] = 2.0
    diffs = reference_differences(reference, current)
    assert "datasets: the reference has 2, this config 1" in diffs
    assert "model.head.bin_std: the reference has none, this config 2.0" in diffs


def test_reference_statistics():
    stats = reference_statistics(_info())
    assert stats == {"reacher": {"action": {"mean": [0.0]}},
                     "cheetah": {"action": {"mean": [1.0]}}}
    info = _info()
    info["datasets"][1]["statistics"] = None
    with pytest.raises(ConfigError, match="'cheetah': expected its normalization statistics"):
        reference_statistics(info)
