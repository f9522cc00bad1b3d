"""Reading predictions and measurements from AnnData; per-gene Pearson r."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from magnet_st.model.metrics import pcc_per_gene
from magnet_st.plot._common import MeasuredScale
from magnet_st.plot._raster import lattice_geometry

if TYPE_CHECKING:
    from anndata import AnnData

log = logging.getLogger(__name__)

# -- reading predictions --------------------------------------------------------------------


@dataclass
class _Spatial:
    library_id: str | None
    bin_px: float
    mpp: float | None
    bin_um: float | None
    hires: np.ndarray | None
    hires_scale: float


def _spatial(adata: AnnData, library_id: str | None, xy: np.ndarray) -> _Spatial:
    spatial = adata.uns.get("spatial", {}) or {}
    magnet = adata.uns.get("magnet", {}) or {}
    if library_id is None and spatial:
        slide = magnet.get("slide")
        library_id = slide if slide in spatial else next(iter(spatial))
    lib = spatial.get(library_id, {}) if library_id is not None else {}
    sf = dict(lib.get("scalefactors", {}) or {})
    mpp = sf.get("microns_per_pixel", magnet.get("microns_per_pixel"))
    mpp = float(mpp) if mpp is not None and float(mpp) > 0 else None
    bin_um = sf.get("bin_size_um")
    bin_px = sf.get("spot_diameter_fullres")
    if bin_px is None and bin_um is not None and mpp:
        bin_px = float(bin_um) / mpp
    if bin_px is None or not float(bin_px) > 0:
        bin_px = lattice_geometry(xy)[0]
        log.warning("no spot_diameter_fullres in uns['spatial']: bins drawn %.3g px wide", bin_px)
    bin_px = float(bin_px)
    if bin_um is None and mpp:
        bin_um = bin_px * mpp
    images = lib.get("images", {}) or {}
    hires = images.get("hires")
    return _Spatial(
        library_id=library_id,
        bin_px=bin_px,
        mpp=mpp,
        bin_um=float(bin_um) if bin_um is not None else None,
        hires=np.asarray(hires) if hires is not None else None,
        hires_scale=float(sf.get("tissue_hires_scalef", 1.0)),
    )


def _matrix(adata: AnnData, layer: str | None) -> Any:
    return adata.X if layer is None else adata.layers[layer]


def _dense(block: Any) -> np.ndarray:
    if sp.issparse(block):
        block = block.toarray()
    return np.asarray(block, dtype=np.float64)


def _columns_of(matrix: Any, cols: Sequence[int]) -> np.ndarray:
    """Dense ``rows x len(cols)`` float64 values of columns ``cols`` of a matrix."""
    return _dense(matrix[:, list(cols)]).reshape(matrix.shape[0], len(cols))


def _block(adata: AnnData, cols: Sequence[int], layer: str | None = None) -> np.ndarray:
    """Dense ``n_obs x len(cols)`` float64 values of columns ``cols``."""
    return _columns_of(_matrix(adata, layer), cols)


def _column_major(matrix: Any) -> Any:
    """A sparse matrix as CSC, so that many column slices are cheap; others as they are."""
    return matrix.tocsc() if sp.issparse(matrix) and matrix.format != "csc" else matrix


def _is_counts(adata: AnnData, layer: str | None, scale: MeasuredScale) -> bool:
    """Whether measured values are raw counts (to be log1p-transformed)."""
    if scale != "auto":
        if scale not in ("log1p", "counts"):
            raise ValueError(f"measured_scale must be 'auto', 'log1p' or 'counts', got {scale!r}")
        return scale == "counts"
    if layer is None:
        declared = str((adata.uns.get("magnet", {}) or {}).get("scale", ""))
        if declared == "counts" or declared.startswith("log1p"):  # log1p(counts [per 10,000])
            return declared == "counts"
    X = _matrix(adata, layer)
    if sp.issparse(X):
        sample = np.asarray(X.data[:100_000], dtype=np.float64)
    else:
        sample = _dense(X[: min(adata.n_obs, 2000)]).ravel()
    sample = sample[np.isfinite(sample)]
    if not len(sample):
        return False
    return bool(np.all(sample == np.round(sample)) and sample.min() >= 0)


def _gene_lookup(adata: AnnData) -> tuple[dict[str, int], dict[str, int]]:
    """Column of each gene name and of each ``var["gene_ids"]`` entry."""
    names = {str(g): i for i, g in enumerate(adata.var_names)}
    ids: dict[str, int] = {}
    if "gene_ids" in adata.var:
        ids = {str(g): i for i, g in enumerate(adata.var["gene_ids"].astype(str))}
    return names, ids


def _gene_columns(adata: AnnData, genes: Sequence[str]) -> dict[str, int]:
    """Column of each of ``genes`` found by name, else by ``var["gene_ids"]``."""
    names, ids = _gene_lookup(adata)
    out = {}
    for g in genes:
        if g in names:
            out[g] = names[g]
        elif g in ids:
            out[g] = ids[g]
    return out


class _Measured:
    """Measured log1p values aligned to the prediction's bins (NaN where not measured)."""

    def __init__(
        self,
        pred: AnnData,
        measured: AnnData | None,
        scale: MeasuredScale,
    ) -> None:
        self.source: AnnData | None = None
        self.layer: str | None = None
        self.rows: np.ndarray | None = None
        if measured is not None:
            if not pred.obs_names.is_unique or not measured.obs_names.is_unique:
                raise ValueError("bin names (obs_names) must be unique to align measured values")
            rows = measured.obs_names.get_indexer(pred.obs_names)
            if not (rows >= 0).any():
                raise ValueError("the prediction and the measured data share no bin (obs_names)")
            self.source, self.rows = measured, rows
        elif "measured" in pred.layers:
            self.source, self.layer = pred, "measured"
        self.counts = self.source is not None and _is_counts(self.source, self.layer, scale)
        self.matrix = None if self.source is None else _matrix(self.source, self.layer)

    @property
    def known(self) -> bool:
        return self.source is not None

    def columns(self, pred: AnnData, pred_cols: Sequence[int]) -> dict[int, int]:
        """Measured column of each prediction column that was measured."""
        if self.source is None:
            return {}
        if self.layer is not None:
            return {c: c for c in pred_cols}
        names, ids = _gene_lookup(self.source)
        pred_ids = pred.var["gene_ids"].astype(str) if "gene_ids" in pred.var else None
        out = {}
        for c in pred_cols:
            name = str(pred.var_names[c])
            if name in names:
                out[c] = names[name]
            elif name in ids:
                out[c] = ids[name]
            elif pred_ids is not None:
                gid = pred_ids.iloc[c]
                if gid in ids:
                    out[c] = ids[gid]
                elif gid in names:
                    out[c] = names[gid]
        return out

    def values(self, cols: Sequence[int]) -> np.ndarray:
        """``n_pred_bins x len(cols)`` log1p values; NaN for bins not measured."""
        assert self.matrix is not None
        vals = _columns_of(self.matrix, cols)
        if self.counts:
            vals = np.log1p(vals)
        if self.rows is None:
            return vals
        out = np.full((len(self.rows), len(cols)), np.nan)
        ok = self.rows >= 0
        out[ok] = vals[self.rows[ok]]
        return out


