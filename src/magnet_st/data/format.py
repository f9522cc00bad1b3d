"""format: the prepared dataset's layout on disk, shared by its writer (magnet_st.prepare)
and its reader (magnet_st.data.dataset)."""

from __future__ import annotations

from pathlib import Path

from magnet_st.data.levels import LEVELS

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "SLIDE_RECORD",
    "slide_dir_is_complete",
    "slide_lists_all",
]

MANIFEST = "manifest.json"
SLIDE_RECORD = "slide.json"
FORMAT = "magnet-st dataset"
FORMAT_VERSION = 1


def slide_lists_all(meta: dict) -> bool:
    """Whether a slide (its manifest record) lists every gene of its reference; records
    written before this was stored: every technology but legacy ST does."""
    return bool(meta.get("lists_all_genes", meta.get("technology") != "legacy_st"))


def slide_dir_is_complete(path: Path) -> bool:
    return all((path / f"{lv}.h5ad").is_file() for lv in LEVELS)
