"""geometry: the tile grid of a slide (its frame, each unit's tile), membership matrices."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from magnet_st.data.slide import Slide
from magnet_st.errors import InputError

log = logging.getLogger(__name__)


# -- geometry ------------------------------------------------------------------------------


@dataclass
class Grid:
    """A non-overlapping square grid over a slide, and the tiles that hold units."""

    tile_um: float
    unit_tile: np.ndarray  # (n_units,) index of each unit's tile
    tile_rc: np.ndarray  # (n_tiles, 2) grid row, column of each tile
    tile_centers_px: np.ndarray  # (n_tiles, 2) x, y in full-resolution pixels


def grid_frame(slide: Slide) -> tuple[np.ndarray, np.ndarray]:
    """Unit positions ``(u, v)`` in microns in the frame the grids are laid in, and the
    affine map ``A`` (3 x 2) from ``[u, v, 1]`` to full-resolution pixels ``(x, y)``.

    Visium HD: Space Ranger's bin grid, ``u = (array_col + 1/2) * bin``, so tile edges
    fall on bin edges. Otherwise: microns from the corner of the units' bounding box.
    """
    if slide.technology == "visium_hd" and slide.array_coords is not None:
        rc = slide.array_coords.astype(np.float64)
        uv = (rc[:, ::-1] + 0.5) * slide.unit_size_um
        design = np.column_stack([uv, np.ones(len(uv))])
        A, *_ = np.linalg.lstsq(design, slide.centers_px, rcond=None)
        resid = np.abs(design @ A - slide.centers_px).max()
        if resid > 0.5 * slide.unit_size_um / slide.microns_per_pixel:
            raise InputError(
                slide.sources.get("positions"),
                f"bin positions do not follow the array grid (off by up to {resid:.1f} px)",
            )
        return uv, A
    um = slide.centers_um
    origin = um.min(axis=0) - slide.unit_size_um / 2
    uv = um - origin
    mpp = slide.microns_per_pixel
    A = np.array([[1 / mpp, 0.0], [0.0, 1 / mpp], origin / mpp])
    return uv, A


def assign_grid(uv: np.ndarray, A: np.ndarray, tile_um: float) -> Grid:
    """Put every unit in the tile that contains its centre; keep tiles with members."""
    # the epsilon keeps centres that sit exactly on an edge (exact multiples) stable
    cell = np.floor(uv / tile_um + 1e-9).astype(np.int64)
    cell_rc = cell[:, ::-1]
    tiles, unit_tile = np.unique(cell_rc, axis=0, return_inverse=True)
    centers_uv = (tiles[:, ::-1] + 0.5) * tile_um
    centers_px = np.column_stack([centers_uv, np.ones(len(tiles))]) @ A
    return Grid(tile_um, unit_tile.ravel(), tiles, centers_px)


def membership_matrix(index: np.ndarray, n_groups: int) -> sp.csr_matrix:
    """Sparse ``n_groups x n`` indicator: row g has ones at the members of group g."""
    n = len(index)
    return sp.csr_matrix((np.ones(n, np.int32), (index, np.arange(n))), shape=(n_groups, n))
