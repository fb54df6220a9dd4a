"""Domain errors raised by adfed.

Every error carries a one-line message that names the offending thing (field, file,
config key), the constraint, and the fix where there is one.
"""

from __future__ import annotations


class AdfedError(Exception):
    """Base class for adfed's domain errors."""


class ConfigError(AdfedError, ValueError):
    """A config key is unknown or has a bad value."""


class DataError(AdfedError, ValueError):
    """A dataset file is missing, truncated, of a foreign version, or lacks a field."""


class TrainingError(AdfedError, RuntimeError):
    """Training diverged (NaN loss) or cannot proceed."""
