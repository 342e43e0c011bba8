"""Errors a user can act on. The `mol_props` commands print them as one `error: ...` line on
stderr, without a traceback, and exit with status 2; any other exception is a bug and keeps its
traceback.

Each module raises its own subclass (ArtifactError, ExportError, InferenceError, ...); the ones
here are for what every stage checks: config values, the contents of a user's table, the command
line. The messages about a table's text encoding are shared by training and inference.
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


def unknown_encoding_message(option: str, encoding: str) -> str:
    return f"{option}={encoding}: not a text encoding Python knows (e.g. utf-8, cp1252, latin-1)"


def undecodable_text_message(encoding: str, error: UnicodeDecodeError, option: str) -> str:
    """The end of "<file> is not <encoding> text ...": the byte that did not decode (not its
    position, which counts from the start of Python's read buffer) and the setting to use."""
    return (
        f"is not {encoding} text (it holds the byte {error.object[error.start]:#04x}); "
        f"save it as UTF-8, or name its encoding, e.g. {option}=cp1252"
    )
