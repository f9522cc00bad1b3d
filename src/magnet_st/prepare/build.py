"""prepare: turn slides into MagNet's multi-level dataset, once.

Every target unit (an HD bin, a Visium spot or a legacy ST spot) is seen at three
levels (docs/design.md):

========  ==============================  ===========================================
level     image                           expression target
========  ==============================  ===========================================
bin       patch centred on the unit       the unit's own counts
spot      tile of a non-overlapping grid  sum of the units whose centre lies in it
region    tile of a coarser grid          sum of the units whose centre lies in it
========  ==============================  ===========================================

Membership is pure geometry: no expression is used to place anything. On Visium HD
the grids are laid on Space Ranger's bin grid (array rows and columns), so 16 um tiles
over 8 um bins reproduce Space Ranger's 16 um bins exactly; elsewhere the grids start
at the corner of the tissue's bounding box, in microns.

Tiles are a shared grid, not patches centred on each unit (docs/design.md). On Visium HD
a tile's edge is snapped to a whole number of bins (the nearest multiple of the bin size,
halves rounded up, keeping ``working_mpp``): the hd preset's 56 um spot tiles stay 56 um
(7 x 7 bins) over 8 um bins and become 64 um (4 x 4 bins) over 16 um bins; 128 um region
tiles are 16 x 16 or 8 x 8 bins. Every tile away from the tissue edge then holds the same
bins, and its image crop (``patch_um``) is exactly their footprint. Round Visium and
legacy ST spots are not snapped. The rule and the sizes are recorded under ``tiles`` in
``manifest.json`` and logged.

Output (``DATASET/``)::

    manifest.json                 written last: config, panel, targets, slides, versions, checksums
    panel.tsv                     gene_id, gene_name of the panel, in order
    slides/<name>/bin.h5ad        units: raw counts (all genes), obsm["spatial"] (px),
                  spot.h5ad       obs["spot"], obs["region"] membership, kNN graph in
                  region.h5ad     obsp["spatial_connectivities"] / ["spatial_distances"]
                  slide.json      what the slide was built from (for resume and no-op reruns)

A dataset without ``manifest.json`` is incomplete and is refused by later stages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tomllib
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from magnet_st.data.format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SLIDE_RECORD,
    slide_dir_is_complete,
    slide_lists_all,
)
from magnet_st.data.graph import knn_adjacency
from magnet_st.data.levels import LEVELS
from magnet_st.data.panel import gene_columns, select_panel, usable_genes
from magnet_st.data.slide import Slide
from magnet_st.data.targets import TargetTransform
from magnet_st.errors import ConfigError, InputError
from magnet_st.read.specs import SlideSpec
from magnet_st.util.atomic import (
    atomic_path,
    check_free_space,
    check_out_folder,
    clean_stale,
    write_text,
)
from magnet_st.util.lock import locked
from magnet_st.util.provenance import package_versions

log = logging.getLogger(__name__)


PRESETS: dict[str, dict[str, float]] = {
    # MagNet paper sizes at ~0.25 um/px: 112 px (28 um), 224 px (56 um), 512 px (128 um);
    # tiles are snapped to whole bins (SQUARE_BINS): 56 um -> 64 um (256 px) over 16 um bins
    "hd": {"working_mpp": 0.25, "bin_patch_px": 112, "spot_tile_px": 224, "region_tile_px": 512},
    # 55 um spots on a 100 um pitch: ~4 spots per 224 um tile, ~20 per 448 um region
    "visium": {
        "working_mpp": 1.0,
        "bin_patch_px": 112,
        "spot_tile_px": 224,
        "region_tile_px": 448,
    },
    # 100 um spots on a 200 um pitch: ~4 spots per 400 um tile, ~16 per 800 um region
    "legacy_st": {
        "working_mpp": 1.0,
        "bin_patch_px": 112,
        "spot_tile_px": 400,
        "region_tile_px": 800,
    },
}
SQUARE_BINS = ("visium_hd",)
"""Technologies whose units are square bins on an array grid: tiles snap to whole bins."""
PRESET_OF_TECHNOLOGY = {
    "visium_hd": "hd",
    "anndata": "hd",
    "visium": "visium",
    "legacy_st": "legacy_st",
}
"""The preset of a technology when the unit size is not known."""


def preset_for(technology: str, unit_size_um: float | None = None) -> str:
    """The size preset that fits units of ``unit_size_um``, whatever the container:
    ``hd`` for bins of 16 um or less, ``visium`` up to 75 um (55 um spots), ``legacy_st``
    above (100 um spots); without a unit size, :data:`PRESET_OF_TECHNOLOGY`."""
    if not unit_size_um:
        return PRESET_OF_TECHNOLOGY[technology]
    if unit_size_um <= 16:
        return "hd"
    return "visium" if unit_size_um <= 75 else "legacy_st"


def _of_type(value: Any, annotation: str) -> bool:
    """Whether a config file's value fits a field annotated ``annotation`` (``int``,
    ``float | None``, ``list[str] | None``, ...)."""
    for kind in (a.strip() for a in annotation.split("|")):
        if kind == "None" and value is None:
            return True
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        if kind == "str" and isinstance(value, str):
            return True
        if kind == "bool" and isinstance(value, bool):
            return True
        if kind.startswith("list[") and isinstance(value, list):
            return all(_of_type(v, kind[5:-1]) for v in value)
    return False


@dataclass
class PrepareConfig:
    """Settings of ``magnet prepare``. ``None`` sizes come from the preset.

    Sizes are in pixels at ``working_mpp`` microns per pixel; the size in microns is
    their product (e.g. 112 px x 0.25 um/px = 28 um).
    """

    preset: str = "auto"
    working_mpp: float | None = None
    bin_patch_px: int | None = None
    spot_tile_px: int | None = None
    region_tile_px: int | None = None
    k: int = 8
    panel: str = "hvg"
    n_genes: int = 250
    genes: list[str] | None = None
    target: str = "log1p"
    train_slides: list[str] | None = None
    seed: int = 0

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> PrepareConfig:
        """Read a TOML or JSON config file; ``overrides`` that are not ``None`` win."""
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "config file not found")
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (OSError, ValueError) as exc:
            raise InputError(path, f"cannot parse the config file ({exc})") from exc
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(path, f"unknown settings {unknown}; known: {sorted(known)}")
        for f in fields(cls):  # a value of the wrong type: one line naming it, here
            if f.name in data and not _of_type(data[f.name], str(f.type)):
                raise InputError(
                    path,
                    f"setting {f.name} = {data[f.name]!r} should be {f.type}, not "
                    f"{type(data[f.name]).__name__}",
                )
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    def resolved(
        self, technology: str, unit_size_um: float | None = None, *, snap: bool = True
    ) -> PrepareConfig:
        """A copy with the preset's sizes filled in, checked.

        The ``auto`` preset follows the unit size (:func:`preset_for`). With
        ``unit_size_um`` on square bins (:data:`SQUARE_BINS`) and ``snap``, the spot and
        region tile sizes are snapped to whole bins (:func:`snap_tile_px`); the result is
        the same when resolved again, so a resolved config stored in a manifest stays as
        it is.
        """
        preset = preset_for(technology, unit_size_um) if self.preset == "auto" else self.preset
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose auto or one of {list(PRESETS)}")
        values = asdict(self)
        values["preset"] = preset
        for key, default in PRESETS[preset].items():
            if values[key] is None:
                values[key] = default
        cfg = PrepareConfig(**values)
        cfg.check()
        if technology in SQUARE_BINS and unit_size_um and snap:
            for key in ("spot_tile_px", "region_tile_px"):
                setattr(
                    cfg,
                    key,
                    snap_tile_px(getattr(cfg, key), cfg.working_mpp, unit_size_um, key[:-8]),
                )
        return cfg

    def check(self) -> None:
        if not self.working_mpp or self.working_mpp <= 0:
            raise ConfigError(f"working_mpp must be positive, got {self.working_mpp}")
        for key in ("bin_patch_px", "spot_tile_px", "region_tile_px"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 8:
                raise ConfigError(f"{key} must be an integer of at least 8 pixels, got {v!r}")
        if self.k < 1:
            raise ConfigError(f"k must be at least 1, got {self.k}")
        if self.n_genes < 1:
            raise ConfigError(f"n_genes must be at least 1, got {self.n_genes}")
        TargetTransform(self.target)

    def size_um(self, level: str) -> float:
        px = {"bin": self.bin_patch_px, "spot": self.spot_tile_px, "region": self.region_tile_px}
        return float(px[level]) * float(self.working_mpp)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update({f"{lv}_size_um": self.size_um(lv) for lv in LEVELS} if self.working_mpp else {})
        return d


def snap_tile_px(px: int, working_mpp: float, unit_um: float, level: str = "tile") -> int:
    """The tile edge in pixels at ``working_mpp`` snapped to a whole number of
    ``unit_um`` bins: the nearest multiple of the bin (halves rounded up), e.g. 56 um ->
    64 um over 16 um bins. A tile smaller than one bin is left as it is (and refused by
    :func:`build_levels`). Raises :class:`ConfigError` when the snapped size is not a
    whole number of pixels at ``working_mpp``."""
    size_um = px * working_mpp
    if size_um < unit_um:
        return px
    n = int(np.floor(size_um / unit_um + 0.5 + 1e-9))
    snapped = n * unit_um / working_mpp
    if abs(snapped - round(snapped)) > 1e-6:
        raise ConfigError(
            f"{level} tiles of {size_um:g} um snap to {n * unit_um:g} um ({n} x {unit_um:g} "
            f"um bins), {snapped:g} px at working_mpp {working_mpp:g}: not a whole number of "
            f"pixels; choose a working_mpp that divides {unit_um:g} um (e.g. 0.25, 0.5 or 1)"
        )
    return int(round(snapped))


def tile_summary(
    cfg: PrepareConfig, technology: str, unit_size_um: float, requested: PrepareConfig
) -> dict[str, Any]:
    """How the tiles of a resolved ``cfg`` relate to the units (stored in the manifest):
    the rule, the unit and tile sizes in microns, the sizes asked for (``requested``,
    resolved without snapping) and, on square bins, the bins per interior tile."""
    ratios = [cfg.size_um(lv) / unit_size_um for lv in ("spot", "region")]
    whole = all(abs(r - round(r)) < 1e-6 for r in ratios)
    snapped = technology in SQUARE_BINS and whole
    if snapped:
        rule = (
            "shared non-overlapping grid on the array grid; tile edge snapped to the nearest "
            "multiple of the bin size (halves up), image crop = the tile's footprint"
        )
    elif technology in SQUARE_BINS:  # e.g. a model trained on other bins
        rule = (
            "shared non-overlapping grid on the array grid; tile sizes (given) are not whole "
            "multiples of the bin size, so tiles hold different numbers of bins"
        )
    else:
        rule = (
            "shared non-overlapping grid from the corner of the units' bounding box; "
            "sizes as configured (round spots are not snapped)"
        )
    out: dict[str, Any] = {
        "rule": rule,
        "unit_um": float(unit_size_um),
        "spot_um": cfg.size_um("spot"),
        "region_um": cfg.size_um("region"),
        "requested_um": {lv: requested.size_um(lv) for lv in ("spot", "region")},
    }
    if snapped:
        out["bins_per_tile"] = {
            lv: round(cfg.size_um(lv) / unit_size_um) ** 2 for lv in ("spot", "region")
        }
    return out


def describe_tiles(tiles: dict[str, Any]) -> str:
    """One line for logs and summaries, e.g. ``spot tiles 64 um (4 x 4 bins of 16 um; 56 um
    asked), region tiles 128 um (8 x 8 bins)``."""
    parts = []
    for lv in ("spot", "region"):
        um, asked = tiles[f"{lv}_um"], tiles["requested_um"][lv]
        notes = []
        if "bins_per_tile" in tiles:
            side = round(um / tiles["unit_um"])
            notes.append(f"{side} x {side} bins of {tiles['unit_um']:g} um")
        if abs(um - asked) > 1e-9:
            notes.append(f"{asked:g} um asked, snapped to whole bins")
        parts.append(f"{lv} tiles {um:g} um" + (f" ({'; '.join(notes)})" if notes else ""))
    return ", ".join(parts)


# -- geometry ------------------------------------------------------------------------------


@dataclass
class Grid:
    """A non-overlapping square grid over a slide, and the tiles that hold units."""

    tile_um: float
    unit_tile: np.ndarray  # (n_units,) index of each unit's tile
    tile_rc: np.ndarray  # (n_tiles, 2) grid row, column of each tile
    tile_centers_px: np.ndarray  # (n_tiles, 2) x, y in full-resolution pixels


def grid_frame(slide: Slide) -> tuple[np.ndarray, np.ndarray]:
    """Unit positions ``(u, v)`` in microns in the frame the grids are laid in, and the
    affine map ``A`` (3 x 2) from ``[u, v, 1]`` to full-resolution pixels ``(x, y)``.

    Visium HD: Space Ranger's bin grid, ``u = (array_col + 1/2) * bin``, so tile edges
    fall on bin edges. Otherwise: microns from the corner of the units' bounding box.
    """
    if slide.technology == "visium_hd" and slide.array_coords is not None:
        rc = slide.array_coords.astype(np.float64)
        uv = (rc[:, ::-1] + 0.5) * slide.unit_size_um
        design = np.column_stack([uv, np.ones(len(uv))])
        A, *_ = np.linalg.lstsq(design, slide.centers_px, rcond=None)
        resid = np.abs(design @ A - slide.centers_px).max()
        if resid > 0.5 * slide.unit_size_um / slide.microns_per_pixel:
            raise InputError(
                slide.sources.get("positions"),
                f"bin positions do not follow the array grid (off by up to {resid:.1f} px)",
            )
        return uv, A
    um = slide.centers_um
    origin = um.min(axis=0) - slide.unit_size_um / 2
    uv = um - origin
    mpp = slide.microns_per_pixel
    A = np.array([[1 / mpp, 0.0], [0.0, 1 / mpp], origin / mpp])
    return uv, A


def assign_grid(uv: np.ndarray, A: np.ndarray, tile_um: float) -> Grid:
    """Put every unit in the tile that contains its centre; keep tiles with members."""
    # the epsilon keeps centres that sit exactly on an edge (exact multiples) stable
    cell = np.floor(uv / tile_um + 1e-9).astype(np.int64)
    cell_rc = cell[:, ::-1]
    tiles, unit_tile = np.unique(cell_rc, axis=0, return_inverse=True)
    centers_uv = (tiles[:, ::-1] + 0.5) * tile_um
    centers_px = np.column_stack([centers_uv, np.ones(len(tiles))]) @ A
    return Grid(tile_um, unit_tile.ravel(), tiles, centers_px)


def membership_matrix(index: np.ndarray, n_groups: int) -> sp.csr_matrix:
    """Sparse ``n_groups x n`` indicator: row g has ones at the members of group g."""
    n = len(index)
    return sp.csr_matrix((np.ones(n, np.int32), (index, np.arange(n))), shape=(n_groups, n))


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


# -- checksums -----------------------------------------------------------------------------

_FULL_HASH_BYTES = 256 * 2**20
_PART_BYTES = 16 * 2**20


def file_checksum(path: Path) -> str:
    """sha256 of the file; for files over 256 MiB, of its size, first and last 16 MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if size <= _FULL_HASH_BYTES:
            for block in iter(lambda: fh.read(2**20), b""):
                h.update(block)
            return "sha256:" + h.hexdigest()
        h.update(str(size).encode())
        h.update(fh.read(_PART_BYTES))
        fh.seek(size - _PART_BYTES)
        h.update(fh.read(_PART_BYTES))
    return "sha256-ends:" + h.hexdigest()


