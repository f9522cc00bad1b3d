"""OME-NGFF multiscale images in zarr v2 / v3 stores (SpatialData image elements)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from magnet_st.errors import InputError
from magnet_st.io.image.base import (
    _WHITE,
    SlideImage,
    _composite,
    _plausible_mpp,
    _short,
    _to_uint8,
)

# --------------------------------------------------------------------------- OME-NGFF

ZARR_MAX_CHUNK_BYTES = 64 * 2**20
"""Zarr chunks up to this decoded RGB size are cached whole; larger ones are read in windows."""

ZARR_WINDOW_PX = 2048
"""Edge of the windows read from arrays whose chunks are larger than ``ZARR_MAX_CHUNK_BYTES``."""

_NGFF_UNITS = {"micrometer": 1.0, "micron": 1.0, "um": 1.0, "µm": 1.0, "nanometer": 1e-3}
_NGFF_UNITS.update({"nm": 1e-3, "millimeter": 1e3, "mm": 1e3})


def ngff_multiscale(attrs: dict[str, Any]) -> dict[str, Any] | None:
    """The first ``multiscales`` entry of an OME-NGFF group's attributes, else ``None``.

    NGFF 0.4 (zarr v2) keeps it at the top of the attributes, 0.5 (zarr v3) under ``"ome"``.
    """
    ome = attrs.get("ome")
    ms = (ome if isinstance(ome, dict) else {}).get("multiscales") or attrs.get("multiscales")
    return ms[0] if isinstance(ms, list) and ms and isinstance(ms[0], dict) else None


def _is_zarr_group(path: Path) -> bool:
    return any((path / name).is_file() for name in ("zarr.json", ".zgroup", ".zattrs"))


def _ngff_mpp(ms: dict[str, Any], axes: tuple[str, ...]) -> float | None:
    """Microns per pixel of level 0 from its ``scale`` transformation and the x axis' unit."""
    ix = axes.index("x")
    meta = ms.get("axes") or []
    x_axis = meta[ix] if ix < len(meta) else None
    unit = x_axis.get("unit") if isinstance(x_axis, dict) else None
    factor = _NGFF_UNITS.get(str(unit).lower()) if unit else None
    for t in ms["datasets"][0].get("coordinateTransformations", []) or []:
        if isinstance(t, dict) and t.get("type") == "scale" and factor:
            try:
                return _plausible_mpp(float(t["scale"][ix]) * factor)
            except (KeyError, IndexError, TypeError, ValueError):
                return None
    return None


def _channels_to_rgb(a: np.ndarray) -> np.ndarray:
    """``(h, w, channels)`` uint8 -> RGB: gray repeated, alpha (2nd or 4th) over white."""
    n = a.shape[-1]
    if n == 1:
        return np.repeat(a, 3, axis=-1)
    if n == 2:
        return _composite(np.repeat(a[..., :1], 3, axis=-1), a[..., 1:2])
    if n == 4:
        return _composite(a[..., :3], a[..., 3:4])
    return a[..., :3]


