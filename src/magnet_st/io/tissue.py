"""Tissue detection on H&E slides and a virtual Visium HD bin grid over the tissue.

:func:`detect_tissue` finds the stained tissue of an H&E whole-slide image on a thumbnail
(one mask pixel ~ ``mask_um_per_px`` microns) and returns a :class:`TissueMask`.
:func:`virtual_bins` lays a square grid of ``bin_um`` bins over the image, aligned with the
image axes, and keeps the bins whose centre is under tissue: the places where expression
can be predicted for an H&E image that has no Visium HD run of its own.

Tissue detection
----------------
Stained tissue is coloured (pink eosin, purple haematoxylin) while the glass around it is
white or grey, so the feature is the HSV saturation ``(max - min) / max`` of every
thumbnail pixel, smoothed by a Gaussian of one mask pixel. The threshold between tissue
and glass is Otsu's on the saturation histogram, but never below
:data:`MIN_SATURATION_THRESHOLD` (so that a slight colour cast of the glass is not split
into "tissue"); pass ``threshold`` to fix it yourself. Paler tissue (adipose, mucin) is
kept by hysteresis: pixels above a low threshold, halfway (:data:`HYSTERESIS`) from the
glass's median saturation to the threshold, count when they are connected to pixels
above the threshold. An image whose "tissue" is on average less than
:data:`MIN_CONTRAST` more saturated than the rest holds no tissue. Near-white pixels
(every channel >= :data:`NEAR_WHITE`) and near-black ones (every channel <=
:data:`NEAR_BLACK`: dark debris, slide edges, black pen) are never tissue. The mask is
then cleaned: a closing and an opening with a disk of ~:data:`MORPHOLOGY_UM` um, holes
smaller than ``max_hole_um2`` filled (bigger holes, e.g. lumens and tears, are kept out),
and connected components smaller than ``min_area_um2`` dropped. Coloured pen marks are
not recognised: they count as tissue, and an image that is tissue nearly everywhere has
no glass for Otsu to split from (pass ``threshold`` then).

Virtual bins
------------
Bin ``(r, c)`` covers ``x`` in ``[origin_x + c * bin_um, origin_x + (c + 1) * bin_um)`` and
``y`` in ``[origin_y + r * bin_um, origin_y + (r + 1) * bin_um)`` microns from the image's
top-left corner (``x`` = column direction); its centre lies at full-resolution pixel
``((origin_x + (c + 0.5) * bin_um) / mpp, (origin_y + (r + 0.5) * bin_um) / mpp)``, the
same formula Space Ranger's ``pxl_col_in_fullres`` / ``pxl_row_in_fullres`` follow for an
axis-aligned capture area (as in :mod:`magnet_st.synthetic`; a real capture area is
registered to its image with a small rotation, so its bins are not exactly these).
Grids of different bin sizes with the same origin nest: the 16 um bin ``(r, c)`` is the
union of the 8 um bins ``(2r .. 2r+1, 2c .. 2c+1)``. The grid starts at the origin
(``r, c >= 0``), like a capture area; the default origin, the image's top-left corner,
covers the whole image.
"""

# Long module: tissue detection (TissueMask, detect_tissue) and the virtual bin/spot grids
# laid over its mask, used together by predict; the ~40-line docstring documents both.

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from scipy import ndimage

from magnet_st.errors import ConfigError, InputError
from magnet_st.util.atomic import atomic_path

if TYPE_CHECKING:
    import pandas as pd

    from magnet_st.io.image import SlideImage

__all__ = [
    "DEFAULT_MASK_UM_PER_PX",
    "MAX_MASK_PX",
    "TissueMask",
    "VirtualBins",
    "detect_tissue",
    "virtual_bins",
]

DEFAULT_MASK_UM_PER_PX = 4.0
"""Default size of one tissue-mask pixel, microns."""

MAX_MASK_PX = 4096
"""The tissue mask is at most this many pixels on its longer side."""

