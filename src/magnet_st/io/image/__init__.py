"""Whole-slide image access: read any region of an H&E image at any resolution.

One module per backend (``tiff``, ``openslide``, ``pil``, ``zarr``) over the common
``base`` (:class:`SlideImage`, the tile cache); :func:`open_image` picks the backend
(``open``). See :mod:`magnet_st.io.image.base` for what every backend guarantees.
"""

from magnet_st.io.image.base import (
    DEFAULT_CACHE_BYTES,
    LEVEL_TOLERANCE,
    MAX_PLAUSIBLE_MPP,
    MAX_READ_PIXELS,
    OPENSLIDE_SUFFIXES,
    PIL_SUFFIXES,
    TIFF_SUFFIXES,
    WHOLE_PAGE_BYTES,
    SlideImage,
)
from magnet_st.io.image.open import (
    open_image,
)
from magnet_st.io.image.zarr import (
    ZARR_MAX_CHUNK_BYTES,
    ZARR_WINDOW_PX,
    ngff_multiscale,
)

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "LEVEL_TOLERANCE",
    "MAX_PLAUSIBLE_MPP",
    "MAX_READ_PIXELS",
    "OPENSLIDE_SUFFIXES",
    "PIL_SUFFIXES",
    "SlideImage",
    "TIFF_SUFFIXES",
    "WHOLE_PAGE_BYTES",
    "ZARR_MAX_CHUNK_BYTES",
    "ZARR_WINDOW_PX",
    "ngff_multiscale",
    "open_image",
]
