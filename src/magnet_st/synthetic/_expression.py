"""The expression drawn for a synthetic slide: the model variables on the 8 um grid, the
Poisson rates of each band of bins, and the UMIs handed to every bin size's writer (and
each cell's sum). The formulas are in :mod:`magnet_st.synthetic`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from magnet_st.synthetic._params import (
    _TAG_CELL_UMIS,
    _TAG_COUNTS,
    _TAG_EFF,
    _TAG_SPLIT,
    BAND_16,
    CELL_TYPES,
    EFFICIENCY_SIGMA,
    LYMG_REF,
    LYMG_SIGMA_UM,
)
from magnet_st.synthetic._scene import N_FEATURES, _Genes, _rng, _Scene

if TYPE_CHECKING:
    from magnet_st.synthetic._cells import CellCounts, CellPlanting
    from magnet_st.synthetic._writers import _LevelWriter


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


def _band_rates(
    grids: _BinGrids, r8a: int, r8b: int, weights: np.ndarray, cell_terms: bool = True
) -> np.ndarray:
    """Poisson rates ``(bins, genes)`` for 8 um rows ``r8a:r8b`` (row-major bins); without
    ``cell_terms``, only the tissue's (domain, context, background) terms."""
    tf = grids.tf[r8a:r8b].ravel().astype(np.float64)
    nb = tf.size
    x = np.zeros((nb, N_FEATURES))
    nt = len(CELL_TYPES)
    if cell_terms:
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
    cells: CellCounts | None = None,
    planted: CellPlanting | None = None,
) -> None:
    """Draw the UMIs band by band and hand them to each bin size's writer; with ``cells``,
    also add each UMI to the cell that its 2 um bin belongs to. With ``planted``, the
    cell-driven UMIs are each cell's own, spread over its 2 um bins
    (:class:`magnet_st.synthetic._cells.CellPlanting`), and the tissue's UMIs go to the 2 um
    bins of their 8 um bin evenly (by default: towards nucleus centres)."""
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
        rates = _band_rates(grids, r8a, r8b, genes.weights, cell_terms=planted is None)
        ubin, ugene = _sample_umis(rates, _rng(scene.seed, _TAG_COUNTS, band))
        del rates
        tf_band = grids.tf[r8a:r8b]
        r2a, r2b = 4 * r8a, 4 * r8b
        if 2 in writers or cells is not None or planted is not None:
            it2 = scene.tissue_2um(r2a, r2b)
            if planted is None:
                lo, hi = np.searchsorted(nu.y, [scene.oy + 2.0 * r2a, scene.oy + 2.0 * r2b])
                ny2 = np.floor((nu.y[lo:hi] - scene.oy) / 2.0).astype(np.int64) - r2a
                nx2 = np.floor((nu.x[lo:hi] - scene.ox) / 2.0).astype(np.int64)
                ok = (ny2 >= 0) & (ny2 < r2b - r2a) & (nx2 >= 0) & (nx2 < n2c)
                m2 = np.bincount(ny2[ok] * n2c + nx2[ok], minlength=(r2b - r2a) * n2c)
                wsub = it2.ravel() * (0.5 + m2)
            else:
                wsub = it2.ravel().astype(np.float64)
            # (nb8, 16) with sub = 4 * dy + dx
            wsub = wsub.reshape(nr8, 4, n8c, 4).transpose(0, 2, 1, 3).reshape(nb8, 16)
            cumw = np.cumsum(wsub, axis=1)
            rng = _rng(scene.seed, _TAG_SPLIT, band)
            t = rng.random(ubin.size) * cumw[ubin, -1]
            sub = np.minimum((cumw[ubin] <= t[:, None]).sum(axis=1), 15)
            r2 = 4 * (ubin // n8c) + sub // 4
            c2 = 4 * (ubin % n8c) + sub % 4
            if planted is not None:
                eff = np.repeat(np.repeat(grids.eff[r8a:r8b], 4, axis=0), 4, axis=1)
                pr2, pc2, pg = planted.umis(r2a, r2b, eff, _rng(scene.seed, _TAG_CELL_UMIS, band))
                r2, c2 = np.concatenate([r2, pr2]), np.concatenate([c2, pc2])
                ugene = np.concatenate([ugene, pg])
                ubin = (r2 // 4) * n8c + c2 // 4
            if cells is not None:
                cells.add(cells.label[r2a + r2, c2], ugene)
            if 2 in writers:
                b, g, c = _entries((r2 * n2c + c2) * ng + ugene, ng)
                writers[2].add_band(scene, np.arange(r2a, r2b), it2, b, g, c)
        if 8 in writers:
            b, g, c = _entries(ubin * ng + ugene, ng, nb8 * ng)
            writers[8].add_band(scene, np.arange(r8a, r8b), tf_band > 0, b, g, c)
        if 16 in writers:
            nr16 = r16b - r16a
            b16 = (ubin // n8c // 2) * n16c + (ubin % n8c) // 2
            b, g, c = _entries(b16 * ng + ugene, ng, nr16 * n16c * ng)
            it16 = tf_band.reshape(nr16, 2, n16c, 2).max(axis=(1, 3)) > 0
            writers[16].add_band(scene, np.arange(r16a, r16b), it16, b, g, c)
