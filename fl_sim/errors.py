"""The one small exception hierarchy of fl-sim.

Every error a user can cause (bad config, bad data file, unknown plug-in, bad run directory)
is a :class:`FlSimError`; the CLI prints its message as ONE line and exits non-zero. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class FlSimError(Exception):
    """Base class of every user-facing fl-sim error."""


class ConfigError(FlSimError, ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


class DataError(FlSimError, ValueError):
    """A data file or directory is missing, malformed or empty."""


class PluginError(FlSimError, KeyError):
    """An unknown plug-in name, or a duplicate registration."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class RunDirError(FlSimError):
    """A run directory is missing, incomplete or from an incompatible version."""


class RunFailedError(FlSimError):
    """A run ended without a usable result (e.g. no client update was aggregated in any
    round); the CLI exits with status 1."""


class InvalidRecordError(RunDirError):
    """A recorded observation is unusable (NaN / infinite tensors): an attack on it would
    report a valid-looking score for garbage, so it is refused."""


class ThreatModelError(FlSimError, PermissionError):
    """An attacker asked for something its view does not grant."""


class MissingResourceError(FlSimError, FileNotFoundError):
    """A locally required resource (weights, dataset) is not present; nothing is downloaded."""


class MissingDependencyError(FlSimError, ImportError):
    """An optional package a feature needs is not installed (e.g. pandas for DataFrames);
    the message names the extra that installs it."""
