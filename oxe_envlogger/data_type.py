"""Space helpers under the original oxe_envlogger's import path."""

from __future__ import annotations

from oxe_envlogger.spaces import get_gym_space, space_to_spec

__all__ = ["get_gym_space", "space_to_spec"]
