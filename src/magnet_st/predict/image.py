"""predict: HD expression from a trained MagNet for slides that were never sequenced.

Two sources of units:

* **image only** (``image=``): tissue is detected on a thumbnail (the mask is saved as
  PNG), and a virtual grid of bins of the model's size (8 or 16 um) is laid over it with
  Space Ranger's bin geometry: square bins on a grid aligned with the image axes, barcodes
  ``s_008um_<row>_<col>-1``, 16 um bins the union of 2 x 2 8 um bins.
* **an existing Space Ranger run** (``spaceranger=``): the run's own bins under tissue, for
  comparison with what was measured (the measured counts are kept as a layer).

Then the slide is laid out as ``magnet prepare`` would (spot and region tiles), its tiles
are encoded with the model's encoder (cached, resumable) and the model predicts every bin,
spot tile and region tile. Outputs in ``OUT/``:

* ``bins.h5ad`` (or ``.zarr``; ``cells.h5ad`` for a model of cells, ``spots.h5ad`` for a
  model of Visium or ST spots): predicted expression per unit of the model's gene panel
  on the **log1p scale** the model was trained on (``log1p(counts per bin)``, or
  ``log1p(counts per 10,000)`` with ``log1p_cp10k`` targets; ``uns["magnet"]["scale"]``
  says which); ``obsm["spatial"]`` in full-resolution pixels; ``uns["spatial"][<slide>]`` with a
  downsampled image and scalefactors, so ``scanpy.pl.spatial(adata, color=gene)`` draws it
  unchanged; ``layers["measured"]`` (the counts on the same scale) with ``--spaceranger``.
* ``spot_tiles.h5ad`` and ``region_tiles.h5ad``: the same for the coarser levels; their
  ``uns["spatial"]`` holds the scale factors, the images are kept once, in ``bins.h5ad``
  (``metadata["images_in"]``).
* ``prediction.zarr`` (with ``spatialdata=True``): all three levels as one SpatialData store
  (``spatialdata.read_zarr``): tables, square shapes and the downsampled images; see
  :mod:`magnet_st.io.export`.
* ``tissue_mask.png`` and ``tissue_mask_overlay.png`` (image-only), ``prediction.json`` (what was
  done, with which model and encoder, how long it took) and ``work/`` (the one-slide
  dataset and its cached features: a rerun reuses them).
"""

# Long module: predict() (~230 lines) and what it builds on: the two unit sources (image-only grid,
# Space Ranger run), mpp/encoder checks and the public output helpers (OneThumbnail, spatial_uns).

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp

from magnet_st.data.shapes import Polygons
from magnet_st.data.targets import TargetTransform, per_10k_rows
from magnet_st.errors import ConfigError, InputError, MagnetError, check_name
from magnet_st.util.atomic import atomic_path, check_out_folder, write_text
from magnet_st.util.lock import locked

log = logging.getLogger(__name__)

LEVEL_FILES = {"bin": "bins", "spot": "spot_tiles", "region": "region_tiles"}
#: the unit level's file is named after what it holds
UNIT_FILES = {
    "visium_hd": "bins",
    "visium_hd_cells": "cells",
    "visium": "spots",
    "legacy_st": "spots",
}


def level_files(technology: str) -> dict[str, str]:
    """The output file name (no suffix) of each level for a model of ``technology``:
    ``bins``, ``cells`` or ``spots`` for the units, then ``spot_tiles``, ``region_tiles``."""
    return {**LEVEL_FILES, "bin": UNIT_FILES.get(technology, "bins")}


MIN_MPP, MAX_MPP = 0.05, 4.0  # plausible full-resolution H&E scans, um per pixel
HIRES_MAX_PX = 2000
LOWRES_MAX_PX = 600
CAPTURE_AREA_UM = 6500.0  # the edge of one Visium HD capture area


def default_max_bins(unit_um: float) -> int:
    """Bins of ``unit_um`` in one 6.5 x 6.5 mm capture area (660,969 of 8 um)."""
    return int(math.ceil(CAPTURE_AREA_UM / unit_um) ** 2)


