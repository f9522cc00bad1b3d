"""Space Ranger outputs: Visium HD (square bins of 2, 8 or 16 um) and standard Visium (55 um spots)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from magnet_st.data.slide import Slide
from magnet_st.errors import InputError
from magnet_st.read.geometry import mpp_from_pitch
from magnet_st.read.matrix import CountMatrix, read_10x_h5, read_10x_mtx

log = logging.getLogger(__name__)

POSITION_COLUMNS = [
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
]
VISIUM_SPOT_DIAMETER_UM = 55.0
VISIUM_SPOT_PITCH_UM = 100.0
#: Space Ranger's own downsampled images under ``spatial/`` and their scale factor keys.
SPACERANGER_IMAGES = {
    "tissue_hires_image.png": "tissue_hires_scalef",
    "tissue_lowres_image.png": "tissue_lowres_scalef",
}
#: Full-resolution images found in a run folder when no image is given: the one that
#: ``magnet synth`` writes next to ``outs/`` (runs marked by ``SYNTHETIC_MARKER``).
RUN_IMAGES = ("he_fullres.tif",)
SYNTHETIC_MARKER = "synthetic_truth.json"
FOUND_NOTE = " (found in the run folder; no image was given)"


def hd_bin_folders(path: str | Path) -> dict[int, Path]:
    """The ``square_XXXum`` folders under a Space Ranger HD path, by bin size in microns.

    ``path`` may be the run folder, its ``outs/``, ``outs/binned_outputs/`` or one
    ``square_XXXum`` folder.
    """
    path = Path(path)
    if path.name.startswith("square_") and path.name.endswith("um"):
        candidates = [path]
    else:
        for base in (path, path / "binned_outputs", path / "outs" / "binned_outputs"):
            candidates = sorted(base.glob("square_*um")) if base.is_dir() else []
            if candidates:
                break
    out = {}
    for c in candidates:
        try:
            out[int(c.name[len("square_") : -len("um")])] = c
        except ValueError:
            continue
    return out


def _read_scalefactors(spatial: Path) -> dict:
    path = spatial / "scalefactors_json.json"
    if not path.is_file():
        raise InputError(path, "scale factors file not found")
    try:
        sf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(sf, dict):
        raise InputError(path, "expected a JSON object of scale factors")
    return sf


def read_positions(spatial: Path) -> tuple[pd.DataFrame, Path]:
    """Read the tissue positions table under ``spatial/`` (parquet, CSV or headerless CSV)."""
    for name in ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv"):
        path = spatial / name
        if path.is_file():
            break
    else:
        raise InputError(
            spatial / "tissue_positions.parquet",
            "tissue positions not found (looked for tissue_positions.parquet, "
            "tissue_positions.csv and tissue_positions_list.csv)",
        )
    try:
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
        elif path.name == "tissue_positions_list.csv":
            df = pd.read_csv(path, header=None)
            if df.shape[1] != len(POSITION_COLUMNS):
                raise InputError(
                    path,
                    f"expected {len(POSITION_COLUMNS)} columns without a header "
                    f"({', '.join(POSITION_COLUMNS)}), found {df.shape[1]}",
                )
            df.columns = POSITION_COLUMNS
        else:
            df = pd.read_csv(path)
    except InputError:
        raise
    except Exception as exc:  # pyarrow / pandas raise many types for corrupt files
        raise InputError(path, f"cannot read the positions table ({exc})") from exc
    missing = [c for c in POSITION_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(
            path,
            f"missing columns {missing}; found {list(df.columns)}; expected {POSITION_COLUMNS}",
        )
    df = df[POSITION_COLUMNS]
    for col in POSITION_COLUMNS[1:]:
        if not pd.api.types.is_numeric_dtype(df[col]):
            raise InputError(path, f"column {col!r} is not numeric")
    if df[["pxl_row_in_fullres", "pxl_col_in_fullres"]].isna().any().any():
        raise InputError(path, "pixel positions contain missing values (NaN)")
    if df["barcode"].duplicated().any():
        raise InputError(path, "barcodes are not unique")
    return df, path


def _read_matrix(folder: Path, matrix: str) -> CountMatrix:
    if matrix not in ("filtered", "raw"):
        raise ValueError("matrix must be 'filtered' or 'raw'")
    h5 = folder / f"{matrix}_feature_bc_matrix.h5"
    mtx = folder / f"{matrix}_feature_bc_matrix"
    if h5.is_file():
        return read_10x_h5(h5)
    if mtx.is_dir():
        return read_10x_mtx(mtx)
    raise InputError(folder, f"no count matrix: neither {h5.name} nor {mtx.name}/ found")


def _join(
    m: CountMatrix, positions: pd.DataFrame, positions_path: Path
) -> tuple[CountMatrix, pd.DataFrame]:
    """Rows of the positions table for each matrix barcode, keeping units under tissue."""
    idx = pd.Index(positions["barcode"].astype(str)).get_indexer(m.barcodes.astype(str))
    absent = idx < 0
    if absent.any():
        examples = ", ".join(map(str, m.barcodes[absent][:3]))
        raise InputError(
            positions_path,
            f"{int(absent.sum())} of {len(absent)} barcodes of {m.source} are absent from the "
            f"positions table (e.g. {examples}); do the matrix and the spatial folder "
            "come from the same run and bin size?",
        )
    pos = positions.iloc[idx].reset_index(drop=True)
    tissue = pos["in_tissue"].to_numpy() == 1
    if not tissue.all():
        log.info("%s: keeping %d of %d barcodes under tissue", m.source, tissue.sum(), len(tissue))
        keep = np.flatnonzero(tissue)
        m = CountMatrix(m.counts[keep], m.barcodes[keep], m.gene_ids, m.gene_names, m.source)
        pos = pos.iloc[keep].reset_index(drop=True)
    if len(pos) == 0:
        raise InputError(m.source, "no barcode of the matrix lies under tissue (in_tissue = 1)")
    return m, pos


def _microns_per_pixel(
    given: float | None, sf: dict, sf_path: Path, pos: pd.DataFrame, pitch_um: float
) -> tuple[float, str]:
    """The user's value, else ``microns_per_pixel`` of the scale factors, else the spot pitch."""
    if given is not None:
        return float(given), "given by the user"
    if sf.get("microns_per_pixel"):
        return float(sf["microns_per_pixel"]), str(sf_path)
    centers = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)
    return (
        mpp_from_pitch(centers, pitch_um, sf_path),
        f"{pitch_um:g} um spot pitch of {sf_path.parent / 'tissue_positions'}",
    )


