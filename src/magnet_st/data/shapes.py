"""Polygons of cells (or any units with an outline), stored flat: the geometry the cell
level needs, with no file format and no model.

A :class:`Polygons` holds ``n`` simple polygons (one exterior ring each, no holes) as one
``(m, 2)`` array of ``[x, y]`` vertices in full-resolution image pixels, and ``n + 1``
offsets: polygon ``i`` is ``xy[offsets[i]:offsets[i + 1]]``. Flat arrays scale to the
~300k cells of a capture area, save to HDF5 / npz as they are, and slice cheaply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Polygons", "assign_points"]


@dataclass(frozen=True)
class Polygons:
    """``n`` polygons: ``xy`` ``(m, 2)`` float64 vertices, ``offsets`` ``(n + 1,)`` int64."""

    xy: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_rings(cls, rings: Sequence[np.ndarray]) -> Polygons:
        """From one ``(k, 2)`` array per polygon; a closing vertex equal to the first is
        dropped (GeoJSON repeats it)."""
        parts = []
        for r in rings:
            r = np.asarray(r, dtype=np.float64).reshape(-1, 2)
            if len(r) > 1 and np.array_equal(r[0], r[-1]):
                r = r[:-1]
            parts.append(r)
        sizes = np.array([len(p) for p in parts], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        xy = np.concatenate(parts) if parts else np.zeros((0, 2))
        return cls(xy=xy, offsets=offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def ring(self, i: int) -> np.ndarray:
        """Polygon ``i``'s vertices ``(k, 2)`` (not closed)."""
        return self.xy[self.offsets[i] : self.offsets[i + 1]]

    def subset(self, index: np.ndarray) -> Polygons:
        """The polygons at ``index``, in that order."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        sizes = np.diff(self.offsets)[index]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        # each kept vertex: its polygon's first vertex plus its position within the polygon
        within = np.arange(int(offsets[-1])) - np.repeat(offsets[:-1], sizes)
        return Polygons(xy=self.xy[np.repeat(self.offsets[index], sizes) + within], offsets=offsets)

    def scaled(self, factor: float) -> Polygons:
        """Every vertex times ``factor`` (another image's pixels)."""
        return Polygons(xy=self.xy * float(factor), offsets=self.offsets)

    def _shoelace(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Signed area and the area-weighted centroid sums per polygon (vectorised)."""
        n = len(self)
        owner = np.repeat(np.arange(n), np.diff(self.offsets))
        nxt = np.arange(len(self.xy)) + 1
        ends = self.offsets[1:] - 1
        nxt[ends] = self.offsets[:-1]  # each ring closes on its first vertex
        x0, y0 = self.xy[:, 0], self.xy[:, 1]
        x1, y1 = self.xy[nxt, 0], self.xy[nxt, 1]
        cross = x0 * y1 - x1 * y0
        a = np.bincount(owner, cross, minlength=n) / 2.0
        cx = np.bincount(owner, (x0 + x1) * cross, minlength=n)
        cy = np.bincount(owner, (y0 + y1) * cross, minlength=n)
        return a, cx, cy

    def areas(self) -> np.ndarray:
        """Area of each polygon, px^2 (either winding)."""
        return np.abs(self._shoelace()[0])

    def median_diameter(self) -> float:
        """The diameter of a disc of the median polygon's area, px: a cell's "unit size"."""
        return float(2.0 * np.sqrt(np.median(self.areas()) / np.pi))

    def centroids(self) -> np.ndarray:
        """``(n, 2)`` area centroids ``[x, y]``, px (the vertex mean for a degenerate one)."""
        a, cx, cy = self._shoelace()
        out = np.empty((len(self), 2))
        ok = np.abs(a) > 1e-12
        out[ok, 0] = cx[ok] / (6.0 * a[ok])
        out[ok, 1] = cy[ok] / (6.0 * a[ok])
        for i in np.flatnonzero(~ok):
            out[i] = self.ring(int(i)).mean(axis=0)
        return out

    def bounds(self) -> np.ndarray:
        """``(n, 4)`` ``[xmin, ymin, xmax, ymax]``, px."""
        owner = np.repeat(np.arange(len(self)), np.diff(self.offsets))
        lo = np.full((len(self), 2), np.inf)
        hi = np.full((len(self), 2), -np.inf)
        for col in (0, 1):
            np.minimum.at(lo[:, col], owner, self.xy[:, col])
            np.maximum.at(hi[:, col], owner, self.xy[:, col])
        return np.concatenate([lo, hi], axis=1)


def assign_points(polygons: Polygons, points: np.ndarray) -> np.ndarray:
    """For each point ``[x, y]`` (px), the index of the polygon that holds it, or -1.

    bin2cell's rule for 2 um bins and a segmentation: a bin goes to the cell whose outline
    holds its centre. Where outlines overlap, the polygon whose centroid is nearest wins.
    Each polygon tests only the points within its bounding circle (a k-d tree), so the
    work grows with the points near each polygon, not with all pairs.
    """
    from matplotlib.path import Path as MplPath
    from scipy.spatial import cKDTree

    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    out = np.full(len(points), -1, dtype=np.int64)
    if len(polygons) == 0 or len(points) == 0:
        return out
    best = np.full(len(points), np.inf)
    tree = cKDTree(points)
    cents = polygons.centroids()
    for i in range(len(polygons)):
        ring = polygons.ring(i)
        if len(ring) < 3:
            continue
        radius = float(np.sqrt(((ring - cents[i]) ** 2).sum(axis=1).max()))
        near = np.asarray(tree.query_ball_point(cents[i], radius + 1e-9), dtype=np.int64)
        if near.size == 0:
            continue
        inside = near[MplPath(ring).contains_points(points[near])]
        d = ((points[inside] - cents[i]) ** 2).sum(axis=1)
        win = d < best[inside]
        out[inside[win]] = i
        best[inside[win]] = d[win]
    return out
