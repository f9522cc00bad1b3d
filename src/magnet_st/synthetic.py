"""Synthetic Visium HD slides, written in the exact Space Ranger layout.

Everything here is **synthetic**: a procedural H&E-like whole-slide image and Visium HD
count matrices (2, 8 and 16 um bins) planted from the same random scene, so that the
ground truth is known. Same seed -> byte-identical matrices and identical image pixels.

>>> from magnet_st.synthetic import write_synthetic_hd
>>> info = write_synthetic_hd("synth_run", width_um=500, height_um=500, seed=1)  # doctest: +SKIP

Scene
-----
* Geometry: the capture area is ``16 * floor(width_um / 16)`` by ``16 * floor(height_um / 16)``
  microns (a whole number of 16 um bins), placed ``margin_um`` from the top-left corner of
  the image; the image is the capture area plus that margin on every side. A point at
  ``(x, y)`` microns from the image's top-left corner lies at full-resolution pixel
  coordinates ``(x / mpp, y / mpp)`` (pixel ``j`` spans ``[j, j + 1)``).
* Fields live on a node grid of 4 um spacing that has nodes on every 8 um bin centre.
  Tissue: ``T = 1.0 - r + 0.2 n_250 + 0.04 n_25 - 1.5 max(0, -n_80 - 1.9)``, with ``r`` a
  superellipse radius (``(|u|^4 + |v|^4)^(1/4)``, ``u, v`` the offsets from the capture
  centre in half-widths) and ``n_L`` smooth unit-variance Gaussian noise of correlation
  length ``L`` um. The stored field is ``sd = T / |grad T|`` (about the signed distance to
  the tissue edge, um); a point is under tissue when the bilinear interpolation of ``sd``
  there is > 0 (this one rule drives the image's tissue mask, nuclei and ``in_tissue``).
* Domains: Voronoi cells of seeds on a jittered grid ``domain_spacing_um`` apart, on
  coordinates warped by 60 um of smooth noise. Types are dealt out in shuffled blocks of
  five, nearest seeds to the capture centre first (so even a small slide holds every
  type), cycling through ``[A, B, STR, LYM, ADI]``, ``[A, B, STR, LYM, A]``,
  ``[A, B, STR, LYM, ADI]``, ``[A, B, STR, LYM, B]`` (A, B = TUM_A, TUM_B). A ``LYM`` cell
  is a round lymphoid aggregate of radius ``U(0.35, 0.5) * spacing`` around its seed; the
  rest of that cell is stroma. The domain of a point is the label of its nearest node.
  Roughly: TUM_A 25%, TUM_B 25%, STR 30%, LYM 10%, ADI 10% of the tissue.
* Image: Beer-Lambert mix of haematoxylin and eosin optical densities: background stain
  per domain (``DOMAIN_STAIN``) with fibre and grain textures, plus anti-aliased
  elliptical nuclei; every pyramid level is rendered from the scene at its own scale.
* Nuclei are explicit objects: for each cell type a jittered lattice at its highest
  density, thinned to ``density[type, domain] / max density`` and kept under tissue
  (densities in ``NUCLEUS_DENSITY``, per 100 x 100 um). ``TUM_A`` and ``TUM_B`` look the
  same (same tumour nuclei, same stain) except for sparse ``CUE`` cells (big dark nuclei,
  one in every 70 x 70 um lattice cell of ``TUM_B``): a 28 um patch rarely holds one, a
  128 um region tile always does.

Expression model (per 8 um bin ``b`` of the capture area and gene ``g``)
---------------------------------------------------------------------
::

    tf_b     = fraction of the 16 2-um bins of b whose centre is under tissue
    n_{t,b}  = number of nuclei of cell type t whose centre lies in b
    d_b      = domain at the centre of b
    rho_b    = (K_75 * n_LYM)(b) / 1.5         (lymphocyte density smoothed over ~150 um: a
                Gaussian of sigma 75 um on the 8 um grid, zero outside the image, in units
                of 1.5 nuclei per bin)
    e_b      = exp(0.2 z_b - 0.02), z_b ~ N(0, 1)   (capture efficiency)

    lambda_{b,g} = 1[tf_b > 0] * e_b * ( sum_t n_{t,b} B_{t,g}
                                         + tf_b * (M_{d_b,g} + C_{d_b,g} + rho_b L_g) )
    y_{b,g} ~ Poisson(lambda_{b,g})

* cell-driven genes ``CELL_<T>_<k>`` (T in TUM, LYM, FIB, ADI, CUE):
  ``B_{T,g} = S_T w_g`` with ``S = CELL_UMI_PER_NUCLEUS`` (UMIs per nucleus);
* context-driven genes: ``CTX_DOMA_<k>``: ``C_{TUM_A,g} = 35 w_g``; ``CTX_DOMB_<k>``:
  ``C_{TUM_B,g} = 35 w_g`` (domain programmes that a 28 um patch cannot tell apart);
  ``CTX_LYMG_<k>``: ``L_g = 60 w_g`` (lymphocyte gradient over ~150 um);
* background genes ``BG_<k>``: ``M_{d,g} = 40 v_g exp(tau_g z_{g,d})``, ``tau_g = 0.5 U^2``
  with ``U ~ U(0, 1)``, ``z ~ N(0, 1)`` (mild dependence on the domain);
* ``w_g`` (within a programme) and ``v_g`` (over background genes) are log-normal
  (sigma 0.8 and 1.0) normalised to sum to 1; all other entries of B, C, M, L are 0.

Counts are drawn per 8 um bin (total ``~ Poisson(sum_g lambda)``, then each UMI's gene
with probability ``lambda_{b,g} / sum``, which is the same law). Each UMI then goes to one
of the 16 2-um bins ``s`` of its 8 um bin with probability proportional to
``in_tissue(s) * (0.5 + m_s)``, ``m_s`` the number of nucleus centres in ``s``; 16 um bins
are sums of 2 x 2 8 um bins. So 2 -> 8 -> 16 sums are exact, and bins with no 2 um bin
under tissue have no counts. A 2 um bin is under tissue when its centre is; an 8 or 16 um
bin when any of its 2 um bins is.
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import math
import shutil
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import tifffile
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

from magnet_st.atomic import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "CELL_TYPES",
    "DOMAIN_TYPES",
    "SyntheticSlideInfo",
    "write_synthetic_hd",
]

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
_TAG_COUNTS, _TAG_SPLIT = 7, 8


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
    image_shape: tuple[int, int]
    microns_per_pixel: float
    seed: int


# --------------------------------------------------------------------------- helpers


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *tags])


def _bilinear(grid: np.ndarray, fy: np.ndarray, fx: np.ndarray) -> np.ndarray:
    """Separable bilinear interpolation of ``grid[..., ny, nx]`` at fractional indices.

    Returns ``(..., len(fy), len(fx))`` float32; indices are clamped to the grid.
    """
    ny, nx = grid.shape[-2:]
    fy = np.clip(np.asarray(fy, dtype=np.float64), 0.0, ny - 1.000001)
    fx = np.clip(np.asarray(fx, dtype=np.float64), 0.0, nx - 1.000001)
    i0 = fy.astype(np.int64)
    j0 = fx.astype(np.int64)
    wy = (fy - i0).astype(np.float32)[:, None]
    wx = (fx - j0).astype(np.float32)
    jlo = int(j0.min())
    jhi = int(j0.max()) + 2
    ilo = int(i0.min())
    ihi = int(i0.max()) + 2
    g = grid[..., ilo:ihi, jlo:jhi]
    ii = i0 - ilo
    rows = g[..., ii, :] * (1.0 - wy) + g[..., ii + 1, :] * wy
    jj = j0 - jlo
    # np.take keeps the result C-contiguous (fancy indexing on the last axis would not)
    left = np.take(rows, jj, axis=-1)
    right = np.take(rows, jj + 1, axis=-1)
    left *= 1.0 - wx
    right *= wx
    left += right
    return left


def _bilinear_points(grid: np.ndarray, fy: np.ndarray, fx: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of a 2-D grid at scattered fractional indices."""
    ny, nx = grid.shape
    fy = np.clip(fy, 0.0, ny - 1.000001)
    fx = np.clip(fx, 0.0, nx - 1.000001)
    i0 = fy.astype(np.int64)
    j0 = fx.astype(np.int64)
    wy = fy - i0
    wx = fx - j0
    return (
        grid[i0, j0] * (1 - wy) * (1 - wx)
        + grid[i0 + 1, j0] * wy * (1 - wx)
        + grid[i0, j0 + 1] * (1 - wy) * wx
        + grid[i0 + 1, j0 + 1] * wy * wx
    )


