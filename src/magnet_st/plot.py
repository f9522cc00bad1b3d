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
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from magnet_st.atomic import atomic_path
from magnet_st.metrics import pcc_per_gene

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

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

MeasuredScale = Literal["auto", "log1p", "counts"]

#: Name of the cross-validation baseline model (``magnet_st.cv.BASELINE``), drawn first.
BASELINE = "mean_profile"

METRIC_LABELS = {
    "pcc_gene": "PCC-gene (Pearson r per gene, mean)",
    "pcc_gene_top": "PCC-gene, top-50 variable genes",
    "pcc_unit": "PCC-unit (Pearson r per bin, mean)",
    "mse": "MSE (log1p scale)",
    "mae": "MAE (log1p scale)",
}

METRIC_NAMES = {
    "pcc_gene": "PCC-gene",
    "pcc_gene_top": "PCC-gene top-50",
    "pcc_unit": "PCC-unit",
    "mse": "MSE",
    "mae": "MAE",
}

_SCALE_LABELS = {"log1p": "log1p(counts)", "counts": "counts"}


# -- figures and files ----------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    """A constrained-layout figure on its own Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(
    fig: Figure,
    path: str | Path,
    formats: Sequence[str] = ("png", "pdf"),
    dpi: int = 150,
) -> list[Path]:
    """Write ``fig`` once per format next to ``path`` and return the files written.

    ``path`` may carry a suffix: one that names an image format (``maps.png``) is replaced
    by each of ``formats``; any other (``slide.v2``) is kept and the format appended
    (``slide.v2.png``). Each file is written under a temporary name in the same folder and
    renamed into place, so a reader never sees half a figure.
    """
    if isinstance(formats, str):
        formats = (formats,)
    if not formats:
        raise ValueError("formats is empty: name at least one, e.g. ('png',)")
    supported = fig.canvas.get_supported_filetypes()
    fmts = [f.lower().lstrip(".") for f in formats]
    unknown = [f for f in fmts if f not in supported]
    if unknown:
        raise ValueError(f"unsupported formats {unknown}; choose from {sorted(supported)}")
    path = Path(path)
    if path.suffix.lower().lstrip(".") in supported:
        path = path.with_suffix("")
    written = []
    for fmt in dict.fromkeys(fmts):
        dest = path.with_name(f"{path.name}.{fmt}")
        # no creation date: the same figure gives the same PDF
        meta = {"CreationDate": None} if fmt == "pdf" else None
        with atomic_path(dest) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, metadata=meta)
        written.append(dest)
    return written


# -- rasterising bins -----------------------------------------------------------------------


