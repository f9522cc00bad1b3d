"""What to read: one :class:`SlideSpec` per slide, from paths or a sample sheet."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from magnet_st.data.slide import Slide
from magnet_st.errors import InputError, check_name


@dataclass(frozen=True)
class SlideSpec:
    """Where one slide's data lives. ``section`` selects one her2st section.

    ``spot_pitch_um`` (legacy ST: microns between neighbouring array positions) and
    ``unit_size_um`` (AnnData, SpatialData and legacy ST: bin edge or spot diameter)
    override what the reader would derive. For a SpatialData store, ``bin_size`` picks its
    ``square_XXXum`` table (``table``: any table by name) and ``image`` names one of its
    image elements. ``cells`` makes a Visium HD run's units cells: ``"spaceranger"``
    (Space Ranger 4's ``segmented_outputs/``) or a GeoJSON segmentation that the 2 um bins
    are summed into."""

    name: str
    path: str
    image: str | None = None
    mpp: float | None = None
    bin_size: int | None = None
    section: str | None = None
    spot_pitch_um: float | None = None
    unit_size_um: float | None = None
    table: str | None = None
    cells: str | None = None

    def __post_init__(self) -> None:
        check_name(self.name, "slide name", self.path)  # names become folder names

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in _RECORDED_IF_SET:  # unset: as recorded before these existed (no rebuild)
            if d[key] is None:
                del d[key]
        return d

    def load(self, with_image: bool = True) -> Slide:
        from magnet_st.read import auto

        (slide,) = auto(
            self.path,
            image=self.image,
            microns_per_pixel=self.mpp,
            bin_size_um=self.bin_size,
            spot_pitch_um=self.spot_pitch_um,
            unit_size_um=self.unit_size_um,
            sections=[self.section] if self.section else None,
            with_image=with_image,
            table=self.table,
            cells=self.cells == SPACERANGER_CELLS,
            segmentation=None if self.cells in (None, SPACERANGER_CELLS) else self.cells,
        )
        slide.name = self.name
        return slide


_OPTIONAL = ("spot_pitch_um", "unit_size_um")
_RECORDED_IF_SET = (*_OPTIONAL, "table", "cells")
SPACERANGER_CELLS = "spaceranger"
"""``cells`` value for Space Ranger 4's own cells (else a GeoJSON path)."""


def specs_from_paths(
    paths: list[str | Path],
    *,
    image: str | Path | None = None,
    mpp: float | None = None,
    bin_size: int | None = None,
    spot_pitch_um: float | None = None,
    unit_size_um: float | None = None,
    table: str | None = None,
    cells: str | None = None,
) -> list[SlideSpec]:
    """One spec per slide found at ``paths`` (a her2st folder gives one per section)."""
    from magnet_st.read import detect_format, her2st_sections

    if image is not None and len(paths) > 1:
        raise InputError(image, "one --image was given for several inputs; use a sample sheet")
    if cells not in (None, SPACERANGER_CELLS) and len(paths) > 1:
        raise InputError(cells, "one segmentation was given for several inputs; use a sample sheet")
    specs = []
    for p in paths:
        p = Path(p)
        fmt = detect_format(p)
        if fmt == "her2st":
            specs += [
                SlideSpec(
                    name=s,
                    path=str(p),
                    mpp=mpp,
                    section=s,
                    spot_pitch_um=spot_pitch_um,
                    unit_size_um=unit_size_um,
                )
                for s in her2st_sections(p)
            ]
            continue
        if fmt == "legacy_st":
            name = p.name.split(".")[0]
        else:
            run = p.resolve()
            while run.name.startswith("square_") or run.name in ("binned_outputs", "outs"):
                run = run.parent
            name = run.stem if fmt in ("h5ad", "spatialdata") else run.name
        specs.append(
            SlideSpec(
                name=name,
                path=str(p),
                image=None if image is None else str(image),
                mpp=mpp,
                bin_size=bin_size,
                spot_pitch_um=spot_pitch_um,
                unit_size_um=unit_size_um,
                table=table,
                cells=None if cells is None else str(cells),
            )
        )
    return check_unique(specs)


SHEET_COLUMNS = (
    "name",
    "path",
    "image",
    "mpp",
    "bin_size",
    "section",
    "spot_pitch_um",
    "unit_size_um",
    "table",
    "cells",
)


def table_sep(path: Path) -> str:
    """The column separator of a user's table by its extension: tab for ``.tsv`` / ``.tab``
    / ``.txt``, else comma."""
    return "\t" if path.suffix.lower() in (".tsv", ".tab", ".txt") else ","


def specs_from_sheet(sheet: str | Path) -> list[SlideSpec]:
    """Read a sample sheet (CSV, or TSV by extension) with columns ``name, path`` and optionally
    ``image, mpp, bin_size, section, spot_pitch_um, unit_size_um, table, cells`` (``cells``:
    ``spaceranger`` or a GeoJSON segmentation). Relative paths are relative to the sheet's
    folder."""
    sheet = Path(sheet)
    if not sheet.is_file():
        raise InputError(sheet, "sample sheet not found")
    try:
        # read as CSV, or TSV by extension: never sniffed (a sniffer split "path" on "t")
        df = pd.read_csv(sheet, sep=table_sep(sheet), dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises many types for malformed files
        raise InputError(sheet, f"cannot read the sample sheet ({exc})") from exc
    missing = [c for c in ("name", "path") if c not in df.columns]
    if missing:
        raise InputError(sheet, f"missing columns {missing}; found {list(df.columns)}")
    unknown = [c for c in df.columns if c not in SHEET_COLUMNS]
    if unknown:
        raise InputError(sheet, f"unknown columns {unknown}; allowed: {list(SHEET_COLUMNS)}")

    def resolve(value: str) -> str | None:
        if not value:
            return None
        p = Path(value)
        return str(p if p.is_absolute() else sheet.parent / p)

    specs = []
    for i, row in df.iterrows():
        try:
            mpp = float(row["mpp"]) if row.get("mpp") else None
            bin_size = int(row["bin_size"]) if row.get("bin_size") else None
            sizes = {k: float(row[k]) if row.get(k) else None for k in _OPTIONAL}
        except ValueError as exc:
            raise InputError(sheet, f"row {i + 2}: {exc}") from exc
        bad = [k for k, v in sizes.items() if v is not None and not v > 0]
        if bad:
            raise InputError(sheet, f"row {i + 2}: {bad[0]} must be a positive number of microns")
        if not row["name"] or not row["path"]:
            raise InputError(sheet, f"row {i + 2}: empty name or path")
        specs.append(
            SlideSpec(
                name=row["name"],
                path=resolve(row["path"]),
                image=resolve(row.get("image", "")),
                mpp=mpp,
                bin_size=bin_size,
                section=row.get("section") or None,
                table=row.get("table") or None,
                cells=(
                    SPACERANGER_CELLS
                    if row.get("cells") == SPACERANGER_CELLS
                    else resolve(row.get("cells", ""))
                ),
                **sizes,
            )
        )
    return check_unique(specs, sheet)


def check_unique(specs: list[SlideSpec], where: str | Path | None = None) -> list[SlideSpec]:
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(where, f"slide names must be unique; repeated: {dup}")
    return specs
