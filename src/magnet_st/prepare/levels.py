"""levels: one slide's bins, spot tiles and region tiles, with their graphs."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from magnet_st.data.graph import knn_adjacency
from magnet_st.data.slide import Slide
from magnet_st.errors import ConfigError
from magnet_st.prepare.config import SQUARE_BINS, PrepareConfig
from magnet_st.prepare.geometry import assign_grid, grid_frame, membership_matrix

__all__ = ["build_levels"]

log = logging.getLogger(__name__)


# -- one slide -----------------------------------------------------------------------------


MIN_PATCH_NATIVE_PX = 16
"""A patch must cover at least this many pixels of the slide's own image (its edge)."""


def check_patch_resolution(slide: Slide, cfg: PrepareConfig) -> None:
    """Refuse a level whose patches cover fewer than :data:`MIN_PATCH_NATIVE_PX` pixels of
    the slide's image (e.g. Space Ranger's downsampled ``tissue_hires_image.png``)."""
    if slide.image_path is None:
        return
    options = {"bin": "bin_patch_px", "spot": "spot_tile_px", "region": "region_tile_px"}
    for lv, option in options.items():
        native = cfg.size_um(lv) / slide.microns_per_pixel
        if native < MIN_PATCH_NATIVE_PX:
            raise ConfigError(
                f"slide {slide.name}: {lv} patches of {cfg.size_um(lv):g} um cover only "
                f"{native:.1f} px of its image {slide.image_path} at "
                f"{slide.microns_per_pixel:.4g} um/px (fewer than {MIN_PATCH_NATIVE_PX}); give "
                f"the full-resolution image, or larger {lv} patches with "
                f"--{option.replace('_', '-')} ({option} in a config file)"
            )


