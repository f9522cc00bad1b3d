"""Image resolution from the known centre-to-centre pitch of a spot array."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from magnet_st.errors import InputError


def mpp_from_pitch(centers_px: np.ndarray, pitch_um: float, source: str | Path) -> float:
    """Microns per pixel such that the median nearest-neighbour distance equals ``pitch_um``.

    Used where a format stores no resolution: legacy ST (200 um pitch) and
    standard Visium (100 um pitch).
    """
    pts = np.asarray(centers_px, dtype=np.float64)
    if len(pts) < 2:
        raise InputError(
            source, "fewer than 2 spots: cannot derive microns per pixel from the spot pitch"
        )
    dist, _ = cKDTree(pts).query(pts, k=2)
    nn = float(np.median(dist[:, 1]))
    if not np.isfinite(nn) or nn <= 0:
        raise InputError(source, "spot positions coincide: cannot derive microns per pixel")
    return pitch_um / nn
