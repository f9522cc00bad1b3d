"""Shared fixtures: paths of the real data in ../shared/data and small synthetic slides."""

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


@pytest.fixture(scope="session")
def her2st_root() -> Path:
    if not HER2ST.is_dir():
        pytest.fail(f"real her2st data not found at {HER2ST} (set MAGNET_ST_SHARED_DATA)")
    return HER2ST


@pytest.fixture(scope="session")
def hd_toy() -> Path:
    if not HD_TOY.is_dir():
        pytest.fail(f"Visium HD toy layout not found at {HD_TOY} (set MAGNET_ST_SHARED_DATA)")
    return HD_TOY


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small seeded synthetic Visium HD run (0.4 mm square, 2/8/16 um), shared read-only."""
    from magnet_st.synthetic import write_synthetic_hd

    out = tmp_path_factory.mktemp("synthetic") / "run"
    write_synthetic_hd(out, width_um=400, height_um=400, seed=3, progress=False)
    return out


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
