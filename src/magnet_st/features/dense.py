"""dense: one encoder pass per image tile, each unit's features pooled over its footprint.

The per-unit path (:mod:`magnet_st.features.store`) cuts a patch around every unit and runs the
encoder on each; at Visium HD the 28 um patches of neighbouring 8 um bins overlap, so the
same pixels go through the network many times. The dense path runs the frozen encoder
once over square tiles of the slide and averages its feature maps over each unit's exact
footprint:

1. **Working resolution.** The slide is read at ``mpp`` microns per pixel (default
   :data:`DEFAULT_MPP`) in tiles of ``tile_px`` px (the *core*) read with ``margin_px`` px
   of context on every side (white outside the image). Tiles start on a global grid of
   ``tile_px``, so every tile's feature cells are cells of one slide-wide grid.
2. **Maps.** The encoder's maps of the chosen ``strides`` (16: the mid-level map measured
   best; 32: the last) are taken through timm's own multi-scale interface,
   ``forward_intermediates`` (the deepest map of each stride in ``model.feature_info``), so
   any timm CNN or ViT works (a ViT's patch tokens are its stride-16 map; build it with
   ``dynamic_img_size=True``). Where each map's cell centres lie is measured from the model
   (:func:`cell_offset`), never assumed.
3. **Pooling.** A map is piecewise constant over its cells; the mean over a footprint is
   its exact area integral divided by the area. Within one tile the integral over a box is
   read from the summed-area table of the tile's *core cells* at fractional corners
   (bilinear interpolation of a summed-area table is exact for a piecewise-constant
   field); a footprint that spans several tiles adds the parts from each core, so tiles
   have no seams and no footprint size is too large. Squares for bins and tiles, discs for
   Visium / ST spots (cell coverage by 8 x 8 sub-samples). Channels-last, float64 tables
   per tile; the slide-wide map is never held.
4. **Windows** (``windows_um``): the mean over squares of these sizes centred on every
   unit of the bin level, appended to its features as further blocks. They come from a
   map of ``block_um`` blocks (each block pooled exactly as above; a window is the
   area-weighted mean of the blocks it covers, blocks taken as uniform inside) that is
   held for the whole slide: small (a 6.5 mm slide at 16 um blocks: 406 x 406 cells).
   With ``window_mpp`` set, the block map comes from a second pass of the same encoder at
   that coarser resolution (wider receptive field, far fewer pixels) instead of the first.

Tiles are processed in rows. A unit's mean is final once the last row its footprint
touches is done; finished rows go to the level's ``.partial.npy`` and the number of rows
done to a progress file, so an interrupted run resumes at the next row and reruns are
byte-identical. :func:`extract_dense` is called by
:func:`magnet_st.features.extract.extract_features` with ``dense=DenseConfig(...)``; the feature
set's key gets a ``-dense<hash>`` suffix that covers every setting here, and its
``meta.json`` records them under ``"dense"`` with each level's ``blocks`` (name and width
of each concatenated part, so that a linear probe can weigh them apart).
"""

# Long module: the dense path, in sections in pipeline order: config (~60 lines), map geometry (~70),
# footprint pooling maths (~110), the row loop run_slide (~180) and the slide driver extract_slide.

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from magnet_st.data.shapes import Polygons
from magnet_st.errors import ConfigError
from magnet_st.util.atomic import new_memmap, write_text

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MPP", "DenseConfig", "MapSpec", "cell_offset", "map_specs", "pool_tile"]

#: per size preset (:mod:`magnet_st.prepare.build`): the working resolution, the windows
#: around every unit and the resolution of the pass the windows come from, as measured best
#: (docs/results.md, "Dense features"): Visium HD bins gain from 0.25 um/px (the nuclei in
#: an 8 um bin); 100 um ST spots were level at 0.5 and native 0.69 um/px, gained from 300
#: and 600 um windows, and more when those come from a second pass at 2 um/px (level with
#: 1 um/px, a quarter of its pixels). Visium spots (55 um) take the ST values, the nearest
#: measured.
PRESET_DEFAULTS: dict[str, tuple[float, tuple[float, ...], float]] = {
    "hd": (0.25, (), 2.0),
    "visium": (0.5, (300.0, 600.0), 2.0),
    "legacy_st": (0.5, (300.0, 600.0), 2.0),
}
DEFAULT_MPP = PRESET_DEFAULTS["hd"][0]
SQUARE, DISC, POLYGON = "square", "disc", "polygon"
_SUB = 8  # sub-samples per cell edge for disc coverage
LOOKAHEAD = 2  # tiles read ahead of the one being encoded


