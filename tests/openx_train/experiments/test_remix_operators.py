"""The Re-Mix experiment runner: its table from hand-made results, and the whole experiment
end to end at a tiny size (the operators' data logged by the SDK, a reference, Re-Mix, final
runs under budgets and weightings, evaluated in Reacher-v5)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from openx_train.data import load_mixture_weights
from openx_train.experiments import remix_operators as exp
from openx_train.remix import load_kept_episodes


def _results():
    return {"env_id": "Reacher-v5", "domains": ["better_1", "noise"],
            "weights": {"size": {"better_1": 0.25, "noise": 0.75},
                        "remix": {"better_1": 0.6, "noise": 0.4}},
            "returns": {"size": {"100%": {"mean": -5.0, "ci95": 1.25, "seeds": [-4, -6]},
                                 "25%": {"mean": -7.5, "ci95": None, "seeds": [-7.5]}},
                        "remix": {"100%": {"mean": -4.0, "ci95": 0.5, "seeds": [-4, -4]}}},
            "reference_return": -4.5, "budgets": [1.0, 0.25], "seeds": [0, 1],
            "episodes": 50, "wall_s": 12.0}


def test_the_table():
    lines = exp.format_results(_results()).splitlines()
    assert lines[0] == "weights per domain"
    assert lines[1].split() == ["weighting", "better_1", "noise"]
    assert lines[2].split() == ["size", "0.250", "0.750"]
    assert lines[3].split() == ["remix", "0.600", "0.400"]
    assert lines[5].startswith("return in Reacher-v5 (mean over 2 seeds x 50 episodes")
    assert lines[7].split() == ["size", "-5.00", "±", "1.25", "-7.50"]
    assert lines[8].split() == ["remix", "-4.00", "±", "0.50", "-"]
    assert lines[9].split()[:2] == ["reference", "-4.50"]
    assert lines[-1] == "wall time: 12 s"


def test_the_plot(tmp_path):
    path = exp.plot_results(_results(), os.fspath(tmp_path / "r.png"))
    assert os.path.getsize(path) > 5000


def test_unknown_weightings_are_refused():
    with pytest.raises(ValueError, match=r"weightings: expected some of .* given \['best'\]"):
        exp.ExperimentOptions(weightings=("size", "best"))


@pytest.mark.slow
def test_the_experiment_end_to_end_at_a_tiny_size(tmp_path):
    options = exp.ExperimentOptions(size="tiny", seeds=(0, 1), budgets=(1.0, 0.25),
                                    weightings=("remix", "better_only"), episodes=2, steps=8,
                                    batch_size=32, num_envs=2,
                                    overrides={"model.trunk.hidden_dims": (32, 32),
                                               "compilation_cache": "none"})
    results = exp.run_experiment(tmp_path, options)
    domains = results["domains"]
    assert len(domains) == 8 and domains == sorted(domains)
    remix = load_mixture_weights(tmp_path / "remix" / "mixture_weights.json")
    assert results["weights"]["remix"] == pytest.approx(remix)
    assert sum(results["weights"]["remix"].values()) == pytest.approx(1.0)
    better = results["weights"]["better_only"]
    assert better == {d: (0.5 if d.startswith("better") else 0.0) for d in domains}
    for w in options.weightings:
        for b in ("100%", "25%"):
            cell = results["returns"][w][b]
            assert len(cell["seeds"]) == 2 and cell["ci95"] is not None
            assert np.isfinite(cell["mean"]) and -200 < cell["mean"] <= 0
    # the oracle trained on the better operators' episodes only, at both budgets
    for budget in (100, 25):
        with open(tmp_path / "final" / f"better_only_{budget}_s0" / "kept_episodes.json") as f:
            kept = json.load(f)
        assert {e["domain"] for e in kept["episodes"]} <= {"better_1", "better_2"}
    kept = load_kept_episodes(tmp_path / "final" / "remix_25_s1" / "kept_episodes.json")
    assert kept
    with open(tmp_path / "final" / "remix_25_s1" / "eval.json") as f:
        evaluation = json.load(f)
    assert evaluation["num_episodes"] == 2 and len(evaluation["returns"]) == 2
    assert np.mean(evaluation["returns"]) == pytest.approx(evaluation["return_mean"])
    with open(tmp_path / exp.RESULTS_TEXT) as f:
        assert f.read().startswith("weights per domain")
    assert os.path.getsize(tmp_path / exp.RESULTS_PLOT) > 5000
    assert os.path.getsize(tmp_path / "remix" / "weights.png") > 5000
