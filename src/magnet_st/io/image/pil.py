"""Ordinary JPEG / PNG images through PIL."""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

from magnet_st.errors import InputError
from magnet_st.io.image.base import (
    SlideImage,
    _composite,
    _crop_padded,
    _pil_unlimited,
    _spill,
    _spill_empty,
    _to_uint8,
    _writable,
)

# --------------------------------------------------------------------------- PIL


_STRIP_ROWS = 256
"""Rows copied at a time from PIL's decoded image into the level-0 array."""


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
            arrays[level] = arr = _spill(arr)
            return arr

    def _decode(self) -> np.ndarray:
        try:
            with _pil_unlimited(), Image.open(self.path) as img:
                img.load()
                if img.mode != "RGB":
                    return _pil_to_rgb(img)
                # strip by strip into its final place: PIL's own buffer and one strip beside
                # it, not two more whole copies (np.asarray of a PIL image goes via bytes)
                w, h = img.size
                out = _spill_empty((h, w, 3))
                for y in range(0, h, _STRIP_ROWS):
                    out[y : y + _STRIP_ROWS] = np.asarray(
                        img.crop((0, y, w, min(y + _STRIP_ROWS, h)))
                    )
                return out
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
