"""Whole-slide image access (the common base): read any region of an H&E image at any resolution.

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

An image that is decoded whole (JPEG / PNG, and those small compressed stripped pages), and
its coarser levels, are kept in an unlinked temporary file mapped into memory when they are
at least :data:`SPILL_BYTES` (64 MiB, ~4,600 x 4,600 px): the kernel pages them out and back
in as memory requires, so holding many such slides open (training end to end, say) does not
add their decoded size to the process's own memory. The file lies in Python's temporary
folder (``TMPDIR``); it vanishes when the image is closed, or with the process.

Sparse (empty) TIFF tiles read as white. Output pixels whose filter reaches past the image
edge are blended with the white outside, so the outermost row / column of a thumbnail is a
little lighter.

A :class:`SlideImage` pickles as its path and settings and reopens the file lazily, and it
reopens itself after a ``fork``, so it can be handed to DataLoader worker processes.

Speed: warm reads that need no resampling (integer box at a level's own resolution) take
~0.1 ms per 224 px patch; any other read is dominated by PIL's bilinear resize (~1-2 ms per
224 px patch on a slow core). Run ``benchmarks/region_read.py`` for figures.
"""

# Long module: the shared base of the tiff/openslide/pil/zarr backends: the abstract
# SlideImage (~290 lines: open/fork/pickle lifecycle, level choice, resampling) and the
# constants, tile cache and pixel helpers they import; the docstring (~40 lines) states
# the read contract for all of them.

from __future__ import annotations

import math
import os
import tempfile
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from magnet_st.errors import InputError

DEFAULT_CACHE_BYTES = 256 * 2**20
"""Default capacity of the decoded-tile cache of one image, in bytes."""

WHOLE_PAGE_BYTES = 512 * 2**20
"""Compressed stripped TIFF pages up to this decoded size are decoded whole, once."""

SPILL_BYTES = 64 * 2**20
"""Images decoded whole at or above this size live in a temporary file mapped into memory."""

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


def _spill_empty(shape: tuple[int, ...], dtype: Any = np.uint8) -> np.ndarray:
    """An uninitialised array; of :data:`SPILL_BYTES` or more, in an unlinked temporary file
    mapped into memory (pageable; the file goes with the last reference to the map)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes < SPILL_BYTES or nbytes == 0:
        return np.empty(shape, dtype)
    with tempfile.TemporaryFile(prefix="magnet-st-image-") as f:
        f.truncate(nbytes)
        # the map keeps its own handle: the (already unlinked) file lives while it does
        return np.memmap(f, dtype=dtype, mode="r+", shape=shape)


def _spill(a: np.ndarray) -> np.ndarray:
    """``a`` read-only, moved to a file map (:func:`_spill_empty`) if it is that large."""
    if a.nbytes >= SPILL_BYTES and not isinstance(a, np.memmap):
        out = _spill_empty(a.shape, a.dtype)
        out[...] = a
        a = out
    a.flags.writeable = False
    return a


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


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
