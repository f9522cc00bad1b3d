"""prepare: a prepared dataset from slides: bins, spot and region tiles, panel, graphs.

Names are imported from their modules on first use (``magnet --help`` stays light).
"""

from magnet_st.util.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "LEVELS": "build",
        "PRESETS": "build",
        "PrepareConfig": "build",
        "PrepareResult": "build",
        "SQUARE_BINS": "build",
        "build_levels": "build",
        "dataset_is_complete": "build",
        "describe_tiles": "build",
        "prepare": "build",
        "prepare_unmeasured": "build",
        "snap_tile_px": "build",
        "tile_summary": "build",
    },
)
