"""Exceptions that carry a user-facing message: what was wrong, and what to do about it.

The CLI prints these without a traceback; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class RyzenOptError(Exception):
    """Base class of every error ryzen-opt raises on purpose."""


class InvalidDeviceError(RyzenOptError, ValueError):
    """A device string that names no device ryzen-opt knows."""


class DeviceNotAvailableError(RyzenOptError, RuntimeError):
    """A known device that this machine or this torch build cannot provide."""


class ModelLoadError(RyzenOptError, OSError):
    """A model that could not be loaded: missing directory, corrupt config, unreachable hub."""


class ConfigError(RyzenOptError, ValueError):
    """A malformed configuration: names the key, the value and what is allowed."""


class MeasurementError(RyzenOptError, ValueError):
    """A measurement that cannot be real: a zero, negative or non-finite timing (a coarse or broken timer), or an
    accuracy over no tokens."""
