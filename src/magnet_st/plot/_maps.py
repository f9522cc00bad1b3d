"""Gene maps: predicted beside measured, one colour scale, a scale bar."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from magnet_st.plot._common import _SCALE_LABELS, MeasuredScale, _figure
from magnet_st.plot._data import _block, _gene_columns, _Measured, _pcc, _Spatial, _spatial
from magnet_st.plot._raster import _auto_oversample, raster_grid

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

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


# Long: one figure built top to bottom: raster grid and layout, then per gene a shared colour
# scale and 1-2 panels whose drawing uses ~12 setup locals (grid, info, xlim, ylim, bar_um).
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
