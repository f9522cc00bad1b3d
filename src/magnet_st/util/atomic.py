"""Write files and directories so that a reader never sees a half-written result.

Everything is written under a temporary name next to the destination and renamed
into place only when complete. A crash leaves at most a ``.tmp-*`` entry behind,
which the next run removes.
"""

from __future__ import annotations

import contextlib
import errno
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


def new_memmap(path: str | Path, dtype: object, shape: tuple[int, ...]) -> object:
    """A new ``.npy`` memory map whose blocks are reserved on disk first
    (``posix_fallocate``), so that a full disk is one clear error here and never a bus
    error (SIGBUS) later, when a page of a sparse file cannot be written."""
    from numpy.lib.format import open_memmap

    path = Path(path)
    arr = open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    size = path.stat().st_size
    try:
        if hasattr(os, "posix_fallocate") and size:
            with open(path, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, size)
    except OSError as exc:
        del arr
        path.unlink(missing_ok=True)
        raise no_space(path, size) if exc.errno == errno.ENOSPC else exc from None
    return arr


def no_space(path: str | Path, needed: int, where: Path | None = None) -> Exception:
    """The error for a write that does not fit: the device, what it needs and what is free
    (``where``: the folder whose device it is; default: ``path``'s folder)."""
    from magnet_st.errors import InputError

    path = Path(path)
    if where is None:
        where = path if path.is_dir() else path.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = 0
    return InputError(
        path,
        f"no space left on the device of {where} (needs ~{needed / 1e9:.2g} GB, "
        f"{free / 1e9:.2g} GB free): free space or choose another folder",
    )


def check_free_space(
    folder: str | Path, needed: int, margin: float = 1.5, largest_file: int | None = None
) -> None:
    """Refuse (one line) to write about ``needed`` bytes into ``folder`` when its device has
    less than ``margin`` times that free, or when ``largest_file`` bytes (times ``margin``)
    exceed the shell's file size limit (``ulimit -f``): some writers (h5py) die by a signal,
    or flood the terminal, when a write fails half-way."""
    import resource

    folder = Path(folder)
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if largest_file and soft != resource.RLIM_INFINITY and largest_file * margin > soft:
        from magnet_st.errors import InputError

        raise InputError(
            folder,
            f"a file of ~{largest_file * margin / 1e6:.3g} MB is to be written, beyond this "
            f"shell's file size limit ({soft / 1e6:.3g} MB; ulimit -f): raise the limit",
        )
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    if free < needed * margin:
        raise no_space(folder, int(needed * margin), where=probe)


def check_out_folder(out: str | Path) -> Path:
    """``out`` as a folder this command may create or fill: an :class:`InputError` at once
    when it, or a folder above it, is a file."""
    from magnet_st.errors import InputError

    out = Path(out)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise InputError(p, f"is a file, where the output folder {out} should go")
            break
    return out
