"""Vendor whole-slide formats through OpenSlide."""

from __future__ import annotations

from typing import Any

import numpy as np

from magnet_st.errors import InputError
from magnet_st.io.image.base import LEVEL_TOLERANCE, SlideImage, _composite

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
