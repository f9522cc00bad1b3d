"""Bins rasterised onto an image grid, so a map of ~660k bins draws with imshow."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

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
