"""checksums: fingerprints of a slide's input files (a rerun skips unchanged slides)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from magnet_st.data.slide import Slide

log = logging.getLogger(__name__)


# -- checksums -----------------------------------------------------------------------------

_FULL_HASH_BYTES = 256 * 2**20
_PART_BYTES = 16 * 2**20


def file_checksum(path: Path) -> str:
    """sha256 of the file; for files over 256 MiB, of its size, first and last 16 MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if size <= _FULL_HASH_BYTES:
            for block in iter(lambda: fh.read(2**20), b""):
                h.update(block)
            return "sha256:" + h.hexdigest()
        h.update(str(size).encode())
        h.update(fh.read(_PART_BYTES))
        fh.seek(size - _PART_BYTES)
        h.update(fh.read(_PART_BYTES))
    return "sha256-ends:" + h.hexdigest()


def input_files(slide: Slide) -> list[Path]:
    """The files a slide was read from (matrix, positions, scale factors, image)."""
    files = []
    for value in slide.sources.values():
        p = Path(str(value).split(" ")[0])
        if p.is_file():
            files.append(p)
    return sorted(set(files))


def fingerprint(files: list[Path], known: dict[str, dict] | None = None) -> dict[str, dict]:
    """``{path: {size, mtime_ns, checksum}}``; the checksum is reused when size and mtime
    match ``known``."""
    out = {}
    for p in files:
        st = p.stat()
        key = str(p.resolve())
        old = (known or {}).get(key)
        if old and old["size"] == st.st_size and old["mtime_ns"] == st.st_mtime_ns:
            out[key] = old
        else:
            out[key] = {
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "checksum": file_checksum(p),
            }
    return out


def unchanged(recorded: dict[str, dict]) -> bool:
    """Whether every recorded input file is still as it was."""
    for path, rec in recorded.items():
        p = Path(path)
        if not p.is_file():
            return False
        st = p.stat()
        if st.st_size != rec["size"]:
            return False
        if st.st_mtime_ns != rec["mtime_ns"] and file_checksum(p) != rec["checksum"]:
            return False
    return True
