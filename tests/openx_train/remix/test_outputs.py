"""What a Re-Mix run writes: alpha_<step>.json, the final weights file and the plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from openx_train.data import ConfigError, load_mixture_weights, resolve_mixture_weights
from openx_train.remix import (
    domain_statistics,
    init_weights,
    plot_weights,
    read_alpha_history,
    update_weights,
    write_alpha,
    write_final_weights,
)

DOMAINS = ("better_1", "okay_1", "worse_1", "noise")


def _run(directory, steps=1200, save_freq=100):
    """Weights of a run where 'noise' has the highest excess, saved every save_freq steps."""
    rng = np.random.default_rng(0)
    weights = init_weights([0.1, 0.2, 0.3, 0.4])
    saved = {}
    for t in range(steps):
        ids = rng.integers(0, 4, 32).astype(np.int32)
        excess = rng.normal(0.0, 0.3, 32).astype(np.float32) + 0.2 * ids
        weights = update_weights(weights, domain_statistics(excess, ids, 4), t)
        if (t + 1) % save_freq == 0:
            write_alpha(directory, t + 1, DOMAINS, weights.alpha, weights.average_alpha)
            saved[t + 1] = (np.asarray(weights.alpha), np.asarray(weights.average_alpha))
    return weights, saved


def test_alpha_files_history_final_weights_and_plot(tmp_path):
    weights, saved = _run(tmp_path)
    with open(tmp_path / "alpha_200.json") as f:
        data = json.load(f)
    assert data["step"] == 200 and data["domains"] == list(DOMAINS)
    assert list(data["alpha"]) == list(DOMAINS)
    assert data["alpha"]["noise"] == pytest.approx(float(saved[200][0][3]))
    history = read_alpha_history(tmp_path)
    assert history.steps.tolist() == list(range(100, 1201, 100))  # 1000 after 900, not 100
    assert history.domains == DOMAINS
    np.testing.assert_allclose(history.alpha, [saved[s][0] for s in history.steps], rtol=1e-6)
    np.testing.assert_allclose(history.average_alpha, [saved[s][1] for s in history.steps],
                               rtol=1e-6)
    path = write_final_weights(tmp_path, DOMAINS, weights.average_alpha,
                               metadata={"step": 1200, "domain_key": "episode_metadata/operator"})
    assert path.endswith("mixture_weights.json")
    loaded = load_mixture_weights(path)
    assert list(loaded) == list(DOMAINS)
    np.testing.assert_allclose(list(loaded.values()), weights.average_alpha, rtol=1e-6)
    # The loader's weights argument takes the file, per domain.
    np.testing.assert_allclose(resolve_mixture_weights(path, list(DOMAINS), [1, 1, 1, 1],
                                                       kind="domain"),
                               np.asarray(weights.average_alpha) / np.sum(weights.average_alpha),
                               rtol=1e-6)
    with open(path) as f:
        assert json.load(f)["metadata"] == {"source": "remix", "step": 1200,
                                            "domain_key": "episode_metadata/operator"}
    png = plot_weights(tmp_path)
    assert png == str(tmp_path / "domain_weights.png")
    with Image.open(png) as image:
        assert image.size == (900, 600)
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # lines and text were drawn


def test_bad_alpha_files(tmp_path):
    with pytest.raises(ConfigError, match=r"no alpha_<step>\.json files"):
        read_alpha_history(tmp_path)
    write_alpha(tmp_path, 1, ["a", "b"], [0.5, 0.5], [0.5, 0.5])
    write_alpha(tmp_path, 2, ["a", "c"], [0.5, 0.5], [0.5, 0.5])
    with pytest.raises(ConfigError, match=r"alpha_2.json: domains \['a', 'c'\] differ"):
        read_alpha_history(tmp_path)
    (tmp_path / "alpha_2.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"alpha_2\.json: expected step, domains"):
        read_alpha_history(tmp_path)
    with pytest.raises(ConfigError, match="expected 2 weights"):
        write_alpha(tmp_path, 3, ["a", "b"], [1.0], [1.0])
