"""Shared fixtures: paths of the real data and small synthetic slides.

The real data live under ``$MAGNET_ST_SHARED_DATA`` (development default: ``../shared/data``
next to the clone). Without them, the tests that need them are skipped with a line that
says where to get them; under CI (``CI`` set) they fail instead, so CI never passes
without running them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    env = os.environ.get("MAGNET_ST_SHARED_DATA")
    if env:
        return Path(env)
    for base in (REPO.parent / "shared" / "data", REPO / "shared" / "data"):
        if base.is_dir():
            return base
    return REPO.parent / "shared" / "data"


SHARED = _shared_data()
HER2ST = SHARED / "her2st"
HD_TOY = SHARED / "formats" / "visium_hd_toy_002um_binned_outputs"


HER2ST_SOURCE = (
    "get the data/ folder of the public her2st repository (https://github.com/almaan/her2st) "
    "as her2st/data/ and set MAGNET_ST_SHARED_DATA to the folder that holds her2st/"
)
HD_TOY_SOURCE = (
    "get the Visium HD toy layout of the VisiumIO package's test data (Bioconductor) as "
    "formats/visium_hd_toy_002um_binned_outputs/ and set MAGNET_ST_SHARED_DATA to the "
    "folder that holds formats/"
)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_data(path: Path, what: str, source: str) -> Path:
    """``path`` if it is a folder; else skip with one line saying how to get it (fail in CI)."""
    if path.is_dir():
        return path
    message = f"{what} not found at {path}: {source}"
    if in_ci():
        pytest.fail(f"{message} (CI is set: these tests must run)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def her2st_root() -> Path:
    return require_data(HER2ST, "her2st sections", HER2ST_SOURCE)


@pytest.fixture(scope="session")
def hd_toy() -> Path:
    return require_data(HD_TOY, "Visium HD toy layout", HD_TOY_SOURCE)


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small seeded synthetic Visium HD run (0.4 mm square, 2/8/16 um), shared read-only."""
    from magnet_st.synthetic import write_synthetic_hd

    out = tmp_path_factory.mktemp("synthetic") / "run"
    write_synthetic_hd(out, width_um=400, height_um=400, seed=3, progress=False, cells=False)
    return out


@pytest.fixture(scope="session")
def hd_runs():
    """A factory of small synthetic HD runs: ``hd_runs(root, n, size_um, seed)`` writes
    ``n`` runs (8 and 16 um bins, seeds ``seed``, ``seed + 1`` ...) under ``root`` and
    returns their :class:`~magnet_st.read.specs.SlideSpec` (named s0, s1 ...)."""
    from magnet_st.read.specs import SlideSpec
    from magnet_st.synthetic import write_synthetic_hd

    def make(root: Path, n: int, size_um: int = 320, seed: int = 20) -> list:
        specs = []
        for i in range(n):
            run = root / f"s{i}"
            write_synthetic_hd(
                run,
                width_um=size_um,
                height_um=size_um,
                seed=seed + i,
                bin_sizes=(8, 16),
                progress=False,
                write_mtx=False,
                write_raw=False,
                cells=False,  # bins only: cells have their own tests (test_cells.py)
            )
            image = str(run / "he_fullres.tif")
            specs.append(SlideSpec(name=f"s{i}", path=str(run), image=image, bin_size=8))
        return specs

    return make


@pytest.fixture
def synthetic_copy(synthetic_slide: Path, tmp_path: Path) -> Path:
    """A private, writable copy of :func:`synthetic_slide` for tests that corrupt it."""
    dest = tmp_path / "run"
    shutil.copytree(synthetic_slide, dest)
    for p in dest.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dest


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module: the tiny models in tests gain nothing from more,
    and on a shared 2-core machine multi-threaded (OpenMP) runs slow down many times over."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
