"""write_synthetic_hd: one synthetic Visium HD run."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from magnet_st.synthetic._cells import (
    CellCounts,
    CellPlanting,
    cell_masks,
    write_segmented_outputs,
)
from magnet_st.synthetic._expression import _bin_grids, _write_counts
from magnet_st.synthetic._params import (
    EXPRESSION_MODES,
    HIRES_MAX_PX,
    LOWRES_MAX_PX,
    MIN_GENES,
    VALID_BIN_SIZES,
    SyntheticSlideInfo,
)
from magnet_st.synthetic._scene import (
    _make_genes,
    _Scene,
)
from magnet_st.synthetic._truth import (
    _synthetic_md,
    _truth,
    _write_bin_truth,
    _write_nuclei,
)
from magnet_st.synthetic._writers import (
    _LevelWriter,
    _render_whole,
    _write_png,
    _write_tiff,
)
from magnet_st.util.atomic import atomic_path

logger = logging.getLogger("magnet_st.synthetic")


# --------------------------------------------------------------------------- public


# Long: one atomic write in order: checks, scene and genes, then image, hires/lowres PNGs,
# count matrices, spatial/ scalefactors and truth files; the steps are helpers already and
# the rest shares scene, genes, grids, sizes, tmp and the image scale factors.
def write_synthetic_hd(
    out_dir: str | Path,
    *,
    width_um: float = 1000.0,
    height_um: float = 1000.0,
    seed: int = 0,
    bin_sizes: Sequence[int] = (2, 8, 16),
    microns_per_pixel: float = 0.2738,
    n_genes: int = 500,
    write_mtx: bool = True,
    write_raw: bool = True,
    progress: bool = True,
    margin_um: float = 150.0,
    domain_spacing_um: float | None = None,
    cells: bool = True,
    expression: str = "bins",
) -> SyntheticSlideInfo:
    """Write a SYNTHETIC Visium HD run (Space Ranger ``outs/binned_outputs`` layout) + image.

    Args:
        out_dir: the run folder to create (replaced if it exists; written atomically: on
            failure nothing is left at ``out_dir``).
        width_um, height_um: capture area, rounded down to whole 16 um bins (the full 10x
            area is 6500 x 6500 um).
        seed: the seed; the same seed gives byte-identical matrices and identical pixels.
        bin_sizes: any of 2, 8, 16 (the 2 um matrix of a full slide has ~10M bins).
        microns_per_pixel: of the full-resolution image.
        n_genes: number of genes (at least 20); see the module docstring for the groups.
        write_mtx: also write ``filtered_feature_bc_matrix/`` (MatrixMarket).
        write_raw: also write ``raw_feature_bc_matrix.h5`` (all bins of the capture area).
        progress: show tqdm progress bars.
        margin_um: background around the capture area in the image.
        domain_spacing_um: typical size of a tissue domain; by default a third of the
            shorter side, between 150 and 300 um (so small test slides hold every type).
        cells: also write Space Ranger 4's cell segmentation of the planted nuclei
            (``outs/segmented_outputs/`` and ``outs/barcode_mappings.parquet``; see
            :mod:`magnet_st.synthetic._cells`).
        expression: how the cell-driven UMIs are planted: ``"bins"`` (default: each nucleus's
            UMIs in the 8 um bin that holds its centre, spread over that bin's 2 um bins
            towards nucleus centres) or ``"cells"`` (each cell's UMIs spread evenly over its
            own 2 um bins, across 8 um bin edges; the tissue's UMIs evenly over the 2 um
            bins of their 8 um bin; :class:`magnet_st.synthetic._cells.CellPlanting`).

    Returns:
        A :class:`SyntheticSlideInfo`.
    """
    sizes = sorted({int(s) for s in bin_sizes})
    if not sizes or any(s not in VALID_BIN_SIZES for s in sizes):
        raise ValueError(f"bin_sizes must be a non-empty subset of {VALID_BIN_SIZES}")
    if n_genes < MIN_GENES:
        raise ValueError(f"n_genes must be at least {MIN_GENES}")
    if not (microns_per_pixel > 0 and math.isfinite(microns_per_pixel)):
        raise ValueError("microns_per_pixel must be a positive number")
    if domain_spacing_um is None:
        domain_spacing_um = float(np.clip(min(width_um, height_um) / 3.0, 150.0, 300.0))
    if expression not in EXPRESSION_MODES:
        raise ValueError(f"expression must be one of {EXPRESSION_MODES}, got {expression!r}")
    if margin_um < 0 or domain_spacing_um < 50:
        raise ValueError("margin_um must be >= 0 and domain_spacing_um >= 50")
    out_dir = Path(out_dir)
    params = {
        "width_um": float(width_um),
        "height_um": float(height_um),
        "bin_sizes": sizes,
        "microns_per_pixel": float(microns_per_pixel),
        "n_genes": int(n_genes),
        "write_mtx": bool(write_mtx),
        "write_raw": bool(write_raw),
        "margin_um": float(margin_um),
        "domain_spacing_um": float(domain_spacing_um),
        "cells": bool(cells),
        "expression": expression,
    }
    t_start = time.perf_counter()
    scene = _Scene(
        width_um=width_um,
        height_um=height_um,
        seed=seed,
        mpp=microns_per_pixel,
        margin_um=margin_um,
        domain_spacing_um=domain_spacing_um,
    )
    genes = _make_genes(n_genes, seed)
    bin_rel = {s: Path("outs") / "binned_outputs" / f"square_{s:03d}um" for s in sizes}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        t0 = time.perf_counter()
        _write_tiff(scene, tmp / "he_fullres.tif", progress)
        logger.info("wrote he_fullres.tif (%.1f s)", time.perf_counter() - t0)
        t0 = time.perf_counter()
        longest = max(scene.width_px, scene.height_px)
        hires_f = min(1.0, HIRES_MAX_PX / longest)
        lowres_f = min(1.0, LOWRES_MAX_PX / longest)
        spatial_tmp = tmp / ".spatial_images"
        spatial_tmp.mkdir()
        _write_png(_render_whole(scene, hires_f), spatial_tmp / "tissue_hires_image.png")
        _write_png(_render_whole(scene, lowres_f), spatial_tmp / "tissue_lowres_image.png")
        grids = _bin_grids(scene)
        masks = cell_masks(scene) if cells or expression == "cells" else None
        sink = CellCounts(masks.cell, n_genes) if masks is not None and cells else None
        planted = None
        if masks is not None and expression == "cells":
            planted = CellPlanting(masks.cell, scene.nuclei.ctype, genes.weights)
        writers: dict[int, _LevelWriter] = {}
        try:
            for s in sizes:
                writers[s] = _LevelWriter(
                    s, tmp / bin_rel[s], genes, write_mtx=write_mtx, write_raw=write_raw
                )
            _write_counts(scene, grids, genes, writers, progress, sink, planted)
        finally:
            for w in writers.values():
                try:
                    w.close()
                except Exception:  # pragma: no cover - cleanup after an earlier error
                    logger.debug("closing a writer failed", exc_info=True)
        n_tissue = {s: writers[s].n_tissue for s in sizes}
        n_total = {s: writers[s].n_total for s in sizes}
        for s in sizes:
            spatial = tmp / bin_rel[s] / "spatial"
            for name in ("tissue_hires_image.png", "tissue_lowres_image.png"):
                shutil.copyfile(spatial_tmp / name, spatial / name)
            scalefactors = {
                "spot_diameter_fullres": s / scene.mpp,
                "bin_size_um": float(s),
                "microns_per_pixel": scene.mpp,
                "tissue_hires_scalef": hires_f,
                "tissue_lowres_scalef": lowres_f,
                "regist_target_img_scalef": hires_f,
                "fiducial_diameter_fullres": 65.0 / scene.mpp,
            }
            (spatial / "scalefactors_json.json").write_text(json.dumps(scalefactors, indent=2))
        shutil.rmtree(spatial_tmp)
        logger.info("wrote matrices and spatial/ (%.1f s)", time.perf_counter() - t0)
        cell_truth = None
        if masks is not None and sink is not None:
            t0 = time.perf_counter()
            spatial = tmp / bin_rel[sizes[0]] / "spatial"
            cell_truth = write_segmented_outputs(
                scene, masks, sink.matrix(), genes, tmp / "outs", spatial, write_raw=write_raw
            )
            logger.info("wrote segmented_outputs/ (%.1f s)", time.perf_counter() - t0)
        _write_nuclei(scene, tmp / "synthetic_nuclei.parquet")
        _write_bin_truth(scene, grids, tmp / "synthetic_bins_008um.parquet")
        truth = _truth(scene, genes, params, grids, n_tissue, n_total)
        if cell_truth is not None:
            truth["cells"] = cell_truth
        (tmp / "synthetic_truth.json").write_text(json.dumps(truth, indent=1))
        (tmp / "SYNTHETIC.md").write_text(_synthetic_md(truth))
    logger.info("synthetic slide written to %s (%.1f s)", out_dir, time.perf_counter() - t_start)
    return SyntheticSlideInfo(
        out_dir=out_dir,
        image_path=out_dir / "he_fullres.tif",
        bin_dirs={s: out_dir / bin_rel[s] for s in sizes},
        n_bins_in_tissue=n_tissue,
        n_bins_total=n_total,
        gene_groups=genes.groups,
        gene_programs=genes.programs,
        truth_path=out_dir / "synthetic_truth.json",
        nuclei_path=out_dir / "synthetic_nuclei.parquet",
        bins_truth_path=out_dir / "synthetic_bins_008um.parquet",
        cells_dir=out_dir / "outs" / "segmented_outputs" if cells else None,
        image_shape=(scene.height_px, scene.width_px),
        microns_per_pixel=scene.mpp,
        seed=int(seed),
    )
