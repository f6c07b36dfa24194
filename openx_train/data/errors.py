"""Errors of the data pipeline. Messages name the key, the expected and the given value."""

from __future__ import annotations


class DataPipelineError(Exception):
    """Base class of the errors raised by ``openx_train.data``."""


class ConfigError(DataPipelineError, ValueError):
    """An option or a structure that does not fit the dataset or the other options."""


class MissingKeyError(ConfigError):
    """A key named in a structure that the dataset does not have."""


class DatasetFormatError(DataPipelineError):
    """A dataset directory the pipeline cannot read (format, layout, inconsistent index)."""
