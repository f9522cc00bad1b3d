"""Constants of the synthetic slides, and what :func:`write_synthetic_hd` returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

GENERATOR = "magnet_st.synthetic"
FORMAT_VERSION = 1
SOFTWARE_VERSION = "magnet-st synthetic 1"
NODE_UM = 4.0  # spacing of the scene's field grid
TILE = 256  # TIFF tile edge (px)
BAND_16 = 8  # 16 um bin rows per expression band (128 um)
VALID_BIN_SIZES = (2, 8, 16)
BARCODE_DTYPE = "S21"  # s_008um_00301_00412-1
HIRES_MAX_PX = 2000
LOWRES_MAX_PX = 600
JPEG_QUALITY = 90
LYMG_SIGMA_UM = 75.0
LYMG_REF = 1.5  # lymphocytes per 8 um bin that make rho = 1
EFFICIENCY_SIGMA = 0.2

DOMAIN_TYPES: tuple[str, ...] = ("TUM_A", "TUM_B", "STR", "LYM", "ADI")
DOMAIN_DESCRIPTIONS = {
    "TUM_A": "tumour epithelium, programme A (no cue cells)",
    "TUM_B": "tumour epithelium, programme B: looks like TUM_A plus sparse CUE cells (~1/70x70 um)",
    "STR": "stroma: pink, sparse elongated fibroblast nuclei, scattered lymphocytes",
    "LYM": "lymphoid aggregate: dense small dark round nuclei",
    "ADI": "adipose/mucin-like: pale, sparse flat nuclei",
}
CELL_TYPES: tuple[str, ...] = ("TUM", "LYM", "FIB", "ADI", "CUE")
CELL_DESCRIPTIONS = {
    "TUM": "tumour epithelial cell: large vesicular purple nucleus",
    "LYM": "lymphocyte: small dark round nucleus",
    "FIB": "fibroblast: elongated nucleus aligned with the local fibre direction",
    "ADI": "adipocyte/mucin cell: flat pale nucleus",
    "CUE": "cue cell (only in TUM_B): very large dark round nucleus",
}
# Nuclei per 100 x 100 um, [cell type, domain type].
NUCLEUS_DENSITY = np.array(
    [
        [120.0, 120.0, 0.0, 0.0, 0.0],  # TUM
        [3.0, 3.0, 8.0, 230.0, 2.0],  # LYM
        [2.0, 2.0, 22.0, 6.0, 5.0],  # FIB
        [0.0, 0.0, 0.0, 0.0, 12.0],  # ADI
        [0.0, 1e4 / 70.0**2, 0.0, 0.0, 0.0],  # CUE: one per 70 x 70 um
    ]
)
# semi-major axis (um), aspect ratio, haematoxylin OD, rim darkening
NUCLEUS_SHAPE = {
    "TUM": ((3.2, 4.6), (1.0, 1.5), (0.70, 1.00), 0.5),
    "LYM": ((2.2, 2.9), (1.0, 1.15), (1.30, 1.60), 0.0),
    "FIB": ((3.5, 6.0), (2.5, 4.5), (0.90, 1.20), 0.0),
    "ADI": ((2.5, 4.0), (2.5, 3.5), (0.80, 1.00), 0.0),
    "CUE": ((6.0, 7.5), (1.0, 1.2), (1.50, 1.80), 0.2),
}
A_MAX_UM = 7.5
CELL_UMI_PER_NUCLEUS = {"TUM": 70.0, "LYM": 25.0, "FIB": 45.0, "ADI": 40.0, "CUE": 80.0}
CONTEXT_UMI = {"DOMA": 35.0, "DOMB": 35.0, "LYMG": 60.0}
BACKGROUND_UMI = 40.0
# (programme, group, fraction of n_genes); background genes take the rest
PROGRAMS: tuple[tuple[str, str, float], ...] = (
    ("CELL_TUM", "cell", 0.08),
    ("CELL_LYM", "cell", 0.08),
    ("CELL_FIB", "cell", 0.08),
    ("CELL_ADI", "cell", 0.03),
    ("CELL_CUE", "cell", 0.03),
    ("CTX_DOMA", "context", 0.06),
    ("CTX_DOMB", "context", 0.06),
    ("CTX_LYMG", "context", 0.08),
)
MIN_GENES = 20
# Background (cytoplasm/stroma) stain per domain: haematoxylin OD, eosin OD, fibre amplitude
DOMAIN_STAIN = np.array(
    [
        [0.18, 0.50, 0.25],
        [0.18, 0.50, 0.25],
        [0.04, 0.72, 1.00],
        [0.12, 0.30, 0.20],
        [0.10, 0.22, 0.30],
    ],
    dtype=np.float32,
)
# Optical density per unit stain for R, G, B (Beer-Lambert)
H_VEC = np.array([0.55, 0.75, 0.30], dtype=np.float32)
E_VEC = np.array([0.10, 0.75, 0.35], dtype=np.float32)
WHITE = 241.0
TEX_N = 1024
RENDER_THREADS = 2

# rng stream tags
_TAG_FIELDS, _TAG_DOMAINS, _TAG_NUCLEI, _TAG_TEX, _TAG_GENES, _TAG_EFF = 1, 2, 3, 4, 5, 6
_TAG_COUNTS, _TAG_SPLIT, _TAG_CELL_UMIS = 7, 8, 9
#: how a slide's cell-driven UMIs are planted (``write_synthetic_hd(expression=...)``)
EXPRESSION_MODES = ("bins", "cells")


@dataclass(frozen=True)
class SyntheticSlideInfo:
    """What :func:`write_synthetic_hd` wrote (all paths are final, under ``out_dir``).

    Attributes:
        out_dir: the run folder.
        image_path: the full-resolution pyramidal BigTIFF.
        bin_dirs: bin size (um) -> ``outs/binned_outputs/square_XXXum``.
        n_bins_in_tissue: bin size -> bins under tissue (rows of the filtered matrix).
        n_bins_total: bin size -> all bins of the capture area.
        gene_groups: ``"cell"``, ``"context"``, ``"background"`` -> gene names.
        gene_programs: programme (``"CELL_TUM"``, ``"CTX_DOMB"``, ``"BG"``, ...) -> names.
        truth_path: ``synthetic_truth.json``.
        nuclei_path: ``synthetic_nuclei.parquet`` (one row per nucleus).
        bins_truth_path: ``synthetic_bins_008um.parquet`` (model variables per 8 um bin).
        cells_dir: ``outs/segmented_outputs`` (Space Ranger 4's cells of the planted
            nuclei), or ``None`` when cells were not written.
        image_shape: ``(height, width)`` of the full-resolution image, px.
        microns_per_pixel: of the full-resolution image.
        seed: the seed.
    """

    out_dir: Path
    image_path: Path
    bin_dirs: dict[int, Path]
    n_bins_in_tissue: dict[int, int]
    n_bins_total: dict[int, int]
    gene_groups: dict[str, list[str]]
    gene_programs: dict[str, list[str]]
    truth_path: Path
    nuclei_path: Path
    bins_truth_path: Path
    cells_dir: Path | None
    image_shape: tuple[int, int]
    microns_per_pixel: float
    seed: int
