"""magnet-st: predict Visium HD spatial gene expression from H&E slides with MagNet.

The pipeline runs one way: read -> prepare -> features -> train -> predict -> report.

>>> import magnet_st as ms
>>> slide = ms.read.visium_hd("outs/", bin_size_um=8, image="slide.btf")
>>> slide.summary()
"""

from magnet_st import read
from magnet_st.errors import InputError, MagnetError
from magnet_st.image import SlideImage, open_image
from magnet_st.slide import Slide

__version__ = "0.1.0.dev0"

__all__ = ["InputError", "MagnetError", "Slide", "SlideImage", "open_image", "read", "__version__"]
