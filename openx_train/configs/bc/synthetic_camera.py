"""BC with images and language on ``oxe_envlogger/SyntheticCamera-v0``: a small CNN per camera
(64x64 main, 32x32 wrist), hashed-token language by FiLM, MSE head, one observation, one action.

::

    python run_gym.py --env_name=oxe_envlogger/SyntheticCamera-v0 --policy=scripted \\
        --num_episodes=100 --enable_envlogger --output_dir=demo_out/camera
    python tools/train_bc.py --config=openx_train/configs/bc/synthetic_camera.py \\
        --path=runs/camera --data=demo_out/camera
"""

from __future__ import annotations

import ml_collections

from openx_train.training.loop import train_config


def get_config() -> ml_collections.ConfigDict:
    config = train_config()
    config.data.datasets = [{"path": "demo_out/camera"}]
    config.data.structure = {
        "state": ["observation/state"],
        "images": {"image": {"key": "observation/image", "size": [64, 64]},
                   "image_wrist": {"key": "observation/wrist_image", "size": [32, 32]}},
        "action": ["action"],
        "language": "language_instruction",
    }
    config.data.loader.augment = {"crop_scale": [0.9, 1.0], "brightness": 0.05,
                                  "contrast": None, "saturation": None, "hue": 0.0}
    config.model.image_encoder.kind = "conv"
    config.model.image_encoder.width = 32
    config.model.image_encoder.pooling = "spatial_softmax"
    config.model.image_encoder.num_keypoints = 32
    config.model.task.language = "tokens"
    config.model.task.conditioning = "film"
    config.model.head.kind = "mse"
    config.model.trunk.hidden_dims = (256, 256)
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 200
    config.steps = 3000
    config.batch_size = 64
    config.steps_per_call = 1
    config.log_freq = 100
    config.val_freq = 500
    config.save_freq = 500
    config.keep = 2
    return config
