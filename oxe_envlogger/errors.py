"""The exceptions raised by oxe_envlogger.

Every error that comes from user input names where the problem is (a key path such as
``steps/observation/image``), what was expected and what was given.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence


class OXEEnvLoggerError(Exception):
    """Base class of every error raised by this package."""


class SpecError(OXEEnvLoggerError, ValueError):
    """A value does not fit the feature declared for its key path."""

    def __init__(self, path: str, expected: str, given: str, hint: str = ""):
        self.path = path
        self.expected = expected
        self.given = given
        message = f"{path or '<root>'}: expected {expected}, given {given}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class UnknownKeyError(SpecError):
    """A dict value has keys that the spec does not declare, or lacks declared ones."""


class NonFiniteError(SpecError):
    """A float value holds NaN or Inf and the logger was created with ``strict_finite=True``."""


class OutOfBoundsError(SpecError):
    """A value lies outside its declared space (a Box's bounds, a Discrete's range) and the
    logger was created with ``strict_bounds=True``."""


class UnsupportedSpaceError(OXEEnvLoggerError, TypeError):
    """A gymnasium space (or a sample) has no RLDS feature."""


class UnknownOptionError(OXEEnvLoggerError, TypeError):
    """A logger was given a keyword option it does not have; the message names the valid ones
    (and the closest, for a misspelling)."""

    def __init__(self, front: str, unknown: Sequence[str], valid: Sequence[str]):
        self.unknown = list(unknown)
        self.valid = list(valid)
        close = [m for k in self.unknown for m in difflib.get_close_matches(k, self.valid, n=1)]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        super().__init__(f"{front}: unknown option{'s' if len(self.unknown) > 1 else ''} "
                         f"{', '.join(map(repr, self.unknown))}{hint}; the options are: "
                         f"{', '.join(self.valid)}")


class StepOrderError(OXEEnvLoggerError, RuntimeError):
    """Calls arrive in an order that has no RLDS meaning (e.g. ``step()`` before ``reset()``)."""


class LoggerClosedError(OXEEnvLoggerError, RuntimeError):
    """A logger or writer was used after ``close()``."""


class WriterError(OXEEnvLoggerError, RuntimeError):
    """The background writer failed (disk full, permission, ...); the cause is chained."""


class DatasetExistsError(OXEEnvLoggerError, FileExistsError):
    """The target already holds a dataset and neither appending nor overwriting applies."""


class FeatureMismatchError(OXEEnvLoggerError, ValueError):
    """Two feature sets that must be equal differ; ``differences`` lists each difference."""

    def __init__(self, message: str, differences: Sequence[str]):
        self.differences = list(differences)
        lines = "\n".join(f"  - {d}" for d in self.differences)
        super().__init__(f"{message}:\n{lines}" if lines else message)


class RecordTooLargeError(OXEEnvLoggerError, ValueError):
    """One serialized episode is larger than a tf.train.Example can hold (2 GiB)."""


class CorruptDatasetError(OXEEnvLoggerError):
    """A dataset directory holds data that fails validation (bad CRC, wrong lengths, ...)."""


class DamagedShardError(CorruptDatasetError):
    """A shard file is damaged: a record is cut short or fails its CRC. ``path`` is the file and
    ``offset`` the byte where the damage starts; ``tools/recover_rlds.py`` salvages every intact
    record around it."""

    def __init__(self, path: str, offset: int, what: str):
        self.path = path
        self.offset = offset
        self.what = what
        super().__init__(f"{path}: {what} at byte {offset}")


class RecoveryError(CorruptDatasetError):
    """Recovery made every change it could but something is left that it cannot repair (e.g. a
    lost ``features.json``); ``report`` says what was done, the message what was not."""

    def __init__(self, message: str, report: dict):
        self.report = report
        super().__init__(message)
