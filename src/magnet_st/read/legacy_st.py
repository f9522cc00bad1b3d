"""Legacy Spatial Transcriptomics (100 um spots on an array), as laid out by her2st.

Counts are a spots x genes table whose row names are ``"XxY"`` (array x and y);
the spot table (``*_selection.tsv``) has columns ``x y new_x new_y pixel_x pixel_y
selected`` and joins the counts on ``x`` and ``y``. The tables list only the genes a
section detected: a gene absent from one is zero there (``Slide.lists_all_genes`` is
``False``).

No resolution is stored: it is derived from the array pitch, the distance between
neighbouring array positions (``x`` to ``x + 1``), unless given (:func:`array_scale`):

- spots on every array position (the 1k array, her2st): 200 um, so neighbouring spots
  are 200 um apart;
- spots only where ``x + y`` has one parity (a checkerboard, as in the public mouse
  olfactory bulb ST data): 100 um, so the nearest spots are diagonal, 141 um apart.

The pixel scale is fitted by least squares from array vs pixel positions, per image axis,
and a warning says when the two axes differ by more than 2 % (a stretched image).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from magnet_st.data.slide import Slide
from magnet_st.errors import InputError
from magnet_st.read.geometry import mpp_from_pitch
from magnet_st.read.matrix import as_integer_counts

log = logging.getLogger(__name__)

SPOT_DIAMETER_UM = 100.0
SPOT_PITCH_UM = 200.0
"""Microns between neighbouring array positions when spots fill every position (1k array)."""
CHECKERBOARD_PITCH_UM = 100.0
"""Microns between neighbouring array positions when spots fill every other one."""
STRETCH_TOLERANCE = 0.02
"""Relative difference of the pixel scale along x and y above which a warning is given."""
SPOT_COLUMNS = ["x", "y", "pixel_x", "pixel_y", "selected"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def _read_table(path: Path, what: str, **kwargs) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(path, f"{what} not found")
    try:
        return pd.read_csv(path, sep="\t", **kwargs)
    except Exception as exc:  # pandas raises many types for malformed files
        raise InputError(path, f"cannot read the {what} as a tab-separated table ({exc})") from exc


def array_scale(
    array_xy: np.ndarray,
    centers_px: np.ndarray,
    source: str | Path,
    spot_pitch_um: float | None = None,
) -> tuple[float, str]:
    """Microns per pixel of a legacy ST image from its spot array, and where it came from.

    The pitch (microns between neighbouring array positions) is ``spot_pitch_um`` or, by
    the layout, :data:`SPOT_PITCH_UM` when neighbouring positions both hold spots and
    :data:`CHECKERBOARD_PITCH_UM` when spots sit only where ``x + y`` has one parity (a
    checkerboard). Pixels per array unit come from a least-squares fit of the spots' pixel
    positions on their array positions (any rotation; the mean of the image's x and y
    scales): every spot counts, and a detected centre's offset from the grid averages out.
    The median nearest-neighbour distance, used before (and still when the spots lie on
    one line), is biased low by those offsets, since it is the smallest of four noisy
    distances: on her2st (centres ~17 um rms off the grid) it read 0.73 um per pixel where
    the fit reads 0.69 (the pixel positions are exactly affine in the spot table's fitted
    ``new_x`` / ``new_y``, at 290-292 px per 200 um).

    When the x and y scales differ by more than :data:`STRETCH_TOLERANCE` the image is
    stretched and a warning says so.
    """
    xy = np.rint(np.asarray(array_xy, dtype=np.float64)).astype(np.int64)
    px = np.asarray(centers_px, dtype=np.float64)
    checkerboard = len(xy) >= 2 and len(np.unique(xy.sum(axis=1) % 2)) == 1
    layout = "checkerboard layout" if checkerboard else "spots on every array position"
    if spot_pitch_um is None:
        pitch, given = (CHECKERBOARD_PITCH_UM if checkerboard else SPOT_PITCH_UM), ""
    else:
        pitch, given = float(spot_pitch_um), "given "
        if not (np.isfinite(pitch) and pitch > 0):
            raise InputError(source, f"the spot pitch must be a positive number, got {pitch!r}")
    design = np.column_stack([xy, np.ones(len(xy))]).astype(np.float64)
    if len(xy) < 3 or np.linalg.matrix_rank(design) < 3:  # a line of spots: no fit
        nn_units = np.sqrt(2.0) if checkerboard else 1.0
        mpp = mpp_from_pitch(px, pitch * nn_units, source)
        how = "nearest-neighbour distance"
    else:
        A, *_ = np.linalg.lstsq(design, px, rcond=None)
        px_per_unit = np.linalg.norm(A[:2], axis=0)  # along the image's x and y
        mpp_x, mpp_y = pitch / px_per_unit
        mpp = float(np.mean([mpp_x, mpp_y]))
        how = "least-squares fit of pixel vs array positions"
        stretch = abs(mpp_x / mpp_y - 1.0)
        if stretch > STRETCH_TOLERANCE:
            log.warning(
                "%s: by the spot array, pixels are %.4f um wide but %.4f um tall (%.1f %% "
                "apart): the image looks stretched; %.4f um per pixel is used for both axes "
                "(pass the microns per pixel, or the spot pitch, if that is wrong)",
                source,
                mpp_x,
                mpp_y,
                100 * stretch,
                mpp,
            )
    return mpp, f"{given}{pitch:g} um array pitch ({layout}; {how}) of {source}"


# Long: reads and checks two tables, joins count rows ('XxY') to selected spots logging what
# is dropped, derives mpp, builds one Slide; mostly error and log messages.
def legacy_st(
    counts: str | Path,
    spots: str | Path,
    image: str | Path | None = None,
    *,
    microns_per_pixel: float | None = None,
    spot_pitch_um: float | None = None,
    unit_size_um: float | None = None,
    name: str | None = None,
) -> Slide:
    """Read one legacy ST section.

    Args:
        counts: spots x genes count table (``.tsv`` or ``.tsv.gz``), row names ``"XxY"``.
        spots: the spot table (``*_selection.tsv``).
        image: the full-resolution H&E image the pixel positions refer to.
        microns_per_pixel: override the value derived from the array pitch.
        spot_pitch_um: microns between neighbouring array positions (``x`` to ``x + 1``);
            default: from the layout (:func:`array_scale`).
        unit_size_um: spot diameter; default: 100 um.
        name: the section's name; default: the counts file's stem (``C2``).
    """
    counts, spots = Path(counts), Path(spots)
    table = _read_table(counts, "count table", index_col=0)
    spot_df = _read_table(spots, "spot table")
    missing = [c for c in SPOT_COLUMNS if c not in spot_df.columns]
    if missing:
        raise InputError(
            spots, f"missing columns {missing}; found {list(spot_df.columns)}; need {SPOT_COLUMNS}"
        )
    if spot_df[["x", "y", "pixel_x", "pixel_y"]].isna().any().any():
        raise InputError(spots, "spot coordinates contain missing values (NaN)")
    if table.shape[0] == 0 or table.shape[1] == 0:
        raise InputError(counts, "the count table is empty")
    if not all(pd.api.types.is_numeric_dtype(t) for t in table.dtypes):
        raise InputError(counts, "the count table has non-numeric columns")

    selected = spot_df[spot_df["selected"] == 1]
    keys = (
        selected["x"].round().astype(int).astype(str)
        + "x"
        + selected["y"].round().astype(int).astype(str)
    )
    where = pd.Index(keys).get_indexer(table.index.astype(str))
    matched = where >= 0
    if not matched.any():
        raise InputError(
            counts,
            f"no row name matches a selected spot of {spots} (row names must be 'XxY', "
            f"e.g. {table.index[0]!r} for x={keys.iloc[0] if len(keys) else '?'})",
        )
    if not matched.all():
        log.info(
            "%s: %d count rows are not under tissue in %s; dropped",
            counts,
            int((~matched).sum()),
            spots,
        )
    if len(selected) > matched.sum():
        log.info(
            "%s: %d selected spots have no counts; dropped", spots, len(selected) - matched.sum()
        )
    rows = np.flatnonzero(matched)
    pos = selected.iloc[where[rows]]
    centers = pos[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    if microns_per_pixel is None:
        mpp, mpp_source = array_scale(
            spot_df[["x", "y"]].to_numpy(np.float64),
            spot_df[["pixel_x", "pixel_y"]].to_numpy(np.float64),
            spots,
            spot_pitch_um,
        )
    else:
        mpp, mpp_source = float(microns_per_pixel), "given by the user"
    genes = table.columns.astype(str).to_numpy(dtype=object)
    slide = Slide(
        name=name or counts.name.split(".")[0],
        counts=as_integer_counts(table.to_numpy()[rows], counts),
        gene_ids=genes,
        gene_names=genes.copy(),
        unit_ids=table.index.astype(str).to_numpy(dtype=object)[rows],
        centers_px=centers,
        array_coords=pos[["y", "x"]].round().astype(np.int64).to_numpy(),
        unit_size_um=SPOT_DIAMETER_UM if unit_size_um is None else float(unit_size_um),
        microns_per_pixel=mpp,
        technology="legacy_st",
        lists_all_genes=False,
        image_path=None if image is None else Path(image),
        sources={
            "counts": str(counts),
            "positions": str(spots),
            "microns_per_pixel": mpp_source,
            **({"image": str(image)} if image is not None else {}),
        },
    )
    slide.check_image_bounds()
    return slide


def her2st_sections(root: str | Path) -> list[str]:
    """Section names (``C2``, ...) found under a her2st-layout folder."""
    cnts = _her2st_data(Path(root)) / "ST-cnts"
    return sorted(p.name.split(".")[0] for p in cnts.glob("*.tsv*"))


def _her2st_data(root: Path) -> Path:
    for base in (root, root / "data"):
        if (base / "ST-cnts").is_dir():
            return base
    raise InputError(root, "not a her2st-layout folder (no ST-cnts/ or data/ST-cnts/)")


def her2st(
    root: str | Path,
    section: str,
    *,
    microns_per_pixel: float | None = None,
    spot_pitch_um: float | None = None,
    unit_size_um: float | None = None,
    with_image: bool = True,
) -> Slide:
    """Read section ``section`` (e.g. ``"C2"``) of a folder in the her2st repository's layout.

    Finds ``ST-cnts/<section>.tsv.gz``, ``ST-spotfiles/<section>_selection.tsv`` and the
    one image in ``ST-imgs/<patient>/<section>/`` (patient = the section's letter).
    """
    data = _her2st_data(Path(root))
    counts = next(iter(sorted((data / "ST-cnts").glob(f"{section}.tsv*"))), None)
    if counts is None:
        raise InputError(
            data / "ST-cnts" / f"{section}.tsv.gz",
            f"no counts for section {section!r}; sections here: {her2st_sections(root)}",
        )
    spots = data / "ST-spotfiles" / f"{section}_selection.tsv"
    image = None
    if with_image:
        img_dir = data / "ST-imgs" / section[:1] / section
        images = (
            sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if img_dir.is_dir()
            else []
        )
        if len(images) != 1:
            raise InputError(
                img_dir, f"expected exactly one image for section {section}, found {len(images)}"
            )
        image = images[0]
    return legacy_st(
        counts,
        spots,
        image,
        microns_per_pixel=microns_per_pixel,
        spot_pitch_um=spot_pitch_um,
        unit_size_um=unit_size_um,
        name=section,
    )