MIN_SATURATION_THRESHOLD = 0.05
"""The automatic (Otsu) saturation threshold is never below this."""

HYSTERESIS = 0.5
"""The low threshold lies this far from the glass's saturation to the (Otsu) threshold."""

MIN_CONTRAST = 0.05
"""Tissue must be at least this much more saturated than the glass, on average."""

NEAR_WHITE = 235
"""Pixels whose every channel is at least this are glass, whatever their saturation."""

NEAR_BLACK = 30
"""Pixels whose every channel is at most this are artefacts (debris, edges, black pen)."""

MORPHOLOGY_UM = 8.0
"""Radius of the closing / opening that smooths the mask, microns (at least one pixel)."""

_BAND_BINS = 1 << 20  # bins per band of grid rows in virtual_bins


# --------------------------------------------------------------------------- tissue mask


@dataclass
class TissueMask:
    """Where the tissue is on a slide, as a boolean image at reduced resolution.

    Mask pixel ``(i, j)`` (row, column) covers full-resolution pixels
    ``[j / scale, (j + 1) / scale) x [i / scale, (i + 1) / scale)`` (``x`` x ``y``).

    Attributes:
        mask: ``(H, W)`` bool, True under tissue.
        scale: mask pixels per full-resolution pixel (the same along x and y, at most 1).
        microns_per_pixel: of the full-resolution image.
        threshold: the saturation threshold used (in ``[0, 1]``).
        image_size_px: ``(width, height)`` of the full-resolution image, pixels.
        low_threshold: the hysteresis (low) threshold, when one was used.
        thumbnail: the RGB ``uint8`` thumbnail the mask was computed from (same shape), if
            kept; pass it to :meth:`save_png` for an overlay.
    """

    mask: np.ndarray
    scale: float
    microns_per_pixel: float
    threshold: float
    image_size_px: tuple[int, int]
    low_threshold: float | None = None
    thumbnail: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.mask = np.asarray(self.mask, dtype=bool)
        if self.mask.ndim != 2:
            raise ValueError(f"mask must be 2-D, got shape {self.mask.shape}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a positive number, got {self.scale!r}")
        if not (math.isfinite(self.microns_per_pixel) and self.microns_per_pixel > 0):
            raise ValueError(
                f"microns_per_pixel must be a positive number, got {self.microns_per_pixel!r}"
            )
        self.image_size_px = (int(self.image_size_px[0]), int(self.image_size_px[1]))

    @property
    def microns_per_mask_pixel(self) -> float:
        """Edge of one mask pixel, microns."""
        return self.microns_per_pixel / self.scale

    @property
    def fraction(self) -> float:
        """Fraction of the image's area under tissue (mask pixels past the edge excluded)."""
        h, w = self.mask.shape
        ih = min(h, max(1, math.ceil(self.image_size_px[1] * self.scale - 1e-9)))
        iw = min(w, max(1, math.ceil(self.image_size_px[0] * self.scale - 1e-9)))
        return float(self.mask[:ih, :iw].mean())

    @property
    def area_um2(self) -> float:
        """Area under tissue, square microns."""
        return float(self.mask.sum()) * self.microns_per_mask_pixel**2

    def contains_px(self, xy: np.ndarray) -> np.ndarray:
        """Whether full-resolution pixel coordinates ``(x, y)`` lie under tissue.

        Args:
            xy: ``(n, 2)`` array of ``(x, y)`` = (column, row) full-resolution pixels
                (continuous: pixel ``j`` spans ``[j, j + 1)``).

        Returns:
            ``(n,)`` bool: the value of the mask pixel that holds each point; False for
            points outside the mask image and for non-finite coordinates.
        """
        xy = np.asarray(xy, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2:
            raise ValueError(f"xy must have shape (n, 2), got {xy.shape}")
        h, w = self.mask.shape
        with np.errstate(invalid="ignore"):
            fx = np.floor(xy[:, 0] * self.scale)
            fy = np.floor(xy[:, 1] * self.scale)
            inside = (fx >= 0) & (fx < w) & (fy >= 0) & (fy < h)
        out = np.zeros(len(xy), dtype=bool)
        out[inside] = self.mask[fy[inside].astype(np.intp), fx[inside].astype(np.intp)]
        return out

    def save_png(
        self,
        path: str | Path,
        thumbnail: np.ndarray | None = None,
        *,
        overlay_path: str | Path | None = None,
    ) -> list[Path]:
        """Write the mask as a black (glass) / white (tissue) PNG, and optionally an overlay.

        Args:
            path: the mask PNG (one pixel per mask pixel).
            thumbnail: an RGB ``uint8`` image of the whole slide (e.g. :attr:`thumbnail`);
                when given, an overlay is also written: the thumbnail with the tissue tinted
                green and its outline drawn in blue, at the thumbnail's size.
            overlay_path: where the overlay goes; by default ``<path stem>_overlay.png``
                next to ``path``.

        Returns:
            The files written (the mask first). Each is written atomically.
        """
        path = Path(path)
        written = [path]
        with atomic_path(path) as tmp:
            Image.fromarray(self.mask.astype(np.uint8) * 255).save(tmp, format="PNG")
        if thumbnail is None:
            return written
        rgb = np.asarray(thumbnail)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"thumbnail must be RGB uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
        mask = self.mask
        if mask.shape != rgb.shape[:2]:
            img = Image.fromarray(mask.astype(np.uint8) * 255)
            img = img.resize((rgb.shape[1], rgb.shape[0]), Image.Resampling.NEAREST)
            mask = np.asarray(img) > 127
        edge = mask & ~ndimage.binary_erosion(mask, border_value=0)
        edge = ndimage.binary_dilation(edge, iterations=max(1, min(rgb.shape[:2]) // 500))
        out = rgb.astype(np.float32)
        out[mask] = 0.7 * out[mask] + 0.3 * np.array([0.0, 200.0, 0.0], dtype=np.float32)
        out[edge] = (0.0, 60.0, 255.0)
        overlay = Path(overlay_path) if overlay_path is not None else None
        if overlay is None:
            overlay = path.with_name(f"{path.stem}_overlay.png")
        with atomic_path(overlay) as tmp:
            Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8)).save(tmp, format="PNG")
        written.append(overlay)
        return written


def _otsu(values: np.ndarray, bins: int = 256) -> tuple[float, float]:
    """Otsu's threshold of ``values`` in ``[0, 1]`` and the between-class variance there."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(1, hist.sum())
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m = np.cumsum(p * centers)
    mt = m[-1]
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 - m) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    k = int(np.argmax(between[:-1]))
    # between-class variance is flat across empty bins: split in the middle of the gap
    j = k
    while j + 2 < bins and hist[j + 1] == 0:
        j += 1
    return float((edges[k + 1] + edges[j + 1]) / 2), float(max(between[k], 0.0))


def _disk(radius: int) -> np.ndarray:
    y, x = np.ogrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius + radius


def _positive(name: str, value: float, *, zero_ok: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok):
        raise ConfigError(
            f"{name} must be a {'non-negative' if zero_ok else 'positive'} number, got {value!r}"
        )
    return v


# Long: one pipeline in the order the module docstring gives (checks, thumbnail, saturation,
# Otsu threshold with hysteresis, closing/opening, hole filling, debris removal) on one mask.
def detect_tissue(
    image: SlideImage,
    *,
    mask_um_per_px: float = DEFAULT_MASK_UM_PER_PX,
    min_area_um2: float = 10_000.0,
    max_hole_um2: float = 2_500.0,
    threshold: float | None = None,
) -> TissueMask:
    """Find the tissue of an H&E slide (see the module docstring for the method).

    Args:
        image: the slide; its ``microns_per_pixel`` must be known (from the file or given
            to :func:`~magnet_st.io.image.open_image`).
        mask_um_per_px: the mask is computed on a thumbnail with one pixel per about this
            many microns (coarser when that would exceed :data:`MAX_MASK_PX` pixels on the
            longer side; never finer than the image itself).
        min_area_um2: connected pieces of tissue smaller than this (square microns) are
            dropped as debris; the default is a 100 x 100 um square.
        max_hole_um2: holes in the tissue up to this area are filled; bigger ones (lumens,
            tears, fat) stay out of the mask. 0 fills none.
        threshold: a fixed saturation threshold in ``[0, 1)`` (no hysteresis, no
            uniformity check); by default Otsu's, at least
            :data:`MIN_SATURATION_THRESHOLD`, with hysteresis.

    Returns:
        A :class:`TissueMask` (with its ``thumbnail``).

    Raises:
        InputError: the image's resolution is unknown, or no tissue was found (a blank or
            uniform image, or only specks smaller than ``min_area_um2``).
        ConfigError: an argument is out of range.
    """
    mask_um = _positive("mask_um_per_px", mask_um_per_px)
    min_area = _positive("min_area_um2", min_area_um2, zero_ok=True)
    max_hole = _positive("max_hole_um2", max_hole_um2, zero_ok=True)
    if threshold is not None:
        t = _positive("threshold", threshold, zero_ok=True)
        if t >= 1:
            raise ConfigError(f"threshold must be in [0, 1), got {threshold!r}")
    mpp = image.microns_per_pixel
    if mpp is None:
        raise InputError(
            image.path,
            "the image's resolution (microns per pixel) is unknown; give it explicitly",
        )
    w, h = image.size
    longest = max(w, h)
    max_size = max(1, min(MAX_MASK_PX, longest, math.ceil(longest * mpp / mask_um)))
    rgb, scale = image.thumbnail(max_size)
    px_um = mpp / scale  # microns per mask pixel
    px_area = px_um * px_um

    f = rgb.astype(np.float32)
    mx = f.max(axis=2)
    mn = f.min(axis=2)
    sat = ndimage.gaussian_filter(
        np.where(mx > 0, (mx - mn) / np.maximum(mx, 1.0), 0.0), sigma=1.0, mode="nearest"
    )
    excluded = (mn >= NEAR_WHITE) | (mx <= NEAR_BLACK)
    if threshold is None:
        otsu, _ = _otsu(np.clip(sat, 0.0, 1.0))
        t = max(otsu, MIN_SATURATION_THRESHOLD)
    raw = (sat > t) & ~excluded
    low: float | None = None
    if threshold is None and raw.any() and (~raw).any():
        glass = float(np.median(sat[~raw]))
        contrast = float(sat[raw].mean() - sat[~raw].mean())
        if contrast < MIN_CONTRAST:
            raw[:] = False
        else:
            # hysteresis: paler tissue (adipose, mucin) joined to clearly stained tissue
            low = max(MIN_SATURATION_THRESHOLD, glass + HYSTERESIS * (t - glass))
            weak = (sat > low) & ~excluded
            lab, n = ndimage.label(weak)
            strong = np.zeros(n + 1, dtype=bool)
            strong[np.unique(lab[raw])] = True
            strong[0] = False
            raw = strong[lab]
    if not raw.any():
        raise InputError(
            image.path,
            f"no tissue found: no part of the image is coloured like stained tissue "
            f"(HSV saturation above {t:.3f}); is it a blank or non-H&E image?",
        )

    radius = max(1, round(MORPHOLOGY_UM / px_um))
    disk = _disk(radius)
    # pad so that the closing does not glue tissue to the image border
    pad = radius + 1
    m = np.pad(raw, pad)
    m = ndimage.binary_closing(m, structure=disk)
    m = ndimage.binary_opening(m, structure=disk)[pad:-pad, pad:-pad]
    if max_hole > 0:
        holes = ndimage.binary_fill_holes(m) & ~m
        lab, n = ndimage.label(holes)
        if n:
            sizes = np.bincount(lab.ravel(), minlength=n + 1) * px_area
            fill = sizes <= max_hole
            fill[0] = False
            m |= fill[lab]
    lab, n = ndimage.label(m)
    if n:
        sizes = np.bincount(lab.ravel(), minlength=n + 1) * px_area
        keep = sizes >= min_area
        keep[0] = False
        m = keep[lab]
    if not m.any():
        raise InputError(
            image.path,
            f"no tissue found: the only coloured regions are smaller than min_area_um2="
            f"{min_area:g} um^2 ({float(raw.sum()) * px_area:.0f} um^2 in all before "
            "cleaning); lower min_area_um2 if the tissue really is that small",
        )
    return TissueMask(
        mask=m,
        scale=float(scale),
        microns_per_pixel=float(mpp),
        threshold=float(t),
        image_size_px=(int(w), int(h)),
        low_threshold=low,
        thumbnail=rgb,
    )


# --------------------------------------------------------------------------- virtual bins


@dataclass
class VirtualBins:
    """Square bins of a virtual Visium HD grid that lie under tissue, row-major.

    Attributes:
        centers_px: ``(n, 2)`` float64, bin centres ``(x, y)`` in full-resolution pixels.
        array_rc: ``(n, 2)`` int64, grid ``(row, col)`` of every bin.
        barcodes: ``(n,)`` str, Space Ranger style ``s_008um_00012_00034-1`` (bin size in
            whole microns, 3 digits; row and column, at least 5 digits).
        bin_um: bin edge, microns.
        origin_um: ``(x, y)`` of the top-left corner of bin ``(0, 0)``, microns from the
            image's top-left corner.
        microns_per_pixel: of the full-resolution image.
        grid_shape: ``(rows, cols)`` of the grid over the image (all bins, kept or not).
    """

    centers_px: np.ndarray
    array_rc: np.ndarray
    barcodes: np.ndarray
    bin_um: float
    origin_um: tuple[float, float]
    microns_per_pixel: float
    grid_shape: tuple[int, int] = (0, 0)

    def __len__(self) -> int:
        return len(self.barcodes)

    @property
    def bin_px(self) -> float:
        """Bin edge in full-resolution pixels."""
        return self.bin_um / self.microns_per_pixel

    def to_tissue_positions(self) -> pd.DataFrame:
        """The bins as Space Ranger's ``tissue_positions.parquet`` table (all in tissue)."""
        import pandas as pd

        return pd.DataFrame(
            {
                "barcode": self.barcodes.astype(object),
                "in_tissue": np.ones(len(self), dtype=np.int32),
                "array_row": self.array_rc[:, 0].astype(np.int32),
                "array_col": self.array_rc[:, 1].astype(np.int32),
                "pxl_row_in_fullres": self.centers_px[:, 1],
                "pxl_col_in_fullres": self.centers_px[:, 0],
            }
        )


