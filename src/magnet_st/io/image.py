"""Whole-slide image access: read any region of an H&E image at any resolution.

:func:`open_image` returns a :class:`SlideImage` for a pyramidal or flat TIFF / BigTIFF
(read with ``tifffile``), a vendor whole-slide format (read with OpenSlide), an ordinary
JPEG / PNG (read with PIL) or an OME-NGFF multiscale image group in a zarr v2 / v3 store,
such as an image element of a SpatialData store (read with ``zarr``; its datasets are the
pyramid levels). All of them answer the same questions in the same way:

* Coordinates are level-0 (full-resolution) pixels, ``x`` = column, ``y`` = row. A box
  ``(x, y, width, height)`` is continuous: pixel ``(i, j)`` covers ``[i, i + 1) x [j, j + 1)``,
  so an integer box at the native resolution returns exactly the stored pixels.
* A read picks the pyramid level that is just sharper than (or as sharp as) the request,
  reads the pixels it needs from that level and resamples them with PIL to the exact
  output size. PIL's resampling filters widen with the reduction factor, so reductions
  by more than 2x are antialiased too.
* Reads that run past the image edge are padded with white (255); they never fail.
* The output is always RGB ``uint8`` of shape ``(H, W, 3)``: grayscale is expanded, an
  alpha channel is composited over white (which equals dropping it where the image is
  opaque).

Zarr arrays are read chunk by chunk through the same cache as TIFF tiles.
Tiled TIFF pages are never decoded whole: only the tiles that intersect a read are
decoded, and decoded tiles are kept in a bounded LRU cache (``cache_bytes``, 256 MiB by
default) so that neighbouring reads reuse them. Stripped (non-tiled) TIFF pages are
memory-mapped when stored uncompressed; compressed stripped pages are decoded whole once
when they are small (at most :data:`WHOLE_PAGE_BYTES` decoded) and read strip by strip
through the same cache otherwise.

Sparse (empty) TIFF tiles read as white. Output pixels whose filter reaches past the image
edge are blended with the white outside, so the outermost row / column of a thumbnail is a
little lighter.

A :class:`SlideImage` pickles as its path and settings and reopens the file lazily, and it
reopens itself after a ``fork``, so it can be handed to DataLoader worker processes.

Speed: warm reads that need no resampling (integer box at a level's own resolution) take
~0.1 ms per 224 px patch; any other read is dominated by PIL's bilinear resize (~1-2 ms per
224 px patch on a slow core). Run ``benchmarks/region_read.py`` for figures.
"""

from __future__ import annotations

import math
import os
import re
import threading
import warnings
import xml.etree.ElementTree as ET
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from magnet_st.errors import InputError

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "LEVEL_TOLERANCE",
    "SlideImage",
    "WHOLE_PAGE_BYTES",
    "open_image",
]

DEFAULT_CACHE_BYTES = 256 * 2**20
"""Default capacity of the decoded-tile cache of one image, in bytes."""

WHOLE_PAGE_BYTES = 512 * 2**20
"""Compressed stripped TIFF pages up to this decoded size are decoded whole, once."""

LEVEL_TOLERANCE = 0.01
"""A level counts as sharp enough when its downsample is at most 1% above the request."""

MAX_READ_PIXELS = 2**24
"""Level pixels resampled in one pass; larger reads are done in bands of output rows."""

MAX_PLAUSIBLE_MPP = 50.0
"""Resolution metadata implying coarser pixels than this is a placeholder (72 dpi etc.)."""

TIFF_SUFFIXES = frozenset({".tif", ".tiff", ".btf", ".tf2", ".tf8"})
OPENSLIDE_SUFFIXES = frozenset(
    {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"}
)
PIL_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".jp2", ".j2k", ".ppm", ".pgm"}
)
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

_RESAMPLE = {
    "nearest": (Image.Resampling.NEAREST, 0.5),
    "box": (Image.Resampling.BOX, 0.5),
    "bilinear": (Image.Resampling.BILINEAR, 1.0),
    "hamming": (Image.Resampling.HAMMING, 1.0),
    "bicubic": (Image.Resampling.BICUBIC, 2.0),
    "lanczos": (Image.Resampling.LANCZOS, 3.0),
}
"""Resampling filter name -> (PIL filter, support radius in source pixels at scale 1)."""