@dataclass(frozen=True)
class DenseConfig:
    """How dense features are made; every field is part of the feature set's key.

    ``mpp``, ``windows_um`` and ``window_mpp`` left ``None`` take the dataset's preset
    defaults (:data:`PRESET_DEFAULTS`) when the extraction starts (:meth:`resolve`);
    ``window_mpp`` equal to ``mpp`` takes the windows from the units' own pass."""

    mpp: float | None = None
    tile_px: int = 512
    margin_px: int = 128
    strides: tuple[int, ...] = (16,)
    windows_um: tuple[float, ...] | None = None
    block_um: float = 16.0
    window_mpp: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        if self.windows_um is not None:
            object.__setattr__(self, "windows_um", tuple(float(w) for w in self.windows_um))
        for name in ("mpp", "window_mpp"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))

    def resolve(self, preset: str) -> DenseConfig:
        """The settings with the preset's defaults filled in."""
        mpp, windows, wmpp = PRESET_DEFAULTS.get(preset, PRESET_DEFAULTS["hd"])
        return replace(
            self,
            mpp=mpp if self.mpp is None else self.mpp,
            windows_um=windows if self.windows_um is None else self.windows_um,
            # by default never finer than the units' own pass
            window_mpp=max(wmpp, mpp if self.mpp is None else self.mpp)
            if self.window_mpp is None
            else self.window_mpp,
        )

    def check(self) -> DenseConfig:
        if self.mpp is None or self.windows_um is None:
            raise ConfigError("dense settings not resolved: call resolve(preset) first")
        if not (math.isfinite(self.mpp) and 0.05 <= self.mpp <= 10):
            raise ConfigError(f"dense mpp must be 0.05-10 microns per pixel, got {self.mpp}")
        if not self.strides or any(s not in (4, 8, 16, 32) for s in self.strides):
            raise ConfigError(f"dense strides must be among 4 8 16 32, got {list(self.strides)}")
        if len(set(self.strides)) != len(self.strides):
            raise ConfigError(f"dense strides repeat: {list(self.strides)}")
        for what, v in (("tile", self.tile_px), ("margin", self.margin_px)):
            if v % 32 or v < (32 if what == "tile" else 0):
                raise ConfigError(f"dense {what}_px must be a multiple of 32, got {v}")
        if any(not (math.isfinite(w) and w > 0) for w in self.windows_um):
            raise ConfigError(f"dense windows must be positive microns, got {self.windows_um}")
        if not (math.isfinite(self.block_um) and self.block_um > 0):
            raise ConfigError(f"dense block_um must be positive, got {self.block_um}")
        w = self.window_mpp
        if w is not None and not (math.isfinite(w) and 0.05 <= w <= 10):
            raise ConfigError(f"dense window mpp must be 0.05-10 microns per pixel, got {w}")
        return self

    @property
    def separate_windows(self) -> bool:
        """Whether the windows come from a second pass at ``window_mpp``."""
        return bool(self.windows_um) and self.window_mpp not in (None, self.mpp)

    def describe(self) -> dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if not self.separate_windows:  # one pass, as before the option: the keys stay
            del d["window_mpp"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DenseConfig:
        keys = {f for f in cls.__dataclass_fields__}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in keys}
        if "window_mpp" not in kw and kw.get("windows_um") is not None and kw.get("mpp"):
            kw["window_mpp"] = kw["mpp"]  # a resolved record without it: one pass
        return cls(**kw)

    def suffix(self) -> str:
        h = hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()
        return f"dense{h[:8]}"


# --------------------------------------------------------------------------- the maps


@dataclass(frozen=True)
class MapSpec:
    """One map: its ``feature_info`` index, stride, width and where cell 0's centre lies
    (``offset`` px from the input's first pixel edge; cell k at ``stride * k + offset``)."""

    index: int
    stride: int
    channels: int
    offset: float


def _forward_maps(model: Any, x: Any, indices: list[int]) -> list[Any]:
    out = model.forward_intermediates(x, indices=indices, intermediates_only=True, stop_early=True)
    return list(out)


def cell_offset(model: Any, index: int, stride: int) -> float:
    """Where cell 0 of map ``index`` is centred, in input pixels, measured from the model:
    the middle of the input support of one interior cell's gradient (on noise, so no unit
    is silent). Continuous coordinates: pixel i spans [i, i + 1), so a cell whose support
    is pixels 0 .. 15 is centred at 8. Models without a local receptive field (a ViT's
    attention sees the whole input) get the centre of their patch, ``stride / 2``."""
    import torch

    if hasattr(model, "patch_embed"):
        return stride / 2
    for n in (256, 512, 1024):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 3, n, n, generator=gen).requires_grad_(True)
        with torch.enable_grad():
            fmap = _forward_maps(model, x, [index])[0]
            k = fmap.shape[-1] // 2
            fmap[0, :, k, k].sum().backward()
        g = x.grad.abs().sum(dim=(0, 1))
        cols = torch.nonzero(g.sum(0) > 0).flatten()
        rows = torch.nonzero(g.sum(1) > 0).flatten()
        if len(cols) == 0:
            break
        lo, hi = int(cols.min()), int(cols.max())
        if lo > 0 and hi < n - 1:
            centre = (lo + hi) / 2
            centre_y = (int(rows.min()) + int(rows.max())) / 2
            if abs(centre - centre_y) > 0.5:
                log.warning(
                    "map %d: cell centre differs along x and y (%g, %g)", index, centre, centre_y
                )
            return round((centre - stride * k) * 2) / 2 + 0.5
    return stride / 2