class OneThumbnail:
    """A slide image whose thumbnails all come from one read of the whole slide: the first
    request reads at ``max(largest, asked)`` px, smaller ones are reduced from it (box
    filter) with the same scale a direct read would have. Everything else is the image's."""

    def __init__(self, image: Any, largest: int = HIRES_MAX_PX):
        self._image, self._largest = image, int(largest)
        self._rgb: np.ndarray | None = None
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._image, name)

    def thumbnail(self, max_size: int) -> tuple[np.ndarray, float]:
        from PIL import Image

        if self._rgb is None or max_size > max(self._rgb.shape[:2]):
            self._rgb, _ = self._image.thumbnail(max(self._largest, int(max_size)))
            self.reads += 1
        w, h = self._image.size
        scale = min(1.0, max_size / max(w, h))
        out_w = min(int(max_size), max(1, round(w * scale)))
        out_h = min(int(max_size), max(1, round(h * scale)))
        if (out_h, out_w) == self._rgb.shape[:2]:
            return self._rgb, scale
        small = Image.fromarray(self._rgb).resize((out_w, out_h), Image.Resampling.BOX)
        return np.asarray(small), scale


@dataclass
class PredictResult:
    """Where the outputs are, and a few numbers about the run."""

    out: Path
    files: dict[str, Path]
    n: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)


def _slide_mpp(path: Path, given: float | None, model_mpp: float) -> float:
    """The image's microns per pixel: ``given`` or the file's; checked for plausibility."""
    from magnet_st.io.image import open_image

    recorded = open_image(path).microns_per_pixel
    mpp = given if given is not None else recorded
    if mpp is None:
        raise InputError(
            path,
            "the image does not record its microns per pixel; pass --mpp (e.g. 0.2738 for a "
            "Visium HD CytAssist-matched 40x scan, ~0.25 for 40x, ~0.5 for 20x)",
        )
    if not (np.isfinite(mpp) and MIN_MPP <= mpp <= MAX_MPP):
        raise InputError(
            path,
            f"microns per pixel {mpp!r} is not plausible for a full-resolution H&E scan "
            f"(expected {MIN_MPP} to {MAX_MPP})",
        )
    if given is not None and recorded is not None and abs(given / recorded - 1) > 0.1:
        log.warning(
            "%s: --mpp %.4g differs from the %.4g the file records; using --mpp",
            path,
            given,
            recorded,
        )
    if mpp > 2 * model_mpp:
        raise InputError(
            path,
            f"the image has {mpp:.3g} um/px but the model works at {model_mpp:.3g} um/px: "
            "patches would be upsampled more than 2x; is --mpp right?",
        )
    return float(mpp)


def _image_only_slide(
    name: str,
    image: Path,
    mpp: float,
    unit_um: float,
    genes: list[str],
    gene_names: list[str],
    origin_um: tuple[float, float],
    out: Path,
    tissue_options: dict[str, Any],
    img: Any,
    roi_um: tuple[float, float, float, float] | None = None,
    max_bins: int | None = None,
    technology: str = "visium_hd",
):
    from magnet_st.data.slide import Slide
    from magnet_st.io.tissue import detect_tissue, virtual_bins, virtual_spots

    mask = detect_tissue(img, **tissue_options)
    size = tuple(img.size)
    if technology == "visium_hd":
        grid = virtual_bins(mask, unit_um, origin_um=origin_um, image_size_px=size)
    else:  # a spot model: a virtual array of its own spots
        grid = virtual_spots(mask, technology, origin_um=origin_um, image_size_px=size)
    centers = np.asarray(grid.centers_px, dtype=np.float64)
    keep = np.ones(len(centers), bool)
    if roi_um is not None:
        x0, y0, x1, y1 = roi_um
        um = centers * mpp
        keep = (um[:, 0] >= x0) & (um[:, 0] < x1) & (um[:, 1] >= y0) & (um[:, 1] < y1)
    n = int(keep.sum())
    if n == 0:
        where = " inside the --roi (or --capture-area) box" if roi_um is not None else ""
        what = "bins" if technology == "visium_hd" else "spots"
        raise InputError(image, f"no {what} under the detected tissue{where}")
    limit = default_max_bins(unit_um) if max_bins is None else int(max_bins)
    if n > limit:
        w_mm = float(np.ptp(centers[keep, 0])) * mpp / 1000
        h_mm = float(np.ptp(centers[keep, 1])) * mpp / 1000
        raise InputError(
            image,
            f"{n:,} virtual {unit_um:g} um {'bins' if technology == 'visium_hd' else 'spots'} "
            f"under the tissue ({w_mm:.1f} x {h_mm:.1f} mm), "
            f"more than --max-bins {limit:,} (one 6.5 mm capture area); give --roi X0 Y0 X1 Y1 "
            "(microns from the image's top-left corner) around the part to predict, or raise "
            "--max-bins",
        )
    thumb, _ = img.thumbnail(max(mask.mask.shape))
    out.mkdir(parents=True, exist_ok=True)
    mask.save_png(out / "tissue_mask.png", thumbnail=thumb)
    log.info(
        "%s: tissue on %.1f%% of the image; %d virtual %g um bins",
        image,
        100 * mask.fraction,
        n,
        unit_um,
    )
    counts = sp.csr_matrix((n, len(genes)), dtype=np.int32)
    slide = Slide(
        name=name,
        counts=counts,
        gene_ids=np.asarray(genes, dtype=object),
        gene_names=np.asarray(gene_names, dtype=object),
        unit_ids=np.asarray(grid.barcodes, dtype=object)[keep],
        centers_px=centers[keep],
        unit_size_um=float(unit_um),
        microns_per_pixel=mpp,
        technology=technology,
        image_path=Path(image),
        array_coords=np.asarray(grid.array_rc, dtype=np.int64)[keep],
        sources={"positions": f"virtual grid over the tissue of {image}"},
    )
    return slide, None