def _pcc(truth: np.ndarray, pred: np.ndarray) -> float:
    ok = np.isfinite(truth) & np.isfinite(pred)
    if ok.sum() < 2:
        return float("nan")
    return float(pcc_per_gene(truth[ok, None], pred[ok, None])[0])


def per_gene_pcc(
    pred: AnnData,
    measured: AnnData | None = None,
    *,
    measured_scale: MeasuredScale = "auto",
    chunk: int | None = None,
) -> pd.Series:
    """Pearson r per gene between predicted and measured log1p values across bins.

    ``measured`` is aligned to ``pred`` by bin names (``obs_names``) and genes (by name,
    else by ``var["gene_ids"]``); only shared bins and genes count. Without ``measured``
    the layer ``"measured"`` of ``pred`` is used. Raw counts are log1p-transformed
    (``measured_scale="auto"`` decides from ``uns["magnet"]["scale"]`` or integer values).

    Computed with :func:`magnet_st.model.metrics.pcc_per_gene`, so the values match the
    cross-validation's ``pcc_gene``: genes whose measured values are constant have no
    correlation and are left out; a constant prediction of a varying gene scores 0.
    Returns a Series named ``"pcc"`` indexed by the prediction's gene names. Genes are
    read ``chunk`` at a time (default: about 20 million values per chunk).
    """
    m = _Measured(pred, measured, measured_scale)
    if not m.known:
        raise ValueError("no measured values: pass `measured` or add a layer 'measured'")
    pairs = m.columns(pred, range(pred.n_vars))
    if not pairs:
        raise ValueError("the prediction and the measured data share no gene")
    rows = np.arange(pred.n_obs) if m.rows is None else np.flatnonzero(m.rows >= 0)
    pred_cols = list(pairs)
    if chunk is None:
        chunk = max(1, min(512, 20_000_000 // max(1, len(rows))))
    m.matrix = _column_major(m.matrix)  # one conversion instead of a scan per chunk
    est_matrix = _column_major(_matrix(pred, None))
    r = np.full(len(pred_cols), np.nan)
    for s in range(0, len(pred_cols), chunk):
        cols = pred_cols[s : s + chunk]
        truth = m.values([pairs[c] for c in cols])[rows]
        est = _columns_of(est_matrix, cols)[rows]
        r[s : s + chunk] = pcc_per_gene(truth, est)
    out = pd.Series(r, index=pd.Index(pred.var_names[pred_cols].astype(str), name="gene"))
    return out[np.isfinite(out)].rename("pcc")