# Long: tile-size checks (~30 lines), the spot and region grids with each spot tile's region, then
# the three AnnData built by the inner level() closure from slide, cfg, var and meta.
def build_levels(slide: Slide, cfg: PrepareConfig) -> dict[str, Any]:
    """The bin, spot and region AnnData objects of one slide (counts of all genes)."""
    import anndata

    check_patch_resolution(slide, cfg)
    if cfg.size_um("spot") < slide.unit_size_um:
        raise ConfigError(
            f"spot tiles of {cfg.size_um('spot'):g} um are smaller than the "
            f"{slide.unit_size_um:g} um units of {slide.name}: give larger tiles "
            f"(--spot-tile-px and --region-tile-px, pixels at {cfg.working_mpp:g} um/px), or, "
            "if the unit size is wrong, the right one (--unit-size UM, or the sample "
            "sheet's unit_size_um column)"
        )
    if cfg.size_um("region") < cfg.size_um("spot"):
        raise ConfigError(
            f"region tiles ({cfg.size_um('region'):g} um) are smaller than spot tiles "
            f"({cfg.size_um('spot'):g} um)"
        )
    if slide.technology in SQUARE_BINS:
        for lv in ("spot", "region"):
            ratio = cfg.size_um(lv) / slide.unit_size_um
            if abs(ratio - round(ratio)) > 1e-6:
                log.warning(
                    "%s: %s tiles of %g um are not a whole number of %g um bins; tiles will "
                    "hold different numbers of bins",
                    slide.name,
                    lv,
                    cfg.size_um(lv),
                    slide.unit_size_um,
                )
    uv, A = grid_frame(slide)
    spot = assign_grid(uv, A, cfg.size_um("spot"))
    region = assign_grid(uv, A, cfg.size_um("region"))
    # a spot tile belongs to the region tile that contains its centre
    spot_uv = (spot.tile_rc[:, ::-1] + 0.5) * spot.tile_um
    region_key = {tuple(rc): i for i, rc in enumerate(region.tile_rc)}
    spot_region_rc = np.floor(spot_uv / region.tile_um + 1e-9).astype(np.int64)[:, ::-1]
    spot_region = np.array([region_key.get(tuple(rc), -1) for rc in spot_region_rc])
    # a spot tile whose centre falls in a region without units: use its first unit's region
    orphan = np.flatnonzero(spot_region < 0)
    if len(orphan):
        first_unit = np.full(len(spot.tile_rc), -1)
        first_unit[spot.unit_tile[::-1]] = np.arange(len(uv))[::-1]
        spot_region[orphan] = region.unit_tile[first_unit[orphan]]

    counts = slide.counts
    var = pd.DataFrame(
        {"gene_ids": slide.gene_ids.astype(str)},
        index=pd.Index(slide.gene_names.astype(str), name="gene"),
    )
    meta = {
        "slide": slide.name,
        "technology": slide.technology,
        "unit_size_um": float(slide.unit_size_um),
        "microns_per_pixel": float(slide.microns_per_pixel),
        "image": str(slide.image_path) if slide.image_path else "",
        "working_mpp": float(cfg.working_mpp),
        "affine_um_to_px": A.tolist(),
    }

    def level(
        level_name: str, X: sp.csr_matrix, obs: pd.DataFrame, centers_px: np.ndarray, px: int
    ) -> anndata.AnnData:
        obs.index = obs.index.astype(str)
        obs["total_counts"] = np.asarray(X.sum(axis=1)).ravel()
        ad = anndata.AnnData(X=X, obs=obs, var=var.copy())
        ad.var_names_make_unique()
        ad.obsm["spatial"] = centers_px.astype(np.float64)
        conn, dist = knn_adjacency(centers_px * slide.microns_per_pixel, cfg.k)
        ad.obsp["spatial_connectivities"] = conn
        ad.obsp["spatial_distances"] = dist
        ad.uns["magnet"] = {
            **meta,
            "level": level_name,
            "patch_px": int(px),
            "patch_um": float(px * cfg.working_mpp),
            "k": int(cfg.k),
        }
        ad.uns["spatial"] = {
            slide.name: {
                "images": {},
                "scalefactors": {
                    "microns_per_pixel": float(slide.microns_per_pixel),
                    "spot_diameter_fullres": float(
                        (slide.unit_size_um if level_name == "bin" else px * cfg.working_mpp)
                        / slide.microns_per_pixel
                    ),
                    "bin_size_um": float(
                        slide.unit_size_um if level_name == "bin" else px * cfg.working_mpp
                    ),
                },
            }
        }
        return ad

    bin_obs = pd.DataFrame(index=pd.Index(slide.unit_ids.astype(str), name="barcode"))
    bin_obs["spot"] = spot.unit_tile.astype(np.int32)
    bin_obs["region"] = region.unit_tile.astype(np.int32)
    if slide.array_coords is not None:
        bin_obs["array_row"] = slide.array_coords[:, 0]
        bin_obs["array_col"] = slide.array_coords[:, 1]
    out = {"bin": level("bin", counts, bin_obs, slide.centers_px, cfg.bin_patch_px)}
    if slide.polygons is not None:  # cells: their outlines, flat (data.shapes.Polygons)
        out["bin"].uns["polygons"] = {
            "xy": slide.polygons.xy.astype(np.float64),
            "offsets": slide.polygons.offsets.astype(np.int64),
        }
    for name, grid in (("spot", spot), ("region", region)):
        M = membership_matrix(grid.unit_tile, len(grid.tile_rc))
        obs = pd.DataFrame(
            {
                "tile_row": grid.tile_rc[:, 0],
                "tile_col": grid.tile_rc[:, 1],
                "n_units": np.asarray(M.sum(axis=1)).ravel().astype(np.int32),
            },
            index=pd.Index([f"{name}_{r}_{c}" for r, c in grid.tile_rc], name="tile"),
        )
        if name == "spot":
            obs["region"] = spot_region.astype(np.int32)
        X = (M @ counts).tocsr()
        px = cfg.spot_tile_px if name == "spot" else cfg.region_tile_px
        out[name] = level(name, X, obs, grid.tile_centers_px, px)
    return out