def _run_units(
    run: Path,
    image: Path | None,
    mpp: float | None,
    unit_um: float,
    technology: str,
    segmentation: Path | None,
):
    """A Space Ranger run's units as the model knows them: bins of its size, Space Ranger
    4's cells, or the run's 2 um bins pooled into a segmentation's cells."""
    from magnet_st.read import cells_from_bins, visium_hd, visium_hd_cells

    if technology == "visium_hd_cells":
        if segmentation is not None:
            return cells_from_bins(run, segmentation, image, microns_per_pixel=mpp)
        return visium_hd_cells(run, image, microns_per_pixel=mpp)
    return visium_hd(run, int(round(unit_um)), image, microns_per_pixel=mpp)


def _spaceranger_slide(
    name: str | None,
    run: Path,
    src: Any,
    genes: list[str],
    gene_names: list[str],
    per_10k: bool = False,
):
    from magnet_st.data.slide import Slide

    # without --image: the image a 'magnet synth' run keeps in its folder, else an error
    if src.image_path is None:
        raise InputError(run, "--spaceranger needs --image: the full-resolution H&E of the run")
    src.check_counts()  # nothing to compare the predictions with
    measured, present = measured_on_panel(src, genes, per_10k, run)
    slide = Slide(
        name=name or src.name,
        counts=sp.csr_matrix((src.n_units, len(genes)), dtype=np.int32),
        gene_ids=np.asarray(genes, dtype=object),
        gene_names=np.asarray(gene_names, dtype=object),
        unit_ids=src.unit_ids,
        centers_px=src.centers_px,
        unit_size_um=src.unit_size_um,
        microns_per_pixel=src.microns_per_pixel,
        technology=src.technology,
        image_path=src.image_path,
        array_coords=src.array_coords,
        sources=src.sources,
        polygons=src.polygons,
    )
    return slide, (measured, present)


def measured_on_panel(
    src: Any, genes: list[str], per_10k: bool, where: Path
) -> tuple[sp.csr_matrix, np.ndarray]:
    """A slide's measured counts on the model's scale (log1p of counts, or of counts per
    10,000 of each unit's total over all genes), the panel's columns in the model's order,
    sparse throughout (660k bins x genes); and which of the panel's genes the slide has."""
    col = {g: i for i, g in enumerate(src.gene_ids.astype(str))}
    have = [i for i, g in enumerate(genes) if g in col]
    if not have:
        raise InputError(where, "none of the model's panel genes are in this run's matrix")
    if len(have) < len(genes):
        log.warning(
            "%s: %d of the model's %d genes are not in the matrix; 'measured' is NaN for them",
            where,
            len(genes) - len(have),
            len(genes),
        )
    sub = sp.csr_matrix(src.counts[:, [col[genes[i]] for i in have]], dtype=np.float32)
    if per_10k:  # the model's scale: counts per 10,000 of each unit's total over all genes
        sub = per_10k_rows(sub, np.asarray(src.counts.sum(axis=1)).ravel())
    sub = sub.tocoo()
    measured = sp.csr_matrix(
        (np.log1p(sub.data), (sub.row, np.asarray(have, dtype=np.int64)[sub.col])),
        shape=(src.n_units, len(genes)),
        dtype=np.float32,
    )
    present = np.zeros(len(genes), bool)
    present[have] = True
    return measured, present