def _smooth_noise(rng: np.random.Generator, ny: int, nx: int, corr_um: float) -> np.ndarray:
    """Smooth Gaussian noise of unit variance on the node grid, correlation ~``corr_um``."""
    cell = max(NODE_UM, corr_um / 4.0)
    pad = 8
    nyc = int(math.ceil(ny * NODE_UM / cell)) + 2 * pad
    nxc = int(math.ceil(nx * NODE_UM / cell)) + 2 * pad
    z = ndimage.gaussian_filter(rng.standard_normal((nyc, nxc)), corr_um / cell / 2.0)
    z /= z[pad:-pad, pad:-pad].std() + 1e-12
    fy = np.arange(ny) * (NODE_UM / cell) + pad
    fx = np.arange(nx) * (NODE_UM / cell) + pad
    return _bilinear(z.astype(np.float32), fy, fx)


def _split_counts(n: int) -> dict[str, int]:
    """Number of genes per programme (``"BG"`` takes the rest)."""
    sizes = {name: max(1, int(round(frac * n))) for name, _, frac in PROGRAMS}
    sizes["BG"] = n - sum(sizes.values())
    if sizes["BG"] < 1:
        raise ValueError(f"n_genes={n} is too small (at least {MIN_GENES})")
    return sizes


def _lognormal_weights(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    w = rng.lognormal(0.0, sigma, n)
    return w / w.sum()


# --------------------------------------------------------------------------- scene


@dataclass
class _Nuclei:
    x: np.ndarray  # um from the image's left edge
    y: np.ndarray  # um from the image's top edge (sorted ascending)
    a: np.ndarray  # semi-major axis, um
    b: np.ndarray  # semi-minor axis, um
    theta: np.ndarray  # angle of the major axis, radians (x towards y)
    od: np.ndarray  # haematoxylin optical density
    rim: np.ndarray  # rim darkening
    ctype: np.ndarray  # index into CELL_TYPES
    domain: np.ndarray  # index into DOMAIN_TYPES

    def __len__(self) -> int:
        return len(self.x)


class _Scene:
    """The random scene: tissue, domains, nuclei, textures; renders any window at any scale."""

    def __init__(
        self,
        *,
        width_um: float,
        height_um: float,
        seed: int,
        mpp: float,
        margin_um: float,
        domain_spacing_um: float,
    ) -> None:
        self.seed = int(seed)
        self.mpp = float(mpp)
        self.margin_um = float(margin_um)
        self.domain_spacing_um = float(domain_spacing_um)
        self.n16r = int(height_um // 16)
        self.n16c = int(width_um // 16)
        if self.n16r < 2 or self.n16c < 2:
            raise ValueError("width_um and height_um must be at least 32 um")
        self.n8r, self.n8c = 2 * self.n16r, 2 * self.n16c
        self.n2r, self.n2c = 8 * self.n16r, 8 * self.n16c
        self.cap_w_um = 16.0 * self.n16c
        self.cap_h_um = 16.0 * self.n16r
        self.ox = self.oy = self.margin_um  # capture origin, um
        self.img_w_um = self.cap_w_um + 2 * self.margin_um
        self.img_h_um = self.cap_h_um + 2 * self.margin_um
        self.width_px = int(math.ceil(self.img_w_um / self.mpp - 1e-9))
        self.height_px = int(math.ceil(self.img_h_um / self.mpp - 1e-9))
        # node grid: nodes at origin + NODE_UM * k, with a node on every 8 um bin centre
        self.k0 = int(math.ceil(self.margin_um / NODE_UM)) + 2
        self.g0 = self.margin_um - NODE_UM * self.k0  # same for x and y (square margin)
        self.ny = int(math.ceil((self.img_h_um - self.g0) / NODE_UM)) + 3
        self.nx = int(math.ceil((self.img_w_um - self.g0) / NODE_UM)) + 3
        self.node_y = self.g0 + NODE_UM * np.arange(self.ny)
        self.node_x = self.g0 + NODE_UM * np.arange(self.nx)
        t0 = time.perf_counter()
        self._build_tissue()
        self._build_domains()
        self._build_stain_fields()
        self._build_nuclei()
        self._build_textures()
        logger.info(
            "synthetic scene: %d x %d px image, %d nuclei, %d domain seeds (%.1f s)",
            self.width_px,
            self.height_px,
            len(self.nuclei),
            len(self.seed_xy),
            time.perf_counter() - t0,
        )

    # ---------------------------------------------------------------- construction
    def _build_tissue(self) -> None:
        rng = _rng(self.seed, _TAG_FIELDS)
        ny, nx = self.ny, self.nx
        n250 = _smooth_noise(rng, ny, nx, 250.0)
        n25 = _smooth_noise(rng, ny, nx, 25.0)
        n80 = _smooth_noise(rng, ny, nx, 80.0)
        cx = self.ox + self.cap_w_um / 2
        cy = self.oy + self.cap_h_um / 2
        u = np.abs((self.node_x - cx) / (self.cap_w_um / 2)).astype(np.float32)
        v = np.abs((self.node_y - cy) / (self.cap_h_um / 2)).astype(np.float32)
        r = (u[None, :] ** 4 + v[:, None] ** 4) ** 0.25
        t = 1.0 - r + 0.2 * n250 + 0.04 * n25 - 1.5 * np.maximum(0.0, -n80 - 1.9)
        gy, gx = np.gradient(t, NODE_UM)
        grad = np.sqrt(gx * gx + gy * gy)
        self.sd = np.clip(t / np.maximum(grad, 1e-5), -2000.0, 2000.0).astype(np.float32)

    def _build_domains(self) -> None:
        rng = _rng(self.seed, _TAG_DOMAINS)
        s = self.domain_spacing_um
        gy = np.arange(-0.5, self.img_h_um / s + 1.0)
        gx = np.arange(-0.5, self.img_w_um / s + 1.0)
        sy, sx = np.meshgrid(gy * s, gx * s, indexing="ij")
        sy = sy.ravel() + rng.uniform(-0.35, 0.35, sy.size) * s
        sx = sx.ravel() + rng.uniform(-0.35, 0.35, sx.size) * s
        n = sy.size
        cx = self.ox + self.cap_w_um / 2
        cy = self.oy + self.cap_h_um / 2
        order = np.argsort((sx - cx) ** 2 + (sy - cy) ** 2, kind="stable")
        blocks = ([0, 1, 2, 3, 4], [0, 1, 2, 3, 0], [0, 1, 2, 3, 4], [0, 1, 2, 3, 1])
        types = np.empty(n, dtype=np.int8)
        dealt: list[int] = []
        k = 0
        while len(dealt) < n:
            dealt.extend(rng.permutation(blocks[k % len(blocks)]).tolist())
            k += 1
        types[order] = np.asarray(dealt[:n], dtype=np.int8)
        lym_radius = rng.uniform(0.35, 0.5, n) * s
        self.seed_xy = np.stack([sx, sy], axis=1)
        self.seed_type = types
        # warp the node coordinates and take the nearest seed
        wx = _smooth_noise(rng, self.ny, self.nx, 120.0) * 60.0
        wy = _smooth_noise(rng, self.ny, self.nx, 120.0) * 60.0
        px = (self.node_x[None, :] + wx).ravel()
        py = (self.node_y[:, None] + wy).ravel()
        del wx, wy
        tree = cKDTree(self.seed_xy)
        dist, idx = tree.query(np.stack([px, py], axis=1))
        del px, py
        label = types[idx]
        lym = label == DOMAIN_TYPES.index("LYM")
        label[lym & (dist > lym_radius[idx])] = DOMAIN_TYPES.index("STR")
        self.domain = label.reshape(self.ny, self.nx).astype(np.int8)
        # fibre direction field (stroma) and its orientation for fibroblasts
        self.fibre_angle = (_smooth_noise(rng, self.ny, self.nx, 100.0) * 1.2).astype(np.float32)

    def _build_stain_fields(self) -> None:
        stain = DOMAIN_STAIN[self.domain]  # (ny, nx, 3)
        fields = np.empty((5, self.ny, self.nx), dtype=np.float32)
        fields[0] = self.sd
        for c in range(3):
            fields[1 + c] = ndimage.gaussian_filter(stain[..., c], 1.0)
        # blend weight between horizontal and vertical fibre textures
        fields[4] = 0.5 + 0.5 * np.sin(self.fibre_angle)
        self.fields = fields

    def in_tissue_at(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        fy = (np.asarray(y_um) - self.g0) / NODE_UM
        fx = (np.asarray(x_um) - self.g0) / NODE_UM
        return _bilinear_points(self.sd, fy, fx) > 0

    def domain_at(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        iy = np.clip(
            np.rint((np.asarray(y_um) - self.g0) / NODE_UM).astype(np.int64), 0, self.ny - 1
        )
        ix = np.clip(
            np.rint((np.asarray(x_um) - self.g0) / NODE_UM).astype(np.int64), 0, self.nx - 1
        )
        return self.domain[iy, ix]

    def _build_nuclei(self) -> None:
        parts: list[dict[str, np.ndarray]] = []
        for t, name in enumerate(CELL_TYPES):
            rng = _rng(self.seed, _TAG_NUCLEI, t)
            dens = NUCLEUS_DENSITY[t] / 1e4
            dmax = float(dens.max())
            spacing = 1.0 / math.sqrt(dmax)
            jitter = 0.5 if name == "CUE" else 0.35
            ny = int(math.ceil(self.img_h_um / spacing)) + 1
            nx = int(math.ceil(self.img_w_um / spacing)) + 1
            off = rng.uniform(0.0, spacing, 2)
            keep_parts = []
            # rows in chunks to bound memory on full-size slides
            step = max(1, 2_000_000 // nx)
            for r0 in range(0, ny, step):
                r1 = min(ny, r0 + step)
                gy, gx = np.meshgrid(np.arange(r0, r1), np.arange(nx), indexing="ij")
                m = gy.size
                y = (gy.ravel() + 0.5 + rng.uniform(-jitter, jitter, m)) * spacing + off[0]
                x = (gx.ravel() + 0.5 + rng.uniform(-jitter, jitter, m)) * spacing + off[1]
                u = rng.random(m)
                ok = (x > 0) & (x < self.img_w_um) & (y > 0) & (y < self.img_h_um)
                x, y, u = x[ok], y[ok], u[ok]
                dom = self.domain_at(x, y)
                ok = (u < dens[dom] / dmax) & self.in_tissue_at(x, y)
                keep_parts.append((x[ok], y[ok], dom[ok]))
            x = np.concatenate([p[0] for p in keep_parts])
            y = np.concatenate([p[1] for p in keep_parts])
            dom = np.concatenate([p[2] for p in keep_parts])
            n = len(x)
            (a_lo, a_hi), (r_lo, r_hi), (od_lo, od_hi), rim = NUCLEUS_SHAPE[name]
            a = rng.uniform(a_lo, a_hi, n)
            b = a / rng.uniform(r_lo, r_hi, n)
            if name == "FIB":
                fy = (y - self.g0) / NODE_UM
                fx = (x - self.g0) / NODE_UM
                theta = _bilinear_points(self.fibre_angle, fy, fx) + rng.normal(0, 0.25, n)
            else:
                theta = rng.uniform(0.0, math.pi, n)
            parts.append(
                {
                    "x": x,
                    "y": y,
                    "a": a,
                    "b": b,
                    "theta": theta,
                    "od": rng.uniform(od_lo, od_hi, n),
                    "rim": np.full(n, rim),
                    "ctype": np.full(n, t, dtype=np.int8),
                    "domain": dom.astype(np.int8),
                }
            )
        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.lexsort((cols["x"], cols["y"]))
        f32 = ("a", "b", "theta", "od", "rim")
        self.nuclei = _Nuclei(
            **{k: (v[order].astype(np.float32) if k in f32 else v[order]) for k, v in cols.items()}
        )

    def _build_textures(self) -> None:
        rng = _rng(self.seed, _TAG_TEX)
        n = TEX_N
        tex = np.empty((4, n, n), dtype=np.float32)
        for i, sigma in enumerate(((0.7, 6.0), (6.0, 0.7), (1.5, 1.5))):
            z = ndimage.gaussian_filter(rng.standard_normal((n, n)), sigma, mode="wrap")
            tex[i] = z / z.std()
        tex[3] = rng.uniform(-1.0, 1.0, (n, n))
        self.tex = tex

    # ---------------------------------------------------------------- rendering
    def render(self, row0: int, col0: int, h: int, w: int, px_um: float) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of the window whose pixel ``(i, j)`` is centred at
        ``((col0 + j + 0.5) px_um, (row0 + i + 0.5) px_um)`` um."""
        ys = (row0 + np.arange(h) + 0.5) * px_um
        xs = (col0 + np.arange(w) + 0.5) * px_um
        f = _bilinear(self.fields, (ys - self.g0) / NODE_UM, (xs - self.g0) / NODE_UM)
        alpha, hem, eo, fibw, fib = f  # views; updated in place below
        amp = math.sqrt(min(1.0, self.mpp / px_um))
        iy = np.floor(ys / self.mpp).astype(np.int64) % TEX_N
        ix = np.floor(xs / self.mpp).astype(np.int64) % TEX_N
        t = np.take(np.take(self.tex, iy, axis=1), ix, axis=2)
        # alpha = clip(sd / edge + 0.5, 0, 1): ~1.5 um (or one pixel) anti-aliased tissue edge
        alpha *= 1.0 / max(1.5, px_um)
        alpha += 0.5
        np.clip(alpha, 0.0, 1.0, out=alpha)
        # eosin: E * (1 + 0.45 amp fibw fibre) * (1 + 0.08 amp grain)
        fib *= t[1] - t[0]
        fib += t[0]
        fib *= fibw
        fib *= 0.45 * amp
        fib += 1.0
        eo *= fib
        grain = t[2]
        grain *= 0.15 * amp
        tmp = fibw  # reuse the buffer
        np.multiply(grain, 0.08 / 0.15, out=tmp)
        tmp += 1.0
        eo *= tmp
        # haematoxylin: H (1 + grain) + nuclei (0.85 + grain); nuclei hide some eosin
        hn = self._nuclei_od(row0, col0, h, w, px_um)
        np.add(grain, 1.0, out=tmp)
        hem *= tmp
        grain += 0.85
        grain *= hn
        hem += grain
        np.minimum(hn, 1.0, out=hn)
        hn *= -0.5
        hn += 1.0
        eo *= hn
        hem *= alpha
        eo *= alpha
        i0 = t[3]
        i0 *= 2.5
        i0 += WHITE
        out = np.empty((h, w, 3), dtype=np.uint8)
        od = tmp
        for c in range(3):
            np.multiply(hem, -H_VEC[c], out=od)
            np.multiply(eo, -E_VEC[c], out=alpha)
            od += alpha
            np.exp(od, out=od)
            od *= i0
            od += 0.5
            np.clip(od, 0.0, 255.0, out=od)
            out[..., c] = od
        return out

    def _nuclei_od(self, row0: int, col0: int, h: int, w: int, px_um: float) -> np.ndarray:
        nu = self.nuclei
        lo, hi = np.searchsorted(nu.y, [row0 * px_um - A_MAX_UM, (row0 + h) * px_um + A_MAX_UM])
        x = nu.x[lo:hi]
        sel = np.flatnonzero(
            (x > col0 * px_um - A_MAX_UM) & (x < (col0 + w) * px_um + A_MAX_UM)
        ) + int(lo)
        out = np.zeros(h * w, dtype=np.float32)
        if sel.size == 0:
            return out.reshape(h, w)
        cx = (nu.x[sel] / px_um - col0 - 0.5).astype(np.float32)
        cy = (nu.y[sel] / px_um - row0 - 0.5).astype(np.float32)
        a = nu.a[sel] / np.float32(px_um)
        b = nu.b[sel] / np.float32(px_um)
        od = nu.od[sel]
        small = a < 1.0
        if small.any():
            ix = np.rint(cx[small]).astype(np.int64)
            iy = np.rint(cy[small]).astype(np.int64)
            ok = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
            val = od[small] * np.float32(math.pi) * a[small] * b[small]
            out += np.bincount((iy * w + ix)[ok], weights=val[ok], minlength=h * w).astype(
                np.float32
            )
        big = np.flatnonzero(~small)
        if big.size:
            radius = np.ceil(a[big] + 1.0).astype(np.int64)
            for r in np.unique(radius):
                grp = big[radius == r]
                off = np.arange(-r, r + 1)
                dy = np.repeat(off, 2 * r + 1)
                dx = np.tile(off, 2 * r + 1)
                k = dy.size
                step = max(1, 1_500_000 // k)
                for s0 in range(0, grp.size, step):
                    g = grp[s0 : s0 + step]
                    _stamp_ellipses(
                        out,
                        (h, w),
                        (cx[g], cy[g], a[g], b[g], nu.theta[sel[g]], od[g], nu.rim[sel[g]]),
                        dy,
                        dx,
                    )
        return out.reshape(h, w)

    # ---------------------------------------------------------------- bin-level grids
    def tissue_2um(self, r2a: int = 0, r2b: int | None = None) -> np.ndarray:
        """``in_tissue`` of 2 um bins, rows ``r2a:r2b`` (bool, ``(rows, n2c)``)."""
        r2b = self.n2r if r2b is None else r2b
        yc = self.oy + 2.0 * np.arange(r2a, r2b) + 1.0
        xc = self.ox + 2.0 * np.arange(self.n2c) + 1.0
        return _bilinear(self.sd, (yc - self.g0) / NODE_UM, (xc - self.g0) / NODE_UM) > 0


def _stamp_ellipses(
    out: np.ndarray,
    shape: tuple[int, int],
    nuclei: tuple[np.ndarray, ...],
    dy: np.ndarray,
    dx: np.ndarray,
) -> None:
    """Draw anti-aliased filled ellipses (haematoxylin OD) into the flat ``out`` by max.

    ``nuclei`` = (cx, cy, a, b, theta, od, rim) in window pixels; ``dy, dx`` the offsets of
    a square stencil large enough for all of them.
    """
    h, w = shape
    cx, cy, a, b, theta, od, rim = nuclei
    icx = np.rint(cx).astype(np.int64)
    icy = np.rint(cy).astype(np.int64)
    u = dx[None, :].astype(np.float32) - (cx - icx)[:, None]
    v = dy[None, :].astype(np.float32) - (cy - icy)[:, None]
    cos = np.cos(theta)[:, None]
    sin = np.sin(theta)[:, None]
    p = u * cos + v * sin
    q = v * cos - u * sin
    g2 = p * p * (1.0 / (a * a))[:, None] + q * q * (1.0 / (b * b))[:, None]
    # coverage ~ signed distance to the edge along the minor axis, 1 px ramp
    cov = np.clip((1.0 - np.sqrt(g2)) * b[:, None] + 0.5, 0.0, 1.0)
    val = cov * od[:, None] * (1.0 + rim[:, None] * (np.minimum(g2, 1.0) - 0.6))
    py = icy[:, None] + dy[None, :]
    px = icx[:, None] + dx[None, :]
    m = (cov > 0) & (py >= 0) & (py < h) & (px >= 0) & (px < w)
    flat = (py * w + px)[m]
    out[flat] = np.maximum(out[flat], val[m])


def _describe(scene: _Scene) -> dict[str, Any]:
    return {
        "capture_area_um": [scene.cap_w_um, scene.cap_h_um],
        "capture_origin_um": [scene.ox, scene.oy],
        "image_size_px": [scene.width_px, scene.height_px],
        "image_size_um": [scene.img_w_um, scene.img_h_um],
        "bins": {
            "2": [scene.n2r, scene.n2c],
            "8": [scene.n8r, scene.n8c],
            "16": [scene.n16r, scene.n16c],
        },
    }


# --------------------------------------------------------------------------- genes


@dataclass
class _Genes:
    names: list[str]
    ids: list[str]
    program: list[str]  # per gene
    group: list[str]  # per gene: cell / context / background
    weights: np.ndarray  # (11, G) float64: feature -> rate
    tau: np.ndarray  # background genes' domain dependence (0 elsewhere)

    @property
    def programs(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, prog in zip(self.names, self.program, strict=True):
            out.setdefault(prog, []).append(name)
        return out

    @property
    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {"cell": [], "context": [], "background": []}
        for name, grp in zip(self.names, self.group, strict=True):
            out[grp].append(name)
        return out


N_FEATURES = len(CELL_TYPES) + len(DOMAIN_TYPES) + 1
FEATURE_NAMES = (
    [f"n_{t}" for t in CELL_TYPES] + [f"tf*1[domain={d}]" for d in DOMAIN_TYPES] + ["tf*rho"]
)


def _make_genes(n_genes: int, seed: int) -> _Genes:
    rng = _rng(seed, _TAG_GENES)
    sizes = _split_counts(n_genes)
    names: list[str] = []
    program: list[str] = []
    group: list[str] = []
    for prog, grp, _ in PROGRAMS:
        k = sizes[prog]
        width = max(2, len(str(k)))
        names += [f"{prog}_{i + 1:0{width}d}" for i in range(k)]
        program += [prog] * k
        group += [grp] * k
    k = sizes["BG"]
    width = max(3, len(str(k)))
    names += [f"BG_{i + 1:0{width}d}" for i in range(k)]
    program += ["BG"] * k
    group += ["background"] * k
    ids = [f"SYNTH{i + 1:06d}" for i in range(n_genes)]
    prog_arr = np.array(program)
    weights = np.zeros((N_FEATURES, n_genes))
    tau = np.zeros(n_genes)
    nt = len(CELL_TYPES)
    for t, ct in enumerate(CELL_TYPES):
        idx = np.flatnonzero(prog_arr == f"CELL_{ct}")
        weights[t, idx] = CELL_UMI_PER_NUCLEUS[ct] * _lognormal_weights(rng, idx.size, 0.8)
    for prog, dom in (("DOMA", "TUM_A"), ("DOMB", "TUM_B")):
        idx = np.flatnonzero(prog_arr == f"CTX_{prog}")
        d = DOMAIN_TYPES.index(dom)
        weights[nt + d, idx] = CONTEXT_UMI[prog] * _lognormal_weights(rng, idx.size, 0.8)
    idx = np.flatnonzero(prog_arr == "CTX_LYMG")
    weights[nt + len(DOMAIN_TYPES), idx] = CONTEXT_UMI["LYMG"] * _lognormal_weights(
        rng, idx.size, 0.8
    )
    idx = np.flatnonzero(prog_arr == "BG")
    base = BACKGROUND_UMI * _lognormal_weights(rng, idx.size, 1.0)
    tau[idx] = 0.5 * rng.uniform(0.0, 1.0, idx.size) ** 2
    z = rng.standard_normal((len(DOMAIN_TYPES), idx.size))
    weights[nt : nt + len(DOMAIN_TYPES), idx] += base[None, :] * np.exp(tau[idx][None, :] * z)
    return _Genes(names, ids, program, group, weights, tau)


# --------------------------------------------------------------------------- writers


def _barcodes(size: int, rows: np.ndarray, ncols: int) -> np.ndarray:
    pre = np.array([f"s_{size:03d}um_{r:05d}_".encode() for r in rows], dtype="S14")
    suf = np.array([f"{c:05d}-1".encode() for c in range(ncols)], dtype="S7")
    return np.strings.add(pre[:, None], suf[None, :]).ravel().astype(BARCODE_DTYPE)


_POS_SCHEMA = pa.schema(
    [
        ("barcode", pa.string()),
        ("in_tissue", pa.int32()),
        ("array_row", pa.int32()),
        ("array_col", pa.int32()),
        ("pxl_row_in_fullres", pa.float64()),
        ("pxl_col_in_fullres", pa.float64()),
    ]
)


class _H5Matrix:
    """A 10x HDF5 v3 feature-barcode matrix, appended barcode by barcode (CSC genes x bcs)."""

    def __init__(self, path: Path, genes: _Genes) -> None:
        self.path = path
        self.f = h5py.File(path, "w")
        f = self.f
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = np.int64(2)
        f.attrs["library_ids"] = np.array([b"synthetic"])
        f.attrs["original_gem_groups"] = np.array([1], dtype=np.int64)
        f.attrs["chemistry_description"] = "Visium HD v1 (synthetic, magnet-st)"
        f.attrs["software_version"] = SOFTWARE_VERSION
        m = f.create_group("matrix")
        kw: dict[str, Any] = {
            "maxshape": (None,),
            "compression": "gzip",
            "compression_opts": 2,
            "shuffle": True,
        }
        m.create_dataset("barcodes", shape=(0,), dtype=BARCODE_DTYPE, chunks=(1 << 14,), **kw)
        m.create_dataset("data", shape=(0,), dtype=np.int32, chunks=(1 << 18,), **kw)
        m.create_dataset("indices", shape=(0,), dtype=np.int64, chunks=(1 << 18,), **kw)
        m.create_dataset("indptr", data=np.zeros(1, dtype=np.int64), chunks=(1 << 16,), **kw)
        feat = m.create_group("features")
        n = len(genes.names)
        feat.create_dataset("id", data=np.array([s.encode() for s in genes.ids]))
        feat.create_dataset("name", data=np.array([s.encode() for s in genes.names]))
        feat.create_dataset("feature_type", data=np.array([b"Gene Expression"] * n))
        feat.create_dataset("genome", data=np.array([b"SYNTHETIC"] * n))
        feat.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        self.n_genes = n
        self.n_barcodes = 0
        self.nnz = 0

    @staticmethod
    def _append(ds: h5py.Dataset, arr: np.ndarray) -> None:
        n = ds.shape[0]
        ds.resize((n + arr.shape[0],))
        ds[n:] = arr

    def append(self, barcodes: np.ndarray, bins: np.ndarray, genes: np.ndarray, counts: np.ndarray):
        m = self.f["matrix"]
        nb = barcodes.shape[0]
        per = np.bincount(bins, minlength=nb)
        indptr = self.nnz + np.cumsum(per)
        self._append(m["barcodes"], barcodes)
        self._append(m["data"], counts.astype(np.int32))
        self._append(m["indices"], genes.astype(np.int64))
        self._append(m["indptr"], indptr.astype(np.int64))
        self.n_barcodes += nb
        self.nnz += int(counts.size)

    def close(self) -> None:
        self.f["matrix"].create_dataset(
            "shape", data=np.array([self.n_genes, self.n_barcodes], dtype=np.int32)
        )
        self.f.close()


class _MtxWriter:
    """``filtered_feature_bc_matrix/`` (MatrixMarket body spooled to a temporary gzip member)."""

    def __init__(self, folder: Path, genes: _Genes) -> None:
        folder.mkdir(parents=True)
        self.folder = folder
        with gzip.open(folder / "features.tsv.gz", "wt", compresslevel=6) as fh:
            for gid, name in zip(genes.ids, genes.names, strict=True):
                fh.write(f"{gid}\t{name}\tGene Expression\n")
        self.n_genes = len(genes.names)
        self.bc = gzip.open(folder / "barcodes.tsv.gz", "wb", compresslevel=6)  # noqa: SIM115
        self.body_path = folder / ".matrix.body.gz"
        self.body = open(self.body_path, "wb")  # noqa: SIM115
        self.z = zlib.compressobj(4, zlib.DEFLATED, 31)
        self.n_barcodes = 0
        self.nnz = 0
        self.opts = pacsv.WriteOptions(include_header=False, delimiter=" ", quoting_style="none")

    def append(self, barcodes: np.ndarray, bins: np.ndarray, genes: np.ndarray, counts: np.ndarray):
        self.bc.write(b"\n".join(barcodes.tolist()) + b"\n" if barcodes.size else b"")
        if counts.size:
            table = pa.table(
                {
                    "g": genes.astype(np.int64) + 1,
                    "b": bins.astype(np.int64) + (self.n_barcodes + 1),
                    "c": counts.astype(np.int64),
                }
            )
            sink = pa.BufferOutputStream()
            pacsv.write_csv(table, sink, write_options=self.opts)
            self.body.write(self.z.compress(sink.getvalue().to_pybytes()))
        self.n_barcodes += barcodes.shape[0]
        self.nnz += int(counts.size)

    def close(self) -> None:
        self.bc.close()
        self.body.write(self.z.flush())
        self.body.close()
        meta = json.dumps({"software_version": SOFTWARE_VERSION, "format_version": 2})
        header = (
            "%%MatrixMarket matrix coordinate integer general\n"
            f"%metadata_json: {meta}\n"
            f"{self.n_genes} {self.n_barcodes} {self.nnz}\n"
        )
        # A gzip file may hold several members: header member + spooled body member.
        with open(self.folder / "matrix.mtx.gz", "wb") as out:
            out.write(gzip.compress(header.encode(), compresslevel=6, mtime=0))
            with open(self.body_path, "rb") as body:
                shutil.copyfileobj(body, out, 1 << 22)
        self.body_path.unlink()


class _LevelWriter:
    """All matrix and position outputs of one bin size."""

    def __init__(
        self,
        size: int,
        folder: Path,
        genes: _Genes,
        *,
        write_mtx: bool,
        write_raw: bool,
    ) -> None:
        self.size = size
        self.folder = folder
        (folder / "spatial").mkdir(parents=True)
        self.filtered = _H5Matrix(folder / "filtered_feature_bc_matrix.h5", genes)
        self.raw = _H5Matrix(folder / "raw_feature_bc_matrix.h5", genes) if write_raw else None
        self.mtx = _MtxWriter(folder / "filtered_feature_bc_matrix", genes) if write_mtx else None
        self.pos = pq.ParquetWriter(
            folder / "spatial" / "tissue_positions.parquet", _POS_SCHEMA, compression="snappy"
        )
        self.n_total = 0
        self.n_tissue = 0

    def add_band(
        self,
        scene: _Scene,
        rows: np.ndarray,
        in_tissue: np.ndarray,
        bins: np.ndarray,
        genes: np.ndarray,
        counts: np.ndarray,
    ) -> None:
        """One band of whole bin rows; entries sorted by (bin, gene), bins row-major."""
        ncols = in_tissue.shape[1]
        s = self.size
        bcs = _barcodes(s, rows, ncols)
        it = in_tissue.ravel()
        rr = np.repeat(rows, ncols).astype(np.int32)
        cc = np.tile(np.arange(ncols, dtype=np.int32), rows.size)
        self.pos.write_table(
            pa.table(
                {
                    "barcode": pa.array(bcs).cast(pa.string()),
                    "in_tissue": it.astype(np.int32),
                    "array_row": rr,
                    "array_col": cc,
                    "pxl_row_in_fullres": (scene.oy + (rr + 0.5) * s) / scene.mpp,
                    "pxl_col_in_fullres": (scene.ox + (cc + 0.5) * s) / scene.mpp,
                },
                schema=_POS_SCHEMA,
            )
        )
        if self.raw is not None:
            self.raw.append(bcs, bins, genes, counts)
        keep = it[bins]
        new_index = np.cumsum(it) - 1
        fb = new_index[bins[keep]]
        fbcs = bcs[it]
        self.filtered.append(fbcs, fb, genes[keep], counts[keep])
        if self.mtx is not None:
            self.mtx.append(fbcs, fb, genes[keep], counts[keep])
        self.n_total += bcs.size
        self.n_tissue += int(it.sum())

    def close(self) -> None:
        self.pos.close()
        self.filtered.close()
        if self.raw is not None:
            self.raw.close()
        if self.mtx is not None:
            self.mtx.close()


# --------------------------------------------------------------------------- image


def _pyramid_shapes(height: int, width: int) -> list[tuple[int, int]]:
    shapes = [(height, width)]
    while max(shapes[-1]) >= 1024:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def _render_bands(
    scene: _Scene, h: int, w: int, px_um: float, rows: int = TILE
) -> Iterator[np.ndarray]:
    """Render an ``h x w`` image at ``px_um`` in bands of ``rows`` rows (the last one may run
    past ``h``), two bands at a time in threads (numpy releases the GIL)."""
    starts = iter(range(0, h, rows))
    with ThreadPoolExecutor(max_workers=RENDER_THREADS) as pool:
        pending: deque[Future[np.ndarray]] = deque()
        for r0 in itertools.islice(starts, RENDER_THREADS):
            pending.append(pool.submit(scene.render, r0, 0, rows, w, px_um))
        while pending:
            band = pending.popleft().result()
            r0 = next(starts, None)
            if r0 is not None:
                pending.append(pool.submit(scene.render, r0, 0, rows, w, px_um))
            yield band


def _write_tiff(scene: _Scene, path: Path, progress: bool) -> list[tuple[int, int]]:
    shapes = _pyramid_shapes(scene.height_px, scene.width_px)
    total = sum(math.ceil(h / TILE) * math.ceil(w / TILE) for h, w in shapes)
    bar = tqdm(total=total, desc="synthetic H&E", unit="tile", disable=not progress)

    def tiles(level: int, h: int, w: int) -> Iterator[np.ndarray]:
        ntx = math.ceil(w / TILE)
        for band in _render_bands(scene, h, ntx * TILE, scene.mpp * 2**level):
            for j in range(ntx):
                yield band[:, j * TILE : (j + 1) * TILE]
                bar.update(1)

    try:
        with tifffile.TiffWriter(path, bigtiff=True) as tif:
            for level, (h, w) in enumerate(shapes):
                res = 1e4 / (scene.mpp * 2**level)  # pixels per centimetre
                kwargs: dict[str, Any] = {
                    "shape": (h, w, 3),
                    "dtype": np.uint8,
                    "tile": (TILE, TILE),
                    "photometric": "rgb",
                    "compression": "jpeg",
                    "compressionargs": {"level": JPEG_QUALITY},
                    "resolution": (res, res),
                    "resolutionunit": tifffile.RESUNIT.CENTIMETER,
                    "maxworkers": 2,
                }
                if level == 0:
                    kwargs["subifds"] = len(shapes) - 1
                    kwargs["description"] = (
                        f"SYNTHETIC H&E-like image made by magnet-st (seed {scene.seed}); "
                        f"mpp={scene.mpp}"
                    )
                    kwargs["metadata"] = None
                else:
                    kwargs["subfiletype"] = 1
                tif.write(tiles(level, h, w), **kwargs)
    finally:
        bar.close()
    return shapes


def _render_whole(scene: _Scene, scalef: float) -> np.ndarray:
    h = max(1, int(round(scene.height_px * scalef)))
    w = max(1, int(round(scene.width_px * scalef)))
    out = np.empty((h, w, 3), dtype=np.uint8)
    for i, band in enumerate(_render_bands(scene, h, w, scene.mpp / scalef)):
        r0 = i * TILE
        out[r0 : r0 + TILE] = band[: min(TILE, h - r0)]
    return out


def _write_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, format="PNG", compress_level=3)


# --------------------------------------------------------------------------- counts


@dataclass
class _BinGrids:
    """Model variables on the 8 um grid of the capture area."""

    tf: np.ndarray  # (n8r, n8c) float32
    counts: np.ndarray  # (T, n8r, n8c) int16: nuclei centres per type
    domain: np.ndarray  # (n8r, n8c) int8
    rho: np.ndarray  # (n8r, n8c) float32
    eff: np.ndarray  # (n8r, n8c) float32


def _bin_grids(scene: _Scene) -> _BinGrids:
    n8r, n8c = scene.n8r, scene.n8c
    tf = np.zeros((n8r, n8c), dtype=np.float32)
    step = 64  # 8 um rows per chunk
    for r0 in range(0, n8r, step):
        r1 = min(n8r, r0 + step)
        it = scene.tissue_2um(4 * r0, 4 * r1)
        tf[r0:r1] = it.reshape(r1 - r0, 4, n8c, 4).sum(axis=(1, 3)) / 16.0
    nu = scene.nuclei
    bx = np.floor((nu.x - scene.ox) / 8.0).astype(np.int64)
    by = np.floor((nu.y - scene.oy) / 8.0).astype(np.int64)
    inside = (bx >= 0) & (bx < n8c) & (by >= 0) & (by < n8r)
    counts = np.zeros((len(CELL_TYPES), n8r, n8c), dtype=np.int16)
    for t in range(len(CELL_TYPES)):
        m = inside & (nu.ctype == t)
        counts[t] = np.bincount(by[m] * n8c + bx[m], minlength=n8r * n8c).reshape(n8r, n8c)
    k = scene.k0
    domain = scene.domain[k + 1 : k + 1 + 2 * n8r : 2, k + 1 : k + 1 + 2 * n8c : 2].copy()
    # lymphocyte density on the 8 um grid extended over the whole image, then smoothed
    ext = int(math.ceil(scene.margin_um / 8.0)) + 1
    lym = nu.ctype == CELL_TYPES.index("LYM")
    ey, ex = n8r + 2 * ext, n8c + 2 * ext
    ly = by[lym] + ext
    lx = bx[lym] + ext
    ok = (ly >= 0) & (ly < ey) & (lx >= 0) & (lx < ex)
    dens = np.bincount(ly[ok] * ex + lx[ok], minlength=ey * ex).reshape(ey, ex)
    smooth = ndimage.gaussian_filter(
        dens.astype(np.float64), LYMG_SIGMA_UM / 8.0, mode="constant", truncate=4.0
    )
    rho = (smooth[ext : ext + n8r, ext : ext + n8c] / LYMG_REF).astype(np.float32)
    rng = _rng(scene.seed, _TAG_EFF)
    z = rng.standard_normal((n8r, n8c))
    eff = np.exp(EFFICIENCY_SIGMA * z - EFFICIENCY_SIGMA**2 / 2).astype(np.float32)
    return _BinGrids(tf=tf, counts=counts, domain=domain, rho=rho, eff=eff)


def _band_rates(grids: _BinGrids, r8a: int, r8b: int, weights: np.ndarray) -> np.ndarray:
    """Poisson rates ``(bins, genes)`` for 8 um rows ``r8a:r8b`` (row-major bins)."""
    tf = grids.tf[r8a:r8b].ravel().astype(np.float64)
    nb = tf.size
    x = np.zeros((nb, N_FEATURES))
    nt = len(CELL_TYPES)
    x[:, :nt] = grids.counts[:, r8a:r8b].reshape(nt, nb).T
    dom = grids.domain[r8a:r8b].ravel().astype(np.int64)
    x[np.arange(nb), nt + dom] = tf
    x[:, -1] = tf * grids.rho[r8a:r8b].ravel()
    scale = grids.eff[r8a:r8b].ravel() * (tf > 0)
    rates = x @ weights
    rates *= scale[:, None]
    return rates


def _sample_umis(rates: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-UMI (bin, gene), equivalent to independent Poisson(rates) counts."""
    nb, ng = rates.shape
    cum = np.cumsum(rates.ravel())
    end = cum[ng - 1 :: ng]
    start = np.concatenate(([0.0], end[:-1]))
    total = np.maximum(end - start, 0.0)
    n = rng.poisson(total)
    ubin = np.repeat(np.arange(nb, dtype=np.int64), n)
    target = start[ubin] + rng.random(ubin.size) * total[ubin]
    # bins own increasing, disjoint ranges of cum: sorting keeps every target in its bin
    # and makes the search cache-friendly (which UMI is which does not matter)
    target.sort()
    flat = np.searchsorted(cum, target, side="right")
    flat = np.clip(flat, ubin * ng, ubin * ng + ng - 1)
    return ubin, flat - ubin * ng


def _entries(keys: np.ndarray, n_genes: int, minlength: int | None = None):
    """Sorted unique (bin, gene, count) from flat keys ``bin * n_genes + gene``."""
    if minlength is not None and minlength <= 4 * max(keys.size, 1) + 8_000_000:
        c = np.bincount(keys, minlength=minlength)
        nz = np.flatnonzero(c)
        cnt = c[nz]
    else:
        nz, cnt = np.unique(keys, return_counts=True)
    return nz // n_genes, nz % n_genes, cnt.astype(np.int32)


def _write_counts(
    scene: _Scene,
    grids: _BinGrids,
    genes: _Genes,
    writers: dict[int, _LevelWriter],
    progress: bool,
) -> None:
    ng = len(genes.names)
    n8c, n16c, n2c = scene.n8c, scene.n16c, scene.n2c
    nu = scene.nuclei
    bands = list(range(0, scene.n16r, BAND_16))
    for band, r16a in enumerate(
        tqdm(bands, desc="synthetic counts", unit="band", disable=not progress)
    ):
        r16b = min(scene.n16r, r16a + BAND_16)
        r8a, r8b = 2 * r16a, 2 * r16b
        nr8 = r8b - r8a
        nb8 = nr8 * n8c
        rates = _band_rates(grids, r8a, r8b, genes.weights)
        ubin, ugene = _sample_umis(rates, _rng(scene.seed, _TAG_COUNTS, band))
        del rates
        tf_band = grids.tf[r8a:r8b]
        if 8 in writers:
            b, g, c = _entries(ubin * ng + ugene, ng, nb8 * ng)
            writers[8].add_band(scene, np.arange(r8a, r8b), tf_band > 0, b, g, c)
        if 16 in writers:
            nr16 = r16b - r16a
            b16 = (ubin // n8c // 2) * n16c + (ubin % n8c) // 2
            b, g, c = _entries(b16 * ng + ugene, ng, nr16 * n16c * ng)
            it16 = tf_band.reshape(nr16, 2, n16c, 2).max(axis=(1, 3)) > 0
            writers[16].add_band(scene, np.arange(r16a, r16b), it16, b, g, c)
        if 2 in writers:
            r2a, r2b = 4 * r8a, 4 * r8b
            it2 = scene.tissue_2um(r2a, r2b)
            lo, hi = np.searchsorted(nu.y, [scene.oy + 2.0 * r2a, scene.oy + 2.0 * r2b])
            ny2 = np.floor((nu.y[lo:hi] - scene.oy) / 2.0).astype(np.int64) - r2a
            nx2 = np.floor((nu.x[lo:hi] - scene.ox) / 2.0).astype(np.int64)
            ok = (ny2 >= 0) & (ny2 < r2b - r2a) & (nx2 >= 0) & (nx2 < n2c)
            m2 = np.bincount(ny2[ok] * n2c + nx2[ok], minlength=(r2b - r2a) * n2c)
            wsub = it2.ravel() * (0.5 + m2)
            # (nb8, 16) with sub = 4 * dy + dx
            wsub = wsub.reshape(nr8, 4, n8c, 4).transpose(0, 2, 1, 3).reshape(nb8, 16)
            cumw = np.cumsum(wsub, axis=1)
            rng = _rng(scene.seed, _TAG_SPLIT, band)
            t = rng.random(ubin.size) * cumw[ubin, -1]
            sub = np.minimum((cumw[ubin] <= t[:, None]).sum(axis=1), 15)
            r2 = 4 * (ubin // n8c) + sub // 4
            c2 = 4 * (ubin % n8c) + sub % 4
            b, g, c = _entries((r2 * n2c + c2) * ng + ugene, ng)
            writers[2].add_band(scene, np.arange(r2a, r2b), it2, b, g, c)


# --------------------------------------------------------------------------- truth


def _write_nuclei(scene: _Scene, path: Path) -> None:
    nu = scene.nuclei
    table = pa.table(
        {
            "x_um": nu.x,
            "y_um": nu.y,
            "x_px": nu.x / scene.mpp,
            "y_px": nu.y / scene.mpp,
            "semi_major_um": nu.a,
            "semi_minor_um": nu.b,
            "angle_rad": nu.theta,
            "cell_type": pa.DictionaryArray.from_arrays(
                pa.array(nu.ctype.astype(np.int32)), pa.array(list(CELL_TYPES))
            ),
            "domain": pa.DictionaryArray.from_arrays(
                pa.array(nu.domain.astype(np.int32)), pa.array(list(DOMAIN_TYPES))
            ),
        }
    )
    pq.write_table(table, path, compression="zstd")


def _write_bin_truth(scene: _Scene, grids: _BinGrids, path: Path) -> None:
    n8r, n8c = scene.n8r, scene.n8c
    rows = np.arange(n8r)
    cols: dict[str, Any] = {
        "barcode": pa.array(_barcodes(8, rows, n8c)).cast(pa.string()),
        "array_row": np.repeat(rows, n8c).astype(np.int32),
        "array_col": np.tile(np.arange(n8c), n8r).astype(np.int32),
        "in_tissue": (grids.tf.ravel() > 0).astype(np.int32),
        "tissue_fraction": grids.tf.ravel(),
        "domain": pa.DictionaryArray.from_arrays(
            pa.array(grids.domain.ravel().astype(np.int32)), pa.array(list(DOMAIN_TYPES))
        ),
    }
    for t, name in enumerate(CELL_TYPES):
        cols[f"n_{name}"] = grids.counts[t].ravel()
    cols["lymph_context"] = grids.rho.ravel()
    cols["efficiency"] = grids.eff.ravel()
    pq.write_table(pa.table(cols), path, compression="zstd")


FORMULAS = {
    "rate": (
        "lambda[b,g] = 1[tf_b > 0] * e_b * (sum_t n[t,b] * B[t,g] "
        "+ tf_b * (M[d_b,g] + C[d_b,g] + rho_b * L[g])); y[b,g] ~ Poisson(lambda[b,g])"
    ),
    "tf_b": "fraction of the 16 2-um bins of 8 um bin b whose centre is under tissue",
    "n[t,b]": "number of nuclei of cell type t whose centre lies in 8 um bin b",
    "d_b": "domain type at the centre of bin b",
    "rho_b": (
        "gaussian_filter(n_LYM on the 8 um grid extended over the image, sigma=75/8 bins "
        "(75 um), mode='constant', truncate=4) / 1.5"
    ),
    "e_b": "exp(0.2 z_b - 0.02), z_b ~ N(0, 1)",
    "B[T,g]": "S_T * w_g for g in CELL_<T> (S_T = cell_types[T].umi_per_nucleus), else 0",
    "C[d,g]": "35 * w_g for g in CTX_DOMA and d = TUM_A, or g in CTX_DOMB and d = TUM_B, else 0",
    "L[g]": "60 * w_g for g in CTX_LYMG, else 0",
    "M[d,g]": (
        "40 * v_g * exp(tau_g * z[g,d]) for background genes, tau_g = 0.5 * U(0, 1)^2, "
        "z ~ N(0, 1); else 0"
    ),
    "w_g, v_g": "log-normal (sigma 0.8 within a programme, 1.0 over background) summing to 1",
    "2um split": (
        "each UMI of bin b goes to 2-um bin s of b with probability proportional to "
        "in_tissue(s) * (0.5 + number of nucleus centres in s)"
    ),
    "16um": "sum of the 2 x 2 8-um bins",
    "in_tissue": "2 um: centre under tissue; 8 and 16 um: any 2 um bin under tissue",
}


def _truth(
    scene: _Scene,
    genes: _Genes,
    params: dict[str, Any],
    grids: _BinGrids,
    n_tissue: dict[int, int],
    n_total: dict[int, int],
) -> dict[str, Any]:
    counts = {name: int((scene.nuclei.ctype == t).sum()) for t, name in enumerate(CELL_TYPES)}
    dom_frac = {
        name: float(((grids.domain == d) & (grids.tf > 0)).sum() / max(1, (grids.tf > 0).sum()))
        for d, name in enumerate(DOMAIN_TYPES)
    }
    gene_table = []
    for i, name in enumerate(genes.names):
        nz = {
            FEATURE_NAMES[f]: round(float(genes.weights[f, i]), 6)
            for f in range(N_FEATURES)
            if genes.weights[f, i] != 0
        }
        gene_table.append(
            {
                "id": genes.ids[i],
                "name": name,
                "group": genes.group[i],
                "programme": genes.program[i],
                "tau": round(float(genes.tau[i]), 6),
                "coefficients": nz,
            }
        )
    return {
        "synthetic": True,
        "generator": GENERATOR,
        "format_version": FORMAT_VERSION,
        "seed": scene.seed,
        "parameters": params,
        "geometry": _describe(scene),
        "domain_types": [
            {"id": d, "name": n, "description": DOMAIN_DESCRIPTIONS[n], "fraction_in_tissue": f}
            for d, (n, f) in enumerate(dom_frac.items())
        ],
        "cell_types": [
            {
                "id": t,
                "name": n,
                "description": CELL_DESCRIPTIONS[n],
                "n_nuclei": counts[n],
                "density_per_100x100um": dict(
                    zip(DOMAIN_TYPES, NUCLEUS_DENSITY[t].round(3).tolist(), strict=True)
                ),
                "umi_per_nucleus": CELL_UMI_PER_NUCLEUS[n],
            }
            for t, n in enumerate(CELL_TYPES)
        ],
        "gene_groups": genes.groups,
        "gene_programs": genes.programs,
        "context_programmes": {
            "CTX_DOMA": "domain TUM_A (locally identical to TUM_B)",
            "CTX_DOMB": "domain TUM_B, recognisable only from its sparse CUE cells (~1/70x70 um)",
            "CTX_LYMG": "lymphocyte density smoothed over ~150 um (Gaussian, sigma 75 um)",
        },
        "formulas": FORMULAS,
        "features": FEATURE_NAMES,
        "genes": gene_table,
        "n_bins_in_tissue": {str(k): v for k, v in n_tissue.items()},
        "n_bins_total": {str(k): v for k, v in n_total.items()},
        "files": {
            "synthetic_nuclei.parquet": "one row per nucleus: x_um, y_um (from the image's "
            "top-left corner), x_px, y_px (full-resolution pixels), axes, angle, type, domain",
            "synthetic_bins_008um.parquet": "per 8 um bin: tissue fraction, domain, nuclei "
            "per type, lymph_context (rho), efficiency",
        },
    }


def _synthetic_md(truth: dict[str, Any]) -> str:
    p = truth["parameters"]
    geo = truth["geometry"]
    lines = [
        "# SYNTHETIC Visium HD slide",
        "",
        "**This is synthetic data** made by magnet-st (`magnet_st.synthetic.write_synthetic_hd`).",
        "No part of it comes from a real sample. The H&E-like image and the counts are planted",
        "from one random scene, so the ground truth is known (`synthetic_truth.json`,",
        "`synthetic_nuclei.parquet`, `synthetic_bins_008um.parquet`).",
        "",
        f"- seed: {truth['seed']}",
        f"- parameters: `{json.dumps(p)}`",
        f"- capture area: {geo['capture_area_um'][0]:g} x {geo['capture_area_um'][1]:g} um at "
        f"{geo['capture_origin_um'][0]:g} um from the image's top-left corner",
        f"- image: {geo['image_size_px'][0]} x {geo['image_size_px'][1]} px at "
        f"{p['microns_per_pixel']} um/px (`he_fullres.tif`, pyramidal JPEG BigTIFF)",
        "",
        "## Scene",
        "",
        "Domains (Voronoi cells of jittered seeds, warped):",
        "",
    ]
    for d in truth["domain_types"]:
        lines.append(
            f"- `{d['name']}` ({d['fraction_in_tissue']:.0%} of tissue bins): {d['description']}"
        )
    lines += ["", "Cell types (explicit nuclei):", ""]
    for c in truth["cell_types"]:
        lines.append(f"- `{c['name']}` ({c['n_nuclei']} nuclei): {c['description']}")
    lines += [
        "",
        "## Expression model (per 8 um bin b and gene g)",
        "",
        "```",
    ]
    lines += [f"{k}: {v}" for k, v in truth["formulas"].items()]
    lines += [
        "```",
        "",
        "## Genes",
        "",
        "- `CELL_<T>_<k>`: cell-driven, proportional to the nuclei of type T in the bin "
        "(visible in a ~28 um patch).",
        "- `CTX_DOMA_<k>`, `CTX_DOMB_<k>`: domain programmes of TUM_A / TUM_B, which look the "
        "same locally; only the sparse CUE cells (seen in a 128 um region) tell them apart.",
        "- `CTX_LYMG_<k>`: lymphocyte density smoothed over ~150 um.",
        "- `BG_<k>`: background, log-normal baseline with mild dependence on the domain.",
        "",
        "Gene ids are `SYNTH000001`...; `synthetic_truth.json` lists every gene's group and "
        "coefficients.",
        "",
    ]
    for prog, names in truth["gene_programs"].items():
        lines.append(f"- {prog}: {len(names)} genes")
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- public


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
        writers: dict[int, _LevelWriter] = {}
        try:
            for s in sizes:
                writers[s] = _LevelWriter(
                    s, tmp / bin_rel[s], genes, write_mtx=write_mtx, write_raw=write_raw
                )
            _write_counts(scene, grids, genes, writers, progress)
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
        _write_nuclei(scene, tmp / "synthetic_nuclei.parquet")
        _write_bin_truth(scene, grids, tmp / "synthetic_bins_008um.parquet")
        truth = _truth(scene, genes, params, grids, n_tissue, n_total)
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
        image_shape=(scene.height_px, scene.width_px),
        microns_per_pixel=scene.mpp,
        seed=int(seed),
    )
