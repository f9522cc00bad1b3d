"""magnet-st: predict Visium HD spatial gene expression from H&E slides with MagNet.

The pipeline runs one way: read -> prepare -> features -> train -> predict -> report.

>>> import magnet_st as ms
>>> slide = ms.read.visium_hd("outs/", bin_size_um=8, image="slide.btf")
>>> slide.summary()

In scanpy's shape: ``ms.pp`` (prepare, features), ``ms.tl`` (train, cv, benchmark,
predict), ``ms.pl`` (figures), ``ms.read`` (readers); see docs/api.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from magnet_st.errors import InputError, MagnetError

if TYPE_CHECKING:
    from magnet_st import pl, pp, read, tl
    from magnet_st.data.slide import Slide
    from magnet_st.io.image import SlideImage, open_image

__version__ = "0.1.0.dev0"

__all__ = [
    "InputError",
    "MagnetError",
    "Slide",
    "SlideImage",
    "__version__",
    "open_image",
    "pl",
    "pp",
    "read",
    "tl",
]

# Imported on first use, so that 'import magnet_st' (and 'magnet --help') stays light:
# the readers pull in pandas and scipy.
_LAZY = {
    "read": ("magnet_st.read", None),
    "pp": ("magnet_st.pp", None),
    "tl": ("magnet_st.tl", None),
    "pl": ("magnet_st.pl", None),
    "Slide": ("magnet_st.data.slide", "Slide"),
    "SlideImage": ("magnet_st.io.image", "SlideImage"),
    "open_image": ("magnet_st.io.image", "open_image"),
}


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