class _ZarrImage(SlideImage):
    """An OME-NGFF multiscale image group (zarr v2 or v3), e.g. an image element of a
    SpatialData store: its datasets are the pyramid levels, axes ``c, y, x`` (or ``y, x``).

    Reads go by chunk (or by ``ZARR_WINDOW_PX`` windows for very large chunks) through the
    decoded-tile cache, as tiles do for TIFF.
    """

    backend = "zarr"

    def _exists(self) -> bool:
        return self.path.is_dir()

    def _reset_handles(self) -> None:
        self._arrays: list[Any] = []
        self._axes: tuple[str, ...] = ()
        self._segs: list[tuple[int, int]] = []

    def _open(self) -> tuple[list[tuple[int, int]], None, float | None]:
        import zarr

        try:
            group = zarr.open_group(str(self.path), mode="r")
            ms = ngff_multiscale(group.attrs.asdict())
            if ms is None or not ms.get("datasets"):
                raise InputError(
                    self.path,
                    "not an OME-NGFF image: no 'multiscales' with datasets in its attributes",
                )
            arrays = [group[str(d["path"])] for d in ms["datasets"]]
        except InputError:
            raise
        except Exception as exc:  # zarr raises many types for missing or corrupt groups
            raise InputError(
                self.path, f"cannot open as an OME-NGFF image ({_short(exc)})"
            ) from exc
        ndim = arrays[0].ndim
        names = [a.get("name") if isinstance(a, dict) else a for a in ms.get("axes", [])]
        axes = tuple(str(a) for a in names) or (("c", "y", "x") if ndim == 3 else ("y", "x"))
        if len(axes) != ndim or "x" not in axes or "y" not in axes:
            raise InputError(
                self.path, f"axes {list(axes)} do not fit {ndim}-d arrays with y and x"
            )
        for a in arrays:
            extra = [n for ax, n in zip(axes, a.shape, strict=False) if ax not in "cyx" and n != 1]
            if a.ndim != ndim or extra:
                raise InputError(
                    self.path, f"only 2-D images are read; axes {list(axes)}, shape {a.shape}"
                )
        iy, ix = axes.index("y"), axes.index("x")
        segs = []
        for a in arrays:
            ch, cw = a.chunks[iy], a.chunks[ix]
            if ch * cw * 3 > ZARR_MAX_CHUNK_BYTES:
                ch = cw = ZARR_WINDOW_PX
            segs.append((min(ch, a.shape[iy]), min(cw, a.shape[ix])))
        self._arrays, self._axes, self._segs = arrays, axes, segs
        return [(a.shape[ix], a.shape[iy]) for a in arrays], None, _ngff_mpp(ms, axes)

    def _close_handles(self) -> None:
        pass

    def _read_level(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), _WHITE, np.uint8)
        lw, lh = self.level_dimensions[level]
        ix0, iy0 = max(x0, 0), max(y0, 0)
        ix1, iy1 = min(x0 + w, lw), min(y0 + h, lh)
        sh, sw = self._segs[level]
        for ty in range(iy0 // sh, (iy1 - 1) // sh + 1) if ix0 < ix1 and iy0 < iy1 else ():
            ty0 = ty * sh
            ry0, ry1 = max(iy0, ty0), min(iy1, ty0 + sh)
            for tx in range(ix0 // sw, (ix1 - 1) // sw + 1):
                tx0 = tx * sw
                rx0, rx1 = max(ix0, tx0), min(ix1, tx0 + sw)
                seg = self._segment(level, ty, tx)
                out[ry0 - y0 : ry1 - y0, rx0 - x0 : rx1 - x0] = seg[
                    ry0 - ty0 : ry1 - ty0, rx0 - tx0 : rx1 - tx0
                ]
        return out

    def _segment(self, level: int, ty: int, tx: int) -> np.ndarray:
        """Chunk (or window) ``(ty, tx)`` of ``level`` as RGB, full segment size, from the cache."""
        key = (level, ty, tx)
        with self._lock:
            seg = self._cache.get(key)
        if seg is not None:
            return seg
        sh, sw = self._segs[level]
        rows, cols = slice(ty * sh, (ty + 1) * sh), slice(tx * sw, (tx + 1) * sw)
        pick = {"y": rows, "x": cols, "c": slice(None)}
        try:
            raw = np.asarray(self._arrays[level][tuple(pick.get(ax, 0) for ax in self._axes)])
        except Exception as exc:  # codecs and stores raise many types for corrupt chunks
            raise InputError(self.path, f"cannot read level {level}: {_short(exc)}") from exc
        kept = [ax for ax in self._axes if ax in pick]
        raw = raw.transpose([kept.index(ax) for ax in ("y", "x", "c") if ax in kept])
        rgb = _channels_to_rgb(_to_uint8(raw if raw.ndim == 3 else raw[..., None]))
        seg = np.full((sh, sw, 3), _WHITE, np.uint8)
        seg[: rgb.shape[0], : rgb.shape[1]] = rgb
        with self._lock:
            self._cache.put(key, seg)
        return seg