def map_specs(model: Any, strides: Sequence[int]) -> list[MapSpec]:
    """The deepest map of each stride that the model's ``feature_info`` lists."""
    info = getattr(model, "feature_info", None)
    if not info or not hasattr(model, "forward_intermediates"):
        raise ConfigError(
            f"{type(model).__name__} has no timm multi-scale interface (feature_info / "
            "forward_intermediates): dense features need a timm CNN or ViT"
        )
    entries = [(i, int(f["reduction"]), int(f["num_chs"])) for i, f in enumerate(info)]
    specs = []
    for s in strides:
        found = [e for e in entries if e[1] == s]
        if not found:
            have = sorted({e[1] for e in entries})
            raise ConfigError(f"the encoder has no stride-{s} map; its strides: {have}")
        i, _, c = found[-1]
        specs.append(MapSpec(i, s, c, cell_offset(model, i, s)))
    return specs


# --------------------------------------------------------------------------- footprints


@dataclass
class Footprints:
    """Units of one level in working pixels: centres ``(n, 2)`` (x, y), a half-size (squares)
    or radius (discs) per unit, and the shape. Polygons (cells) keep their outlines, and
    ``half`` is the half-edge of the square around the centre that holds each outline."""

    centres: np.ndarray
    half: np.ndarray
    shape: str = SQUARE
    polygons: Polygons | None = None

    def take(self, index: np.ndarray) -> Footprints:
        """The footprints at ``index``, in that order."""
        polys = None if self.polygons is None else self.polygons.subset(index)
        return Footprints(self.centres[index], self.half[index], self.shape, polys)

    def ring_cells(self, spec: MapSpec, i: int) -> np.ndarray:
        """Polygon ``i``'s vertices ``(k, 2)`` (x, y) in edge coordinates of the map's cells."""
        assert self.polygons is not None
        return (self.polygons.ring(i) - spec.offset) / spec.stride + 0.5

    def boxes(self, spec: MapSpec) -> np.ndarray:
        """``(n, 4)`` y0, y1, x0, x1 in edge coordinates of the map's cells (cell j spans
        [j, j + 1))."""
        c = (self.centres - spec.offset) / spec.stride + 0.5
        h = self.half[:, None] / spec.stride
        return np.stack(
            [c[:, 1] - h[:, 0], c[:, 1] + h[:, 0], c[:, 0] - h[:, 0], c[:, 0] + h[:, 0]], 1
        )


def _sat(core: np.ndarray) -> np.ndarray:
    """Summed-area table ``(h + 1, w + 1, C)`` of a channels-last map, float64."""
    h, w, c = core.shape
    s = np.zeros((h + 1, w + 1, c), np.float64)
    np.cumsum(core, axis=0, dtype=np.float64, out=s[1:, 1:])
    np.cumsum(s[1:, 1:], axis=1, out=s[1:, 1:])
    return s


