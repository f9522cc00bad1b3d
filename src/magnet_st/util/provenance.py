"""Versions of the packages that made a file, recorded beside it."""

from __future__ import annotations

from collections.abc import Sequence

PACKAGES = ("magnet-st", "numpy", "scipy", "pandas", "anndata", "scanpy", "h5py", "tifffile")


def package_versions(packages: Sequence[str] = PACKAGES) -> dict[str, str]:
    """``{package: version}``; ``"not installed"`` for a package that is not."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
