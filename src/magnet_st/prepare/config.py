"""config: the settings of a prepared dataset (PrepareConfig), the size presets per technology, tile sizes snapped to whole bins."""

from __future__ import annotations

import json
import logging
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from magnet_st.data.levels import LEVELS
from magnet_st.data.targets import TargetTransform
from magnet_st.errors import ConfigError, InputError

__all__ = [
    "PRESETS",
    "SQUARE_BINS",
    "PrepareConfig",
    "describe_tiles",
    "snap_tile_px",
    "tile_summary",
]

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
    "visium_hd_cells": "hd",
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
