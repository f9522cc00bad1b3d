"""Cell outlines from GeoJSON, as Space Ranger 4, QuPath, StarDist and Cellpose exports
write them.

Accepted: a ``FeatureCollection``, a bare list of features (QuPath's "Export objects"
without the collection), or a single ``Feature``. Each feature's geometry is a
``Polygon`` (its exterior ring; holes are ignored) or a ``MultiPolygon`` (the exterior of
its largest part, as Space Ranger keeps the largest piece of a cell). Coordinates are
``[x, y]`` pixels of the full-resolution image. QuPath annotations
(``properties.objectType == "annotation"``: tissue outlines, regions drawn by hand) are
skipped; detections and cells are kept.

Ids, first found: ``properties.cell_id`` (Space Ranger), the feature's ``id`` (QuPath),
``properties.id`` or ``properties.name``, else the feature's 1-based position in the file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from magnet_st.data.shapes import Polygons
from magnet_st.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["read_geojson"]


def _features(doc: Any, path: Path) -> list:
    if isinstance(doc, list):
        return doc
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        feats = doc.get("features")
        if not isinstance(feats, list):
            raise InputError(path, "a FeatureCollection without a 'features' list")
        return feats
    if isinstance(doc, dict) and doc.get("type") == "Feature":
        return [doc]
    raise InputError(path, "not a GeoJSON FeatureCollection, Feature or list of features")


def _ring(geom: Any, path: Path, k: int) -> np.ndarray:
    if not isinstance(geom, dict):
        raise InputError(path, f"feature {k}: no geometry")
    kind, coords = geom.get("type"), geom.get("coordinates")
    try:
        if kind == "Polygon":
            ring = np.asarray(coords[0], dtype=np.float64)
        elif kind == "MultiPolygon":
            rings = [np.asarray(p[0], dtype=np.float64) for p in coords]
            ring = max(rings, key=lambda r: abs(Polygons.from_rings([r]).areas()[0]))
        else:
            raise InputError(path, f"feature {k}: geometry {kind!r} is not a Polygon")
    except (TypeError, IndexError, ValueError) as exc:
        raise InputError(path, f"feature {k}: malformed {kind} coordinates ({exc})") from exc
    if ring.ndim != 2 or ring.shape[1] < 2 or len(ring) < 3:
        raise InputError(path, f"feature {k}: a polygon needs at least 3 [x, y] vertices")
    if not np.all(np.isfinite(ring[:, :2])):
        raise InputError(path, f"feature {k}: coordinates contain NaN or inf")
    return ring[:, :2]


def _id(feat: dict, k: int) -> Any:
    props = feat.get("properties") or {}
    for value in (props.get("cell_id"), feat.get("id"), props.get("id"), props.get("name")):
        if value is not None and value != "":
            return value
    return k + 1


def read_geojson(path: str | Path) -> tuple[np.ndarray, Polygons]:
    """``(ids, polygons)`` of the cells in a GeoJSON file (see the module docstring).

    ``ids`` is an int64 array when every id is an integer, else strings.

    Raises:
        InputError: not JSON, not GeoJSON, a feature that is not a polygon, no cells, or
            ids that repeat.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "segmentation file not found")
    try:
        with open(path, "rb") as fh:
            doc = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"not valid JSON ({exc})") from exc
    feats = _features(doc, path)
    ids, rings, skipped = [], [], 0
    for k, feat in enumerate(feats):
        if not isinstance(feat, dict):
            raise InputError(path, f"feature {k}: not a JSON object")
        if (feat.get("properties") or {}).get("objectType") == "annotation":
            skipped += 1
            continue
        rings.append(_ring(feat.get("geometry"), path, k))
        ids.append(_id(feat, k))
    if skipped:
        log.info("%s: skipped %d QuPath annotations (kept %d cells)", path, skipped, len(rings))
    if not rings:
        raise InputError(path, "no cell polygons in the file")
    if all(isinstance(i, int | np.integer) and not isinstance(i, bool) for i in ids):
        arr = np.asarray(ids, dtype=np.int64)
    else:
        arr = np.asarray([str(i) for i in ids], dtype=object)
    uniq, counts = np.unique(arr.astype(str), return_counts=True)
    if (counts > 1).any():
        raise InputError(path, f"cell id {str(uniq[counts > 1][0])!r} appears {counts.max()} times")
    return arr, Polygons.from_rings(rings)
