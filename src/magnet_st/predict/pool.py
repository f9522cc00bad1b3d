"""Cells from a prediction of bins: each cell gets the bins under its outline, weighted by
the share of each bin's area that lies inside it (the way bin2cell and ENACT carry Visium HD
bins to cells). What a model trained on bins offers at the level of cells; a model trained
on cells predicts them directly (``docs/results.md``, "Cells", compares the two)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from magnet_st.data.shapes import Polygons, assign_points
from magnet_st.errors import InputError

__all__ = ["bin_cell_weights", "pool_to_cells", "pooled_cells"]

#: points per bin edge at which a bin's area share in each cell is measured
SUBDIVISIONS = 4

#: genes pooled at a time (bounds memory on a full slide: bins x this many floats)
_GENE_BLOCK = 64


def bin_cell_weights(
    centres_px: np.ndarray, bin_px: float, polygons: Polygons, sub: int = SUBDIVISIONS
) -> sp.csr_matrix:
    """``(cells, bins)``: the share of each square bin (``bin_px`` wide, centred on
    ``centres_px``) that lies in each cell, measured on ``sub x sub`` points per bin (an 8 um
    bin: its 16 2 um sub-bins' centres). A point goes to the cell whose outline holds it
    (:func:`magnet_st.data.shapes.assign_points`), so the shares of a bin sum to at most 1."""
    centres = np.asarray(centres_px, dtype=np.float64).reshape(-1, 2)
    off = ((np.arange(sub) + 0.5) / sub - 0.5) * float(bin_px)
    dx, dy = np.meshgrid(off, off)
    grid = np.column_stack([dx.ravel(), dy.ravel()])
    points = (centres[:, None, :] + grid[None]).reshape(-1, 2)
    cell = assign_points(polygons, points)
    bins = np.repeat(np.arange(len(centres)), sub * sub)
    keep = cell >= 0
    w = sp.csr_matrix(
        (np.full(int(keep.sum()), 1.0 / sub**2), (cell[keep], bins[keep])),
        shape=(len(polygons), len(centres)),
    )
    w.sum_duplicates()
    return w


def pool_to_cells(pred: np.ndarray, weights: sp.spmatrix, per_10k: bool = False) -> np.ndarray:
    """Cells' predictions from the bins' (``pred``: bins x genes, on the log1p scale, as
    ``magnet predict`` writes them), on the same scale. Counts add up: a cell's is log1p of
    the area-weighted sum of its bins' ``expm1``. Counts per 10,000 (``per_10k``) are a
    profile, not an amount: a cell's is the area-weighted mean of its bins'. A cell that
    covers no bin gets 0."""
    w = sp.csr_matrix(weights, dtype=np.float64)
    out = np.zeros((w.shape[0], pred.shape[1]), dtype=np.float32)
    area = np.asarray(w.sum(axis=1)).ravel()
    norm = np.where(area > 0, 1.0 / np.where(area > 0, area, 1.0), 0.0)
    for g0 in range(0, pred.shape[1], _GENE_BLOCK):
        block = np.expm1(np.asarray(pred[:, g0 : g0 + _GENE_BLOCK], dtype=np.float64))
        pooled = w @ block
        if per_10k:
            pooled *= norm[:, None]
        out[:, g0 : g0 + _GENE_BLOCK] = np.log1p(np.maximum(pooled, 0.0))
    return out


def pooled_cells(
    bins: Any,
    outlines: tuple[np.ndarray, Polygons],
    segmentation: Path,
    bin_px: float,
    per_10k: bool,
    images_in: str,
) -> Any:
    """The cells ``outlines`` (ids and polygons in the bins' full-resolution pixels, as
    :func:`magnet_st.read.geojson.read_geojson` reads ``segmentation``) pooled from the
    bins' prediction ``bins`` (AnnData, as ``magnet predict`` writes it): the cells that
    cover at least one predicted bin, their outlines (``uns["polygons"]``) and centroids
    (``obsm["spatial"]``), ``obs["bins"]``: how many bins' area each covers."""
    import anndata
    import pandas as pd

    from magnet_st.read.cells import cell_names

    ids, polys = outlines
    w = bin_cell_weights(np.asarray(bins.obsm["spatial"]), bin_px, polys)
    area = np.asarray(w.sum(axis=1)).ravel()
    keep = np.flatnonzero(area > 0)
    if keep.size == 0:
        raise InputError(segmentation, "no cell covers a predicted bin (another slide's outlines?)")
    polys, w = polys.subset(keep), w[keep]
    x = pool_to_cells(np.asarray(bins.X), w, per_10k)
    obs = pd.DataFrame({"bins": area[keep]}, index=pd.Index(cell_names(ids[keep]), name="cell_id"))
    ad = anndata.AnnData(X=x, obs=obs, var=bins.var.copy())
    ad.obsm["spatial"] = polys.centroids()
    ad.uns["polygons"] = {"xy": polys.xy, "offsets": polys.offsets}
    ad.uns["magnet"] = {**dict(bins.uns["magnet"]), "level": "cell", "pooled_from": "bin",
                        "segmentation": str(Path(segmentation).resolve())}  # fmt: skip
    spatial = {k: dict(v) for k, v in bins.uns["spatial"].items()}
    for lib in spatial.values():  # the images once, in the bins' file
        lib.pop("images", None)
        lib.setdefault("metadata", {})["images_in"] = images_in
    ad.uns["spatial"] = spatial
    return ad
