"""Readers: every input format becomes a :class:`magnet_st.Slide`.

- :func:`visium_hd`: Space Ranger Visium HD output, one bin size (2, 8 or 16 um).
- :func:`visium_hd_cells`: Space Ranger 4's cells (``segmented_outputs/``), with outlines.
- :func:`cells_from_bins`: a run's 2 um bins summed into a GeoJSON segmentation's cells
  (:func:`read_geojson`: Space Ranger, QuPath, StarDist, Cellpose outlines).
- :func:`visium`: Space Ranger standard Visium output (55 um spots).
- :func:`legacy_st` and :func:`her2st`: legacy Spatial Transcriptomics (her2st layout).
- :func:`h5ad`: AnnData with ``obsm["spatial"]``.
- :func:`spatialdata_zarr`: a SpatialData ``.zarr`` store as spatialdata-io writes it for
  Visium HD and Visium (read with zarr, anndata and pyarrow: no extra package needed).
- :func:`auto`: detect the format of a path and read every slide in it.
- :class:`SlideSpec`, :func:`specs_from_paths`, :func:`specs_from_sheet`: say which
  slides to read (with their images) without reading them yet.
"""

from __future__ import annotations

from pathlib import Path

from magnet_st.data.slide import Slide
from magnet_st.errors import InputError
from magnet_st.read.cells import cells_from_bins, visium_hd_cells
from magnet_st.read.geojson import read_geojson
from magnet_st.read.h5ad import h5ad
from magnet_st.read.legacy_st import her2st, her2st_sections, legacy_st
from magnet_st.read.matrix import read_10x_h5, read_10x_mtx
from magnet_st.read.spatialdata import is_spatialdata_store, spatialdata_zarr
from magnet_st.read.specs import SlideSpec, specs_from_paths, specs_from_sheet
from magnet_st.read.visium import hd_bin_folders, visium, visium_hd

__all__ = [
    "SlideSpec",
    "auto",
    "cells_from_bins",
    "detect_format",
    "h5ad",
    "her2st",
    "her2st_sections",
    "legacy_st",
    "read_10x_h5",
    "read_10x_mtx",
    "read_geojson",
    "spatialdata_zarr",
    "specs_from_paths",
    "specs_from_sheet",
    "visium",
    "visium_hd",
    "visium_hd_cells",
]


def detect_format(path: str | Path) -> str:
    """``"visium_hd"``, ``"visium"``, ``"her2st"``, ``"legacy_st"``, ``"h5ad"`` or
    ``"spatialdata"`` (a zarr store with ``tables/``)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "not found")
    if path.is_file():
        if path.suffix == ".h5ad":
            return "h5ad"
        if path.parent.name == "ST-cnts" and ".tsv" in path.name:
            return "legacy_st"
        raise InputError(path, "unknown input: expected a folder or an .h5ad file")
    if is_spatialdata_store(path):
        return "spatialdata"
    if hd_bin_folders(path):
        return "visium_hd"
    if (path / "ST-cnts").is_dir() or (path / "data" / "ST-cnts").is_dir():
        return "her2st"
    for base in (path, path / "outs"):
        if (base / "spatial").is_dir():
            return "visium"
    raise InputError(
        path,
        "unknown input folder: expected Space Ranger outs/ (Visium HD or Visium), "
        "a her2st-layout folder or a SpatialData .zarr store",
    )


def auto(
    path: str | Path,
    *,
    image: str | Path | None = None,
    microns_per_pixel: float | None = None,
    bin_size_um: int | None = None,
    spot_pitch_um: float | None = None,
    unit_size_um: float | None = None,
    sections: list[str] | None = None,
    with_image: bool = True,
    table: str | None = None,
    cells: bool = False,
    segmentation: str | Path | None = None,
) -> list[Slide]:
    """Read every slide at ``path`` whatever its format.

    ``bin_size_um`` (Visium HD, Space Ranger or SpatialData) defaults to 8 um when present,
    else the only or the finest bin size available. ``sections`` selects her2st sections
    (default: all). ``spot_pitch_um`` (legacy ST: microns between neighbouring array
    positions) and ``unit_size_um`` (.h5ad, SpatialData and legacy ST: bin edge or spot
    diameter) override what the reader derives; Space Ranger inputs state both, so they
    are refused there. For a SpatialData store, ``image`` names one of its image elements
    and ``table`` the table of units (default: the ``square_XXXum`` table of
    ``bin_size_um``, or the only one). For Visium HD, ``cells`` reads Space Ranger 4's cells
    (:func:`visium_hd_cells`) and ``segmentation`` (GeoJSON) sums the run's 2 um bins into
    the cells it outlines (:func:`cells_from_bins`).
    """
    path = Path(path)
    fmt = detect_format(path)
    given = {"--spot-pitch": spot_pitch_um, "--unit-size": unit_size_um, "--table": table}
    allowed = {"h5ad": ("--unit-size",), "spatialdata": ("--unit-size", "--table")}
    allowed |= {"legacy_st": tuple(given), "her2st": tuple(given)}
    wrong = [k for k, v in given.items() if v is not None and k not in allowed.get(fmt, ())]
    if wrong:
        raise InputError(
            path,
            f"{' and '.join(wrong)} given for a {fmt} input, which states its own unit size "
            "and scale (--spot-pitch is for legacy ST; --unit-size for legacy ST, .h5ad and "
            "SpatialData; --table for SpatialData)",
        )
    legacy = {"spot_pitch_um": spot_pitch_um, "unit_size_um": unit_size_um}
    if (cells or segmentation is not None) and fmt != "visium_hd":
        raise InputError(path, f"cells are read from Visium HD runs, not from a {fmt} input")
    if cells and segmentation is not None:
        raise InputError(
            Path(segmentation), "give either Space Ranger's cells or a segmentation, not both"
        )
    if cells:
        return [visium_hd_cells(path, image, microns_per_pixel=microns_per_pixel)]
    if segmentation is not None:
        return [cells_from_bins(path, segmentation, image, microns_per_pixel=microns_per_pixel)]
    if fmt == "visium_hd":
        if bin_size_um is None:
            sizes = sorted(hd_bin_folders(path))
            bin_size_um = 8 if 8 in sizes else sizes[0]
        return [visium_hd(path, bin_size_um, image, microns_per_pixel=microns_per_pixel)]
    if fmt == "visium":
        return [visium(path, image, microns_per_pixel=microns_per_pixel)]
    if fmt == "h5ad":
        return [h5ad(path, image, microns_per_pixel=microns_per_pixel, unit_size_um=unit_size_um)]
    if fmt == "spatialdata":
        return [
            spatialdata_zarr(
                path,
                table if table is not None else bin_size_um,
                image,
                microns_per_pixel=microns_per_pixel,
                unit_size_um=unit_size_um,
            )
        ]
    if fmt == "legacy_st":
        section = path.name.split(".")[0]
        root = path.parent.parent
        return [
            her2st(
                root, section, microns_per_pixel=microns_per_pixel, with_image=with_image, **legacy
            )
        ]
    names = sections or her2st_sections(path)
    return [
        her2st(path, s, microns_per_pixel=microns_per_pixel, with_image=with_image, **legacy)
        for s in names
    ]
