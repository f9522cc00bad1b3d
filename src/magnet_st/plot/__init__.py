"""Figures for people who read the results: expression maps, per-gene accuracy, training
curves and cross-validation summaries.

Every function returns a :class:`matplotlib.figure.Figure` drawn with the Agg canvas; the
global matplotlib backend and pyplot's figure registry are left alone, so the functions are
safe on headless machines and inside other programs. :func:`save` writes a figure in one
or more formats, each file atomically.

Expression maps paint each bin as a square of its physical size: the bin centres
(``obsm["spatial"]``, full-resolution pixels) lie on a square lattice, so they are
rasterised onto an image grid (:func:`raster_grid`) and shown with ``imshow``, which
stays fast for the ~660k bins of an 8 um Visium HD slide and handles lattices rotated
against the image axes.

By part: ``_raster`` (bins onto an image grid), ``_data`` (reading predictions and
measurements), ``_maps`` (gene maps), ``_curves`` (per-gene bars, training curves,
cross-validation summaries), ``_common`` (labels, :func:`save`).
"""

from __future__ import annotations

from magnet_st.plot._common import save
from magnet_st.plot._curves import cv_summary, load_history, pcc_bars, training_curves
from magnet_st.plot._data import per_gene_pcc
from magnet_st.plot._maps import gene_maps, nice_length
from magnet_st.plot._raster import RasterGrid, lattice_geometry, raster_grid, rasterize

__all__ = [
    "RasterGrid",
    "cv_summary",
    "gene_maps",
    "lattice_geometry",
    "load_history",
    "nice_length",
    "pcc_bars",
    "per_gene_pcc",
    "raster_grid",
    "rasterize",
    "save",
    "training_curves",
]
