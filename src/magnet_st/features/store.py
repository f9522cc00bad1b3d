"""features: run a frozen encoder over every spot / region tile once and cache the result.

MagNet's spot and region branches see their tiles through a frozen pretrained encoder, so
the features are computed once per dataset and encoder and stored with the dataset::

    DATASET/features/<encoder_key>/meta.json          encoder, preprocessing, sizes, rows,
                                                      package versions
    DATASET/features/<encoder_key>/<slide>/<level>.npy   float16 (n_units_of_level, dim),
                                                      rows in the order of the level's units
    DATASET/features/<encoder_key>/<slide>/<level>.json  what the array was computed from;
                                                      its presence marks the array complete

``encoder_key`` is the encoder name made filesystem-safe plus a short weights checksum
(``resnet50-random``, ``resnet50-3f2a9c0d1b7e``; see :func:`magnet_st.features.encoders.encoder_key`).

How a tile becomes a feature vector:

1. The tile is cut from the slide image at the image's native resolution: a box of
   ``round(patch_um / microns_per_pixel)`` native pixels centred on the unit
   (``Dataset.positions_px``), aligned to whole pixels, so that the read is a plain copy of
   stored pixels (no resampling in the reader) and every tile of a level has the same size.
   Only when that box would exceed ``max(1024, 4 x the encoder input)`` px (coarse tiles on
   a sharp image) is it read reduced, by the image reader, to 2x the encoder input. The
   end-to-end bin encoder cuts its patches the same way (:mod:`magnet_st.features.patches`).
2. Reading happens in ``DataLoader`` worker processes, in spatial order (rows of tiles,
   left to right) so that neighbouring tiles reuse decoded image tiles; each batch is a
   uint8 ``(B, P, P, 3)`` tensor.
3. On the encoder's device the batch is resampled to the encoder input size with
   ``torch.nn.functional.interpolate(..., antialias=True)`` in the interpolation mode of the
   encoder's pretrained config, normalised with its mean / std, and encoded in eval mode
   under ``torch.inference_mode()`` (bf16 autocast and channels_last on CUDA).

Work is resumable: each slide/level is written into ``<level>.partial.npy`` (a
``numpy.lib.format.open_memmap``) with a ``<level>.progress.json`` sidecar saved every
``flush_every`` batches and on any error or interrupt; a rerun continues from the last
saved batch and renames the file into place when done. Completed slide/levels are
skipped unless ``overwrite=True``. Later stages read the arrays with
:func:`load_features`.

Features are cached as float16. A value beyond its range (``|x| > 65504``) or not finite
is an error (:class:`FeatureOverflowError`, a ``ConfigError``) naming the slide, the level
and the largest magnitude, raised before the batch reaches the file; the level's partial
file is then removed (a rerun would compute the same values), so nothing half-written is
left and nothing is stored under the final name.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from magnet_st.data.levels import LEVELS
from magnet_st.errors import ConfigError, InputError
from magnet_st.features import patches
from magnet_st.util.atomic import write_text
from magnet_st.util.provenance import package_versions

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LEVELS",
    "FEATURES_DIR",
    "feature_set_meta",
    "list_feature_sets",
    "load_features",
]

FEATURES_DIR = "features"
META = "meta.json"
FORMAT = "magnet-st features"
FORMAT_VERSION = 1
DEFAULT_LEVELS = ("spot", "region")
ALL_LEVELS = LEVELS
FEATURE_PACKAGES = ("magnet-st", "torch", "torchvision", "timm", "numpy", "pillow", "tifffile")
DTYPE = np.float16
MIN_READ_CAP = patches.MIN_READ_CAP
"""Native boxes up to this edge (or 4x the encoder input, if larger) are read unreduced."""


class FeatureOverflowError(ConfigError):
    """Features that float16, the dtype of the cache, cannot hold."""


FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


def check_float16(feats: np.ndarray, slide: str, level: str) -> np.ndarray:
    """``feats`` as float16, or :class:`FeatureOverflowError` naming the slide, the level
    and the largest magnitude when a value is not finite or beyond float16's range (it
    would be stored as inf). Called before the values reach any file."""
    a = np.asarray(feats)
    if a.dtype == DTYPE:
        bad = not np.isfinite(a).all()
        peak = float(np.max(np.abs(a.astype(np.float32)))) if a.size else 0.0
    else:
        a64 = a.astype(np.float64, copy=False)
        bad = not np.isfinite(a64).all()
        peak = float(np.max(np.abs(a64))) if a64.size else 0.0
    if bad or peak > FLOAT16_MAX:
        what = (
            "contain NaN or inf"
            if bad
            else f"reach |value| = {peak:.6g}, beyond float16's largest {FLOAT16_MAX:g}"
        )
        raise FeatureOverflowError(
            f"slide {slide}, level {level}: features {what} (features are cached as "
            "float16); nothing of this slide/level was stored. Use an encoder whose "
            "features are normalised, or rescale imported features."
        )
    return a.astype(DTYPE, copy=False)


@dataclass
class _Job:
    """One slide/level to encode."""

    slide: str
    level: str
    n: int
    patch_um: float
    mpp: float
    native_px: int
    read_px: int
    fingerprint: str
    image: str

    @property
    def name(self) -> str:
        return f"{self.slide}/{self.level}"


# --------------------------------------------------------------------------- files


def _level_paths(root: Path, job_or_slide: _Job | str, level: str | None = None) -> dict[str, Path]:
    if isinstance(job_or_slide, _Job):
        slide, level = job_or_slide.slide, job_or_slide.level
    else:
        slide = job_or_slide
    d = root / slide
    return {
        "dir": d,
        "npy": d / f"{level}.npy",
        "record": d / f"{level}.json",
        "partial": d / f"{level}.partial.npy",
        "progress": d / f"{level}.progress.json",
    }


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _npy_shape(path: Path) -> tuple[tuple[int, ...], np.dtype] | None:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    return tuple(arr.shape), arr.dtype


def _is_complete(root: Path, job: _Job, dim: int) -> bool:
    p = _level_paths(root, job)
    rec = _read_json(p["record"])
    if rec is None or rec.get("fingerprint") != job.fingerprint or rec.get("rows") != job.n:
        return False
    return _npy_shape(p["npy"]) == ((job.n, dim), np.dtype(DTYPE))


def _write_meta(
    root: Path,
    enc_desc: dict,
    ds: Any,
    jobs: list[_Job],
    levels: Sequence[str],
    run: dict,
    *,
    computed: bool = True,
    level_dims: dict[str, int] | None = None,
) -> dict:
    """Write ``meta.json``. With ``computed=False`` (a run that encoded nothing) a meta
    whose content is unchanged but for its times and last run is left untouched."""
    dim = int(enc_desc["feature_dim"])
    old = _read_json(root / META) or {}
    slides: dict[str, dict] = {}
    # keep what earlier runs recorded (other levels / slides), then refresh from disk
    for slide, lv in (old.get("slides") or {}).items():
        if slide in ds.slides:
            slides[slide] = dict(lv)
    for job in jobs:
        entry = {
            "rows": job.n,
            "file": f"{job.slide}/{job.level}.npy",
            "microns_per_pixel": job.mpp,
            "native_px": job.native_px,
            "read_px": job.read_px,
            "fingerprint": job.fingerprint,
            "complete": _is_complete(root, job, (level_dims or {}).get(job.level, dim)),
        }
        slides.setdefault(job.slide, {})[job.level] = entry
    level_info = dict(old.get("levels") or {})
    for level in levels:
        level_info[level] = {
            "patch_um": float(ds.patch_um(level)),
            "patch_px": int(ds.patch_px(level)),
            "working_mpp": float(ds.working_mpp),
        }
    now = datetime.now(UTC).isoformat(timespec="seconds")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "key": enc_desc["key"],
        "created": old.get("created", now),
        "updated": now,
        "encoder": enc_desc,
        "feature_dim": dim,
        "dtype": np.dtype(DTYPE).name,
        "input_size": enc_desc["input_size"],
        "mean": enc_desc["mean"],
        "std": enc_desc["std"],
        "interpolation": enc_desc["interpolation"],
        "levels": level_info,
        "slides": slides,
        "packages": package_versions(FEATURE_PACKAGES),
        "last_run": run,
    }
    text = json.dumps(meta, indent=1)
    if not computed and old:
        volatile = ("updated", "last_run")
        same = {k: v for k, v in json.loads(text).items() if k not in volatile}
        if same == {k: v for k, v in old.items() if k not in volatile}:
            return old
    write_text(root / META, text)
    return meta


def _compatible(old: dict | None, enc_desc: dict) -> bool:
    if not old:
        return True
    keys = (
        "name",
        "weights_checksum",
        "feature_dim",
        "input_size",
        "mean",
        "std",
        "interpolation",
    )  # dense settings and map geometry: in the key and in every job's fingerprint
    return all(old.get("encoder", {}).get(k) == enc_desc.get(k) for k in keys)


# --------------------------------------------------------------------------- reading


def list_feature_sets(dataset_path: str | Path) -> list[dict]:
    """The feature sets stored with a dataset: their ``meta.json`` plus ``key`` and ``path``
    (a string), sorted by key."""
    root = Path(dataset_path) / FEATURES_DIR
    out = []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            meta = _read_json(d / META) if d.is_dir() else None
            if meta and meta.get("format") == FORMAT:
                out.append({**meta, "key": d.name, "path": str(d)})
    return out


def feature_set_meta(dataset_path: str | Path, encoder_key_or_name: str) -> dict:
    """The ``meta.json`` of one feature set (a key or an encoder name), plus ``key``/``path``.

    Raises:
        InputError: no such feature set (the message says how to make it).
    """
    return resolve_feature_set(dataset_path, encoder_key_or_name)


def _hint(dataset_path: Path, encoder: str, level: str | None = None) -> str:
    lv = f" --levels {level}" if level and level not in DEFAULT_LEVELS else ""
    return f"run 'magnet features {dataset_path} --encoder {encoder}{lv}' first"


def resolve_feature_set(dataset_path: str | Path, encoder: str) -> dict:
    """The feature set of ``encoder``: a key (folder name) or an encoder name."""
    path = Path(dataset_path)
    sets = list_feature_sets(path)
    by_key = [s for s in sets if s["key"] == encoder]
    if by_key:
        return by_key[0]
    by_name = [s for s in sets if s.get("encoder", {}).get("name") == encoder]
    if len(by_name) == 1:
        return by_name[0]
    if len(by_name) > 1:
        keys = ", ".join(s["key"] for s in by_name)
        raise InputError(
            path / FEATURES_DIR,
            f"several feature sets for encoder {encoder!r} ({keys}); pass the key instead",
        )
    have = ", ".join(s["key"] for s in sets) or "none"
    raise InputError(
        path / FEATURES_DIR,
        f"no features for encoder {encoder!r} (feature sets: {have}); {_hint(path, encoder)}",
    )


def load_features(
    dataset_path: str | Path,
    encoder_key_or_name: str,
    slide: str,
    level: str,
    *,
    mmap: bool = False,
    on_disk: bool = False,
) -> np.ndarray:
    """The cached features of one slide/level: float16 ``(n_units_of_level, dim)``.

    ``mmap``: memory-mapped. ``on_disk``: an :class:`magnet_st.data.ondisk.NpyRows` that reads
    the rows it is indexed with (training: memory stays bounded over a long run).

    Rows follow the order of the level's units in the dataset (``Dataset.level(slide,
    level)``). ``encoder_key_or_name`` is a feature-set key (``resnet50-random``) or an
    encoder name when only one feature set of that encoder exists.

    Raises:
        InputError: no such feature set, slide or level, or the features are incomplete or
            stale (the dataset was rebuilt since); the message says which
            ``magnet features`` command makes them.
    """
    path = Path(dataset_path)
    if level not in ALL_LEVELS:
        raise ValueError(f"level must be one of {ALL_LEVELS}, got {level!r}")
    fs = resolve_feature_set(path, encoder_key_or_name)
    name = fs.get("encoder", {}).get("name", encoder_key_or_name)
    p = _level_paths(Path(fs["path"]), slide, level)
    rec = _read_json(p["record"])
    if rec is None or not p["npy"].is_file():
        partial = (
            " (an interrupted run left partial work; rerunning resumes it)" * p["partial"].is_file()
        )
        raise InputError(
            p["npy"],
            f"no complete {level} features for slide {slide!r} with encoder {fs['key']}"
            f"{partial}; {_hint(path, name, level)}",
        )
    if on_disk:
        from magnet_st.data.ondisk import NpyRows

        arr = NpyRows(p["npy"])
    else:
        arr = np.load(p["npy"], mmap_mode="r" if mmap else None)
    if arr.shape[0] != rec.get("rows"):
        raise InputError(p["npy"], f"holds {arr.shape[0]} rows, its record says {rec.get('rows')}")
    manifest = _read_json(path / "manifest.json") or {}
    n = (manifest.get("slides", {}).get(slide, {}).get("n") or {}).get(level)
    if n is not None and int(n) != arr.shape[0]:
        raise InputError(
            p["npy"],
            f"stale: {arr.shape[0]} rows but the dataset's slide {slide!r} has {n} {level} "
            f"units (rebuilt since?); rerun 'magnet features {path} --encoder {name}'",
        )
    return arr
