"""Nuclei and cells from the H&E alone: the classical detector QuPath's cell detection uses,
for slides that were never segmented.

Per image tile, at a working resolution (``NucleusConfig.mpp``, 0.5 um/px by default):

1. **Colour deconvolution** (Ruifrok and Johnston's H&E-DAB matrix, scikit-image's
   ``rgb2hed``) gives the haematoxylin optical density; a Gaussian of ``sigma_um`` smooths it.
2. **Threshold**: haematoxylin above ``threshold`` (optical density; default: Otsu's
   threshold of the tile's tissue pixels, never below ``min_threshold``) is nuclear;
   holes are filled and specks under ``min_area_um2`` dropped.
3. **Seeded watershed** splits touching nuclei: seeds are the maxima of the distance to
   the background at least ``min_distance_um`` apart.
4. **Cells**: each nucleus grows by up to ``expand_um`` into the pixels around it, a pixel
   going to the nearest nucleus (scikit-image's ``expand_labels``; QuPath's "cell
   expansion"; Space Ranger grows its nuclei the same way).

Tiles overlap by a margin; a nucleus belongs to the tile whose core holds its centroid, so
each is found once. Outlines are traced at level 0.5 of each label's mask (marching
squares) and returned in full-resolution pixels.

The detector is a replaceable step: a segmentation from StarDist, Cellpose or QuPath,
exported as GeoJSON, goes where this one's output goes (``magnet predict --segmentation``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from magnet_st.util.atomic import atomic_path

__all__ = ["NucleusConfig", "detect_cells", "label_outlines", "write_segmentation"]


@dataclass(frozen=True)
class NucleusConfig:
    """Settings of :func:`detect_cells` (see the module docstring). The defaults were
    chosen on one synthetic slide (seed 1) among Otsu's and fixed thresholds, 0.3 to
    1 um smoothing and 2 to 4 um between seeds (docs/results.md, "The built-in nucleus detector
    against the planted nuclei")."""

    mpp: float = 0.5
    sigma_um: float = 0.3
    threshold: float | None = None
    min_threshold: float = 0.01
    min_area_um2: float = 6.0
    min_distance_um: float = 2.5
    expand_um: float = 4.0
    tile_px: int = 1024
    margin_px: int = 64


def label_outlines(
    label: np.ndarray,
    scale: float,
    offset: tuple[float, float] = (0.0, 0.0),
    only: np.ndarray | None = None,
) -> dict[int, np.ndarray]:
    """``{label: (k, 2) [x, y]}``: the outline of each label's largest piece (level 0.5 of
    its mask, marching squares: a pixel's centre lies inside its own label's outline), in
    the coordinates ``offset + scale * (pixel index + 0.5)``; ``only``: just these labels."""
    from skimage.measure import find_contours

    out: dict[int, np.ndarray] = {}
    wanted = None if only is None else set(np.asarray(only).tolist())
    for i, sl in enumerate(ndimage.find_objects(label), start=1):
        if sl is None or (wanted is not None and i not in wanted):
            continue
        m = np.pad(label[sl] == i, 1).astype(np.float32)
        ring = max(find_contours(m, 0.5), key=len)  # (row, col) in the padded crop
        r = ring[:, 0] - 1 + sl[0].start
        c = ring[:, 1] - 1 + sl[1].start
        out[i] = np.stack([offset[0] + scale * (c + 0.5), offset[1] + scale * (r + 0.5)], 1)
    return out


def _tile_labels(rgb: np.ndarray, cfg: NucleusConfig) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus and cell labels of one RGB tile at the working resolution."""
    from skimage.color import rgb2hed
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import expand_labels, watershed

    px = cfg.mpp
    h = rgb2hed(rgb)[..., 0]
    h = ndimage.gaussian_filter(h, cfg.sigma_um / px)
    if cfg.threshold is not None:
        t = cfg.threshold
    else:
        tissue = h[h > 0.01]
        t = threshold_otsu(tissue) if tissue.size > 100 else np.inf
        t = max(float(t), cfg.min_threshold)
    mask = ndimage.binary_fill_holes(h > t)
    blobs, _ = ndimage.label(mask)
    big = np.bincount(blobs.ravel()) >= cfg.min_area_um2 / px**2
    big[0] = False
    mask = big[blobs]
    empty = np.zeros(mask.shape, np.int32)
    if not mask.any():
        return empty, empty
    dist = ndimage.distance_transform_edt(mask)
    pieces, _ = ndimage.label(mask)
    peaks = peak_local_max(
        dist, min_distance=max(1, int(round(cfg.min_distance_um / px))), labels=pieces,
        exclude_border=False,
    )  # fmt: skip
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # a piece without a seed (flat, e.g. a thin sliver) gets one at its deepest pixel
    seeded = set(np.unique(pieces[markers > 0]).tolist())
    n_seeds = len(peaks)
    for j, sl in enumerate(ndimage.find_objects(pieces), start=1):
        if sl is not None and j not in seeded:
            d = np.where(pieces[sl] == j, dist[sl], -1)
            r, c = np.unravel_index(int(np.argmax(d)), d.shape)
            n_seeds += 1
            markers[sl[0].start + r, sl[1].start + c] = n_seeds
    nuclei = watershed(-dist, markers, mask=mask).astype(np.int32)
    cells = expand_labels(nuclei, distance=cfg.expand_um / px).astype(np.int32)
    return nuclei, cells


def detect_cells(
    image: Any,
    region_px: tuple[float, float, float, float] | None = None,
    cfg: NucleusConfig | None = None,
    *,
    progress: bool = False,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Nuclei and cells of ``image`` (a :class:`~magnet_st.io.image.SlideImage`) inside
    ``region_px`` (``x0, y0, x1, y1`` full-resolution pixels; default: the whole image):
    ``(nucleus outlines, cell outlines)``, one ``(k, 2)`` ``[x, y]`` array each in
    full-resolution pixels, the i-th cell grown from the i-th nucleus."""
    from tqdm.auto import tqdm

    cfg = cfg or NucleusConfig()
    native = float(image.microns_per_pixel)
    scale = cfg.mpp / native  # full-resolution px per working px
    w, h = image.size
    x0, y0, x1, y1 = region_px if region_px is not None else (0.0, 0.0, float(w), float(h))
    tp, mp = cfg.tile_px, cfg.margin_px
    nx = max(1, math.ceil((x1 - x0) / scale / tp))
    ny = max(1, math.ceil((y1 - y0) / scale / tp))
    nuclei: list[np.ndarray] = []
    cells: list[np.ndarray] = []
    bar = tqdm(total=nx * ny, desc="nuclei", unit="tile", disable=not progress)
    for ty in range(ny):
        for tx in range(nx):
            # the tile's first pixel, working px from the region's corner
            cx, cy = tx * tp - mp, ty * tp - mp
            edge = tp + 2 * mp
            rgb = image.read_region(
                x0 + cx * scale, y0 + cy * scale, edge * scale, edge * scale, (edge, edge)
            )
            nuc, cel = _tile_labels(np.asarray(rgb)[..., :3], cfg)
            offset = (x0 + cx * scale, y0 + cy * scale)
            # a nucleus belongs to the tile whose core (and the region) holds its centroid;
            # only those are outlined
            ids = np.arange(1, int(nuc.max()) + 1)
            com = np.asarray(ndimage.center_of_mass(nuc > 0, nuc, ids)).reshape(-1, 2)
            lx, ly = com[:, 1] + 0.5 - mp, com[:, 0] + 0.5 - mp  # working px in the core
            gx, gy = offset[0] + scale * (com[:, 1] + 0.5), offset[1] + scale * (com[:, 0] + 0.5)
            inside = (lx >= 0) & (lx < tp) & (ly >= 0) & (ly < tp)
            inside &= (gx >= x0) & (gx < x1) & (gy >= y0) & (gy < y1)
            keep = ids[inside & np.isfinite(com).all(axis=1)]
            n_out = label_outlines(nuc, scale, offset, keep)
            c_out = label_outlines(cel, scale, offset, keep)
            for i in keep:
                if int(i) in n_out and int(i) in c_out:
                    nuclei.append(n_out[int(i)])
                    cells.append(c_out[int(i)])
            bar.update(1)
    bar.close()
    return nuclei, cells


def write_segmentation(path: str | Path, rings: Mapping[int, np.ndarray]) -> Path:
    """Outlines as Space Ranger 4 writes its segmentation GeoJSON: one Polygon Feature per
    cell (a closed ring, ``[x, y]`` full-resolution pixels rounded to 0.1 px) with
    ``properties = {"cell_id": id}``; atomic."""
    feats = []
    for i, xy in sorted(rings.items()):
        xy = np.round(np.asarray(xy, dtype=np.float64), 1)
        if not np.array_equal(xy[0], xy[-1]):
            xy = np.vstack([xy, xy[:1]])
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [xy.tolist()]},
                "properties": {"cell_id": int(i)},
            }
        )
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path
