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


def check_name(name: str, what: str = "slide name", where: str | Path | None = None) -> str:
    """A slide (or output) name is a name, not a path: one rule wherever names enter (sample
    sheets, ``--name``, model files, SpatialData stores), since names become file and
    folder names. Refused: empty, over 200 characters, ``/`` or ``\\``, a leading ``.``
    (``.``, ``..``, hidden files), control characters. Returns ``name``."""
    text = str(name)
    problem = None
    if not text.strip():
        problem = "is empty"
    elif len(text) > 200:
        problem = "is longer than 200 characters"
    elif "/" in text or "\\" in text:
        problem = "holds a path separator ('/' or '\\')"
    elif text.startswith("."):
        problem = "starts with '.'"
    elif any(ord(c) < 32 or ord(c) == 127 for c in text):
        problem = "holds a control character"
    if problem:
        message = f"{what} {text!r} {problem}: a name is not a path"
        raise InputError(where, message) if where is not None else ConfigError(message)
    return text


def from_worker(exc: BaseException) -> MagnetError | None:
    """The error a DataLoader worker process raised, when it was one of ours.

    torch re-raises a worker's exception in the main process as a ``RuntimeError`` (ours
    take two arguments, so it cannot rebuild them) whose message is the worker's whole
    traceback; this returns a :class:`MagnetError` with the worker's own one-line message,
    or ``None`` for anything else."""
    import re

    text = str(exc)
    head = re.match(r"Caught (\w+) in DataLoader worker process \d+", text)
    if head is None or head.group(1) not in {c.__name__ for c in _subclasses()}:
        return None
    last = [line for line in text.splitlines() if line.strip()][-1]
    message = re.sub(r"^[\w.]+Error: ", "", last.strip())
    err = MagnetError(message)
    err.__cause__ = exc
    return err


def _subclasses() -> list[type]:
    out, todo = [], [MagnetError]
    while todo:
        c = todo.pop()
        out.append(c)
        todo += c.__subclasses__()
    return out
