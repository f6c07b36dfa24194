"""Re-Mix on the operators experiment's Reacher-v5 data (``openx_train.experiments.operators``):
one dataset whose domains are the ``operator`` episode metadata; state MLP 512x512x512, the
discretized head with 48 gaussian bins, one observation, one action; the robomimic setting of
the weight update (eta 0.2, smoothing 5e-2). The same file is the config of the reference and of
the final BC runs (``train_bc.py`` ignores the ``remix`` section), so all three agree::

    python -m openx_train.experiments.operators --path=runs/operators   # the data
    python tools/train_bc.py --config=openx_train/configs/remix/reacher_operators.py \\
        --path=runs/ref --data=runs/operators/data
    python tools/train_remix.py --config=openx_train/configs/remix/reacher_operators.py \\
        --reference=runs/ref --path=runs/remix --data=runs/operators/data
    python tools/train_bc.py --config=openx_train/configs/remix/reacher_operators.py \\
        --path=runs/final --data=runs/operators/data \\
        --weights=runs/remix/mixture_weights.json --data_budget=0.25

The Bridge setting of the paper (eta 1.0, smoothing 5e-3) is ``--config=...py:bridge`` (or
``--config.remix.eta=1.0 --config.remix.smoothing=5e-3``).
"""

from __future__ import annotations

import ml_collections

from openx_train.remix.train import remix_config

SETTINGS = {"robomimic": (0.2, 5e-2), "bridge": (1.0, 5e-3)}


def get_config(setting: str = "robomimic") -> ml_collections.ConfigDict:
    config = remix_config()
    config.remix.eta, config.remix.smoothing = SETTINGS[setting or "robomimic"]
    config.data.datasets = [{"path": "runs/operators/data"}]
    config.data.val_fraction = 0.05
    config.data.loader.augment = False
    config.data.loader.domain_key = "episode_metadata/operator"
    config.data.loader.weights = "size"
    config.model.trunk.hidden_dims = (512, 512, 512)
    config.model.head.kind = "discrete"
    config.model.head.num_bins = 48
    config.model.head.bin_type = "gaussian"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 200
    config.optimizer.weight_decay = 1e-4
    config.steps = 3000
    config.batch_size = 256
    config.log_freq = 100
    config.val_freq = 1000
    config.save_freq = 500
    config.keep = 2
    config.deterministic = True
    return config
