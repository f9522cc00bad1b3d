"""Cells as QuPath objects: a GeoJSON FeatureCollection that QuPath imports (File > Import
objects, or drag and drop) as detections whose measurements are the predicted genes, so
that Measure > Show measurement maps colours the cells by any gene.

Each cell is one Feature (RFC 7946): a Polygon (its outline, a closed ring, in the
full-resolution image's pixels, as QuPath's own exports), ``properties.objectType``
``"detection"`` (QuPath draws measurement maps from detections, not annotations),
``properties.name`` the cell's barcode and ``properties.measurements`` a map of gene ->
value (QuPath 0.4 and later; missing values are written as ``null``, since JSON has no NaN).
An optional ``classification`` (a name per cell, e.g. a cluster) becomes QuPath's class,
with a colour per name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from magnet_st.util.atomic import atomic_path


class Outlines(Protocol):
    """What the writer needs of the outlines (:class:`magnet_st.data.shapes.Polygons`)."""

    def __len__(self) -> int: ...

    def ring(self, i: int) -> np.ndarray: ...


__all__ = ["qupath_features", "write_qupath_geojson"]

_COLOURS = [
    [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
    [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207],
]  # fmt: skip


def _value(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def qupath_features(
    polygons: Outlines,
    names: Sequence[str],
    values: np.ndarray,
    genes: Sequence[str],
    classification: Sequence[str] | None = None,
) -> list[dict]:
    """The Features of :func:`write_qupath_geojson`, one per polygon."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (len(polygons), len(genes)) or len(names) != len(polygons):
        raise ValueError(
            f"{len(polygons)} outlines, {len(names)} names and values of shape {values.shape} "
            f"for {len(genes)} genes do not agree"
        )
    colour = {}
    if classification is not None:
        for k, c in enumerate(dict.fromkeys(classification)):
            colour[c] = _COLOURS[k % len(_COLOURS)]
    genes = [str(g) for g in genes]
    feats = []
    for i in range(len(polygons)):
        ring = polygons.ring(i)
        closed = np.vstack([ring, ring[:1]]).round(2).tolist()
        props: dict = {
            "objectType": "detection",
            "name": str(names[i]),
            "measurements": {g: _value(v) for g, v in zip(genes, values[i], strict=True)},
        }
        if classification is not None:
            c = str(classification[i])
            props["classification"] = {"name": c, "color": colour[classification[i]]}
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [closed]},
                "properties": props,
            }
        )
    return feats


def write_qupath_geojson(
    path: str | Path,
    polygons: Outlines,
    names: Sequence[str],
    values: np.ndarray,
    genes: Sequence[str],
    classification: Sequence[str] | None = None,
) -> Path:
    """Write cells as QuPath detections (see the module docstring); atomic: a failed write
    leaves nothing at ``path``."""
    doc = {
        "type": "FeatureCollection",
        "features": qupath_features(polygons, names, values, genes, classification),
    }
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        json.dump(doc, fh, allow_nan=False, separators=(",", ":"))
    return path
