"""util: atomic writes, locks, safe torch files, provenance.

Names are imported from their modules on first use (``magnet --help`` stays light).
"""

from magnet_st.util.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "PACKAGES": "provenance",
        "TMP_PREFIX": "atomic",
        "atomic_path": "atomic",
        "check_free_space": "atomic",
        "check_out_folder": "atomic",
        "clean_stale": "atomic",
        "describe_error": "torchfile",
        "hold": "lock",
        "load": "torchfile",
        "locked": "lock",
        "new_memmap": "atomic",
        "no_space": "atomic",
        "package_versions": "provenance",
        "write_text": "atomic",
    },
)
