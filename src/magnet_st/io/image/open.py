"""open_image: the backend for a path, tried in order."""

from __future__ import annotations

from pathlib import Path

from magnet_st.errors import InputError
from magnet_st.io.image.base import (
    _RESAMPLE,
    _TIFF_MAGICS,
    DEFAULT_CACHE_BYTES,
    OPENSLIDE_SUFFIXES,
    PIL_SUFFIXES,
    TIFF_SUFFIXES,
    SlideImage,
    _check_mpp,
    _short,
)
from magnet_st.io.image.openslide import _OpenSlideImage
from magnet_st.io.image.pil import _PILImage
from magnet_st.io.image.tiff import _TiffImage
from magnet_st.io.image.zarr import _is_zarr_group, _ZarrImage

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