def _bin_label(bin_um: float) -> str:
    if float(bin_um).is_integer():
        return f"{int(bin_um):03d}"
    return f"{bin_um:g}".replace(".", "p")


def _digits(values: np.ndarray, width: int) -> np.ndarray:
    """``(n, width)`` code points of the digits of non-negative integers, zero-padded."""
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((values[:, None] // powers) % 10 + ord("0")).astype(np.uint32)


def _barcodes(bin_um: float, rows: np.ndarray, cols: np.ndarray, width: int) -> np.ndarray:
    """Space Ranger barcodes ``s_008um_RRRRR_CCCCC-1`` as a numpy str array, vectorised.

    The characters are assembled as UCS-4 code points (numpy's str storage) and viewed as
    strings, with no Python loop over bins.
    """

    def chars(text: str) -> np.ndarray:
        return np.array([ord(ch) for ch in text], dtype=np.uint32)

    n = len(rows)
    prefix = chars(f"s_{_bin_label(bin_um)}um_")
    parts = [
        np.broadcast_to(prefix, (n, prefix.size)),
        _digits(rows, width),
        np.broadcast_to(chars("_"), (n, 1)),
        _digits(cols, width),
        np.broadcast_to(chars("-1"), (n, 2)),
    ]
    codes = np.ascontiguousarray(np.concatenate(parts, axis=1), dtype="<u4")
    return codes.view(f"<U{codes.shape[1]}").reshape(n)


def _axis_bins(origin: float, bin_um: float, mpp: float, size_px: int) -> np.ndarray:
    """Indices ``k >= 0`` of the bins whose centre lies inside ``[0, size_px)`` pixels."""
    hi = math.ceil((size_px * mpp - origin) / bin_um) + 1
    if hi <= 0:
        return np.zeros(0, dtype=np.int64)
    lo = max(0, math.floor(-origin / bin_um - 0.5) - 1)
    k = np.arange(lo, hi, dtype=np.int64)
    c = (origin + (k + 0.5) * bin_um) / mpp
    return k[(c >= 0) & (c < size_px)]


def virtual_bins(
    mask: TissueMask,
    bin_um: float,
    *,
    origin_um: tuple[float, float] = (0.0, 0.0),
    image_size_px: tuple[int, int] | None = None,
) -> VirtualBins:
    """The bins of a square ``bin_um`` grid whose centre is inside the image and on tissue.

    The grid is aligned with the image axes and anchored at ``origin_um`` (see the module
    docstring for the exact geometry). With ``origin_um`` set to a Visium HD capture area's
    top-left corner, the bins, their ``(row, col)`` and their centres are Space Ranger's.
    Work is done in bands of grid rows, linear in the number of bins: a full 6.5 mm
    capture area in 8 um bins (~660k) takes well under a second.

    Args:
        mask: from :func:`detect_tissue`.
        bin_um: bin edge, microns (Visium HD: 2, 8 or 16).
        origin_um: ``(x, y)`` of the top-left corner of bin ``(0, 0)``, microns from the
            image's top-left corner. Only bins right of and below it are made.
        image_size_px: ``(width, height)`` of the full-resolution image; by default the
            mask's.

    Raises:
        ConfigError: ``bin_um`` is not a positive number, ``origin_um`` is not two finite
            numbers, or ``image_size_px`` is not two positive integers.
    """
    b = _positive("bin_um", bin_um)
    try:
        ox, oy = (float(v) for v in origin_um)
    except (TypeError, ValueError):
        raise ConfigError(f"origin_um must be two numbers (x, y), got {origin_um!r}") from None
    if not (math.isfinite(ox) and math.isfinite(oy)):
        raise ConfigError(f"origin_um must be finite, got {origin_um!r}")
    size = mask.image_size_px if image_size_px is None else image_size_px
    try:
        width, height = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ConfigError(f"image_size_px must be (width, height), got {size!r}") from None
    if width < 1 or height < 1 or (width, height) != tuple(size):
        raise ConfigError(f"image_size_px must be two positive integers, got {size!r}")
    mpp = mask.microns_per_pixel
    cols = _axis_bins(ox, b, mpp, width)
    rows = _axis_bins(oy, b, mpp, height)
    grid_shape = (int(rows[-1]) + 1 if rows.size else 0, int(cols[-1]) + 1 if cols.size else 0)
    cx = (ox + (cols + 0.5) * b) / mpp
    cy = (oy + (rows + 0.5) * b) / mpp
    # mask pixel of every bin column / row (-1: outside the mask image)
    mh, mw = mask.mask.shape
    mcol = np.floor(cx * mask.scale).astype(np.int64)
    mrow = np.floor(cy * mask.scale).astype(np.int64)
    col_ok = (mcol >= 0) & (mcol < mw)
    cols, cx, mcol = cols[col_ok], cx[col_ok], mcol[col_ok]
    row_ok = (mrow >= 0) & (mrow < mh)
    rows, cy, mrow = rows[row_ok], cy[row_ok], mrow[row_ok]

    band = max(1, _BAND_BINS // max(1, cols.size))
    rr_parts: list[np.ndarray] = []
    cc_parts: list[np.ndarray] = []
    for start in range(0, rows.size, band):
        keep = mask.mask[np.ix_(mrow[start : start + band], mcol)]
        ri, ci = np.nonzero(keep)
        rr_parts.append(ri + start)
        cc_parts.append(ci)
    ri = np.concatenate(rr_parts) if rr_parts else np.zeros(0, dtype=np.int64)
    ci = np.concatenate(cc_parts) if cc_parts else np.zeros(0, dtype=np.int64)
    array_rc = np.stack([rows[ri], cols[ci]], axis=1).astype(np.int64)
    centers = np.stack([cx[ci], cy[ri]], axis=1).astype(np.float64)
    width_digits = max(5, len(str(int(array_rc.max())))) if len(array_rc) else 5
    barcodes = _barcodes(b, array_rc[:, 0], array_rc[:, 1], width_digits)
    return VirtualBins(
        centers_px=centers,
        array_rc=array_rc,
        barcodes=barcodes,
        bin_um=b,
        origin_um=(ox, oy),
        microns_per_pixel=mpp,
        grid_shape=grid_shape,
    )


#: spot arrays a virtual grid can be laid out as: centre-to-centre pitch (um) and layout
SPOT_ARRAYS = {"visium": (100.0, "hexagonal"), "legacy_st": (200.0, "square")}


def virtual_spots(
    mask: TissueMask,
    technology: str,
    *,
    origin_um: tuple[float, float] = (0.0, 0.0),
    image_size_px: tuple[int, int] | None = None,
) -> VirtualBins:
    """The spots of a virtual Visium (hexagonal, 100 um pitch) or legacy ST (square, 200 um
    pitch) array whose centre is inside the image and on tissue, row-major.

    Spot ``(row, col)`` is centred at ``origin_um + (col * dx, row * dy)`` microns with, for
    Visium, ``dx = 50`` and ``dy = 100 * sqrt(3) / 2`` and only columns of the row's parity
    (Space Ranger's array numbering: neighbours in a row are two columns apart), for ST
    ``dx = dy = 200``. Barcodes ``spot_<row>_<col>``. ``bin_um`` of the result is the
    column step.
    """
    if technology not in SPOT_ARRAYS:
        raise ConfigError(f"no virtual spot array for {technology!r}; known: {list(SPOT_ARRAYS)}")
    pitch, layout = SPOT_ARRAYS[technology]
    dx, dy = (pitch / 2, pitch * math.sqrt(3) / 2) if layout == "hexagonal" else (pitch, pitch)
    ox, oy = (float(v) for v in origin_um)
    width, height = mask.image_size_px if image_size_px is None else image_size_px
    mpp = mask.microns_per_pixel
    rows = np.arange(0, int(height * mpp / dy) + 1)
    cols = np.arange(0, int(width * mpp / dx) + 1)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    if layout == "hexagonal":
        keep = (rr % 2) == (cc % 2)
        rr, cc = rr[keep], cc[keep]
    x = (ox + cc * dx) / mpp
    y = (oy + rr * dy) / mpp
    mh, mw = mask.mask.shape
    mc = np.floor(x * mask.scale).astype(np.int64)
    mr = np.floor(y * mask.scale).astype(np.int64)
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    inside &= (mc >= 0) & (mc < mw) & (mr >= 0) & (mr < mh)
    on = np.zeros(len(x), bool)
    on[inside] = mask.mask[mr[inside], mc[inside]]
    rc = np.stack([rr[on], cc[on]], 1).astype(np.int64)
    return VirtualBins(
        centers_px=np.stack([x[on], y[on]], 1).astype(np.float64),
        array_rc=rc,
        barcodes=np.asarray([f"spot_{r}_{c}" for r, c in rc], dtype=object),
        bin_um=dx,
        origin_um=(ox, oy),
        microns_per_pixel=mpp,
        grid_shape=(len(rows), len(cols)),
    )
