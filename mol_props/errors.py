"""Errors a user can act on. The `mol_props` commands print them as one `error: ...` line on
stderr, without a traceback, and exit with status 2; any other exception is a bug and keeps its
traceback.

Each module raises its own subclass (ArtifactError, ExportError, InferenceError, ...); the two
here are for what every stage checks: config values, and the contents of a user's table.
"""

from __future__ import annotations


class MolPropsError(Exception):
    """Base of every error whose message says what is wrong and what to do about it."""


class ConfigError(MolPropsError, ValueError):
    """A config value that cannot work; the message names its key (`model.conv=...`)."""


class DataError(MolPropsError, ValueError):
    """A data table that cannot be used as configured (missing column, unknown split label)."""


class UsageError(MolPropsError, ValueError):
    """Command-line arguments the command would misread: an unknown option, a repeated one."""
