"""BC with images and language on ``oxe_envlogger/SyntheticCamera-v0``: a small CNN per camera
(48x48 main, 24x24 wrist), hashed-token language by FiLM, MSE head, one observation, one action.

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
        "state": ("observation/state",),
        "images": {"image": {"key": "observation/image", "size": (48, 48)},
                   "image_wrist": {"key": "observation/wrist_image", "size": (24, 24)}},
        "action": ("action",),
        "language": "language_instruction",
    }
    augment = config.data.loader.augment_options
    augment.crop_scale, augment.brightness, augment.hue = (0.9, 1.0), 0.05, 0.0
    augment.contrast = augment.saturation = None
    config.model.image_encoder.kind = "conv"
    config.model.image_encoder.width = 16
    config.model.image_encoder.pooling = "spatial_softmax"
    config.model.image_encoder.num_keypoints = 16
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
