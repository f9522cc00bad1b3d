"""Write files and directories so that a reader never sees a half-written result.

Everything is written under a temporary name next to the destination and renamed
into place only when complete. A crash leaves at most a ``.tmp-*`` entry behind,
which the next run removes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"


def _tmp_sibling(dest: Path) -> Path:
    return dest.with_name(f"{TMP_PREFIX}{dest.name}.{uuid.uuid4().hex[:8]}")


def clean_stale(directory: str | Path) -> None:
    """Remove temporary entries that an interrupted run left in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(dest: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``dest`` to; rename it into place on success.

    Works for files and for directories (create the directory at the yielded
    path). On any exception the temporary entry is deleted and ``dest`` is left
    as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(dest)
    try:
        yield tmp
        if dest.exists() or dest.is_symlink():
            if not overwrite:
                raise FileExistsError(f"{dest} already exists")
            if dest.is_dir() and not dest.is_symlink():
                # Move the old directory aside first so the swap is quick.
                old = _tmp_sibling(dest)
                os.replace(dest, old)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
                return
        os.replace(tmp, dest)
    finally:
        if tmp.exists() or tmp.is_symlink():
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def write_text(dest: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text)
