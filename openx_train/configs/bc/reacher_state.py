"""BC on logged Reacher-v5 states: MLP 512x512x512, MSE head, one observation, one action.

::

    python run_gym.py --env_name=Reacher-v5 --policy=scripted --num_episodes=100 \\
        --enable_envlogger --output_dir=demo_out/reacher
    python tools/train_bc.py --config=openx_train/configs/bc/reacher_state.py \\
        --path=runs/bc --data=demo_out/reacher
"""

from __future__ import annotations

import ml_collections

from openx_train.training.loop import train_config


def get_config() -> ml_collections.ConfigDict:
    config = train_config()
    config.data.datasets = [{"path": "demo_out/reacher"}]
    config.data.val_fraction = 0.05
    config.data.loader.augment = False
    config.model.head.kind = "mse"
    config.model.trunk.hidden_dims = (512, 512, 512)
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 200
    config.optimizer.weight_decay = 1e-4
    config.steps = 4000
    config.batch_size = 256
    config.log_freq = 200
    config.val_freq = 1000
    config.save_freq = 1000
    config.keep = 2
    config.deterministic = True
    return config
