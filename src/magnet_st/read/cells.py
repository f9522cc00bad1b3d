"""Cells of a Visium HD run: Space Ranger 4's own segmentation, or 2 um bins pooled into a
segmentation of the user's.

Space Ranger 4 (``spaceranger count`` with segmentation) writes, beside ``binned_outputs/``::

    outs/segmented_outputs/
        filtered_feature_cell_matrix.h5     cells x genes, barcodes cellid_000000001-1 ...
        raw_feature_cell_matrix.h5
        cell_segmentations.geojson          one Polygon per cell, properties {"cell_id": 1}
        nucleus_segmentations.geojson       the nuclei the cells grew from (same ids)
        spatial/scalefactors_json.json      (and the hires / lowres images)
    outs/barcode_mappings.parquet           2 um bin -> 8 / 16 um bin, cell_id, in_nucleus

Polygons are in the full-resolution image's pixels, ``[x, y]``. :func:`visium_hd_cells`
reads the cell matrix with its outlines (matrix barcodes without an outline are dropped,
as spatialdata-io does); :func:`cells_from_bins` sums the run's 2 um bins into the
polygons of any GeoJSON segmentation (QuPath, StarDist, Cellpose, Space Ranger): each bin
goes to the cell whose outline holds its centre (bin2cell's rule).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from magnet_st.data.shapes import Polygons, assign_points
from magnet_st.data.slide import Slide
from magnet_st.errors import InputError
from magnet_st.read.geojson import read_geojson
from magnet_st.read.matrix import read_10x_h5, read_10x_mtx
from magnet_st.read.visium import (
    SPACERANGER_IMAGES,
    _read_scalefactors,
    _run_image,
    hd_bin_folders,
    visium_hd,
)

log = logging.getLogger(__name__)

__all__ = [
    "cell_names",
    "cell_slide",
    "cells_from_bins",
    "segmented_outputs",
    "visium_hd_cells",
]

SEGMENTED_OUTPUTS = "segmented_outputs"
OUTLINES = ("cell", "nucleus")
_CELL_BARCODE = re.compile(r"^cellid_(\d+)-\d+$")


def cell_names(ids: np.ndarray) -> np.ndarray:
    """Unit ids of cells: Space Ranger's barcodes (``cellid_{id:09d}-1``) for integer ids,
    else the ids themselves (QuPath's, say) as strings."""
    ids = np.asarray(ids)
    if ids.dtype.kind in "iu":
        return np.array([f"cellid_{int(i):09d}-1" for i in ids], dtype=object)
    return ids.astype(str).astype(object)


def segmented_outputs(path: str | Path) -> Path | None:
    """The ``segmented_outputs`` folder of a Space Ranger 4 run (``path``: the run folder,
    its ``outs/``, ``binned_outputs/`` or the folder itself), or ``None``."""
    path = Path(path)
    if path.name == SEGMENTED_OUTPUTS and path.is_dir():
        return path
    for base in (path, path / "outs", path.parent, path.parent.parent):
        if (base / SEGMENTED_OUTPUTS).is_dir():
            return base / SEGMENTED_OUTPUTS
    return None


def _run_folder(seg: Path) -> Path:
    run = seg.resolve().parent
    return run.parent if run.name == "outs" else run


def _refuse_downsampled(image: Path | None) -> None:
    if image is not None and image.name.lower() in SPACERANGER_IMAGES:
        raise InputError(
            image,
            "Space Ranger's downsampled image is too coarse for cells (several microns per "
            "pixel); give the full-resolution H&E the outlines were drawn on",
        )


def _mpp(seg: Path, given: float | None) -> tuple[float, str]:
    if given is not None:
        return float(given), "given by the user"
    candidates = [seg / "spatial" / "scalefactors_json.json"]
    candidates += [
        f / "spatial" / "scalefactors_json.json" for f in hd_bin_folders(seg.parent).values()
    ]
    for sf_path in candidates:
        if sf_path.is_file():
            sf = _read_scalefactors(sf_path.parent)
            if sf.get("microns_per_pixel"):
                return float(sf["microns_per_pixel"]), str(sf_path)
    raise InputError(
        seg / "spatial" / "scalefactors_json.json",
        "no microns_per_pixel in the run's scale factors; give it (--mpp)",
    )


def cell_slide(
    name: str,
    counts: sp.csr_matrix,
    gene_ids: np.ndarray,
    gene_names: np.ndarray,
    barcodes: np.ndarray,
    polygons: Polygons,
    mpp: float,
    image: Path | None,
    sources: dict[str, str],
) -> Slide:
    """A slide of cells: centres at the outlines' centroids, unit size the diameter of a
    disc of the median cell's area; checked against the image's bounds."""
    slide = Slide(
        name=name,
        counts=counts,
        gene_ids=np.asarray(gene_ids, dtype=object),
        gene_names=np.asarray(gene_names, dtype=object),
        unit_ids=np.asarray(barcodes, dtype=object),
        centers_px=polygons.centroids(),
        unit_size_um=polygons.median_diameter() * mpp,
        microns_per_pixel=float(mpp),
        technology="visium_hd_cells",
        image_path=image,
        sources=sources,
        polygons=polygons,
    )
    slide.check_image_bounds()
    return slide


def visium_hd_cells(
    path: str | Path,
    image: str | Path | None = None,
    *,
    microns_per_pixel: float | None = None,
    outline: str = "cell",
    matrix: str = "filtered",
    name: str | None = None,
) -> Slide:
    """Space Ranger 4's cells: the cell x gene matrix with each cell's outline.

    Args:
        path: the run folder, its ``outs/`` or ``outs/segmented_outputs/``.
        image: the full-resolution H&E given to Space Ranger (default: the image of a run
            written by ``magnet synth``).
        microns_per_pixel: override the run's scale factors.
        outline: ``"cell"`` (the expanded outlines; default) or ``"nucleus"`` (the same
            cells' counts, outlined by their nuclei).
        matrix: ``"filtered"`` or ``"raw"``.
        name: the slide's name; default: the run folder's name.
    """
    path = Path(path)
    if outline not in OUTLINES:
        raise ValueError(f"outline must be one of {OUTLINES}")
    if matrix not in ("filtered", "raw"):
        raise ValueError("matrix must be 'filtered' or 'raw'")
    if not path.exists():
        raise InputError(path, "Space Ranger output folder not found")
    seg = segmented_outputs(path)
    if seg is None:
        raise InputError(
            path,
            "no segmented_outputs/ folder: Space Ranger 4 writes one when it segments cells; "
            "for your own segmentation, pool the 2 um bins into it (--segmentation GEOJSON)",
        )
    h5 = seg / f"{matrix}_feature_cell_matrix.h5"
    mtx = seg / f"{matrix}_feature_cell_matrix"
    if h5.is_file():
        m = read_10x_h5(h5)
    elif mtx.is_dir():
        m = read_10x_mtx(mtx)
    else:
        raise InputError(seg, f"no cell matrix: neither {h5.name} nor {mtx.name}/ found")
    geo = seg / f"{outline}_segmentations.geojson"
    ids, polygons = read_geojson(geo)
    if ids.dtype.kind != "i":
        raise InputError(geo, "Space Ranger's outlines have integer properties.cell_id")
    row_of = {int(i): k for k, i in enumerate(ids)}
    parsed = [_CELL_BARCODE.match(str(b)) for b in m.barcodes]
    bad = [str(b) for b, p in zip(m.barcodes, parsed, strict=True) if p is None]
    if bad:
        raise InputError(m.source, f"barcode {bad[0]!r} is not a cell barcode (cellid_NNNNNNNNN-1)")
    poly_row = np.array([row_of.get(int(p.group(1)), -1) for p in parsed], dtype=np.int64)
    keep = np.flatnonzero(poly_row >= 0)
    if keep.size == 0:
        raise InputError(
            geo, f"none of the {len(m.barcodes):,} cells of {m.source.name} has an outline"
        )
    if keep.size < len(m.barcodes):
        log.warning(
            "%s: %d of %d cells have no outline in %s and are dropped",
            m.source,
            len(m.barcodes) - keep.size,
            len(m.barcodes),
            geo.name,
        )
    mpp, mpp_source = _mpp(seg, microns_per_pixel)
    run = _run_folder(seg)
    image = Path(image) if image is not None else _run_image(run)
    _refuse_downsampled(image)
    sources = {
        "counts": str(m.source),
        "positions": f"{geo} (outline centroids)",
        "polygons": str(geo),
        "microns_per_pixel": mpp_source,
        **({"image": str(image)} if image is not None else {}),
    }
    return cell_slide(
        name or run.name,
        m.counts[keep],
        m.gene_ids,
        m.gene_names,
        np.asarray(m.barcodes, dtype=object)[keep],
        polygons.subset(poly_row[keep]),
        mpp,
        image,
        sources,
    )


def cells_from_bins(
    path: str | Path,
    segmentation: str | Path,
    image: str | Path | None = None,
    *,
    microns_per_pixel: float | None = None,
    bin_size_um: int = 2,
    name: str | None = None,
) -> Slide:
    """A run's bins summed into the cells of a GeoJSON segmentation.

    Each bin (2 um by default) goes to the cell whose outline holds its centre, the
    nearest centroid's where outlines overlap; bins outside every cell are left out, and
    cells that hold no bin under tissue are dropped (logged). Barcodes are Space Ranger's
    (``cellid_{id:09d}-1``) for integer ids, else the ids themselves.

    Args:
        path: a Space Ranger Visium HD run (folder, ``outs/`` or ``binned_outputs/``).
        segmentation: GeoJSON outlines in the full-resolution image's pixels
            (:func:`magnet_st.read.geojson.read_geojson` lists what is accepted).
        image: the full-resolution H&E (default: the image of a run written by
            ``magnet synth``).
        microns_per_pixel: override the run's scale factors.
        bin_size_um: the bins to pool (2; 8 for a coarse look).
        name: the slide's name; default: the run's.
    """
    if image is not None:
        _refuse_downsampled(Path(image))
    bins = visium_hd(path, bin_size_um, image, microns_per_pixel=microns_per_pixel)
    seg_path = Path(segmentation)
    ids, polygons = read_geojson(seg_path)
    owner = assign_points(polygons, bins.centers_px)
    inside = np.flatnonzero(owner >= 0)
    pool = sp.csr_matrix(
        (np.ones(inside.size, dtype=np.int64), (owner[inside], inside)),
        shape=(len(polygons), bins.n_units),
    )
    n_bins = np.asarray(pool.sum(axis=1)).ravel()
    keep = np.flatnonzero(n_bins > 0)
    if keep.size == 0:
        raise InputError(
            seg_path,
            f"no {bin_size_um} um bin under tissue lies inside any of its {len(polygons):,} "
            "outlines; are they in the full-resolution image's pixels?",
        )
    if keep.size < len(polygons):
        log.info(
            "%s: %d of %d cells hold no %d um bin under tissue and are dropped",
            seg_path,
            len(polygons) - keep.size,
            len(polygons),
            bin_size_um,
        )
    counts = (pool[keep] @ bins.counts).tocsr()
    sources = {
        "counts": f"{bins.sources.get('counts')} ({bin_size_um} um bins pooled into cells)",
        "positions": f"{seg_path} (outline centroids)",
        "polygons": str(seg_path),
        "microns_per_pixel": bins.sources.get("microns_per_pixel", ""),
        **({"image": bins.sources["image"]} if "image" in bins.sources else {}),
    }
    log.info(
        "%s: %d of %d bins pooled into %d cells (median %.0f bins a cell)",
        seg_path.name,
        inside.size,
        bins.n_units,
        keep.size,
        float(np.median(n_bins[keep])),
    )
    return cell_slide(
        name or bins.name,
        counts,
        bins.gene_ids,
        bins.gene_names,
        cell_names(ids[keep]),
        polygons.subset(keep),
        bins.microns_per_pixel,
        bins.image_path,
        sources,
    )