_JPEG_COMPRESSIONS = frozenset({6, 7, 33007, 34892})
_WHITE = 255


# --------------------------------------------------------------------------- helpers


class _TileCache:
    """A least-recently-used map from keys to decoded arrays, bounded by total bytes.

    The newest entry is always kept, even when it alone exceeds the capacity.
    """

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[Any, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Any) -> bool:
        return key in self._items

    def keys(self) -> list[Any]:
        return list(self._items)

    def get(self, key: Any) -> np.ndarray | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item

    def put(self, key: Any, value: np.ndarray) -> None:
        if key in self._items:
            self._items.move_to_end(key)
            return
        self._items[key] = value
        self.nbytes += value.nbytes
        while self.nbytes > self.capacity and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.nbytes

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0


def _check_mpp(path: Path, mpp: Any, what: str = "microns_per_pixel") -> float | None:
    if mpp is None:
        return None
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        raise InputError(path, f"{what} must be a positive number, got {mpp!r}") from None
    if isinstance(mpp, bool) or not math.isfinite(value) or value <= 0:
        raise InputError(path, f"{what} must be a positive number, got {mpp!r}")
    return value


def _plausible_mpp(value: float | None) -> float | None:
    if value is None or not math.isfinite(value) or value <= 0 or value > MAX_PLAUSIBLE_MPP:
        return None
    return float(value)


def _level_scales(dims: Sequence[tuple[int, int]]) -> list[tuple[float, float]]:
    """Level-0 pixels per level pixel along x and y, snapped to a power of two if it fits."""
    w0, h0 = dims[0]
    scales = []
    for w, h in dims:
        dx, dy = w0 / w, h0 / h
        p = 2.0 ** round(math.log2((dx + dy) / 2))
        if abs(w0 / p - w) <= 1 and abs(h0 / p - h) <= 1:
            scales.append((p, p))
        else:
            scales.append((dx, dy))
    return scales


