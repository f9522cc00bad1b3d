"""Exceptions that the command line turns into a one-line message and a non-zero exit."""

from __future__ import annotations

from pathlib import Path


class MagnetError(Exception):
    """Base class of every error magnet-st raises on purpose."""


class InputError(MagnetError):
    """An input file or directory is missing, malformed or inconsistent.

    The message always names the offending file and says what is wrong with it.
    """

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")


class ConfigError(MagnetError):
    """A configuration value or command-line option is invalid."""