def _bilinear(s: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The summed-area table at fractional ``(y, x)`` (within its extent): ``(n, C)``."""
    h, w = s.shape[0] - 1, s.shape[1] - 1
    y0 = np.clip(np.floor(y).astype(np.int64), 0, max(h - 1, 0))
    x0 = np.clip(np.floor(x).astype(np.int64), 0, max(w - 1, 0))
    fy, fx = (y - y0)[:, None], (x - x0)[:, None]
    y1, x1 = np.minimum(y0 + 1, h), np.minimum(x0 + 1, w)
    top = s[y0, x0] * (1 - fx) + s[y0, x1] * fx
    bottom = s[y1, x0] * (1 - fx) + s[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def pool_tile(
    core: np.ndarray, origin: tuple[int, int], boxes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Integrals of a tile's core map over boxes clipped to the core.

    ``core``: channels-last ``(h, w, C)`` cells; ``origin``: the global (row, col) of its
    first cell; ``boxes``: ``(n, 4)`` y0, y1, x0, x1 in global cell-edge coordinates.
    Returns ``(sums (n, C), areas (n,))`` of the part of each box inside the core (zero
    where a box misses it).
    """
    h, w, _ = core.shape
    y0 = np.clip(boxes[:, 0] - origin[0], 0, h)
    y1 = np.clip(boxes[:, 1] - origin[0], 0, h)
    x0 = np.clip(boxes[:, 2] - origin[1], 0, w)
    x1 = np.clip(boxes[:, 3] - origin[1], 0, w)
    s = _sat(core)
    sums = _bilinear(s, y1, x1) - _bilinear(s, y0, x1) - _bilinear(s, y1, x0) + _bilinear(s, y0, x0)
    return sums, (y1 - y0) * (x1 - x0)


def disc_cover(rows: np.ndarray, cols: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """The share of each cell ``(rows x cols)`` inside a disc (centre, radius in cells), by
    8 x 8 sub-samples per cell."""
    sub = (np.arange(_SUB) + 0.5) / _SUB
    yy = (rows[:, None] + sub[None, :]).ravel()
    xx = (cols[:, None] + sub[None, :]).ravel()
    inside = ((yy[:, None] - cy) ** 2 + (xx[None, :] - cx) ** 2) <= r * r
    return inside.reshape(len(rows), _SUB, len(cols), _SUB).mean(axis=(1, 3))


def pool_discs(
    core: np.ndarray, origin: tuple[int, int], centres: np.ndarray, radii: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`pool_tile` for discs given in global cell-edge coordinates (centre (y, x),
    radius in cells): each cell weighs by the share of its 8 x 8 sub-samples in the disc."""
    h, w, c = core.shape
    sums = np.zeros((len(centres), c), np.float64)
    areas = np.zeros(len(centres), np.float64)
    for i, ((cy, cx), r) in enumerate(zip(centres, radii, strict=True)):
        ly, lx = cy - origin[0], cx - origin[1]
        r0, r1 = max(0, math.floor(ly - r)), min(h, math.ceil(ly + r))
        c0, c1 = max(0, math.floor(lx - r)), min(w, math.ceil(lx + r))
        if r0 >= r1 or c0 >= c1:
            continue
        wgt = disc_cover(np.arange(r0, r1), np.arange(c0, c1), ly, lx, r)
        sums[i] = np.einsum("yx,yxc->c", wgt, core[r0:r1, c0:c1], dtype=np.float64)
        areas[i] = wgt.sum()
    return sums, areas


def polygon_cover(rows: np.ndarray, cols: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """The share of each cell ``(rows x cols)`` inside a polygon (vertices ``(k, 2)`` (x, y)
    in cell-edge coordinates), by 8 x 8 sub-samples per cell."""
    from matplotlib.path import Path as MplPath

    sub = (np.arange(_SUB) + 0.5) / _SUB
    yy = (rows[:, None] + sub[None, :]).ravel()
    xx = (cols[:, None] + sub[None, :]).ravel()
    gx, gy = np.meshgrid(xx, yy)
    inside = MplPath(ring).contains_points(np.column_stack([gx.ravel(), gy.ravel()]))
    return inside.reshape(len(rows), _SUB, len(cols), _SUB).mean(axis=(1, 3))


def pool_polygons(
    core: np.ndarray, origin: tuple[int, int], rings: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`pool_discs` for polygons (vertices (x, y) in global cell-edge
    coordinates): each cell weighs by the share of its 8 x 8 sub-samples inside."""
    h, w, c = core.shape
    sums = np.zeros((len(rings), c), np.float64)
    areas = np.zeros(len(rings), np.float64)
    for i, ring in enumerate(rings):
        lx, ly = ring[:, 0] - origin[1], ring[:, 1] - origin[0]
        r0, r1 = max(0, math.floor(ly.min())), min(h, math.ceil(ly.max()))
        c0, c1 = max(0, math.floor(lx.min())), min(w, math.ceil(lx.max()))
        if r0 >= r1 or c0 >= c1:
            continue
        wgt = polygon_cover(np.arange(r0, r1), np.arange(c0, c1), np.column_stack([lx, ly]))
        sums[i] = np.einsum("yx,yxc->c", wgt, core[r0:r1, c0:c1], dtype=np.float64)
        areas[i] = wgt.sum()
    return sums, areas


def window_means(
    blocks: np.ndarray,
    origin_px: tuple[float, float],
    block_px: float,
    centres: np.ndarray,
    size_px: float,
) -> np.ndarray:
    """The mean of a block map ``(ny, nx, C)`` (block (0, 0) starts at ``origin_px`` (x, y),
    blocks ``block_px`` wide, uniform inside) over a ``size_px`` square around each centre,
    the part outside the map left out: ``(n, C)``."""
    s = _sat(blocks)
    h, w = blocks.shape[:2]
    cx = (centres[:, 0] - origin_px[0]) / block_px
    cy = (centres[:, 1] - origin_px[1]) / block_px
    half = size_px / block_px / 2
    y0, y1 = np.clip(cy - half, 0, h), np.clip(cy + half, 0, h)
    x0, x1 = np.clip(cx - half, 0, w), np.clip(cx + half, 0, w)
    sums = _bilinear(s, y1, x1) - _bilinear(s, y0, x1) - _bilinear(s, y1, x0) + _bilinear(s, y0, x0)
    area = np.maximum((y1 - y0) * (x1 - x0), 1e-12)
    return sums / area[:, None]


# --------------------------------------------------------------------------- the run


@dataclass
class _Level:
    """One level being pooled: its footprints, per map its boxes and tile ranges, and the
    units still open (whose footprints reach rows not yet done)."""

    name: str
    fp: Footprints
    boxes: list[np.ndarray]
    tiles: np.ndarray  # (n, 4) ty0, ty1, tx0, tx1 over all maps
    out: Any = None  # the partial memmap (float16 rows)
    open_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    acc: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    area: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))


def _tile_ranges(boxes: np.ndarray, k: int) -> np.ndarray:
    """Tiles (of ``k`` cells) each box touches: ``(n, 4)`` ty0, ty1, tx0, tx1 inclusive."""
    eps = 1e-9
    return np.stack(
        [
            np.floor(boxes[:, 0] / k),
            np.floor((boxes[:, 1] - eps) / k),
            np.floor(boxes[:, 2] / k),
            np.floor((boxes[:, 3] - eps) / k),
        ],
        1,
    ).astype(np.int64)


def plan_level(name: str, fp: Footprints, specs: list[MapSpec], tile_px: int) -> _Level:
    boxes = [fp.boxes(s) for s in specs]
    ranges = [_tile_ranges(b, tile_px // s.stride) for b, s in zip(boxes, specs, strict=True)]
    r = np.stack(ranges)
    tiles = np.stack(
        [r[:, :, 0].min(0), r[:, :, 1].max(0), r[:, :, 2].min(0), r[:, :, 3].max(0)], 1
    )
    return _Level(name, fp, boxes, tiles)


# Long: the row-streaming loop: per row open units, read tiles ahead in a thread, encode, pool each
# map into the open units, write finished ones; it mutates each plan's open_ids/acc/area and shares
# the thread pool, timers and progress bar across rows.
def run_slide(
    encoder: Any,
    image: Any,
    native_mpp: float,
    levels: dict[str, Footprints],
    cfg: DenseConfig,
    specs: list[MapSpec],
    outputs: dict[str, Any],
    *,
    start_row: int | None = None,
    on_row: Callable[[int], None] | None = None,
    progress: bool = False,
    desc: str = "",
) -> dict[str, float]:
    """Pool every level of one slide; rows of units are written into ``outputs[level]``
    (array-like ``(n, sum of map channels)``) as they finish. Rows of tiles before
    ``start_row`` (default: none) are taken as done (their units already written); ``on_row(r)`` is called
    after row ``r`` is written. Returns timing figures."""
    import torch
    from tqdm.auto import tqdm

    from magnet_st.features.encoders import Preprocess

    tp, mp = cfg.tile_px, cfg.margin_px
    widths = [s.channels for s in specs]
    cols = np.concatenate([[0], np.cumsum(widths)])
    plans = {lv: plan_level(lv, fp, specs, tp) for lv, fp in levels.items() if len(fp.centres)}
    for p in plans.values():
        p.out = outputs[p.name]
        p.acc = np.zeros((0, int(cols[-1])), np.float64)
        p.area = np.zeros((0, len(specs)), np.float64)
    if not plans:
        return {"tiles": 0, "seconds": 0.0, "megapixels": 0.0}
    lo = min(int(p.tiles[:, 0].min()) for p in plans.values())
    hi = max(int(p.tiles[:, 1].max()) for p in plans.values())
    scale = cfg.mpp / native_mpp  # native px per working px
    edge = tp + 2 * mp
    n_tiles, t_net, t0 = 0, 0.0, time.perf_counter()
    start_row = lo if start_row is None else start_row
    live = {lv: p.tiles[:, 1] >= start_row for lv, p in plans.items()}
    first = [int(p.tiles[live[lv], 0].min()) for lv, p in plans.items() if live[lv].any()]
    rows = range(min(first) if first else hi + 1, hi + 1)
    bar = tqdm(total=hi + 1 - lo, desc=desc or "dense rows", unit="row", disable=not progress)
    bar.update(max(0, min(start_row, hi + 1) - lo))
    indices = [s.index for s in specs]
    # the encoder's normalisation; tiles come at this size, so nothing is resampled
    normalise = Preprocess((edge, edge), encoder.mean, encoder.std, "bilinear")
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        for r in rows:
            # open the units whose footprints start in this row (and are not written yet)
            for lv, p in plans.items():
                new = np.nonzero((p.tiles[:, 0] == r) & live[lv])[0]
                p.open_ids = np.concatenate([p.open_ids, new])
                p.acc = np.concatenate([p.acc, np.zeros((len(new), p.acc.shape[1]))])
                p.area = np.concatenate([p.area, np.zeros((len(new), len(specs)))])
            spans = np.concatenate([p.tiles[p.open_ids][:, 2:4] for p in plans.values()])
            cols_needed: list[int] = []
            if len(spans):
                c0 = int(spans[:, 0].min())
                diff = np.zeros(int(spans[:, 1].max()) - c0 + 2, np.int64)
                np.add.at(diff, spans[:, 0] - c0, 1)
                np.add.at(diff, spans[:, 1] - c0 + 1, -1)
                cols_needed = [c0 + int(i) for i in np.nonzero(np.cumsum(diff)[:-1] > 0)[0]]

            def read(tx: int, r: int = r) -> np.ndarray:
                x0, y0 = tx * tp - mp, r * tp - mp  # working px of the tile's first pixel
                return image.read_region(
                    x0 * scale, y0 * scale, edge * scale, edge * scale, (edge, edge)
                )

            # the next tiles are read (decoded, resampled) in a thread while one is encoded
            pending = [pool.submit(read, tx) for tx in cols_needed[:LOOKAHEAD]]
            for j, tx in enumerate(cols_needed):
                rgb = pending[j].result()
                if j + LOOKAHEAD < len(cols_needed):
                    pending.append(pool.submit(read, cols_needed[j + LOOKAHEAD]))
                t1 = time.perf_counter()
                x = normalise(torch.from_numpy(np.ascontiguousarray(rgb))[None], encoder.device)
                with torch.inference_mode():
                    if encoder.precision == "bf16" and encoder.device.type in ("cuda", "cpu"):
                        with torch.autocast(encoder.device.type, dtype=torch.bfloat16):
                            maps = _forward_maps(encoder.model, x, indices)
                    else:
                        maps = _forward_maps(encoder.model, x, indices)
                    maps = [m[0].float().permute(1, 2, 0).cpu().numpy() for m in maps]
                t_net += time.perf_counter() - t1
                n_tiles += 1
                for p in plans.values():
                    t = p.tiles[p.open_ids]
                    sel = np.nonzero((t[:, 2] <= tx) & (t[:, 3] >= tx))[0]
                    if not len(sel):
                        continue
                    ids = p.open_ids[sel]
                    for m, (spec, fmap) in enumerate(zip(specs, maps, strict=True)):
                        k, skip = tp // spec.stride, mp // spec.stride
                        core = fmap[skip : skip + k, skip : skip + k]
                        if core.shape[:2] != (k, k):
                            raise ConfigError(
                                f"the encoder's stride-{spec.stride} map of a {edge} px tile has "
                                f"{fmap.shape[0]} x {fmap.shape[1]} cells, not {edge // spec.stride}"
                            )
                        origin = (r * k, tx * k)
                        if p.fp.shape == POLYGON:
                            rings = [p.fp.ring_cells(spec, int(i)) for i in ids]
                            sums, areas = pool_polygons(core, origin, rings)
                        elif p.fp.shape == DISC:
                            b = p.boxes[m][ids]
                            ctr = np.stack([(b[:, 0] + b[:, 1]) / 2, (b[:, 2] + b[:, 3]) / 2], 1)
                            sums, areas = pool_discs(core, origin, ctr, (b[:, 1] - b[:, 0]) / 2)
                        else:
                            sums, areas = pool_tile(core, origin, p.boxes[m][ids])
                        p.acc[sel, cols[m] : cols[m + 1]] += sums
                        p.area[sel, m] += areas
            for p in plans.values():
                done = p.tiles[p.open_ids, 1] <= r
                if done.any():
                    ids = p.open_ids[done]
                    area = np.repeat(np.maximum(p.area[done], 1e-12), widths, axis=1)
                    mean = p.acc[done] / area
                    order = np.argsort(ids)
                    p.out[ids[order]] = mean[order]
                    keep = ~done
                    p.open_ids, p.acc, p.area = p.open_ids[keep], p.acc[keep], p.area[keep]
            if on_row is not None and r >= start_row:
                on_row(r)
            if r >= start_row:
                bar.update(1)
    finally:
        pool.shutdown(cancel_futures=True)
    bar.close()
    secs = time.perf_counter() - t0
    return {
        "tiles": n_tiles,
        "seconds": secs,
        "network_seconds": t_net,
        "megapixels": n_tiles * edge * edge / 1e6,
    }


class _Rows:
    """Rows of a float16 memmap, columns ``[0, width)``, checked before they are stored."""

    def __init__(self, arr: Any, width: int, slide: str, level: str, check: bool = True):
        self.arr, self.width, self.slide, self.level, self.check = arr, width, slide, level, check

    def __setitem__(self, ids: np.ndarray, values: np.ndarray) -> None:
        from magnet_st.features.store import check_float16

        v = check_float16(values, self.slide, self.level) if self.check else values
        self.arr[ids, : self.width] = v


def footprints(ds: Any, slide: str, level: str, mpp: float) -> Footprints:
    """A level's units as footprints in working pixels at ``mpp``: bins are squares of the
    unit size (discs for Visium and ST spots, their outlines for cells), spot and region
    tiles squares of their size."""
    from magnet_st.prepare.config import SQUARE_BINS

    meta = ds.slide_meta(slide)
    native = float(meta["microns_per_pixel"])
    centres = ds.positions_px(slide, level) * (native / mpp)
    polys = ds.polygons(slide) if level == "bin" else None
    if polys is not None:
        polys = polys.scaled(native / mpp)
        owner = np.repeat(np.arange(len(polys)), np.diff(polys.offsets))
        reach = np.abs(polys.xy - centres[owner]).max(axis=1)
        half = np.zeros(len(polys))
        np.maximum.at(half, owner, reach)
        return Footprints(centres, half, POLYGON, polys)
    if level == "bin":
        size_um = float(meta["unit_size_um"])
        shape = SQUARE if meta.get("technology") in SQUARE_BINS else DISC
    else:
        size_um, shape = float(ds.patch_um(level)), SQUARE
    half = np.full(len(centres), size_um / 2 / mpp)
    return Footprints(centres, half, shape)


def block_grid(
    centres: np.ndarray, reach_px: float, block_px: float
) -> tuple[np.ndarray, tuple[float, float], tuple[int, int]]:
    """A grid of ``block_px`` blocks covering ``centres`` +- ``reach_px``: block centres
    ``(ny * nx, 2)`` (x, y) row-major, the grid's origin (x, y) and shape (ny, nx)."""
    lo = np.floor((centres.min(0) - reach_px) / block_px) * block_px
    hi = centres.max(0) + reach_px
    nx, ny = (int(v) for v in np.ceil((hi - lo) / block_px))
    xs = lo[0] + (np.arange(nx) + 0.5) * block_px
    ys = lo[1] + (np.arange(ny) + 0.5) * block_px
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx.ravel(), gy.ravel()], 1), (float(lo[0]), float(lo[1])), (ny, nx)


def block_names(specs: list[MapSpec], windows_um: Sequence[float]) -> list[list[Any]]:
    """The parts of a bin row: each map over the unit, then each map over each window."""
    own = [[f"s{s.stride}", s.channels] for s in specs]
    return own + [[f"s{s.stride}@{w:g}um", s.channels] for w in windows_um for s in specs]


def save_json(path: Path, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=1))


