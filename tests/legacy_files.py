"""Small legacy ST sections in the her2st layout, written by the tests that need them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def array_grid(nx: int, ny: int, checkerboard: bool = False) -> np.ndarray:
    """Array positions ``(x, y)`` from 1; a checkerboard keeps those with ``x + y`` even."""
    x, y = np.meshgrid(np.arange(1, nx + 1), np.arange(1, ny + 1), indexing="ij")
    xy = np.column_stack([x.ravel(), y.ravel()])
    return xy[xy.sum(axis=1) % 2 == 0] if checkerboard else xy


def write_section(
    root: Path,
    name: str,
    genes: list[str],
    xy: np.ndarray,
    *,
    pitch_um: float = 200.0,
    mpp: tuple[float, float] = (2.0, 2.0),
    seed: int = 0,
    means: np.ndarray | None = None,
    jitter_um: float = 0.0,
) -> Path:
    """Write section ``name`` under ``root`` (``ST-cnts``, ``ST-spotfiles``, ``ST-imgs``):
    spots at array positions ``xy``, ``pitch_um`` microns per array unit, an image of
    ``mpp`` microns per pixel along x and y (different = stretched), Poisson counts of
    ``genes`` (per-gene ``means``, default 1 .. 5). ``jitter_um``: each spot's detected
    centre lies that far (rms per axis) off the grid, as her2st's ``new_x`` / ``new_y``
    do (~17 um). Returns ``root``."""
    rng = np.random.default_rng(seed)
    means = np.linspace(1, 5, len(genes)) if means is None else np.asarray(means, float)
    counts = rng.poisson(means, size=(len(xy), len(genes)))
    rows = [f"{x}x{y}" for x, y in xy]
    for sub in ("ST-cnts", "ST-spotfiles", f"ST-imgs/{name[0]}/{name}"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    pd.DataFrame(counts, index=rows, columns=genes).to_csv(
        root / "ST-cnts" / f"{name}.tsv.gz", sep="\t"
    )
    margin_um = pitch_um
    found = xy + rng.normal(0.0, jitter_um / pitch_um, size=xy.shape) if jitter_um else xy
    px = (found * pitch_um - xy.min(axis=0) * pitch_um + margin_um) / np.asarray(mpp)
    spots = pd.DataFrame(
        {
            "x": xy[:, 0],
            "y": xy[:, 1],
            "new_x": found[:, 0].astype(float),
            "new_y": found[:, 1].astype(float),
            "pixel_x": px[:, 0],
            "pixel_y": px[:, 1],
            "selected": 1,
        }
    )
    spots.to_csv(root / "ST-spotfiles" / f"{name}_selection.tsv", sep="\t", index=False)
    w, h = (px.max(axis=0) + margin_um / np.asarray(mpp)).astype(int) + 1
    pixels = np.empty((h, w, 3), np.uint8)
    pixels[:] = (220, 170, 200)  # pinkish tissue
    Image.fromarray(pixels).save(root / "ST-imgs" / name[0] / name / f"{name}.png")
    return root
