"""prepare: a prepared dataset from slides: bins, spot and region tiles, panel, graphs.

Names are imported from their modules on first use (``magnet --help`` stays light).
"""

from magnet_st.util.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "LEVELS": "build",
        "PRESETS": "config",
        "PrepareConfig": "config",
        "PrepareResult": "build",
        "SQUARE_BINS": "config",
        "build_levels": "levels",
        "dataset_is_complete": "build",
        "describe_tiles": "config",
        "prepare": "build",
        "prepare_unmeasured": "build",
        "snap_tile_px": "config",
        "tile_summary": "config",
    },
)