# Long: resume state (fingerprint, per-level partial memmaps, the block map) is opened, filled by
# run_slide through on_row(), then windows come from the block map and each level's record is
# written; the `arrays` dict ties the three together.
def extract_slide(
    encoder: Any,
    ds: Any,
    root: Path,
    slide: str,
    jobs: dict[str, Any],
    cfg: DenseConfig,
    specs: list[MapSpec],
    progress: bool = True,
) -> list[dict]:
    """Dense features of the levels ``jobs`` (level -> ``features._Job``) of one slide,
    written as the per-unit path writes them (``<level>.npy`` + ``<level>.json``);
    resumable by rows of tiles (``dense.progress.json``)."""
    from numpy.lib.format import open_memmap

    from magnet_st.features.jobs import _record
    from magnet_st.features.store import _level_paths, _read_json, check_float16

    t0 = time.perf_counter()
    base = sum(s.channels for s in specs)
    windows = cfg.windows_um if "bin" in jobs else ()
    dims = {lv: base * (1 + len(windows)) if lv == "bin" else base for lv in jobs}
    paths = {lv: _level_paths(root, job) for lv, job in jobs.items()}
    d = root / slide
    d.mkdir(parents=True, exist_ok=True)
    prog_path = d / "dense.progress.json"
    fingerprint = hashlib.sha256(
        json.dumps([cfg.describe(), sorted((lv, j.fingerprint) for lv, j in jobs.items())]).encode()
    ).hexdigest()[:32]
    prog = _read_json(prog_path) or {}
    resume = prog.get("fingerprint") == fingerprint
    native = float(ds.slide_meta(slide)["microns_per_pixel"])
    levels = {lv: footprints(ds, slide, lv, cfg.mpp) for lv in jobs}
    outs, arrays = {}, {}
    for lv, job in jobs.items():
        shape = (job.n, dims[lv])
        part = paths[lv]["partial"]
        ok = resume and part.is_file() and np.load(part, mmap_mode="r").shape == shape
        arrays[lv] = open_memmap(part, mode="r+") if ok else new_memmap(part, np.float16, shape)
        outs[lv] = _Rows(arrays[lv], base, slide, lv)
    block_file = d / "dense.blocks.partial.npy"
    grid = None
    # the windows' block map: from the units' pass, or from a second pass at window_mpp
    wmpp = cfg.window_mpp if cfg.separate_windows else cfg.mpp
    wcfg = replace(cfg, mpp=wmpp)
    blocks: dict[str, Footprints] = {}
    if windows and len(levels["bin"].centres):
        bpx = cfg.block_um / wmpp
        reach = max(windows) / wmpp / 2
        bin_ctr = levels["bin"].centres * (cfg.mpp / wmpp)
        ctr, origin, shape2 = block_grid(bin_ctr, reach, bpx)
        grid = (origin, shape2, bpx, bin_ctr)
        blocks["_blocks"] = Footprints(ctr, np.full(len(ctr), bpx / 2), SQUARE)
        ok = resume and block_file.is_file()
        ok = ok and np.load(block_file, mmap_mode="r").shape == (len(ctr), base)
        arrays["_blocks"] = (
            open_memmap(block_file, mode="r+")
            if ok
            else new_memmap(block_file, np.float32, (len(ctr), base))
        )
        outs["_blocks"] = _Rows(arrays["_blocks"], base, slide, "blocks", check=False)
    stage = prog.get("stage", "units") if resume else "units"
    start = prog.get("next_row") if resume else None

    def on_row(stage: str) -> Callable[[int], None]:
        def save(r: int) -> None:
            for a in arrays.values():
                a.flush()
            save_json(prog_path, {"fingerprint": fingerprint, "stage": stage, "next_row": r + 1})

        return save

    image = ds.image(slide)
    passes = [("units", cfg, levels if cfg.separate_windows else {**levels, **blocks})]
    if cfg.separate_windows and blocks:
        passes.append(("blocks", wcfg, blocks))
    stats: dict[str, float] = {"tiles": 0, "seconds": 0.0, "network_seconds": 0.0, "megapixels": 0}
    todo = [p[0] for p in passes]
    for name, pcfg, plevels in passes[todo.index(stage) if stage in todo else 0 :]:
        got = run_slide(
            encoder,
            image,
            native,
            plevels,
            pcfg,
            specs,
            outs,
            start_row=start if name == stage else None,
            on_row=on_row(name),
            progress=progress,
            desc=f"{slide} dense" + (f" windows at {pcfg.mpp:g} um/px" if name == "blocks" else ""),
        )
        stats = {k: stats[k] + got.get(k, 0) for k in stats}
        if name == "units" and len(passes) > 1:  # the units are written: resume at the windows
            for a in arrays.values():
                a.flush()
            save_json(prog_path, {"fingerprint": fingerprint, "stage": "blocks", "next_row": None})
    if grid is not None:
        origin, (ny, nx), bpx, ctr = grid
        bmap = np.asarray(arrays["_blocks"]).reshape(ny, nx, base)
        for a in range(0, len(ctr), 65536):
            parts = [window_means(bmap, origin, bpx, ctr[a : a + 65536], w / wmpp) for w in windows]
            arrays["bin"][a : a + 65536, base:] = check_float16(
                np.concatenate(parts, 1), slide, "bin"
            )
    secs = time.perf_counter() - t0
    results = []
    for lv, job in jobs.items():
        arrays[lv].flush()
        rec = _record(encoder, job, secs)
        rec.update(feature_dim=dims[lv], dense=cfg.describe())
        write_text(paths[lv]["record"], json.dumps(rec, indent=1))
        del outs[lv]
        os.replace(paths[lv]["partial"], paths[lv]["npy"])
        results.append(
            {
                "slide": slide,
                "level": lv,
                "rows": job.n,
                "status": "resumed" if start is not None else "done",
                "processed_rows": job.n,
                "seconds": secs,
                "tiles_per_s": job.n / secs if secs > 0 else float("nan"),
                "dense": stats,
            }
        )
    arrays.clear()
    block_file.unlink(missing_ok=True)
    prog_path.unlink(missing_ok=True)
    log.info(
        "%s: %d tiles (%.0f Mpx) in %.1f s, network %.1f s",
        slide,
        stats["tiles"],
        stats.get("megapixels", 0),
        secs,
        stats.get("network_seconds", 0),
    )
    return results
