"""TIFF / BigTIFF images (tifffile): tiled pages through the tile cache, stripped pages
memory-mapped or decoded once."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from magnet_st.errors import InputError
from magnet_st.io.image.base import (
    _JPEG_COMPRESSIONS,
    _WHITE,
    WHOLE_PAGE_BYTES,
    SlideImage,
    _composite,
    _crop_padded,
    _plausible_mpp,
    _spill,
    _to_uint8,
)

# --------------------------------------------------------------------------- TIFF


class _TiffLevel:
    """One pyramid level of a TIFF: its page and how to get its pixels."""

    def __init__(self, page: Any, path: Path):
        self.page = page
        self.width = int(page.imagewidth)
        self.height = int(page.imagelength)
        shaped = page.shaped  # (separate samples, depth, length, width, contig samples)
        if shaped[1] != 1:
            raise ValueError("volumetric (ImageDepth > 1) TIFF pages are not supported")
        self.planes = int(shaped[0])
        self.samples = int(shaped[0] * shaped[4])
        self.photometric = int(page.photometric)
        self.compression = int(page.compression)
        self.bits = int(page.bitspersample)
        self.extrasamples = tuple(int(e) for e in (page.extrasamples or ()))
        self.colormap = page.colormap if self.photometric == 3 else None
        self.jpegtables = page.jpegtables
        self.jpegheader = getattr(page, "jpegheader", None)
        if page.is_tiled:
            self.kind = "tile"
            self.seg_w, self.seg_h = int(page.tilewidth), int(page.tilelength)
        else:
            self.kind = "strip"
            self.seg_w, self.seg_h = self.width, min(int(page.rowsperstrip), self.height)
        self.n_across = math.ceil(self.width / self.seg_w)
        self.n_down = math.ceil(self.height / self.seg_h)
        self.per_plane = self.n_across * self.n_down
        self.offsets = page.dataoffsets
        self.bytecounts = page.databytecounts
        if len(self.offsets) < self.per_plane * self.planes:
            raise ValueError(
                f"{len(self.offsets)} {self.kind}s for a {self.width} x {self.height} px page"
            )
        # raises for unsupported compression, pixel type or subsampling
        page.decode(None, 0, jpegtables=self.jpegtables)
        self.array: np.ndarray | None = None  # memory map or whole decoded page
        self.mode = "segments"
        if self.kind == "strip":
            if (
                page.is_memmappable
                and page.dtype == np.uint8
                and self.bits == 8
                and self.planes == 1
            ):
                self.mode = "memmap"
                self.array = np.memmap(
                    path,
                    dtype=np.uint8,
                    mode="r",
                    offset=int(self.offsets[0]),
                    shape=(self.height, self.width, self.samples),
                )
            elif self.width * self.height * 3 <= WHOLE_PAGE_BYTES:
                self.mode = "whole"

    @property
    def segment_bytes(self) -> int:
        return self.seg_w * self.seg_h * 3

    def to_rgb(self, a: np.ndarray) -> np.ndarray:
        """Raw ``(h, w, samples)`` pixels of this page -> RGB uint8 ``(h, w, 3)``."""
        if self.photometric == 3 and self.colormap is not None:  # palette
            cmap = _to_uint8(np.asarray(self.colormap).T, 16 if self.colormap.max() > 255 else 8)
            return cmap[np.clip(a[..., 0].astype(np.intp), 0, len(cmap) - 1)]
        a = _to_uint8(a, self.bits)
        s = a.shape[-1]
        alpha = None
        premultiplied = False
        n_color = 1 if self.photometric in (0, 1) else (4 if self.photometric == 5 else 3)
        if s > n_color and self.extrasamples and self.extrasamples[0] in (1, 2):
            alpha = a[..., n_color : n_color + 1]
            premultiplied = self.extrasamples[0] == 1
        if self.photometric == 0:  # min-is-white
            a = 255 - a[..., :1]
        if n_color == 1 or s < 3:
            rgb = np.repeat(a[..., :1], 3, axis=-1)
        elif self.photometric == 5 and s >= 4:  # CMYK
            k = 255 - a[..., 3:4].astype(np.uint16)
            rgb = ((255 - a[..., :3].astype(np.uint16)) * k // 255).astype(np.uint8)
        elif self.photometric == 6 and self.compression not in _JPEG_COMPRESSIONS:
            rgb = _ycbcr_to_rgb(a[..., :3])
        else:
            rgb = a if s == 3 else a[..., :3]
        if alpha is not None:
            rgb = _composite(rgb, alpha, premultiplied)
        return rgb


def _ycbcr_to_rgb(a: np.ndarray) -> np.ndarray:
    y = a[..., 0].astype(np.float32)
    cb = a[..., 1].astype(np.float32) - 128
    cr = a[..., 2].astype(np.float32) - 128
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def _tiff_pages(tif: Any) -> list[Any]:
    """The pages of the main image's pyramid levels, largest first.

    The main image is the largest series. Its ``levels`` cover SubIFD pyramids and the
    multi-page pyramids tifffile recognises (SVS, NDPI, ...). A generic multi-page pyramid
    shows up as one series per page; those series whose image has the aspect ratio of the
    main image (and is smaller) are taken as further levels.
    """
    import tifffile

    def as_page(p: Any) -> Any:
        return p if isinstance(p, tifffile.TiffPage) else p.aspage()

    series = [s for s in tif.series if s.levels and len(s.levels[0].pages) > 0]
    if not series:
        raise ValueError("no image in the file")
    firsts = [as_page(s.levels[0].pages[0]) for s in series]
    main_i = max(range(len(series)), key=lambda i: firsts[i].imagewidth * firsts[i].imagelength)
    pages = [as_page(lv.pages[0]) for lv in series[main_i].levels if len(lv.pages)]
    if len(pages) == 1:
        w0, h0 = pages[0].imagewidth, pages[0].imagelength
        for i, p in enumerate(firsts):
            if i == main_i or not (0 < p.imagewidth < w0 and 0 < p.imagelength < h0):
                continue
            if abs(p.imagelength - h0 * p.imagewidth / w0) <= max(1.0, 0.01 * p.imagelength):
                pages.append(p)
    pages.sort(key=lambda p: -p.imagewidth)
    unique = [pages[0]]
    for p in pages[1:]:
        if p.imagewidth < unique[-1].imagewidth:
            unique.append(p)
    return unique


_OME_UNITS = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "Å": 1e-4, "mm": 1e3}
_OME_UNITS.update({"cm": 1e4, "m": 1e6, "pm": 1e-6})


def _tiff_mpp(tif: Any, page: Any) -> float | None:
    """Microns per pixel from the resolution tags, OME PhysicalSizeX or an Aperio MPP."""
    tags = page.tags
    xres = tags.valueof(282)  # XResolution
    unit = tags.valueof(296, 2)  # ResolutionUnit; TIFF's default is inch
    if xres is not None:
        if isinstance(xres, tuple):
            xres = xres[0] / xres[1] if len(xres) == 2 and xres[1] else None
        factor = {2: 25400.0, 3: 1e4}.get(int(unit) if unit is not None else 2)
        if xres and factor:
            mpp = _plausible_mpp(factor / float(xres))
            if mpp is not None:
                return mpp
    ome = tif.ome_metadata
    if ome:
        try:
            root = ET.fromstring(ome)
        except ET.ParseError:
            root = None
        for el in root.iter() if root is not None else ():
            if el.tag.rsplit("}", 1)[-1] == "Pixels" and el.get("PhysicalSizeX"):
                scale = _OME_UNITS.get(el.get("PhysicalSizeXUnit", "µm"))
                try:
                    mpp = float(el.get("PhysicalSizeX", "")) * scale if scale else None
                except ValueError:
                    mpp = None
                mpp = _plausible_mpp(mpp)
                if mpp is not None:
                    return mpp
                break
    description = page.description or ""
    if description.startswith("Aperio"):
        m = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
        if m:
            try:
                return _plausible_mpp(float(m.group(1)))
            except ValueError:
                return None
    return None


class _TiffImage(SlideImage):
    """TIFF / BigTIFF read with tifffile, decoding only the tiles a read touches."""

    backend = "tifffile"

    def _reset_handles(self) -> None:
        self._tif: Any = None
        self._levels: list[_TiffLevel] = []

    def _open(self) -> tuple[list[tuple[int, int]], None, float | None]:
        import tifffile

        tif = tifffile.TiffFile(self.path)
        try:
            pages = _tiff_pages(tif)
            if any(p.imagewidth == 0 or p.imagelength == 0 for p in pages[:1]):
                raise InputError(self.path, "image has zero size")
            levels = [_TiffLevel(p, self.path) for p in pages]
            mpp = _tiff_mpp(tif, pages[0])
        except BaseException:
            tif.close()
            raise
        self._tif, self._levels = tif, levels
        return [(lv.width, lv.height) for lv in levels], None, mpp

    def _close_handles(self) -> None:
        if self._tif is not None:
            self._tif.close()

    def _read_level(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        lv = self._levels[level]
        if lv.mode == "memmap":
            return self._memmap_read(lv, x0, y0, w, h)
        if lv.mode == "whole":
            return _crop_padded(self._whole(level), x0, y0, w, h)
        out = np.full((h, w, 3), _WHITE, np.uint8)
        ix0, iy0 = max(x0, 0), max(y0, 0)
        ix1, iy1 = min(x0 + w, lv.width), min(y0 + h, lv.height)
        if ix0 >= ix1 or iy0 >= iy1:
            return out
        sw, sh = lv.seg_w, lv.seg_h
        for ty in range(iy0 // sh, (iy1 - 1) // sh + 1):
            ty0 = ty * sh
            ry0, ry1 = max(iy0, ty0), min(iy1, ty0 + sh)
            for tx in range(ix0 // sw, (ix1 - 1) // sw + 1):
                tx0 = tx * sw
                rx0, rx1 = max(ix0, tx0), min(ix1, tx0 + sw)
                seg = self._segment(level, ty * lv.n_across + tx)
                out[ry0 - y0 : ry1 - y0, rx0 - x0 : rx1 - x0] = seg[
                    ry0 - ty0 : ry1 - ty0, rx0 - tx0 : rx1 - tx0
                ]
        return out

    def _memmap_read(self, lv: _TiffLevel, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        assert lv.array is not None
        out = np.full((h, w, 3), _WHITE, np.uint8)
        ix0, iy0 = max(x0, 0), max(y0, 0)
        ix1, iy1 = min(x0 + w, lv.width), min(y0 + h, lv.height)
        if ix0 < ix1 and iy0 < iy1:
            out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = lv.to_rgb(
                np.asarray(lv.array[iy0:iy1, ix0:ix1])
            )
        return out

    def _whole(self, level: int) -> np.ndarray:
        lv = self._levels[level]
        if lv.array is None:
            with self._lock:
                if lv.array is None:
                    try:
                        raw = lv.page.asarray()
                    except Exception as exc:
                        raise InputError(self.path, f"cannot decode level {level}: {exc}") from exc
                    raw = raw.reshape(lv.page.shaped)[:, 0]  # (planes, h, w, contig)
                    raw = np.moveaxis(raw, 0, -2).reshape(lv.height, lv.width, lv.samples)
                    lv.array = _spill(np.ascontiguousarray(lv.to_rgb(raw)))
        return lv.array

    def _segment(self, level: int, index: int) -> np.ndarray:
        """Tile or strip ``index`` of ``level`` as RGB, full segment size, from the cache."""
        key = (level, index)
        with self._lock:
            seg = self._cache.get(key)
            if seg is not None:
                return seg
            fh = self._tif.filehandle
            lv = self._levels[level]
            datas: list[bytes | None] = []
            for plane in range(lv.planes):
                j = plane * lv.per_plane + index
                offset, count = int(lv.offsets[j]), int(lv.bytecounts[j])
                if offset <= 0 or count <= 0:
                    datas.append(None)
                    continue
                fh.seek(offset)
                datas.append(fh.read(count))
        planes = []
        try:
            for plane, data in enumerate(datas):
                if data is None:
                    break
                arr, _, _ = lv.page.decode(
                    data,
                    plane * lv.per_plane + index,
                    jpegtables=lv.jpegtables,
                    jpegheader=lv.jpegheader,
                )
                planes.append(arr[0])  # (h, w, contig samples)
        except Exception as exc:
            raise InputError(
                self.path, f"cannot decode {lv.kind} {index} of level {level}: {exc}"
            ) from exc
        if len(planes) < lv.planes:  # a sparse (empty) tile: background
            seg = np.full((lv.seg_h, lv.seg_w, 3), _WHITE, np.uint8)
        else:
            raw = planes[0] if len(planes) == 1 else np.concatenate(planes, axis=-1)
            rgb = lv.to_rgb(raw)
            sh, sw = rgb.shape[:2]
            if (sh, sw) != (lv.seg_h, lv.seg_w):  # short edge segment
                seg = np.full((lv.seg_h, lv.seg_w, 3), _WHITE, np.uint8)
                seg[: min(sh, lv.seg_h), : min(sw, lv.seg_w)] = rgb[: lv.seg_h, : lv.seg_w]
            else:
                seg = np.ascontiguousarray(rgb)
        with self._lock:
            self._cache.put(key, seg)
        return seg