def spatial_uns(image: Any, name: str, unit_um: float, mpp: float) -> dict[str, Any]:
    """``uns["spatial"]`` as scanpy reads it: hires/lowres images and their scalefactors."""
    hires, s_hi = image.thumbnail(HIRES_MAX_PX)
    lowres, s_lo = image.thumbnail(LOWRES_MAX_PX)
    return {
        name: {
            "images": {
                "hires": np.ascontiguousarray(hires),
                "lowres": np.ascontiguousarray(lowres),
            },
            "scalefactors": {
                "tissue_hires_scalef": float(s_hi),
                "tissue_lowres_scalef": float(s_lo),
                "spot_diameter_fullres": float(unit_um / mpp),
                "bin_size_um": float(unit_um),
                "microns_per_pixel": float(mpp),
            },
            "metadata": {"source": "magnet-st prediction"},
        }
    }


def seen_in_training(payload: dict, name: str, image: str | Path | None) -> bool:
    """Whether a slide (by name or image file) trained the model and chose its gene panel
    and target statistics; warns if so, since a comparison with its counts is not held out."""
    images = {str(Path(p).resolve()) for p in payload.get("training_images", []) if p}
    seen = name in payload.get("training_slides", []) or (
        image is not None and str(Path(image).resolve()) in images
    )
    if seen:
        log.warning(
            "%s: this slide trained the model and helped choose its gene panel and target "
            "statistics; its predicted vs measured comparison is not a held-out evaluation",
            name,
        )
    return seen


def _write(adata: Any, path: Path, zarr: bool) -> Path:
    path = path.with_suffix(".zarr" if zarr else ".h5ad")
    x = np.asarray(adata.X)
    if not np.isfinite(x).all():  # never write a prediction that is not a number
        raise MagnetError(
            f"{path.name}: {int((~np.isfinite(x)).sum())} of {x.size} predicted values are not "
            "finite; nothing written"
        )
    with atomic_path(path) as tmp:
        if zarr:
            adata.write_zarr(tmp)
        else:
            adata.write_h5ad(tmp)
    return path


def _encoder_args(payload: dict, weights: str | Path | None, model_path: Path) -> dict:
    """How to rebuild the model's encoder, checked against what the model was trained with."""
    enc = dict(payload["features"].get("encoder", {}))
    name = enc.get("name")
    if not name:
        raise InputError(model_path, "the model file does not say which encoder made its features")
    checksum = enc.get("weights_checksum", "")
    path = weights or enc.get("weights_path")
    if checksum.startswith("timm-pretrained:") and weights is None:
        path = None
    if path is not None and not Path(path).is_file():
        if weights is not None:
            raise InputError(path, "encoder weights file not found")
        if checksum not in ("random-init",) and not checksum.startswith("timm-pretrained:"):
            raise InputError(
                path,
                f"the model's encoder weights ({name}) are no longer at this path; pass "
                "--weights with the same file",
            )
        path = None
    from magnet_st.features.backbones import OFFLINE_IMAGENET
    from magnet_st.features.dense import DenseConfig

    dense = enc.get("dense")
    return {
        "dense": DenseConfig.from_dict(dense) if dense else None,
        "encoder_name": name,
        "weights": None if name == OFFLINE_IMAGENET else path,
        "pretrained": checksum.startswith("timm-pretrained:"),
        "encoder_kwargs": enc.get("encoder_kwargs") or None,
        "input_px": enc.get("input_px"),
        "expected_key": payload["features"]["key"],
        "expected_checksum": checksum,
    }


def _check_units(
    model_path: Path, technology: str, run: bool, segmentation: Any, qupath: bool
) -> None:
    """Refuse options that do not fit the units the model was trained on."""
    cells = technology == "visium_hd_cells"
    if technology not in ("visium_hd", "visium_hd_cells") and run:
        raise ConfigError(
            f"{model_path}: trained on {technology} spots; --spaceranger reads Visium HD runs "
            "(predict a spot model with --image alone: a virtual array of its spots)"
        )
    if segmentation is not None and not cells and technology != "visium_hd":
        raise ConfigError(
            f"{model_path}: trained on {technology} spots; --segmentation is for a model "
            "trained on cells, or on Visium HD bins (pooled into the cells)"
        )
    if qupath and not cells and segmentation is None:
        raise ConfigError(
            f"{model_path}: --qupath writes cells; this model predicts {technology} units "
            "(give --segmentation to pool them into cells)"
        )
    if technology not in UNIT_FILES:
        raise ConfigError(f"{model_path}: no virtual grid for {technology} units")


