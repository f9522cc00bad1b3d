"""io: whole-slide images (every backend, the tile cache), tissue detection, exports.

Names are imported from their modules on first use (``magnet --help`` stays light).
"""

from magnet_st.util.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "DEFAULT_CACHE_BYTES": "image",
        "DEFAULT_MASK_UM_PER_PX": "tissue",
        "INSTANCE_KEY": "export",
        "LEVEL_TOLERANCE": "image",
        "MAX_MASK_PX": "tissue",
        "NGFF_VERSION": "export",
        "REGION_KEY": "export",
        "SlideImage": "image",
        "TILE_TABLES": "export",
        "TissueMask": "tissue",
        "VirtualBins": "tissue",
        "WHOLE_PAGE_BYTES": "image",
        "detect_tissue": "tissue",
        "element_name": "export",
        "open_image": "image",
        "table_name": "export",
        "virtual_bins": "tissue",
        "write_spatialdata": "export",
    },
)
