"""lock: one magnet-st run at a time per dataset or output folder.

Two ``magnet features`` (or two ``prepare``) on one dataset would clean up each other's
temporary files. :func:`hold` (or the :func:`locked` decorator) takes an exclusive
``flock`` for a folder for the duration of a stage; a second run is refused at once with
one line naming the run that holds it (command, process id, start time). The lock file
lives in the system's temporary folder, keyed by the folder's resolved path: nothing is
written into the folder (reruns stay byte-identical, a refused run creates nothing), and
the operating system releases the lock when the holder exits, also after ``kill -9``.
Within one process the lock is re-entrant (``cv`` holding its folder may call stages that
take it again). Processes started by a multi-GPU launcher (``LOCAL_RANK`` or ``RANK`` set
and not 0) do not lock: their rank 0 holds it for them.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import inspect
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from magnet_st.errors import InputError

__all__ = ["hold", "locked"]

_held: dict[str, int] = {}  # resolved folder -> depth in this process
F = TypeVar("F", bound=Callable[..., Any])


def _worker_rank() -> bool:
    return any(os.environ.get(k, "0") not in ("", "0") for k in ("LOCAL_RANK", "RANK"))


def lock_path(folder: str | Path) -> Path:
    """The lock file of ``folder`` (in the temporary folder, keyed by its resolved path)."""
    key = str(Path(folder).resolve())
    h = hashlib.sha256(key.encode()).hexdigest()[:24]
    return Path(tempfile.gettempdir()) / "magnet-st-locks" / f"{h}.lock"


@contextlib.contextmanager
def hold(folder: str | Path, what: str) -> Iterator[None]:
    """Hold ``folder``'s lock while the block runs; :class:`InputError` at once if another
    process holds it."""
    key = str(Path(folder).resolve())
    if _worker_rank() or key in _held:
        _held[key] = _held.get(key, 0) + 1
        try:
            yield
        finally:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        return
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            who = json.loads(os.read(fd, 65536) or b"{}")
        except (OSError, ValueError):
            who = {}
        os.close(fd)
        raise InputError(
            folder,
            f"another magnet-st run is working on this folder ('{who.get('what', '?')}', "
            f"process {who.get('pid', '?')}, started {who.get('started', '?')}); wait for it "
            "to finish or stop it, then run this again",
        ) from None
    info = {"what": what, "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "folder": key, "argv": sys.argv}  # fmt: skip
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    _held[key] = 1
    try:
        yield
    finally:
        _held.pop(key, None)
        os.close(fd)  # releases the lock


def locked(argument: str, what: str) -> Callable[[F], F]:
    """Decorate a stage so that it holds the lock of its folder argument ``argument``."""

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            folder = sig.bind(*args, **kwargs).arguments[argument]
            with hold(folder, what):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