def capture_area_box(
    origin_um: tuple[float, float], roi_um: tuple[float, float, float, float] | None
) -> tuple[float, float, float, float]:
    """The capture area whose top-left corner is ``origin_um`` (microns), as a box
    ``(x0, y0, x1, y1)``, intersected with ``roi_um`` when given."""
    ox, oy = (float(v) for v in origin_um)
    box = (ox, oy, ox + CAPTURE_AREA_UM, oy + CAPTURE_AREA_UM)
    if roi_um is None:
        return box
    out = (max(box[0], roi_um[0]), max(box[1], roi_um[1]), min(box[2], roi_um[2]))
    out = (*out, min(box[3], roi_um[3]))
    if not (out[0] < out[2] and out[1] < out[3]):
        raise ConfigError(f"--roi {list(roi_um)} lies outside the capture area {list(box)}")
    return out  # type: ignore[return-value]


def _check_region(
    roi_um: tuple[float, float, float, float] | None, max_bins: int | None
) -> tuple[float, float, float, float] | None:
    """``--roi`` as four floats (x0 < x1, y0 < y1), and ``--max-bins`` at least 1."""
    if roi_um is not None:
        roi_um = tuple(float(v) for v in roi_um)  # type: ignore[assignment]
        if len(roi_um) != 4 or not (roi_um[0] < roi_um[2] and roi_um[1] < roi_um[3]):
            raise ConfigError(f"--roi must be X0 Y0 X1 Y1 with X0 < X1 and Y0 < Y1, got {roi_um}")
    if max_bins is not None and int(max_bins) < 1:
        raise ConfigError(f"--max-bins must be >= 1, got {max_bins}")
    return roi_um


