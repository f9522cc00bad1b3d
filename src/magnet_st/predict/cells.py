"""Cells of a slide that was never sequenced: the units a model trained on cells predicts,
from outlines the user gives (GeoJSON from QuPath, StarDist, Cellpose or Space Ranger)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from magnet_st.data.slide import Slide
from magnet_st.errors import InputError
from magnet_st.read.cells import cell_names, cell_slide
from magnet_st.read.geojson import read_geojson

__all__ = ["detected_cells", "segmented_slide"]

DETECTED = "cells_detected.geojson"


def detected_cells(
    image: Path,
    mpp: float,
    out: Path,
    roi_um: tuple[float, float, float, float] | None = None,
    progress: bool = False,
) -> Path:
    """The cells the built-in detector finds on ``image`` (inside ``roi_um``), written once
    to ``out/cells_detected.geojson`` (a rerun reuses the file)."""
    from magnet_st.io.image import open_image
    from magnet_st.io.nuclei import detect_cells, write_segmentation

    path = Path(out) / DETECTED
    if path.is_file():
        return path
    img = open_image(image, microns_per_pixel=mpp)
    region = None if roi_um is None else tuple(v / mpp for v in roi_um)
    _, rings = detect_cells(img, region, progress=progress)  # type: ignore[arg-type]
    if not rings:
        raise InputError(image, "the nucleus detector found no cells; give --segmentation")
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_segmentation(path, {i + 1: r for i, r in enumerate(rings)})


def segmented_slide(
    name: str,
    image: Path,
    mpp: float,
    segmentation: Path,
    genes: list[str],
    gene_names: list[str],
    roi_um: tuple[float, float, float, float] | None = None,
) -> Slide:
    """A slide whose units are the cells outlined in ``segmentation`` (full-resolution pixels
    of ``image``), with no counts: what image-only prediction of cells runs on. ``roi_um``
    keeps the cells whose centroids lie in ``(x0, y0, x1, y1)`` microns."""
    ids, polys = read_geojson(segmentation)
    centres = polys.centroids()
    keep = np.arange(len(polys))
    if roi_um is not None:
        x0, y0, x1, y1 = roi_um
        um = centres * mpp
        keep = np.flatnonzero(
            (um[:, 0] >= x0) & (um[:, 0] < x1) & (um[:, 1] >= y0) & (um[:, 1] < y1)
        )
        if keep.size == 0:
            raise InputError(segmentation, "no cell inside --roi")
        polys, ids = polys.subset(keep), ids[keep]
    return cell_slide(
        name,
        sp.csr_matrix((len(ids), len(genes)), dtype=np.int32),
        np.asarray(genes, dtype=object),
        np.asarray(gene_names, dtype=object),
        cell_names(ids),
        polys,
        float(mpp),
        Path(image),
        {"positions": f"{segmentation} (outline centroids)", "polygons": str(segmentation)},
    )
