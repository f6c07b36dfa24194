"""oxe_envlogger: log gymnasium and dm_env environments to RLDS datasets that tfds reads.

Importing this package (and logging) never imports TensorFlow or JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"

# Names are imported on first use, so that ``import oxe_envlogger`` (and the image encoder
# processes, which import only ``oxe_envlogger.format.codecs``) stay light: gymnasium alone takes
# a quarter second, the dm_env/envlogger front as much again.
_ERRORS = ("CorruptDatasetError", "DatasetExistsError", "FeatureMismatchError",
           "LoggerClosedError", "NonFiniteError", "OXEEnvLoggerError", "OutOfBoundsError",
           "RecordTooLargeError", "SpecError", "StepOrderError", "UnknownKeyError",
           "UnknownOptionError", "UnsupportedSpaceError", "WriterError")
_WHERE = {
    "AutoOXEEnvLogger": "envlogger",
    "OXEEnvLogger": "envlogger",
    "DmEnvLogger": "dm_env_logger",
    "RLDSBackendWriter": "dm_env_logger",
    "ImageCodec": "format.codecs",
    "LoggerOptions": "options",
    "RLDSLogger": "rlds_logger",
    "RLDSStepType": "rlds_logger",
    "VectorOXEEnvLogger": "vector",
    "WriterOptions": "collect.writer",
    "get_gym_space": "spaces",
    "read_episodes": "format.reader",
    "recover": "datasets.recovery",
    **dict.fromkeys(_ERRORS, "errors"),
}

if TYPE_CHECKING:
    from oxe_envlogger.collect.writer import WriterOptions
    from oxe_envlogger.datasets.recovery import recover
    from oxe_envlogger.dm_env_logger import DmEnvLogger, RLDSBackendWriter
    from oxe_envlogger.envlogger import AutoOXEEnvLogger, OXEEnvLogger
    from oxe_envlogger.errors import (
        CorruptDatasetError,
        DatasetExistsError,
        FeatureMismatchError,
        LoggerClosedError,
        NonFiniteError,
        OutOfBoundsError,
        OXEEnvLoggerError,
        RecordTooLargeError,
        SpecError,
        StepOrderError,
        UnknownKeyError,
        UnknownOptionError,
        UnsupportedSpaceError,
        WriterError,
    )
    from oxe_envlogger.format.codecs import ImageCodec
    from oxe_envlogger.format.reader import read_episodes
    from oxe_envlogger.options import LoggerOptions
    from oxe_envlogger.rlds_logger import RLDSLogger, RLDSStepType
    from oxe_envlogger.spaces import get_gym_space
    from oxe_envlogger.vector import VectorOXEEnvLogger


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'oxe_envlogger' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"oxe_envlogger.{module}"), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "AutoOXEEnvLogger",
    "CorruptDatasetError",
    "DatasetExistsError",
    "DmEnvLogger",
    "FeatureMismatchError",
    "ImageCodec",
    "LoggerClosedError",
    "LoggerOptions",
    "NonFiniteError",
    "OXEEnvLogger",
    "OXEEnvLoggerError",
    "OutOfBoundsError",
    "RLDSBackendWriter",
    "RLDSLogger",
    "RLDSStepType",
    "RecordTooLargeError",
    "SpecError",
    "StepOrderError",
    "UnknownKeyError",
    "UnknownOptionError",
    "UnsupportedSpaceError",
    "VectorOXEEnvLogger",
    "WriterError",
    "WriterOptions",
    "get_gym_space",
    "read_episodes",
    "recover",
]