def lattice_geometry(xy: np.ndarray, sample: int = 5000) -> tuple[float, float]:
    """Spacing and orientation of points on a square lattice.

    Returns the median nearest-neighbour distance and the lattice angle in radians,
    folded into ``[-pi/4, pi/4)`` (a square lattice looks the same every 90 degrees).
    At most ``sample`` evenly spaced points are examined.
    """
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    xy = xy[np.isfinite(xy).all(axis=1)]
    if len(xy) < 2:
        return float("nan"), 0.0
    probe = xy[:: max(1, len(xy) // sample)]
    dist, idx = cKDTree(xy).query(probe, k=2)
    vec = xy[idx[:, 1]] - probe
    ok = dist[:, 1] > 0  # duplicated centres say nothing about the lattice
    if not ok.any():
        return 0.0, 0.0
    theta = np.arctan2(vec[ok, 1], vec[ok, 0])
    z = np.exp(4j * theta).mean()
    angle = float(np.angle(z) / 4) if abs(z) > 1e-6 else 0.0
    if abs(angle) < 1e-9:
        angle = 0.0
    return float(np.median(dist[ok, 1])), angle


@dataclass(frozen=True)
class RasterGrid:
    """Bins painted onto a regular image grid.

    Cell ``(r, c)`` covers full-resolution pixels ``x`` in ``[x0 + c*pitch, x0 + (c+1)*pitch)``
    and ``y`` in ``[y0 + r*pitch, y0 + (r+1)*pitch)`` (row 0 at the top, as in the image);
    ``index[r, c]`` is the bin whose square contains the cell centre, or -1.
    """

    index: np.ndarray
    x0: float
    y0: float
    pitch: float
    bin_size: float
    angle: float = 0.0
    _hit: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hit", self.index >= 0)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.index.shape[0]), int(self.index.shape[1]))

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """``imshow`` extent (left, right, bottom, top) for ``origin="upper"``."""
        rows, cols = self.shape
        return (
            self.x0,
            self.x0 + cols * self.pitch,
            self.y0 + rows * self.pitch,
            self.y0,
        )

    def cell(self, x: float, y: float) -> tuple[int, int]:
        """Row and column of the cell containing full-resolution pixel ``(x, y)``."""
        return (
            int(math.floor((y - self.y0) / self.pitch)),
            int(math.floor((x - self.x0) / self.pitch)),
        )

    def paint(self, values: np.ndarray) -> np.ndarray:
        """A float32 image of per-bin ``values`` (length = number of bins); NaN where no
        bin lies or where the bin's value is NaN."""
        values = np.asarray(values, dtype=np.float32).ravel()
        out = np.full(self.index.shape, np.nan, dtype=np.float32)
        out[self._hit] = values[self.index[self._hit]]
        return out


def raster_grid(
    xy: np.ndarray,
    bin_size: float,
    *,
    oversample: int = 1,
    angle: float | None = None,
    max_cells: int = 50_000_000,
) -> RasterGrid:
    """Rasterise square bins of edge ``bin_size`` centred at ``xy`` (``n x 2``, x then y).

    The grid's cells are ``bin_size / oversample`` wide; each cell shows the bin whose
    square (rotated by the lattice ``angle``, estimated when not given) contains the cell
    centre. For a lattice aligned with the axes and ``oversample=1`` every bin fills
    exactly one cell. Bins with non-finite centres are left out.
    """
    from scipy.spatial import cKDTree

    if not bin_size > 0:
        raise ValueError(f"bin_size must be positive, got {bin_size}")
    if oversample < 1:
        raise ValueError(f"oversample must be >= 1, got {oversample}")
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    keep = np.flatnonzero(np.isfinite(xy).all(axis=1))
    if len(keep) == 0:
        raise ValueError("no bin has a finite position")
    pts = xy[keep]
    if angle is None:
        angle = lattice_geometry(pts)[1]
    cos, sin = math.cos(angle), math.sin(angle)
    half = bin_size / 2
    reach = half * (abs(cos) + abs(sin))  # half-width of a rotated bin's bounding box
    pitch = bin_size / oversample
    lo = pts.min(axis=0) - reach
    hi = pts.max(axis=0) + reach
    cols = max(1, math.ceil((hi[0] - lo[0]) / pitch - 1e-6))
    rows = max(1, math.ceil((hi[1] - lo[1]) / pitch - 1e-6))
    if rows * cols > max_cells:
        raise ValueError(
            f"a {rows} x {cols} raster exceeds max_cells={max_cells}: lower oversample "
            "or raise max_cells"
        )
    cx = lo[0] + (np.arange(cols) + 0.5) * pitch
    cy = lo[1] + (np.arange(rows) + 0.5) * pitch
    tree = cKDTree(pts)
    tol = 1 + 1e-9
    index = np.full((rows, cols), -1, dtype=np.int64)
    step = max(1, 1_000_000 // cols)  # about a million cells per query
    for r0 in range(0, rows, step):
        gx, gy = np.meshgrid(cx, cy[r0 : r0 + step])
        q = np.column_stack([gx.ravel(), gy.ravel()])
        dist, j = tree.query(q, distance_upper_bound=half * math.sqrt(2) * tol)
        hit = np.flatnonzero(np.isfinite(dist))
        rel = q[hit] - pts[j[hit]]
        u = rel[:, 0] * cos + rel[:, 1] * sin
        v = -rel[:, 0] * sin + rel[:, 1] * cos
        inside = (np.abs(u) <= half * tol) & (np.abs(v) <= half * tol)
        block = np.full(len(q), -1, dtype=np.int64)
        block[hit[inside]] = keep[j[hit[inside]]]
        index[r0 : r0 + step] = block.reshape(-1, cols)
    return RasterGrid(
        index=index,
        x0=float(lo[0]),
        y0=float(lo[1]),
        pitch=float(pitch),
        bin_size=float(bin_size),
        angle=float(angle),
    )


def rasterize(
    xy: np.ndarray,
    values: np.ndarray,
    pitch: float,
    *,
    oversample: int = 1,
    angle: float | None = None,
) -> np.ndarray:
    """Paint per-bin ``values`` into an image: bins of edge ``pitch`` centred at ``xy``.

    With an axis-aligned lattice the bin at ``(x, y)`` fills cell
    ``(round((y - y_min) / pitch), round((x - x_min) / pitch))``; cells without a bin are
    NaN. See :func:`raster_grid` for the grid's position and rotated lattices.
    """
    return raster_grid(xy, pitch, oversample=oversample, angle=angle).paint(values)


def _auto_oversample(xy: np.ndarray, bin_size: float, max_cells: int) -> tuple[int, float]:
    """Cells per bin edge: 1 for an axis-aligned lattice of touching bins, more (within
    ``max_cells``) when the bins are rotated or spaced apart and one cell would be coarse."""
    spacing, angle = lattice_geometry(xy)
    aligned = abs(angle) < math.radians(0.5)
    touching = np.isfinite(spacing) and abs(spacing - bin_size) <= 0.05 * bin_size
    if aligned and touching:
        return 1, angle
    span = np.ptp(xy[np.isfinite(xy).all(axis=1)], axis=0) + 2 * bin_size
    cells = float(np.prod(np.maximum(span / bin_size, 1)))
    return int(max(1, min(4, math.floor(math.sqrt(max_cells / cells))))), angle


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
        declared = (adata.uns.get("magnet", {}) or {}).get("scale")
        if declared in ("log1p", "counts"):
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

    Computed with :func:`magnet_st.metrics.pcc_per_gene`, so the values match the
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


# -- gene maps ------------------------------------------------------------------------------


def nice_length(target: float) -> float:
    """The largest 1, 2 or 5 times a power of ten not above ``target`` (> 0)."""
    if not target > 0 or not math.isfinite(target):
        raise ValueError(f"target must be positive and finite, got {target}")
    power = 10.0 ** math.floor(math.log10(target))
    for m in (5, 2, 1):
        if m * power <= target * (1 + 1e-9):
            return m * power
    return power  # pragma: no cover - unreachable


def _format_um(um: float) -> str:
    if um >= 1000 and um % 1000 == 0:
        return f"{um / 1000:g} mm"
    return f"{um:g} µm"


def _draw_scale_bar(
    ax: Axes,
    length_px: float,
    label: str,
    left: float,
    y: float,
) -> None:
    """A black bar ``length_px`` full-resolution pixels long starting at ``(left, y)``
    (``gid="scalebar"``), labelled to its right."""
    ax.plot(
        [left, left + length_px],
        [y, y],
        color="black",
        linewidth=3,
        solid_capstyle="butt",
        gid="scalebar",
        zorder=5,
    )
    ax.text(
        left + length_px * 1.08,
        y,
        label,
        va="center",
        ha="left",
        fontsize=8,
        gid="scalebar-label",
        zorder=5,
    )


def _draw_background(
    ax: Axes, info: _Spatial, xlim: tuple[float, float], ylim: tuple[float, float]
) -> None:
    """The hires H&E image, cropped to the view, faint behind the map."""
    img, s = info.hires, info.hires_scale
    if img is None or img.ndim not in (2, 3) or not s > 0:
        return
    h, w = img.shape[:2]
    c0 = max(0, int(math.floor(xlim[0] * s)))
    c1 = min(w, int(math.ceil(xlim[1] * s)))
    r0 = max(0, int(math.floor(min(ylim) * s)))
    r1 = min(h, int(math.ceil(max(ylim) * s)))
    if c1 <= c0 or r1 <= r0:
        return
    ax.imshow(
        img[r0:r1, c0:c1],
        extent=(c0 / s, c1 / s, r1 / s, r0 / s),
        origin="upper",
        cmap="gray" if img.ndim == 2 else None,
        alpha=0.45,
        zorder=0,
        interpolation="antialiased",
    )


def gene_maps(
    pred: AnnData,
    genes: Sequence[str],
    measured: AnnData | None = None,
    *,
    image: bool = True,
    cmap: str = "viridis",
    percentiles: tuple[float, float] = (1.0, 99.0),
    scale_bar_um: float | None = None,
    panel_size: float = 3.2,
    measured_scale: MeasuredScale = "auto",
    library_id: str | None = None,
    title: str | None = None,
    max_cells: int = 2_000_000,
) -> Figure:
    """Maps of predicted (and, where known, measured) expression: one row per gene.

    Each bin is painted as a square of its physical size. Predicted and measured maps of
    a gene share one colour scale, from the ``percentiles`` of both, with a colour bar in
    the prediction's units (``uns["magnet"]["scale"]``, log1p(counts) by default). The
    measured panel's title gives Pearson r between the two across the shared bins.

    Args:
        pred: predictions: ``X`` on the log1p scale (bins x genes), ``obsm["spatial"]``
            the bin centres in full-resolution pixels, ``uns["spatial"][id]["scalefactors"]``
            with ``spot_diameter_fullres`` and ``microns_per_pixel``.
        genes: gene names (or ``var["gene_ids"]``) to draw, one row each.
        measured: measured expression aligned by bin names and genes; without it the layer
            ``"measured"`` of ``pred`` is used when present.
        image: draw the hires H&E image (``uns["spatial"][id]["images"]["hires"]``) faintly
            behind the maps.
        percentiles: lower and upper percentiles that set each gene's colour scale.
        scale_bar_um: scale bar length in microns; default a round length near a fifth of
            the map's width. No bar when the microns per pixel are unknown.
        panel_size: width of one map in inches.
        measured_scale: ``"log1p"``, ``"counts"`` (log1p-transformed here) or ``"auto"``.
        max_cells: upper bound on raster cells when bins are oversampled (rotated or
            spaced lattices).
    """
    if isinstance(genes, str):
        genes = [genes]
    genes = [str(g) for g in genes]
    if not genes:
        raise ValueError("no genes to draw")
    cols = _gene_columns(pred, genes)
    missing = [g for g in genes if g not in cols]
    if missing:
        raise KeyError(f"genes not in the prediction: {missing}")
    xy = np.asarray(pred.obsm["spatial"], dtype=np.float64)[:, :2]
    info = _spatial(pred, library_id, xy)
    over, angle = _auto_oversample(xy, info.bin_px, max_cells)
    grid = raster_grid(xy, info.bin_px, oversample=over, angle=angle)
    meas = _Measured(pred, measured, measured_scale)
    meas_cols = meas.columns(pred, [cols[g] for g in genes])
    ncols = 2 if meas.known else 1
    magnet = pred.uns.get("magnet", {}) or {}
    unit = _SCALE_LABELS.get(str(magnet.get("scale", "log1p")), str(magnet.get("scale")))

    left, right, bottom, top = grid.extent
    width, height = right - left, bottom - top
    margin = 0.12 * max(height, 0.25 * width)  # room under the tissue for the scale bar
    xlim, ylim = (left, right), (bottom + margin, top)
    aspect = min(3.0, max(0.25, (height + margin) / width))
    fig = _figure(
        ncols * panel_size + 1.3,
        len(genes) * (panel_size * aspect + 0.75) + 0.6,
    )
    axes = fig.subplots(len(genes), ncols, squeeze=False)

    bar_um = None
    if info.mpp:
        bar_um = scale_bar_um if scale_bar_um is not None else nice_length(width * info.mpp / 5)

    for row, gene in enumerate(genes):
        c = cols[gene]
        panels = [("predicted", _block(pred, [c])[:, 0])]
        if meas.known:
            mv = meas.values([meas_cols[c]])[:, 0] if c in meas_cols else None
            panels.append(("measured", mv))
        finite = np.concatenate([v[np.isfinite(v)] for _, v in panels if v is not None])
        vmin, vmax = np.percentile(finite, percentiles) if len(finite) else (0.0, 1.0)
        vmin, vmax = float(vmin), float(vmax)
        if not vmax > vmin:
            vmax = vmin + max(1e-6, abs(vmin) * 1e-3)
        image_artist = None
        for j, (kind, values) in enumerate(panels):
            ax = axes[row, j]
            ax.set_axis_off()
            if values is None:
                ax.set_title(f"{gene} · {kind}", fontsize=10)
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
                continue
            if image:
                _draw_background(ax, info, xlim, ylim)
            im = ax.imshow(
                grid.paint(values),
                extent=grid.extent,
                origin="upper",
                cmap=cmap,
                vmin=vmin,
                vmax=vmax,
                # sharp squares when zoomed in, smoothed when 660k bins shrink to a panel
                interpolation="antialiased",
                zorder=1,
                gid=f"expression:{gene}:{kind}",
            )
            image_artist = im
            ax.set_xlim(*xlim)
            ax.set_ylim(*ylim)
            ax.set_aspect("equal")
            label = f"{gene} · {kind}"
            if kind == "measured":
                r = _pcc(values, panels[0][1])
                label += "\n" + (f"r = {r:.2f}" if math.isfinite(r) else "r: n/a (constant)")
            ax.set_title(label, fontsize=10)
            if bar_um:
                _draw_scale_bar(
                    ax, bar_um / info.mpp, _format_um(bar_um), left, bottom + margin / 2
                )
        if image_artist is not None:
            cb = fig.colorbar(image_artist, ax=list(axes[row]), shrink=0.85, pad=0.02, aspect=18)
            cb.set_label(unit, fontsize=9)
            cb.ax.tick_params(labelsize=8)

    level = magnet.get("level")
    slide = magnet.get("slide", info.library_id)
    if title is None:
        parts = [str(slide)] if slide else []
        if level:
            size = f" ({info.bin_um:g} µm)" if info.bin_um else ""
            parts.append(f"{level}s{size}")
        parts.append("predicted vs measured" if meas.known else "predicted")
        title = " · ".join(parts)
    fig.suptitle(title, fontsize=11)
    return fig


# -- per-gene accuracy ----------------------------------------------------------------------


def pcc_bars(
    pcc: pd.Series | Mapping[str, float],
    *,
    top: int | None = 30,
    title: str = "Per-gene accuracy",
    xlabel: str = "Pearson r, predicted vs measured",
) -> Figure:
    """Horizontal bars of per-gene Pearson r, highest first, with the mean over all genes
    (not only those shown) as a labelled dashed line. ``top`` limits the bars drawn
    (``None``: all); NaN genes are left out."""
    s = pd.Series(pcc, dtype=np.float64)
    s.index = s.index.astype(str)
    s = s[np.isfinite(s)]
    if s.empty:
        raise ValueError("no finite per-gene PCC to draw")
    s = s.sort_values(ascending=False, kind="stable")
    shown = s if top is None else s.iloc[: max(1, int(top))]
    n = len(shown)
    fig = _figure(6.0, 1.5 + 0.22 * n)
    ax = fig.add_subplot()
    y = np.arange(n)
    colours = np.where(shown.to_numpy() >= 0, "#4c72b0", "#c44e52")
    ax.barh(y, shown.to_numpy(), color=colours, height=0.75)
    ax.set_yticks(y, shown.index, fontsize=8 if n > 40 else 9)
    ax.invert_yaxis()  # highest at the top
    mean = float(s.mean())
    ax.axvline(
        mean,
        color="black",
        linestyle="--",
        linewidth=1.2,
        label=f"mean over {len(s)} genes: {mean:.3f}",
        gid="mean",
    )
    ax.axvline(0, color="grey", linewidth=0.8)
    lo = min(0.0, float(shown.min()), mean)
    hi = max(0.0, float(shown.max()), mean)
    pad = 0.05 * max(hi - lo, 0.1)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlabel(xlabel)
    ax.legend(loc="lower right", fontsize=8, frameon=True)
    ax.grid(axis="x", alpha=0.3)
    extra = f" (top {n} of {len(s)} genes)" if n < len(s) else ""
    ax.set_title(title + extra, fontsize=11)
    return fig


# -- training -------------------------------------------------------------------------------


def _canonical(name: str) -> str:
    return str(name).replace("/", "_")


def load_history(history: Sequence[Mapping[str, Any]] | pd.DataFrame | str | Path) -> pd.DataFrame:
    """Training history as one row per epoch, sorted, with ``/`` in names turned into ``_``.

    Accepts the list of per-epoch dicts of :class:`magnet_st.train.FitResult`, a
    DataFrame, a ``history.json``, a Lightning ``metrics.csv`` (rows merged per epoch:
    the last value of each column wins; ``*_step`` columns dropped, ``*_epoch`` renamed)
    or a folder holding ``history.json``, ``metrics.csv`` or ``logs/metrics.csv``.
    Missing values stay NaN; without an ``epoch`` column rows are numbered from 0.
    """
    if isinstance(history, str | Path):
        path = Path(history)
        if path.is_dir():
            for name in ("history.json", "metrics.csv", "logs/metrics.csv"):
                if (path / name).is_file():
                    path = path / name
                    break
            else:
                raise FileNotFoundError(f"no history.json or metrics.csv in {path}")
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, Mapping) and "history" in data:
                data = data["history"]
            df = pd.DataFrame(data)
        else:
            df = pd.read_csv(path)
    elif isinstance(history, pd.DataFrame):
        df = history.copy()
    else:
        df = pd.DataFrame(list(history))
    df = df.rename(columns=_canonical)
    df = df.loc[:, ~df.columns.duplicated()]
    df = df.drop(columns=[c for c in df.columns if c.endswith("_step")])
    for c in [c for c in df.columns if c.endswith("_epoch")]:
        base = c[: -len("_epoch")]
        df = df.drop(columns=c) if base in df.columns else df.rename(columns={c: base})
    df = df.apply(pd.to_numeric, errors="coerce")
    if "epoch" not in df.columns:
        df.insert(0, "epoch", np.arange(len(df)))
    df = df[np.isfinite(df["epoch"])]
    df = df.groupby("epoch", sort=True).last().reset_index()
    df["epoch"] = df["epoch"].astype(int)
    return df.drop(columns=[c for c in ("step",) if c in df.columns])


def _first(df: pd.DataFrame, names: Sequence[str]) -> str | None:
    for n in names:
        if n in df.columns and df[n].notna().any():
            return n
    return None


def _curve(ax: Axes, df: pd.DataFrame, col: str, label: str, **kw: Any) -> None:
    ok = df[col].notna() & np.isfinite(df[col])
    ax.plot(
        df.loc[ok, "epoch"], df.loc[ok, col], marker="o", markersize=3, label=label, gid=col, **kw
    )


def training_curves(
    history: Sequence[Mapping[str, Any]] | pd.DataFrame | str | Path,
    *,
    extra: Sequence[str] = (),
    logy: bool = False,
    title: str | None = "Training",
) -> Figure:
    """Loss per epoch (training and validation) above validation PCC-gene.

    ``history``: anything :func:`load_history` reads. Epochs where a value is missing are
    skipped, not drawn as zero. ``extra``: more loss columns (e.g. ``"train_mse"``) for
    the top panel. The best validation PCC-gene is marked.
    """
    from matplotlib.ticker import MaxNLocator

    df = load_history(history)
    fig = _figure(6.5, 5.5)
    ax_loss, ax_pcc = fig.subplots(2, 1, sharex=True)
    train = _first(df, ["train_loss", "loss"])
    val = _first(df, ["val_loss"])
    drawn = 0
    if train:
        _curve(ax_loss, df, train, "training loss", color="#4c72b0")
        drawn += 1
    if val:
        _curve(ax_loss, df, val, "validation loss", color="#dd8452")
        drawn += 1
    for col in extra:
        col = _canonical(col)
        if col in df.columns and df[col].notna().any():
            _curve(ax_loss, df, col, col.replace("_", " "), linestyle="--", linewidth=1)
            drawn += 1
    if drawn:
        ax_loss.legend(fontsize=8)
        if logy:
            ax_loss.set_yscale("log")
    else:
        ax_loss.text(
            0.5, 0.5, "no loss recorded", ha="center", va="center", transform=ax_loss.transAxes
        )
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)

    pcc = _first(df, ["val_pcc_gene", "val_pcc"])
    train_pcc = _first(df, ["train_pcc_gene"])
    if pcc:
        _curve(ax_pcc, df, pcc, "validation PCC-gene", color="#55a868")
        ok = df[pcc].notna()
        best = df.loc[ok].loc[df.loc[ok, pcc].idxmax()]
        ax_pcc.plot(
            [best["epoch"]],
            [best[pcc]],
            marker="*",
            markersize=12,
            color="#c44e52",
            linestyle="none",
            label=f"best {best[pcc]:.3f} (epoch {int(best['epoch'])})",
            gid="best",
        )
    if train_pcc:
        _curve(ax_pcc, df, train_pcc, "training PCC-gene", color="#8172b3")
    if pcc or train_pcc:
        ax_pcc.legend(fontsize=8)
    else:
        ax_pcc.text(
            0.5, 0.5, "no PCC-gene recorded", ha="center", va="center", transform=ax_pcc.transAxes
        )
    ax_pcc.set_ylabel("PCC-gene")
    ax_pcc.set_xlabel("epoch")
    ax_pcc.grid(alpha=0.3)
    ax_pcc.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


# -- cross-validation -----------------------------------------------------------------------


def cv_summary(
    metrics: pd.DataFrame | str | Path,
    *,
    metric: str = "pcc_gene",
    level: str | None = "bin",
    order: Sequence[str] | None = None,
    paired: bool = True,
    title: str | None = None,
) -> Figure:
    """Per-model distribution of ``metric`` over cross-validation folds.

    ``metrics``: the cross-validation ``metrics.csv`` (or its folder, or its DataFrame).
    Rows of one fold (several test slides) are averaged first, as in ``summary.csv``, so
    each point is one fold; boxes show the spread, a white diamond the mean and the text
    above each box the mean +- standard deviation. The baseline (``mean_profile``) comes
    first unless ``order`` says otherwise. ``paired`` joins the points of one fold.
    """
    if isinstance(metrics, str | Path):
        path = Path(metrics)
        df = pd.read_csv(path / "metrics.csv" if path.is_dir() else path)
    else:
        df = metrics.copy()
    for col in ("model", metric):
        if col not in df.columns:
            raise KeyError(f"column {col!r} not in the metrics table (has {list(df.columns)})")
    if level is not None and "level" in df.columns:
        sub = df[df["level"] == level]
        if sub.empty:
            raise ValueError(f"no rows of level {level!r}; levels: {sorted(df['level'].unique())}")
        df = sub
    if "fold" not in df.columns:
        df = df.assign(fold=np.arange(len(df)))
    per_fold = df.groupby(["model", "fold"], sort=False)[metric].mean().reset_index()
    models = list(dict.fromkeys(per_fold["model"].astype(str)))
    if order is not None:
        models = [m for m in order if m in models] + [m for m in models if m not in order]
    elif BASELINE in models:
        models = [BASELINE] + [m for m in models if m != BASELINE]
    values = [per_fold.loc[per_fold["model"] == m, metric].dropna().to_numpy() for m in models]

    fig = _figure(max(3.8, 1.6 + 1.1 * len(models)), 4.6)
    ax = fig.add_subplot()
    pos = np.arange(1, len(models) + 1)
    ax.boxplot(
        [v if len(v) else [np.nan] for v in values],
        positions=pos,
        widths=0.5,
        whis=(0, 100),  # whiskers span every fold: there are few
        showfliers=False,
        patch_artist=True,
        boxprops={"facecolor": "#dbe4f0", "edgecolor": "#4c72b0"},
        medianprops={"color": "#4c72b0"},
    )
    rng = np.random.default_rng(0)
    folds = sorted(per_fold["fold"].unique(), key=str)
    xs: dict[Any, list[tuple[float, float]]] = {f: [] for f in folds}
    for p, m in zip(pos, models, strict=True):
        sub = per_fold[(per_fold["model"] == m) & per_fold[metric].notna()]
        jitter = rng.uniform(-0.12, 0.12, len(sub))
        x = p + jitter
        ax.scatter(x, sub[metric], s=22, color="#333333", zorder=3, gid=f"folds:{m}")
        for xi, (f, v) in zip(x, zip(sub["fold"], sub[metric], strict=True), strict=True):
            xs[f].append((xi, v))
    if paired and len(models) > 1:
        for pts in xs.values():
            if len(pts) > 1:
                a = np.array(pts)
                ax.plot(a[:, 0], a[:, 1], color="grey", alpha=0.35, linewidth=0.8, zorder=2)
    finite = [v for v in values if len(v)]
    means = [float(np.mean(v)) if len(v) else np.nan for v in values]
    ax.scatter(
        pos, means, marker="D", s=30, color="white", edgecolor="black", zorder=4, label="mean"
    )
    all_v = np.concatenate(finite) if finite else np.array([0.0])
    lo, hi = float(all_v.min()), float(all_v.max())
    span = max(hi - lo, 1e-3)
    for p, v in zip(pos, values, strict=True):
        if len(v):
            sd = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
            ax.text(
                p,
                hi + 0.06 * span,
                f"{np.mean(v):.3f}\n± {sd:.3f}",
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.set_ylim(lo - 0.1 * span, hi + 0.3 * span)
    if metric.startswith("pcc") and lo - 0.1 * span < 0 < hi + 0.3 * span:
        ax.axhline(0, color="grey", linestyle=":", linewidth=0.8)
    long_names = max(len(m) for m in models) > 10
    ax.set_xticks(
        pos, models, rotation=30 if long_names else 0, ha="right" if long_names else "center"
    )
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if title is None:
        where = f", {level}s" if level else ""
        name = METRIC_NAMES.get(metric, metric)
        title = f"Cross-validation: {name}{where} ({len(folds)} folds)"
    ax.set_title(title, fontsize=11)
    return fig