def _crop_padded(arr: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """``arr[y0:y0+h, x0:x0+w]`` as a new RGB array, white where it runs outside ``arr``."""
    ah, aw = arr.shape[:2]
    if x0 >= 0 and y0 >= 0 and x0 + w <= aw and y0 + h <= ah:
        return np.array(arr[y0 : y0 + h, x0 : x0 + w, :3])
    out = np.full((h, w, 3), _WHITE, np.uint8)
    ix0, iy0 = max(x0, 0), max(y0, 0)
    ix1, iy1 = min(x0 + w, aw), min(y0 + h, ah)
    if ix0 < ix1 and iy0 < iy1:
        out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = arr[iy0:iy1, ix0:ix1, :3]
    return out


def _composite(rgb: np.ndarray, alpha: np.ndarray, premultiplied: bool = False) -> np.ndarray:
    """Composite ``rgb`` (uint8, ``(..., 3)``) with ``alpha`` (uint8, ``(..., 1)``) over white."""
    if alpha.min() == 255:
        return rgb
    a = alpha.astype(np.uint16)
    if premultiplied:
        out = rgb.astype(np.uint16) + (255 - a)
        return np.minimum(out, 255).astype(np.uint8)
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _to_uint8(a: np.ndarray, bits: int | None = None) -> np.ndarray:
    if a.dtype == np.uint8 and (bits is None or bits == 8):
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.floating):
        return (np.clip(np.nan_to_num(a), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        if bits is None or bits > 32 or bits < 1:
            bits = 8 * a.dtype.itemsize
        top = 2**bits - 1
        if top == 255:
            return np.clip(a, 0, 255).astype(np.uint8)
        return (np.clip(a, 0, top).astype(np.float64) * (255 / top) + 0.5).astype(np.uint8)
    raise ValueError(f"unsupported pixel type {a.dtype}")


@contextmanager
def _pil_unlimited() -> Iterator[None]:
    """Let PIL open gigapixel images without its decompression-bomb check, then restore it."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _writable(a: np.ndarray) -> np.ndarray:
    return a if a.flags.writeable else a.copy()


# --------------------------------------------------------------------------- base class


class SlideImage(ABC):
    """A whole-slide image that reads any region at any resolution.

    Use :func:`open_image` to get one. Attributes:

    * ``path``: the image file.
    * ``microns_per_pixel``: of level 0; the caller's value, else the file's, else ``None``.
    * ``size``: ``(width, height)`` of level 0, in pixels.
    * ``level_dimensions``: ``(width, height)`` of every pyramid level, sharpest first.
    * ``level_downsamples``: level-0 pixels per level pixel, ascending (``1.0`` first).
    * ``cache_bytes``: capacity of the decoded-tile cache.
    * ``resample``: the resampling filter (``"bilinear"`` by default).

    It is a context manager (``close`` on exit), thread-safe, picklable (only the path and
    settings travel; the file reopens on first use) and reopens itself after ``fork``.
    """

    backend: str = "?"

    def __init__(
        self,
        path: str | Path,
        microns_per_pixel: float | None = None,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        resample: str = "bilinear",
    ):
        self.path = Path(path)
        self._given_mpp = _check_mpp(self.path, microns_per_pixel)
        self.microns_per_pixel: float | None = self._given_mpp
        if resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
        if int(cache_bytes) < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes!r}")
        self.cache_bytes = int(cache_bytes)
        self.resample = resample
        self.size: tuple[int, int] = (0, 0)
        self.level_dimensions: list[tuple[int, int]] = []
        self.level_downsamples: list[float] = []
        self._level_scale: list[tuple[float, float]] = []
        self._init_runtime()
        with self._lock:
            self._ensure_open()

    # -- lifecycle -------------------------------------------------------------------

    def _init_runtime(self) -> None:
        self._lock = threading.RLock()
        self._cache = _TileCache(self.cache_bytes)
        self._opened = False
        self._pid: int | None = None
        self._reset_handles()

    def _ensure_open(self) -> None:
        """Open the file on first use, after ``close`` or ``pickle``, and in a forked child."""
        if self._opened and self._pid == os.getpid():
            return
        if self._opened:  # inherited through fork: the handles share file offsets
            self._cache.clear()
            self._reset_handles()
            self._opened = False
        if not self._exists():
            raise InputError(self.path, "no such file (it was there when the image was opened)")
        dims, scales, file_mpp = self._open()
        dims = [(int(w), int(h)) for w, h in dims]
        if not dims or any(w <= 0 or h <= 0 for w, h in dims):
            self._close_handles()
            self._reset_handles()
            size = f"{dims[0][0]} x {dims[0][1]} px" if dims else "no pixels"
            raise InputError(self.path, f"image has zero size ({size})")
        scales = scales or _level_scales(dims)
        if self.level_dimensions and dims != self.level_dimensions:
            self._close_handles()
            self._reset_handles()
            raise InputError(
                self.path,
                f"file changed since it was opened: levels {dims} instead of "
                f"{self.level_dimensions}",
            )
        if not self.level_dimensions:
            self.level_dimensions = dims
            self.size = dims[0]
            self._level_scale = [(float(sx), float(sy)) for sx, sy in scales]
            self.level_downsamples = [(sx + sy) / 2 for sx, sy in self._level_scale]
            if self.microns_per_pixel is None:
                self.microns_per_pixel = _plausible_mpp(file_mpp)
        self._opened = True
        self._pid = os.getpid()

    def close(self) -> None:
        """Close the file and drop cached tiles; a later read reopens it."""
        self._check_fork()
        with self._lock:
            if self._opened and self._pid == os.getpid():
                self._close_handles()
            self._reset_handles()
            self._cache.clear()
            self._opened = False

    def __enter__(self) -> SlideImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    _PICKLED = (
        "path",
        "_given_mpp",
        "microns_per_pixel",
        "cache_bytes",
        "resample",
        "size",
        "level_dimensions",
        "level_downsamples",
        "_level_scale",
    )

    def __getstate__(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._PICKLED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def __repr__(self) -> str:
        w, h = self.size
        return (
            f"{type(self).__name__}({str(self.path)!r}, {w} x {h} px, "
            f"{len(self.level_dimensions)} levels, mpp={self.microns_per_pixel})"
        )

    # -- backend interface -----------------------------------------------------------

    def _exists(self) -> bool:
        """Whether the image is still there (a file; a folder for OME-NGFF groups)."""
        return self.path.is_file()

    @abstractmethod
    def _reset_handles(self) -> None:
        """Forget open handles and per-file state (without closing anything)."""

    @abstractmethod
    def _open(
        self,
    ) -> tuple[list[tuple[int, int]], list[tuple[float, float]] | None, float | None]:
        """Open the file; return level dimensions, level scales (or None) and file mpp."""

    @abstractmethod
    def _close_handles(self) -> None:
        """Close what ``_open`` opened."""

    @abstractmethod
    def _read_level(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Pixels ``[y0, y0+h) x [x0, x0+w)`` of ``level`` as RGB uint8, white outside."""

    # -- reading -----------------------------------------------------------------------

    def _choose_level(self, downsample: float) -> int:
        """The level with the largest downsample <= ``downsample`` (1% tolerance), else 0."""
        limit = downsample * (1 + LEVEL_TOLERANCE)
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= limit:
                best = i
        return best

    def _check_fork(self) -> None:
        """In a forked child, replace the lock (another parent thread may have held it)."""
        if self._pid is not None and self._pid != os.getpid():
            self._lock = threading.RLock()

    def _read(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        self._check_fork()
        with self._lock:
            self._ensure_open()
        return self._read_level(level, x0, y0, w, h)

    def read_region(
        self,
        x: float,
        y: float,
        width: float,
        height: float,
        out_size: tuple[int, int],
    ) -> np.ndarray:
        """Read the box at ``(x, y)`` of size ``(width, height)`` level-0 px, resampled.

        The box may be fractional and may run outside the image (white there). The level is
        chosen by the reduction ``width / out_w`` (the smaller of the x and y reductions).

        Returns:
            RGB uint8 array of shape ``(out_h, out_w, 3)`` for ``out_size = (out_w, out_h)``.
        """
        out_w, out_h = (int(v) for v in out_size)
        if out_w < 1 or out_h < 1 or (out_w, out_h) != tuple(out_size):
            raise ValueError(f"out_size must be two positive integers, got {out_size!r}")
        box = (float(x), float(y), float(width), float(height))
        if not all(math.isfinite(v) for v in box) or box[2] <= 0 or box[3] <= 0:
            raise ValueError(f"invalid region (x, y, width, height) = {box}")
        downsample = min(box[2] / out_w, box[3] / out_h)
        level = self._choose_level(downsample)
        sx, sy = self._level_scale[level]
        return self._resample_level(
            level, box[0] / sx, box[1] / sy, box[2] / sx, box[3] / sy, out_w, out_h
        )

    def _resample_level(
        self, level: int, lx: float, ly: float, lw: float, lh: float, out_w: int, out_h: int
    ) -> np.ndarray:
        fx, fy = lw / out_w, lh / out_h  # level px per output px
        if fx == 1.0 and fy == 1.0 and lx.is_integer() and ly.is_integer():
            return self._read(level, int(lx), int(ly), out_w, out_h)
        pil_filter, support = _RESAMPLE[self.resample]
        mx = math.ceil(support * max(fx, 1.0)) + 1
        my = math.ceil(support * max(fy, 1.0)) + 1
        x0, y0 = math.floor(lx) - mx, math.floor(ly) - my
        x1, y1 = math.ceil(lx + lw) + mx, math.ceil(ly + lh) + my
        if (x1 - x0) * (y1 - y0) > MAX_READ_PIXELS and out_h > 1:
            rows = max(1, int((MAX_READ_PIXELS / (x1 - x0) - 2 * my) / fy))
            if rows < out_h:
                out = np.empty((out_h, out_w, 3), np.uint8)
                for r0 in range(0, out_h, rows):
                    r1 = min(out_h, r0 + rows)
                    out[r0:r1] = self._resample_level(
                        level, lx, ly + r0 * fy, lw, (r1 - r0) * fy, out_w, r1 - r0
                    )
                return out
        region = self._read(level, x0, y0, x1 - x0, y1 - y0)
        img = Image.fromarray(region)
        box = (lx - x0, ly - y0, lx - x0 + lw, ly - y0 + lh)
        return _writable(np.asarray(img.resize((out_w, out_h), pil_filter, box=box)))

    def _require_mpp(self) -> float:
        if self.microns_per_pixel is None:
            raise InputError(
                self.path,
                "microns per pixel unknown: the file records no resolution; "
                "pass microns_per_pixel to open_image",
            )
        return self.microns_per_pixel

    def _patch_box(self, size: int, mpp: float) -> tuple[int, float]:
        if int(size) != size or size < 1:
            raise ValueError(f"patch size must be a positive integer, got {size!r}")
        if not math.isfinite(float(mpp)) or mpp <= 0:
            raise ValueError(f"mpp must be a positive number, got {mpp!r}")
        return int(size), int(size) * float(mpp) / self._require_mpp()

    def read_patch(self, cx: float, cy: float, size: int, mpp: float) -> np.ndarray:
        """A ``size`` x ``size`` RGB patch at ``mpp`` microns per pixel centred on ``(cx, cy)``.

        ``(cx, cy)`` is in level-0 pixels; the patch covers ``[cx - s/2, cx + s/2)`` with
        ``s = size * mpp / microns_per_pixel``. Needs ``microns_per_pixel``.
        """
        size, span = self._patch_box(size, mpp)
        return self.read_region(cx - span / 2, cy - span / 2, span, span, (size, size))

    def read_patches(self, centers: np.ndarray, size: int, mpp: float) -> np.ndarray:
        """``read_patch`` for every ``(cx, cy)`` row of ``centers``: ``(n, size, size, 3)``.

        Patches are read in raster order (rows of patch height, then x) so that neighbours
        share cached tiles, and returned in the order given.
        """
        size, span = self._patch_box(size, mpp)
        c = np.asarray(centers, dtype=np.float64)
        if c.ndim != 2 or c.shape[1] != 2:
            raise ValueError(f"centers must have shape (n, 2), got {c.shape}")
        if not np.isfinite(c).all():
            raise ValueError("centers contain NaN or infinite values")
        out = np.empty((len(c), size, size, 3), np.uint8)
        order = np.lexsort((c[:, 0], np.floor(c[:, 1] / span)))
        for i in order:
            cx, cy = c[i]
            out[i] = self.read_region(cx - span / 2, cy - span / 2, span, span, (size, size))
        return out

    def thumbnail(self, max_size: int) -> tuple[np.ndarray, float]:
        """The whole image reduced so that its longer side is at most ``max_size`` px.

        Returns:
            ``(rgb, scale)``: ``scale`` is thumbnail px per level-0 px (at most 1), the same
            along x and y; the last thumbnail row/column may be partly white padding.
        """
        if int(max_size) != max_size or max_size < 1:
            raise ValueError(f"max_size must be a positive integer, got {max_size!r}")
        w, h = self.size
        scale = min(1.0, max_size / max(w, h))
        out_w = min(int(max_size), max(1, round(w * scale)))
        out_h = min(int(max_size), max(1, round(h * scale)))
        return self.read_region(0, 0, out_w / scale, out_h / scale, (out_w, out_h)), scale


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
                    lv.array = np.ascontiguousarray(lv.to_rgb(raw))
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


# --------------------------------------------------------------------------- OpenSlide


class _OpenSlideImage(SlideImage):
    """Vendor whole-slide formats (and generic tiled TIFF) read with OpenSlide."""

    backend = "openslide"

    def _reset_handles(self) -> None:
        self._osr: Any = None

    def _open(
        self,
    ) -> tuple[list[tuple[int, int]], list[tuple[float, float]], float | None]:
        import openslide

        osr = openslide.OpenSlide(str(self.path))
        try:
            if hasattr(openslide, "OpenSlideCache"):
                osr.set_cache(openslide.OpenSlideCache(max(self.cache_bytes, 1)))
            dims = [tuple(d) for d in osr.level_dimensions]
            scales = [(float(d), float(d)) for d in osr.level_downsamples]
            mpp: float | None
            try:
                mpp = float(osr.properties[openslide.PROPERTY_NAME_MPP_X])
            except (KeyError, ValueError):
                mpp = None
        except BaseException:
            osr.close()
            raise
        self._osr = osr
        return dims, scales, mpp  # type: ignore[return-value]

    def _close_handles(self) -> None:
        if self._osr is not None:
            self._osr.close()

    def _choose_level(self, downsample: float) -> int:
        self._check_fork()
        with self._lock:
            self._ensure_open()
            return int(self._osr.get_best_level_for_downsample(downsample * (1 + LEVEL_TOLERANCE)))

    def _read_level(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        d = self._level_scale[level][0]
        try:
            img = self._osr.read_region((round(x0 * d), round(y0 * d)), level, (w, h))
        except Exception as exc:
            raise InputError(self.path, f"cannot read region: {exc}") from exc
        rgba = np.asarray(img)
        return np.ascontiguousarray(_composite(rgba[..., :3], rgba[..., 3:4]))


# --------------------------------------------------------------------------- PIL


class _PILImage(SlideImage):
    """JPEG, PNG and other PIL formats, loaded whole on first read.

    Coarser levels (2x, 4x, ... reductions, down to 256-511 px) are listed up front and
    built on first use from the next sharper level with a 2x2 box reduction.
    """

    backend = "pil"
    _MIN_LEVEL_SIDE = 256

    def _reset_handles(self) -> None:
        self._arrays: list[np.ndarray | None] = []

    def _open(self) -> tuple[list[tuple[int, int]], None, float | None]:
        with _pil_unlimited(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns about the corrupt files it rejects
            with Image.open(self.path) as img:
                w, h = img.size
                dpi = img.info.get("dpi")
        mpp = None
        if dpi and isinstance(dpi, tuple) and dpi[0]:
            try:
                mpp = 25400.0 / float(dpi[0])
            except (TypeError, ValueError, ZeroDivisionError):
                mpp = None
        dims = [(w, h)]
        while max(dims[-1]) >= 2 * self._MIN_LEVEL_SIDE and min(dims[-1]) > 1:
            pw, ph = dims[-1]
            dims.append(((pw + 1) // 2, (ph + 1) // 2))
        self._arrays = [None] * len(dims)
        return dims, None, mpp

    def _close_handles(self) -> None:
        self._arrays = []

    def _load(self, level: int) -> np.ndarray:
        arrays = self._arrays
        arr = arrays[level]
        if arr is not None:
            return arr
        with self._lock:
            arrays = self._arrays
            if arrays[level] is not None:
                return arrays[level]  # type: ignore[return-value]
            if level == 0:
                arr = self._decode()
            else:
                prev = Image.fromarray(self._load(level - 1))
                arr = np.asarray(prev.reduce(2))
            if arr.shape[1::-1] != self.level_dimensions[level]:
                raise InputError(
                    self.path,
                    f"level {level} is {arr.shape[1::-1]}, expected "
                    f"{self.level_dimensions[level]} (file changed?)",
                )
            arrays[level] = arr
            return arr

    def _decode(self) -> np.ndarray:
        try:
            with _pil_unlimited(), Image.open(self.path) as img:
                img.load()
                return _pil_to_rgb(img)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(self.path, f"cannot decode image: {exc}") from exc

    def _read_level(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        return _crop_padded(self._load(level), x0, y0, w, h)


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.repeat(_to_uint8(np.asarray(img).astype(np.uint16), 16)[..., None], 3, -1)
    if mode in ("I", "F"):
        a = np.asarray(img)
        bits = 16 if mode == "I" and a.max(initial=0) > 255 else 8
        a = _to_uint8(a.astype(np.int64), bits) if mode == "I" else _to_uint8(a)
        return np.repeat(a[..., None], 3, -1)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = np.asarray(img.convert("RGBA"))
        return _writable(_composite(rgba[..., :3], rgba[..., 3:4]))
    return np.asarray(img.convert("RGB"))


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


# --------------------------------------------------------------------------- open_image

_BACKENDS: dict[str, type[SlideImage]] = {
    "tifffile": _TiffImage,
    "openslide": _OpenSlideImage,
    "pil": _PILImage,
    "zarr": _ZarrImage,
}
_BACKEND_NAMES = {"tifffile": "tifffile", "openslide": "OpenSlide", "pil": "PIL", "zarr": "zarr"}


def _is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in _TIFF_MAGICS
    except OSError:
        return False


def _candidates(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    tiff = _is_tiff(path)
    if suffix in OPENSLIDE_SUFFIXES:
        return ["openslide", "tifffile"] if tiff else ["openslide"]
    if suffix in TIFF_SUFFIXES or tiff:
        return ["tifffile", "openslide", "pil"]
    if suffix in PIL_SUFFIXES:
        return ["pil"]
    return ["tifffile", "openslide", "pil"]


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def open_image(
    path: str | Path,
    microns_per_pixel: float | None = None,
    *,
    backend: str = "auto",
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    resample: str = "bilinear",
) -> SlideImage:
    """Open a whole-slide or ordinary image for region reads.

    Args:
        path: a TIFF / BigTIFF / OME-TIFF, an OpenSlide format (``.svs``, ``.ndpi``,
            ``.mrxs``, ...), a PIL format (JPEG, PNG, ...), or the folder of an OME-NGFF
            multiscale image group in a zarr store (e.g. ``store.zarr/images/<name>`` of a
            SpatialData store).
        microns_per_pixel: of level 0; overrides what the file records.
        backend: ``"auto"`` (by extension and content: TIFF files with tifffile, then
            OpenSlide; OpenSlide formats with OpenSlide, then tifffile; JPEG / PNG with PIL;
            zarr groups (folders) with zarr; anything else tifffile, OpenSlide, PIL), or one
            of ``"tifffile"``, ``"openslide"``, ``"pil"``, ``"zarr"``.
        cache_bytes: capacity of the decoded-tile cache (also OpenSlide's cache).
        resample: PIL filter for resampling: ``"bilinear"`` (default), ``"bicubic"``,
            ``"lanczos"``, ``"box"``, ``"hamming"`` or ``"nearest"``.

    Raises:
        InputError: the file is missing, a directory, empty, corrupt, of an unsupported
            format or of zero size, or ``microns_per_pixel`` is not a positive number.
    """
    p = Path(path)
    mpp = _check_mpp(p, microns_per_pixel)
    if backend != "auto" and backend not in _BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(_BACKENDS)}, got {backend!r}")
    if not p.exists():
        raise InputError(p, "no such file")
    if p.is_dir():
        if backend in ("auto", "zarr") and _is_zarr_group(p):
            return _ZarrImage(p, mpp, cache_bytes=cache_bytes, resample=resample)
        raise InputError(p, "is a directory, not an image file (nor an OME-NGFF image group)")
    if backend == "zarr":
        raise InputError(p, "the zarr backend reads OME-NGFF image groups (folders), not files")
    try:
        if p.stat().st_size == 0:
            raise InputError(p, "file is empty")
        with open(p, "rb"):
            pass
    except OSError as exc:
        raise InputError(p, f"cannot read file: {exc.strerror or exc}") from exc
    if resample not in _RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
    if int(cache_bytes) < 0:
        raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes!r}")
    names = [backend] if backend != "auto" else _candidates(p)
    failures = []
    for name in names:
        try:
            return _BACKENDS[name](p, mpp, cache_bytes=cache_bytes, resample=resample)
        except InputError:
            raise
        except ImportError as exc:
            failures.append(f"{_BACKEND_NAMES[name]} not available ({_short(exc)})")
        except Exception as exc:
            failures.append(f"{_BACKEND_NAMES[name]}: {_short(exc)}")
    raise InputError(p, "unsupported or corrupt image file (" + "; ".join(failures) + ")")