def input_files(slide: Slide) -> list[Path]:
    """The files a slide was read from (matrix, positions, scale factors, image)."""
    files = []
    for value in slide.sources.values():
        p = Path(str(value).split(" ")[0])
        if p.is_file():
            files.append(p)
    return sorted(set(files))


def fingerprint(files: list[Path], known: dict[str, dict] | None = None) -> dict[str, dict]:
    """``{path: {size, mtime_ns, checksum}}``; the checksum is reused when size and mtime
    match ``known``."""
    out = {}
    for p in files:
        st = p.stat()
        key = str(p.resolve())
        old = (known or {}).get(key)
        if old and old["size"] == st.st_size and old["mtime_ns"] == st.st_mtime_ns:
            out[key] = old
        else:
            out[key] = {
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "checksum": file_checksum(p),
            }
    return out


def unchanged(recorded: dict[str, dict]) -> bool:
    """Whether every recorded input file is still as it was."""
    for path, rec in recorded.items():
        p = Path(path)
        if not p.is_file():
            return False
        st = p.stat()
        if st.st_size != rec["size"]:
            return False
        if st.st_mtime_ns != rec["mtime_ns"] and file_checksum(p) != rec["checksum"]:
            return False
    return True


# -- the dataset ---------------------------------------------------------------------------


