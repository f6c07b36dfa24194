"""Small environments and scripted policies for demos, tests and benchmarks.

``SyntheticCamera-v0`` (id ``oxe_envlogger/SyntheticCamera-v0``) is the W2 benchmark env: two
cameras and a state vector, with a language instruction per episode in ``info``.
"""

import gymnasium as gym

from oxe_envlogger.envs.policies import make_policy, random_policy, run_episodes
from oxe_envlogger.envs.synthetic_camera import SyntheticCameraEnv

ENV_ID = "oxe_envlogger/SyntheticCamera-v0"

if ENV_ID not in gym.envs.registry:
    gym.register(id=ENV_ID, entry_point="oxe_envlogger.envs.synthetic_camera:SyntheticCameraEnv",
                 max_episode_steps=200)

__all__ = ["ENV_ID", "SyntheticCameraEnv", "make_policy", "random_policy", "run_episodes"]
