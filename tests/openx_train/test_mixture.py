"""Mixture weights: modes, files written by a (later) Re-Mix run, and their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from openx_train.data import (
    ConfigError,
    load_mixture_weights,
    resolve_mixture_weights,
    save_mixture_weights,
)

NAMES, SIZES = ["a", "b", "c"], [100, 300, 600]


def test_uniform_size_sequence_and_mapping():
    np.testing.assert_allclose(resolve_mixture_weights("uniform", NAMES, SIZES), [1 / 3] * 3)
    np.testing.assert_allclose(resolve_mixture_weights("size", NAMES, SIZES), [0.1, 0.3, 0.6])
    np.testing.assert_allclose(resolve_mixture_weights([1, 1, 2], NAMES, SIZES),
                               [0.25, 0.25, 0.5])
    np.testing.assert_allclose(resolve_mixture_weights({"c": 2, "a": 2, "b": 0}, NAMES, SIZES),
                               [0.5, 0.0, 0.5])


def test_weights_file_round_trip(tmp_path):
    path = tmp_path / "remix_weights.json"
    save_mixture_weights(path, {"a": 0.2, "b": 0.3, "c": 0.5, "d": 1.0},
                         metadata={"method": "remix", "step": 1000})
    assert load_mixture_weights(path) == {"a": 0.2, "b": 0.3, "c": 0.5, "d": 1.0}
    data = json.loads(path.read_text())
    assert data["format"] == "openx_train.mixture_weights" and data["metadata"]["step"] == 1000
    with pytest.warns(UserWarning, match="not in the mixture"):
        w = resolve_mixture_weights(str(path), NAMES, SIZES)
    np.testing.assert_allclose(w, [0.2, 0.3, 0.5])
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"a": 1, "b": 1, "c": 2}))
    np.testing.assert_allclose(resolve_mixture_weights(str(plain), NAMES, SIZES),
                               [0.25, 0.25, 0.5])


@pytest.mark.parametrize("weights, match", [
    ([1, 2], "expected 3 weights"),
    ([1, -1, 1], "expected finite and >= 0"),
    ([0, 0, 0], "positive"),
    ({"a": 1, "b": 1}, r"no weight for datasets \['c'\]"),
    ({"a": float("nan"), "b": 1, "c": 1}, "finite"),
    ("by_size", "expected 'uniform', 'size'"),
])
def test_invalid_weights_name_the_problem(weights, match):
    with pytest.raises(ConfigError, match=match):
        resolve_mixture_weights(weights, NAMES, SIZES)


def test_a_file_that_is_not_weights(tmp_path):
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"a": "heavy"}))
    with pytest.raises(ConfigError, match="name -> number"):
        load_mixture_weights(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_mixture_weights(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="expected finite"):
        save_mixture_weights(tmp_path / "x.json", {"a": -1.0})