def _png_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` of an image from its header, or ``None`` if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _spaceranger_image(image: Path, spatial: Path, sf: dict, sf_path: Path) -> float | None:
    """The scale factor of ``image`` if it is Space Ranger's own hires or lowres image.

    It is when it is the run's ``spatial/tissue_hires_image.png`` (or ``..._lowres_...``),
    or a file of that name with the pixel size of the run's copy (or the run keeps none).
    """
    key = SPACERANGER_IMAGES.get(image.name.lower())
    if key is None:
        return None
    own = spatial / image.name.lower()
    if own.is_file():
        same = own.resolve() == image.resolve()
        if not same:
            size = _png_size(image)
            same = size is not None and size == _png_size(own)
        if not same:
            return None
    try:
        scalef = float(sf[key])
    except (KeyError, TypeError, ValueError):
        raise InputError(
            sf_path,
            f"{image} is Space Ranger's {image.name} but the scale factors have no valid "
            f"{key!r}; give the full-resolution image instead",
        ) from None
    if not (np.isfinite(scalef) and 0 < scalef <= 1):
        raise InputError(sf_path, f"{key} must be in (0, 1], got {sf[key]!r}")
    return scalef


def _image_scale(
    image: Path, spatial: Path, sf: dict, sf_path: Path, pos: pd.DataFrame, mpp: float, source: str
) -> tuple[pd.DataFrame, float, str]:
    """Positions and microns per pixel for ``image``: scaled when it is Space Ranger's
    hires or lowres image (positions refer to the full-resolution image)."""
    scalef = _spaceranger_image(image, spatial, sf, sf_path)
    if scalef is None:
        return pos, mpp, source
    key = SPACERANGER_IMAGES[image.name.lower()]
    pos = pos.copy()
    cols = ["pxl_row_in_fullres", "pxl_col_in_fullres"]
    pos[cols] = pos[cols].to_numpy(np.float64) * scalef
    scaled = mpp / scalef
    log.warning(
        "%s is Space Ranger's downsampled %s: unit centres scaled by %s %g (%s), "
        "%.4g microns per pixel instead of %.4g; patches will be coarse: for real use give "
        "the full-resolution image that was given to Space Ranger",
        image,
        image.name,
        key,
        scalef,
        sf_path,
        scaled,
        mpp,
    )
    return pos, scaled, f"{source} / {key} {scalef:g}"


def _run_image(run: Path) -> Path | None:
    """The full-resolution image kept in a run folder written by ``magnet synth``."""
    if not (run / SYNTHETIC_MARKER).is_file():
        return None
    for name in RUN_IMAGES:
        if (run / name).is_file():
            log.info("%s: using the run's image %s (no image given)", run, run / name)
            return run / name
    return None


def _to_slide(
    m: CountMatrix,
    pos: pd.DataFrame,
    *,
    name: str,
    unit_size_um: float,
    mpp: float,
    mpp_source: str,
    technology: str,
    image: str | Path | None,
    positions_path: Path,
    image_note: str = "",
    col_step_um: float | None = None,
) -> Slide:
    slide = Slide(
        name=name,
        counts=m.counts,
        gene_ids=np.asarray(m.gene_ids, dtype=object),
        gene_names=np.asarray(m.gene_names, dtype=object),
        unit_ids=np.asarray(m.barcodes, dtype=object),
        centers_px=pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64),
        array_coords=pos[["array_row", "array_col"]].to_numpy(np.int64),
        unit_size_um=float(unit_size_um),
        microns_per_pixel=mpp,
        technology=technology,
        image_path=None if image is None else Path(image),
        sources={
            "counts": str(m.source),
            "positions": str(positions_path),
            "microns_per_pixel": mpp_source,
            **({"image": f"{image}{image_note}"} if image is not None else {}),
        },
    )
    slide.check_image_bounds()
    slide.check_scale(col_step_um)
    return slide


def visium_hd(
    path: str | Path,
    bin_size_um: int = 8,
    image: str | Path | None = None,
    *,
    microns_per_pixel: float | None = None,
    matrix: str = "filtered",
    name: str | None = None,
) -> Slide:
    """Read one bin size of a Space Ranger Visium HD run.

    Args:
        path: the run folder, its ``outs/``, ``outs/binned_outputs/``, or a ``square_XXXum`` folder.
        bin_size_um: 2, 8 or 16.
        image: the full-resolution H&E image given to Space Ranger. Space Ranger's own
            ``spatial/tissue_hires_image.png`` or ``tissue_lowres_image.png`` is recognised
            and its scale factor applied (coarse patches: a warning says so). Default: the
            image of a run written by ``magnet synth``, else none.
        microns_per_pixel: override the value of ``scalefactors_json.json`` (of the
            full-resolution image).
        matrix: ``"filtered"`` (bins under tissue) or ``"raw"`` (then filtered by ``in_tissue``).
        name: the slide's name; default: the run folder's name.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "Space Ranger output folder not found")
    folders = hd_bin_folders(path)
    if not folders:
        raise InputError(
            path, "no binned_outputs/square_XXXum folder found; is this a Visium HD run's outs/?"
        )
    if bin_size_um not in folders:
        raise InputError(
            path,
            f"no folder for {bin_size_um} um bins (square_{bin_size_um:03d}um); "
            f"available bin sizes: {sorted(folders)} um",
        )
    folder = folders[bin_size_um]
    spatial = folder / "spatial"
    sf_path = spatial / "scalefactors_json.json"
    sf = _read_scalefactors(spatial)
    positions, positions_path = read_positions(spatial)
    m, pos = _join(_read_matrix(folder, matrix), positions, positions_path)
    mpp, mpp_source = _microns_per_pixel(microns_per_pixel, sf, sf_path, pos, float(bin_size_um))
    run = folder.resolve()
    while run.name.startswith("square_") or run.name in ("binned_outputs", "outs"):
        run = run.parent
    note = ""
    if image is None:
        image = _run_image(run)
        note = FOUND_NOTE if image is not None else ""
    if image is not None:
        image = Path(image)
        pos, mpp, mpp_source = _image_scale(image, spatial, sf, sf_path, pos, mpp, mpp_source)
    if name is None:
        name = run.name
    return _to_slide(
        m,
        pos,
        name=name,
        unit_size_um=float(sf.get("bin_size_um", bin_size_um)),
        mpp=mpp,
        mpp_source=mpp_source,
        technology="visium_hd",
        col_step_um=float(sf.get("bin_size_um", bin_size_um)),  # square bins, edge to edge
        image=image,
        positions_path=positions_path,
        image_note=note,
    )


def visium(
    path: str | Path,
    image: str | Path | None = None,
    *,
    microns_per_pixel: float | None = None,
    matrix: str = "filtered",
    name: str | None = None,
) -> Slide:
    """Read a standard Visium (55 um spot) Space Ranger run: its folder or its ``outs/``.

    Positions come from ``spatial/tissue_positions.csv`` (Space Ranger >= 2.0) or the
    headerless ``spatial/tissue_positions_list.csv``. The image resolution is
    ``microns_per_pixel`` if given, else that of the scale factors file, else derived
    from the 100 um centre-to-centre pitch of the spots. Space Ranger's own hires or lowres
    image is recognised as in :func:`visium_hd`.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "Space Ranger output folder not found")
    outs = path / "outs" if (path / "outs").is_dir() else path
    spatial = outs / "spatial"
    if not spatial.is_dir():
        raise InputError(outs, "no spatial/ folder; is this a Visium run's outs/?")
    sf_path = spatial / "scalefactors_json.json"
    sf = _read_scalefactors(spatial)
    positions, positions_path = read_positions(spatial)
    m, pos = _join(_read_matrix(outs, matrix), positions, positions_path)
    mpp, mpp_source = _microns_per_pixel(microns_per_pixel, sf, sf_path, pos, VISIUM_SPOT_PITCH_UM)
    note = ""
    if image is None:
        image = _run_image((outs.parent if outs.name == "outs" else outs).resolve())
        note = FOUND_NOTE if image is not None else ""
    if image is not None:
        image = Path(image)
        pos, mpp, mpp_source = _image_scale(image, spatial, sf, sf_path, pos, mpp, mpp_source)
    return _to_slide(
        m,
        pos,
        name=name or (outs.parent.name if outs.name == "outs" else outs.name),
        unit_size_um=VISIUM_SPOT_DIAMETER_UM,
        mpp=mpp,
        mpp_source=mpp_source,
        technology="visium",
        col_step_um=VISIUM_SPOT_PITCH_UM / 2,  # hexagonal: neighbours are two columns apart
        image=image,
        positions_path=positions_path,
        image_note=note,
    )