# Long: five timed stages filling `seconds` (units, features, prediction, write, record) that share
# slide, measured, thumbs, work, res, ds and payload; the argument checks are _check_units and
# _check_region, the per-level writing _write_outputs.
@locked("out", "magnet predict")
def predict(
    model_path: str | Path,
    out: str | Path,
    *,
    image: str | Path | None = None,
    spaceranger: str | Path | None = None,
    mpp: float | None = None,
    name: str | None = None,
    grid_origin_um: tuple[float, float] = (0.0, 0.0),
    weights: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int | None = None,
    zarr: bool = False,
    spatialdata: bool = False,
    tissue_options: dict[str, Any] | None = None,
    progress: bool = True,
    roi_um: tuple[float, float, float, float] | None = None,
    max_bins: int | None = None,
    segmentation: str | Path | None = None,
    qupath: bool = False,
    capture_area: bool = False,
) -> PredictResult:
    """Predict the expression of every bin of a slide from its H&E image.

    Args:
        model_path: a model file written by ``magnet train`` / ``magnet cv`` (``model.pt``).
        out: output folder (created; finished steps in ``out/work`` are reused).
        image: the full-resolution H&E image. Alone: predict on a virtual bin grid over the
            detected tissue. With ``spaceranger``: the run's image.
        spaceranger: a Visium HD Space Ranger run (its folder or ``outs/``): predict on its
            bins under tissue and keep the measured counts beside the prediction.
        mpp: microns per pixel of the image; default: what the file records.
        name: the slide's name in the outputs; default: the image's (or run's) name.
        grid_origin_um: where the virtual grid's bin (0, 0) starts, microns from the
            image's top-left corner (image-only).
        weights: the encoder's weights file, when it moved since training.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        batch_size, num_workers: of the feature extraction.
        zarr: write ``.zarr`` stores instead of ``.h5ad`` files.
        spatialdata: also write ``prediction.zarr``, a SpatialData store of all levels.
        tissue_options: keyword arguments of :func:`magnet_st.io.tissue.detect_tissue`.
        roi_um: image-only: predict only the bins whose centres lie in this box,
            ``(x0, y0, x1, y1)`` microns from the image's top-left corner.
        max_bins: image-only: stop (with a message saying how to go on) when the virtual
            grid has more bins than this; default: one 6.5 mm capture area
            (:func:`default_max_bins`).
        segmentation: cells as GeoJSON outlines in the image's full-resolution pixels. A
            model trained on cells predicts them (image-only; with ``spaceranger``, the
            run's 2 um bins pooled into them are the measured counts); a model trained on
            Visium HD bins predicts its bins and pools them into the cells, by the share of
            each bin's area in each cell (``cells.h5ad``; :mod:`magnet_st.predict.pool`;
            with ``spaceranger``, the run's 2 um bins summed into the outlines are the
            cells' ``layers["measured"]``).
            Without it, a cell model predicts Space Ranger 4's cells of ``spaceranger``, or,
            from an image alone, the cells the built-in detector finds
            (:mod:`magnet_st.io.nuclei`; written to ``out/cells_detected.geojson`` and reused
            by a rerun).
        qupath: a model trained on cells: also write ``cells_qupath.geojson``, the cells as
            QuPath detections whose measurements are the predicted genes
            (:mod:`magnet_st.io.qupath`).
        capture_area: image-only: ``grid_origin_um`` is the top-left corner of a capture
            area; predict only what lies inside it (6.5 x 6.5 mm from that corner; with
            ``roi_um``, inside both).

    Raises:
        InputError: missing or unreadable inputs, no tissue, implausible or missing
            microns per pixel, an encoder that does not match the model.
    """
    from magnet_st.data.dataset import Dataset
    from magnet_st.features.encoders import resolve_device
    from magnet_st.features.extract import extract_features
    from magnet_st.io.image import open_image
    from magnet_st.model.inputs import model_inputs, model_reader
    from magnet_st.predict.cells import detected_cells, segmented_slide
    from magnet_st.predict.modelfile import coarse_sources, load_model, predict_slide
    from magnet_st.prepare.build import prepare_unmeasured

    t_all = time.perf_counter()
    model_path = Path(model_path)
    model, payload = load_model(model_path)
    if image is None and spaceranger is None:
        raise ConfigError("give --image (image-only prediction) or --spaceranger with --image")
    genes, gene_names = list(payload["genes"]), list(payload["gene_names"])
    units = payload.get("units") or {"unit_size_um": 8.0, "technology": "visium_hd"}
    unit_um = float(units["unit_size_um"])
    dcfg = payload["dataset_config"]
    technology = str(units.get("technology", "visium_hd"))
    cells = technology == "visium_hd_cells"
    _check_units(model_path, technology, spaceranger is not None, segmentation, qupath)
    segmentation = Path(segmentation) if segmentation is not None else None
    pool_into = None
    if segmentation is not None and not cells:  # a model of bins, pooled into the cells
        from magnet_st.read.geojson import read_geojson

        # read now, once: a bad file fails before the work
        pool_into = _PoolInto(segmentation, read_geojson(segmentation), spaceranger)
    image = Path(image) if image is not None else None
    if image is not None and not image.exists():
        raise InputError(image, "image not found")
    if name is not None:  # a name, not a path: outputs are named after it
        check_name(name, "--name")
    roi_um = _check_region(roi_um, max_bins)
    if capture_area:
        if spaceranger is not None:
            raise ConfigError("--capture-area bounds a virtual grid: it needs no --spaceranger")
        roi_um = capture_area_box(grid_origin_um, roi_um)
    # made when the first file is written: a refused run, or an image that cannot be
    # read, leaves no folder
    out = check_out_folder(out)
    seconds: dict[str, float] = {}
    bin_target = TargetTransform.from_dict(payload["targets"]["bin"])
    per_10k = bin_target.per_10k

    t = time.perf_counter()
    if spaceranger is not None:
        run = Path(spaceranger)
        src = _run_units(run, image, mpp, unit_um, technology, segmentation)
        slide, measured = _spaceranger_slide(name, run, src, genes, gene_names, per_10k)
        _slide_mpp(Path(slide.image_path), slide.microns_per_pixel, dcfg["working_mpp"])
    else:  # image-only: cells, or a virtual grid of the model's units
        assert image is not None
        mpp = _slide_mpp(image, mpp, dcfg["working_mpp"])
        slide_name = check_name(name or image.name.split(".")[0], "--name")
        thumbs = OneThumbnail(open_image(image, microns_per_pixel=mpp))
        if cells:
            if segmentation is None:  # the built-in detector (magnet segment), kept for reruns
                segmentation = detected_cells(image, mpp, out, roi_um, progress)
            slide = segmented_slide(slide_name, image, mpp, segmentation, genes, gene_names, roi_um)
            measured = None
        else:
            slide, measured = _image_only_slide(
                slide_name,
                image,
                mpp,
                unit_um,
                genes,
                gene_names,
                grid_origin_um,
                out,
                tissue_options or {},
                thumbs,
                roi_um,
                max_bins,
                technology,
            )
    work = prepare_unmeasured(
        slide,
        out / "work",
        dcfg,
        genes,
        gene_names,
        payload["targets"],
        fingerprint_extra=str(Path(slide.image_path).resolve()),
    )
    seconds["bins and tiles"] = time.perf_counter() - t

    t = time.perf_counter()
    mc = payload["model_config"]
    # cached bin features: frozen ones, or a dense end-to-end branch's frozen windows
    frozen = mc["bin_encoder"] == "frozen" or bool((mc.get("bin_dense") or {}).get("extra"))
    enc = _encoder_args(payload, weights, model_path)
    levels = (["bin"] if frozen else []) + ["spot", "region"]
    res = extract_features(
        work,
        enc["encoder_name"],
        levels=levels,
        weights=enc["weights"],
        pretrained=enc["pretrained"],
        encoder_kwargs=enc["encoder_kwargs"],
        input_px=enc["input_px"],
        dense=enc["dense"],
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        progress=progress,
    )
    if res["key"] != enc["expected_key"]:
        raise InputError(
            model_path,
            f"the encoder rebuilt for prediction ({res['key']}) is not the one the model was "
            f"trained with ({enc['expected_key']}); pass --weights with the training weights",
        )
    seconds["features"] = time.perf_counter() - t

    t = time.perf_counter()
    ds = Dataset(work)
    arrays = model_inputs(ds, slide.name, res["key"], mc, with_counts=False)
    reader = model_reader(ds, [slide.name], mc)
    dev = resolve_device(device)
    preds = predict_slide(
        model, arrays, payload, patch_reader=reader, device=dev, progress=progress
    )
    seconds["prediction"] = time.perf_counter() - t

    t = time.perf_counter()
    if spaceranger is not None:
        thumbs = OneThumbnail(
            open_image(slide.image_path, microns_per_pixel=slide.microns_per_pixel)
        )
    files, n = _write_outputs(
        out, preds, ds, slide, thumbs, measured, payload, model_path, res, unit_um, zarr,
        spatialdata, qupath, pool_into,
    )  # fmt: skip
    seconds["write"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_all
    record = {
        "model": str(model_path.resolve()),
        "source": "spaceranger" if spaceranger is not None else "image",
        "image": str(Path(slide.image_path).resolve()),
        "spaceranger": str(Path(spaceranger).resolve()) if spaceranger is not None else None,
        "microns_per_pixel": slide.microns_per_pixel,
        "bin_size_um": unit_um,
        "grid_origin_um": list(grid_origin_um) if spaceranger is None else None,
        "encoder": res["key"],
        # per coarse level: the model's head, or the sum of its bins (chosen on validation)
        "coarse_from": coarse_sources(payload),
        "n": n,
        "files": {k: str(v) for k, v in files.items()},
        "seconds": seconds,
        "scale": bin_target.scale,
        "roi_um": list(roi_um) if roi_um is not None else None,
        "capture_area": capture_area,
        "thumbnail_reads": thumbs.reads,
    }
    write_text(out / "prediction.json", json.dumps(record, indent=1))
    log.info("%s: %d bins predicted in %.0f s", out, n["bin"], seconds["total"])
    return PredictResult(out=out, files=files, n=n, seconds=seconds)


def _write_outputs(
    out: Path,
    preds: dict[str, np.ndarray],
    ds: Any,
    slide: Any,
    thumbs: OneThumbnail,
    measured: tuple | None,
    payload: dict,
    model_path: Path,
    res: dict,
    unit_um: float,
    zarr: bool,
    spatialdata: bool,
    qupath: bool,
    pool_into: _PoolInto | None = None,
) -> tuple[dict[str, Path], dict[str, int]]:
    """Each level's AnnData (the images once, in the bins' file; measured counts beside the
    bins' prediction), the bins pooled into the cells of ``pool_into`` (``cells.h5ad``,
    :func:`_pooled_cells`), then the SpatialData store and QuPath's cells when asked."""
    genes, gene_names = list(payload["genes"]), list(payload["gene_names"])
    bin_target = TargetTransform.from_dict(payload["targets"]["bin"])
    names = level_files(str(slide.technology))
    images_in = f"{names['bin']}{'.zarr' if zarr else '.h5ad'}"  # the file holding the images
    files, n, written = {}, {}, {}
    for lv, pred in preds.items():
        src = ds.level(slide.name, lv)
        ad = _prediction_anndata(src, pred, genes, gene_names, lv, slide.name, model_path, res)
        ad.uns["magnet"]["scale"] = bin_target.scale
        size = unit_um if lv == "bin" else ds.patch_um(lv)
        # every thumbnail of the run comes from one read of the slide
        ad.uns["spatial"] = spatial_uns(thumbs, slide.name, size, slide.microns_per_pixel)
        if lv != "bin":  # the images once, in the bins' file (and the SpatialData store)
            lib = ad.uns["spatial"][slide.name]
            del lib["images"]
            lib["metadata"]["images_in"] = images_in
        if lv == "bin" and measured is not None:
            ad.layers["measured"] = measured[0]
            ad.var["measured"] = measured[1]
            if seen_in_training(payload, slide.name, slide.image_path):
                ad.uns["magnet"]["held_out"] = False
        files[lv] = _write(ad, out / names[lv], zarr)
        n[lv], written[lv] = int(ad.n_obs), ad
    cells_ad, polygons = written["bin"], None
    if pool_into is not None:  # a model of bins: its bins pooled into the given cells
        cells_ad = _pooled_cells(
            written["bin"], slide, unit_um, genes, pool_into, bin_target.per_10k, images_in
        )
        files["cell"] = _write(cells_ad, out / UNIT_FILES["visium_hd_cells"], zarr)
        n["cell"] = int(cells_ad.n_obs)
        polygons = Polygons(cells_ad.uns["polygons"]["xy"], cells_ad.uns["polygons"]["offsets"])
    if spatialdata:
        from magnet_st.io.export import write_spatialdata

        tiles = {lv: ds.patch_um(lv) for lv in written if lv != "bin"}
        files["spatialdata"] = write_spatialdata(
            out / "prediction.zarr",
            written if pool_into is None else {**written, "cell": cells_ad},
            slide.name,
            unit_um,
            slide.microns_per_pixel,
            tile_um=tiles,
        )
    if qupath:  # cells as QuPath detections, the predicted genes as their measurements
        from magnet_st.io.qupath import write_qupath_geojson

        files["qupath"] = write_qupath_geojson(
            out / "cells_qupath.geojson",
            ds.polygons(slide.name) if polygons is None else polygons,
            list(cells_ad.obs_names),
            np.asarray(cells_ad.X),
            list(cells_ad.var_names),
        )
    return files, n


class _PoolInto(NamedTuple):
    """Where a model of bins pools its prediction: the segmentation file, its (ids,
    polygons) as read, and the Space Ranger run whose 2 um bins measure the cells (or None)."""

    segmentation: Path
    outlines: tuple[np.ndarray, Polygons]
    run: Any


def _pooled_cells(
    bins: Any,
    slide: Any,
    unit_um: float,
    genes: list[str],
    pool_into: _PoolInto,
    per_10k: bool,
    images_in: str,
) -> Any:
    """The bins' prediction pooled into the cells of a segmentation
    (:func:`magnet_st.predict.pool.pooled_cells`); with a Space Ranger run, its 2 um bins
    summed into the same outlines are the cells' measured counts (``layers["measured"]``),
    when the run has them."""
    from magnet_st.predict.pool import pooled_cells
    from magnet_st.read import cells_from_bins

    segmentation, outlines, run = pool_into
    bin_px = unit_um / slide.microns_per_pixel
    cells = pooled_cells(bins, outlines, segmentation, bin_px, per_10k, images_in)
    if run is None:
        return cells
    try:
        src = cells_from_bins(
            run, segmentation, slide.image_path, microns_per_pixel=slide.microns_per_pixel
        )
    except InputError as exc:  # e.g. a run written without its 2 um bins
        log.warning("cells.h5ad: no measured counts for the cells (%s)", exc)
        return cells
    measured, present = measured_on_panel(src, genes, per_10k, Path(run))
    rows = pd.Index(src.unit_ids).get_indexer(cells.obs_names)
    found = rows >= 0  # cells with no 2 um bin under tissue are not in the run's cells
    pick = sp.csr_matrix(
        (np.ones(int(found.sum()), np.float32), (np.flatnonzero(found), rows[found])),
        shape=(cells.n_obs, measured.shape[0]),
    )
    cells.layers["measured"] = sp.csr_matrix(pick @ measured, dtype=np.float32)
    cells.var["measured"] = present
    cells.obs["measured"] = found
    return cells


def _prediction_anndata(src, pred, genes, gene_names, level, slide, model_path, res):
    import anndata

    obs = src.obs.drop(columns=["total_counts"], errors="ignore").copy()
    if level == "bin":
        obs["in_tissue"] = np.int8(1)
    var = pd.DataFrame({"gene_ids": genes}, index=pd.Index(gene_names, name="gene"))
    ad = anndata.AnnData(X=np.asarray(pred, dtype=np.float32), obs=obs, var=var)
    ad.var_names_make_unique()
    ad.obsm["spatial"] = np.asarray(src.obsm["spatial"], dtype=np.float64)
    if "polygons" in src.uns:  # cells keep their outlines
        ad.uns["polygons"] = dict(src.uns["polygons"])
    ad.uns["magnet"] = {
        "level": level,
        "slide": slide,
        "scale": "log1p",
        "model": str(Path(model_path).resolve()),
        "encoder": res["key"],
    }
    return ad
