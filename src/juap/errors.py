"""Exceptions with messages a user can act on. The CLI prints them without a traceback."""

from __future__ import annotations


class JuapError(Exception):
    """Base class of every error juap raises on purpose for bad input or a bad environment."""


class ConfigError(JuapError, ValueError):
    """A configuration value or key is invalid; the message names the field and the allowed values."""


class CheckpointError(JuapError, ValueError):
    """A checkpoint is missing, corrupt, unsafe, or does not fit the model it is loaded into."""


class WeightsUnavailableError(JuapError, RuntimeError):
    """Pretrained weights could not be fetched (e.g. no network)."""


class DataError(JuapError, ValueError):
    """A data folder or image cannot be used."""


class NumericalError(JuapError, FloatingPointError):
    """A loss or an output became NaN or infinite during an attack or a training run."""
