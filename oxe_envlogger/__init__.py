"""oxe_envlogger: log gymnasium and dm_env environments to RLDS datasets that tfds reads.

Importing this package (and logging) never imports TensorFlow or JAX.
"""

from oxe_envlogger.envlogger import AutoOXEEnvLogger, OXEEnvLogger
from oxe_envlogger.errors import (
    CorruptDatasetError,
    DatasetExistsError,
    FeatureMismatchError,
    LoggerClosedError,
    NonFiniteError,
    OXEEnvLoggerError,
    RecordTooLargeError,
    SpecError,
    StepOrderError,
    UnknownKeyError,
    UnsupportedSpaceError,
    WriterError,
)
from oxe_envlogger.layout import recover
from oxe_envlogger.reader import read_episodes
from oxe_envlogger.rlds_logger import RLDSLogger, RLDSStepType
from oxe_envlogger.specs import ImageCodec, get_gym_space
from oxe_envlogger.vector import VectorOXEEnvLogger
from oxe_envlogger.writer import WriterOptions

__version__ = "0.2.0"


def __getattr__(name: str):
    # The dm_env/envlogger front imports envlogger (a quarter second); only when asked for.
    if name in ("DmEnvLogger", "RLDSBackendWriter"):
        from oxe_envlogger import dm_env_logger

        return getattr(dm_env_logger, name)
    raise AttributeError(f"module 'oxe_envlogger' has no attribute {name!r}")


__all__ = [
    "AutoOXEEnvLogger",
    "CorruptDatasetError",
    "DatasetExistsError",
    "DmEnvLogger",
    "FeatureMismatchError",
    "ImageCodec",
    "LoggerClosedError",
    "NonFiniteError",
    "OXEEnvLogger",
    "OXEEnvLoggerError",
    "RLDSBackendWriter",
    "RLDSLogger",
    "RLDSStepType",
    "RecordTooLargeError",
    "SpecError",
    "StepOrderError",
    "UnknownKeyError",
    "UnsupportedSpaceError",
    "VectorOXEEnvLogger",
    "WriterError",
    "WriterOptions",
    "get_gym_space",
    "read_episodes",
    "recover",
]
