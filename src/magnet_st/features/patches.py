"""patches: cut square tiles centred on units from a slide image, one way for every use.

Both the feature cache (:mod:`magnet_st.features.store`, frozen encoders) and the end-to-end
bin encoder (:class:`magnet_st.model.inputs.PatchReader`) cut their tiles with a
:class:`TileCutter`:

1. a box of ``native_px = round(patch_um / microns_per_pixel)`` native pixels centred on
   the unit, aligned to whole pixels, so that the read is a plain copy of stored pixels
   (no resampling in the image reader) and every tile has the same size;
2. only when that box would exceed ``max(MIN_READ_CAP, 4 x the model input)`` px (coarse
   tiles on a sharp image) is it read reduced, by the image reader, to 2x the input;
3. the uint8 batch is resampled to the model input in torch
   (:meth:`magnet_st.features.encoders.Preprocess.resize`, antialiased).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

MIN_READ_CAP = 1024
"""Native boxes up to this edge (or 4x the encoder input, if larger) are read unreduced."""


def read_px(native_px: int, input_px: int) -> int:
    """The edge a ``native_px`` box is read at for a model input of ``input_px``."""
    cap = max(MIN_READ_CAP, 4 * int(input_px))
    return int(native_px) if native_px <= cap else 2 * int(input_px)


@dataclass(frozen=True)
class TileCutter:
    """How the tiles of one size are cut from one image (see the module docstring).

    ``native_px``: the box edge in whole native pixels; ``read_px``: the edge the box is
    read at (``native_px``: unreduced); ``span``: the exact tile edge in native pixels
    (``patch_um / microns_per_pixel``), used when the box is read reduced.
    """

    native_px: int
    read_px: int
    span: float

    @classmethod
    def plan(cls, patch_um: float, mpp: float, input_px: int) -> TileCutter:
        """The cutter for tiles of ``patch_um`` on an image of ``mpp`` microns per pixel,
        for a model whose input edge is ``input_px``."""
        native = max(1, round(patch_um / mpp))
        return cls(native, read_px(native, input_px), patch_um / mpp)

    def read(self, image: Any, cx: float, cy: float) -> np.ndarray:
        """The uint8 ``(read_px, read_px, 3)`` tile centred on ``(cx, cy)`` (native px)."""
        n, r = self.native_px, self.read_px
        if r == n:  # whole native pixels: a plain copy of stored pixels
            x0, y0 = round(cx - n / 2), round(cy - n / 2)
            return image.read_region(x0, y0, n, n, (n, n))
        s = self.span
        return image.read_region(cx - s / 2, cy - s / 2, s, s, (r, r))

    def cut(self, image: Any, centers: np.ndarray) -> np.ndarray:
        """The uint8 tiles ``(B, read_px, read_px, 3)`` centred on ``centers`` ``(B, 2)``."""
        out = np.empty((len(centers), self.read_px, self.read_px, 3), np.uint8)
        for j, (cx, cy) in enumerate(np.asarray(centers, dtype=np.float64)):
            out[j] = self.read(image, cx, cy)
        return out