@dataclass
class PrepareResult:
    path: Path
    processed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    panel: list[str] = field(default_factory=list)
    nothing_to_do: bool = False
    tiles: dict[str, Any] = field(default_factory=dict)
    """The tile sizes and rule, as in the manifest (see :func:`describe_tiles`)."""
    filled: dict[str, int] = field(default_factory=dict)
    """Per slide that lists only detected genes: panel genes it does not list (zeros)."""


def _read_slide_record(folder: Path) -> dict | None:
    try:
        rec = json.loads((folder / SLIDE_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec if slide_dir_is_complete(folder) else None


def _read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return m if m.get("format") == FORMAT else None


def _config_key(cfg: PrepareConfig) -> dict:
    """Settings that change the per-slide files (the panel and targets do not)."""
    d = cfg.to_dict()
    return {
        k: d[k]
        for k in ("preset", "working_mpp", "bin_patch_px", "spot_tile_px", "region_tile_px", "k")
    }


def _written_bytes(levels: dict[str, Any]) -> list[int]:
    """About what writing each of ``levels`` as .h5ad takes: the count matrix (value +
    index per stored count), obs and obsm, plus the file's own overhead."""
    sizes = []
    for ad in levels.values():
        x = ad.X
        nnz = int(x.nnz) if hasattr(x, "nnz") else int(np.prod(x.shape))
        sizes.append(nnz * 12 + ad.n_obs * (64 + 8 * max(1, len(ad.obs.columns))) + 65536)
    return sizes


@locked("out", "magnet prepare")
def prepare(
    specs: list[SlideSpec],
    out: str | Path,
    config: PrepareConfig | None = None,
    *,
    add: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> PrepareResult:
    """Build (or update) a multi-level dataset at ``out`` from the slides of ``specs``.

    Args:
        specs: the slides (see :mod:`magnet_st.read.specs`).
        out: the dataset folder.
        config: sizes, graph, panel and target settings; ``None`` = defaults.
        add: keep the dataset's slides, config and panel and add ``specs`` to it; the new
            slides must hold every panel gene.
        overwrite: rebuild every slide even when its inputs are unchanged.

    Slides whose inputs and settings are unchanged are not rebuilt; a rerun on unchanged
    inputs writes nothing. The manifest is removed while work is in progress and written
    last, so an interrupted run never leaves a dataset that looks complete.
    """
    check_out_folder(out)
    out = Path(out)
    old = _read_manifest(out)
    if add:
        if old is None:
            raise InputError(out, "--add needs an existing, complete dataset")
        config = PrepareConfig(**{k: v for k, v in old["config"].items() if not k.endswith("_um")})
        names_old = set(old["slides"])
        clash = [s.name for s in specs if s.name in names_old]
        if clash:
            raise InputError(out, f"slides {clash} are already in the dataset")
        specs = [SlideSpec(**old["slides"][n]["spec"]) for n in old["slides"]] + specs
    config = config or PrepareConfig()
    if not specs:
        raise ConfigError("no slides to prepare")
    train = config.train_slides or [s.name for s in specs if not add or s.name in old["slides"]]
    unknown = sorted(set(train) - {s.name for s in specs})
    if unknown:
        raise ConfigError(f"training slides {unknown} are not among the inputs")

    # Which slides need (re)building? A slide is fresh when its spec, input files and
    # per-slide settings are those recorded in the manifest.
    old_slides = dict((old or {}).get("slides", {}))
    for spec in specs:  # slides finished by an interrupted run are recorded in their folder
        if spec.name not in old_slides:
            rec = _read_slide_record(out / "slides" / spec.name)
            if rec is not None:
                old_slides[spec.name] = rec

    def fresh(spec: SlideSpec) -> bool:
        rec = old_slides.get(spec.name)
        return (
            not overwrite
            and rec is not None
            and rec["spec"] == spec.to_dict()
            and slide_dir_is_complete(out / rec["dir"])
            and rec["config"]
            == _config_key(config.resolved(rec["technology"], rec.get("unit_size_um")))
            and unchanged(rec["files"])
        )

    plan = [(spec, fresh(spec)) for spec in specs]
    if (
        old is not None
        and all(f for _, f in plan)
        and set(old["slides"]) == {s.name for s in specs}
        and old["config"] == _resolved_dict(config, old_slides, train)
    ):
        log.info("%s: inputs and settings unchanged; nothing to do", out)
        return PrepareResult(
            out,
            skipped=[s.name for s in specs],
            nothing_to_do=True,
            tiles=old.get("tiles", {}),
        )

    # Folders are made when the first slide is written, so that a run stopped by bad
    # input leaves no empty folders behind.
    clean_stale(out)
    clean_stale(out / "slides")

    result = PrepareResult(out)
    slides_meta: dict[str, dict] = {}
    resolved: PrepareConfig | None = None
    first: tuple[str, str, float] = ("", "", 0.0)  # slide, technology, unit size of `resolved`
    bar = tqdm(plan, desc="prepare", unit="slide", disable=not progress)
    for spec, is_fresh in bar:
        if is_fresh:
            rec = old_slides[spec.name]
            technology, unit_um = rec["technology"], float(rec["unit_size_um"])
            cfg = config.resolved(technology, unit_um)
            slides_meta[spec.name] = rec
            result.skipped.append(spec.name)
        else:
            bar.set_postfix_str(f"{spec.name}: read")
            slide = spec.load()
            slide.check_counts()  # an all-zero slide has nothing to learn from
            if slide.image_path is None:
                raise InputError(
                    spec.path,
                    f"slide {spec.name}: no full-resolution image given (--image or the "
                    "sample sheet's image column); the image is needed to cut patches",
                )
            technology, unit_um = slide.technology, float(slide.unit_size_um)
            cfg = config.resolved(technology, unit_um)
            if add and slide.lists_all_genes:  # else absent panel genes are zeros
                _check_genes(spec, set(slide.gene_ids.astype(str)), old["panel"]["gene_ids"])
            bar.set_postfix_str(f"{spec.name}: tiles and graphs")
            levels = build_levels(slide, cfg)
            bar.set_postfix_str(f"{spec.name}: write")
            rel = f"slides/{spec.name}"
            record = {
                "spec": spec.to_dict(),
                "dir": rel,
                "config": _config_key(cfg),
                "files": fingerprint(
                    input_files(slide), old_slides.get(spec.name, {}).get("files")
                ),
                "technology": slide.technology,
                "unit_size_um": float(slide.unit_size_um),
                "microns_per_pixel": float(slide.microns_per_pixel),
                "image": str(Path(slide.image_path).resolve()),
                "n_genes_measured": int(slide.n_genes),
                "lists_all_genes": bool(slide.lists_all_genes),
                "n": {name: int(ad.n_obs) for name, ad in levels.items()},
            }
            (out / MANIFEST).unlink(missing_ok=True)  # incomplete until the new one is written
            sizes = _written_bytes(levels)  # h5py may segfault when a write fails half-way
            check_free_space(out, sum(sizes), largest_file=max(sizes))
            with atomic_path(out / rel) as tmp:
                tmp.mkdir()
                for name, ad in levels.items():
                    ad.write_h5ad(tmp / f"{name}.h5ad")
                (tmp / SLIDE_RECORD).write_text(json.dumps(record, indent=1))
            slides_meta[spec.name] = record
            result.processed.append(spec.name)
        if resolved is None:
            resolved, first = cfg, (spec.name, technology, unit_um)
        elif _config_key(cfg) != _config_key(resolved):
            raise ConfigError(
                f"slide {spec.name} ({technology}, {unit_um:g} um units) needs preset "
                f"{cfg.preset} with spot / region tiles of {cfg.size_um('spot'):g} / "
                f"{cfg.size_um('region'):g} um, but slide {first[0]} ({first[1]}, "
                f"{first[2]:g} um units) has {resolved.preset} with "
                f"{resolved.size_um('spot'):g} / {resolved.size_um('region'):g} um; prepare "
                "different technologies separately, or give tile sizes that are whole "
                "multiples of every bin size"
            )
    assert resolved is not None
    resolved.train_slides = train
    if add and old is not None and "tiles" in old:
        tiles = old["tiles"]
    else:
        requested = config.resolved(first[1], first[2], snap=False)
        tiles = tile_summary(resolved, first[1], first[2], requested)
    result.tiles = tiles
    explicit = {"spot": config.spot_tile_px, "region": config.region_tile_px}
    changed = [
        lv
        for lv in ("spot", "region")
        if not add and explicit[lv] is not None and tiles[f"{lv}_um"] != tiles["requested_um"][lv]
    ]  # a size the user gave that was snapped: say so louder than the preset's
    (log.warning if changed else log.info)("%s: %s", out, describe_tiles(tiles))

    # Remove slides that are no longer part of the dataset.
    keep = {s.name for s in specs}
    for d in (out / "slides").iterdir():
        if d.is_dir() and d.name not in keep:
            shutil.rmtree(d)

    try:
        panel_ids, targets = _panel_and_targets(out, slides_meta, resolved, old if add else None)
    except (ConfigError, InputError):
        # a failed prepare records nothing: the slides this run wrote would otherwise be
        # taken as done ("unchanged") by the next run
        for name in result.processed:
            shutil.rmtree(out / "slides" / name, ignore_errors=True)
        raise
    result.panel = panel_ids
    result.filled = _check_panel(out, slides_meta, panel_ids)
    for name, n_filled in result.filled.items():
        slides_meta[name] = {**slides_meta[name], "panel_genes_filled": n_filled}
    gene_names = _gene_names(out, [slides_meta[n] for n in train + sorted(keep)], panel_ids)
    write_text(
        out / "panel.tsv",
        "gene_id\tgene_name\n"
        + "".join(f"{g}\t{n}\n" for g, n in zip(panel_ids, gene_names, strict=True)),
    )
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "packages": package_versions(),
        "config": resolved.to_dict(),
        "panel": {
            "method": resolved.panel,
            "n_genes": len(panel_ids),
            "train_slides": train,
            "gene_ids": panel_ids,
            "gene_names": gene_names,
        },
        "targets": targets,
        "tiles": tiles,
        "levels": list(LEVELS),
        "slides": slides_meta,
    }
    write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    log.info(
        "%s: %d slides built, %d unchanged; panel of %d genes",
        out,
        len(result.processed),
        len(result.skipped),
        len(panel_ids),
    )
    return result


def _resolved_dict(config: PrepareConfig, slides: dict[str, dict], train: list[str]) -> dict:
    """``config`` resolved for the technology of recorded ``slides``, as stored in a manifest."""
    if not slides:
        return {}
    rec = next(iter(slides.values()))
    try:
        cfg = config.resolved(rec["technology"], rec.get("unit_size_um"))
    except ConfigError:
        return {}
    cfg.train_slides = train
    return cfg.to_dict()


def _read_level(out: Path, meta: dict, level: str):
    import anndata

    return anndata.read_h5ad(out / meta["dir"] / f"{level}.h5ad")


def _panel_and_targets(
    out: Path, slides: dict[str, dict], cfg: PrepareConfig, old: dict | None
) -> tuple[list[str], dict]:
    train = cfg.train_slides or list(slides)
    if old is not None:
        return list(old["panel"]["gene_ids"]), old["targets"]
    bins = {name: _read_level(out, slides[name], "bin") for name in train}
    # Candidates are the genes every slide of the dataset measures. Legacy ST tables omit
    # the genes a section did not detect: there an absent gene is zero, so it counts as
    # measured; a Space Ranger matrix lists its whole reference, so absent = not measured.
    metas = list(slides.values())
    candidates = set(
        usable_genes([sorted(_slide_gene_ids(out, m)) for m in metas], map(slide_lists_all, metas))
    )
    panel = select_panel(
        [bins[n].X for n in train],
        [list(bins[n].var["gene_ids"].astype(str)) for n in train],
        method=cfg.panel,
        n_genes=cfg.n_genes,
        genes=cfg.genes,
        candidates=candidates,
        lists_all=[slide_lists_all(slides[n]) for n in train],
        seed=cfg.seed,
    )
    targets = {}
    for level in LEVELS:
        tt = TargetTransform(cfg.target)
        if tt.needs_fit:
            ads = bins if level == "bin" else {n: _read_level(out, slides[n], level) for n in train}
            tt.fit(
                [
                    panel_counts(ads[n], panel, fill_absent=not slide_lists_all(slides[n]))
                    for n in train
                ]
            )
        targets[level] = tt.to_dict()
    return panel, targets


def panel_counts(adata, panel: list[str], *, fill_absent: bool = False) -> sp.csr_matrix:
    """The columns of ``adata.X`` for the panel's gene ids, in panel order; a gene absent
    from ``adata`` is zeros with ``fill_absent``, else a :class:`KeyError`."""
    ids = list(adata.var["gene_ids"].astype(str))
    return gene_columns(adata.X, ids, panel, fill_absent=fill_absent)


def _check_genes(spec: SlideSpec | dict, have: set[str], panel: list[str]) -> None:
    missing = [g for g in panel if g not in have]
    if missing:
        spec = spec if isinstance(spec, dict) else spec.to_dict()
        raise InputError(
            spec["path"],
            f"slide {spec['name']} lacks {len(missing)} genes of the dataset's panel: "
            f"{missing[:20]}{' ...' if len(missing) > 20 else ''}",
        )


def _slide_gene_ids(out: Path, meta: dict) -> set[str]:
    import h5py

    with h5py.File(out / meta["dir"] / "bin.h5ad", "r") as f:
        ids = f["var"]["gene_ids"]
        if isinstance(ids, h5py.Group):  # stored as categorical
            ids = ids["categories"]
        return {v.decode() if isinstance(v, bytes) else str(v) for v in ids[:]}


def _check_panel(out: Path, slides: dict[str, dict], panel: list[str]) -> dict[str, int]:
    """Refuse a slide that lists its whole reference but lacks panel genes; for slides that
    list only detected genes, the number of panel genes they do not list (zeros there)."""
    filled = {}
    for name, meta in slides.items():
        have = _slide_gene_ids(out, meta)
        if slide_lists_all(meta):
            _check_genes(meta["spec"], have, panel)
            continue
        filled[name] = sum(g not in have for g in panel)
        if filled[name]:
            log.info(
                "slide %s: %d panel genes not listed in its counts, filled with zeros",
                name,
                filled[name],
            )
    return filled


def _gene_names(out: Path, metas: list[dict], panel: list[str]) -> list[str]:
    """Panel gene names as the first of ``metas`` that lists each gene names it."""
    name: dict[str, str] = {}
    for meta in metas:
        if all(g in name for g in panel):
            break
        ad = _read_level(out, meta, "bin")
        for g, n in zip(ad.var["gene_ids"].astype(str), ad.var_names.astype(str), strict=True):
            name.setdefault(g, n)
    return [name.get(g, g) for g in panel]


def prepare_unmeasured(
    slide: Slide,
    out: str | Path,
    config: dict[str, Any],
    panel: list[str],
    gene_names: list[str],
    targets: dict[str, dict],
    *,
    fingerprint_extra: str = "",
) -> Path:
    """A one-slide dataset for prediction: ``slide``'s units and tiles laid out as
    :func:`prepare` does, with the panel and target statistics of a trained model
    (``config`` is the training dataset's resolved config). Counts may be zeros (an
    image-only slide). A rerun with the same units, image and settings writes nothing.
    """
    out = Path(out)
    cfg = PrepareConfig(**{k: v for k, v in config.items() if not k.endswith("_um")})
    cfg = cfg.resolved(slide.technology, slide.unit_size_um) if cfg.preset == "auto" else cfg
    h = hashlib.sha256(np.ascontiguousarray(slide.centers_px, np.float64).tobytes())
    h.update(json.dumps([_config_key(cfg), panel, fingerprint_extra]).encode())
    key = h.hexdigest()[:32]
    rel = f"slides/{slide.name}"
    rec = _read_slide_record(out / rel)
    manifest = _read_manifest(out)
    if rec is not None and rec.get("units_sha256") == key and manifest is not None:
        log.info("%s: units and settings unchanged; reusing it", out)
        return out
    levels = build_levels(slide, cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    (out / "slides").mkdir(exist_ok=True)
    clean_stale(out / "slides")
    record = {
        "spec": {"name": slide.name, "path": str(slide.image_path)},
        "dir": rel,
        "config": _config_key(cfg),
        "files": {},
        "units_sha256": key,
        "technology": slide.technology,
        "unit_size_um": float(slide.unit_size_um),
        "microns_per_pixel": float(slide.microns_per_pixel),
        "image": str(Path(slide.image_path).resolve()) if slide.image_path else "",
        "n_genes_measured": int(slide.n_genes),
        "n": {name: int(ad.n_obs) for name, ad in levels.items()},
    }
    if (out / rel).exists():
        shutil.rmtree(out / rel)
    with atomic_path(out / rel) as tmp:
        tmp.mkdir()
        for name, ad in levels.items():
            ad.write_h5ad(tmp / f"{name}.h5ad")
        (tmp / SLIDE_RECORD).write_text(json.dumps(record, indent=1))
    cfg.train_slides = []
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "packages": package_versions(),
        "config": cfg.to_dict(),
        "panel": {
            "method": "list",
            "n_genes": len(panel),
            "train_slides": [],
            "gene_ids": list(panel),
            "gene_names": list(gene_names),
        },
        "targets": targets,
        "tiles": tile_summary(cfg, slide.technology, slide.unit_size_um, cfg),
        "levels": list(LEVELS),
        "slides": {slide.name: record},
    }
    write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return out


def dataset_is_complete(path: str | Path) -> bool:
    path = Path(path)
    m = _read_manifest(path)
    return m is not None and all(
        slide_dir_is_complete(path / s["dir"]) for s in m["slides"].values()
    )


__all__ = [
    "LEVELS",
    "PRESETS",
    "SQUARE_BINS",
    "PrepareConfig",
    "PrepareResult",
    "build_levels",
    "dataset_is_complete",
    "describe_tiles",
    "prepare",
    "prepare_unmeasured",
    "snap_tile_px",
    "tile_summary",
]
