"""Errors of the models. Messages name the key path, the expected and the given value."""

from __future__ import annotations


class ModelError(Exception):
    """Base class of the errors raised by ``openx_train.models``."""


class ModelConfigError(ModelError, ValueError):
    """A model config field with a value the models cannot use, or a field they do not know."""


class InputSpecError(ModelError, ValueError):
    """A batch (or a stored input spec) that does not fit what the model consumes."""
