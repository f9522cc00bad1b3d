"""extract: :func:`extract_features` plans the feature store's jobs (one slide and level
encoded by a frozen encoder, :mod:`magnet_st.features.jobs`) and runs them, resumably, on
one or several devices; :func:`import_features` adopts features computed elsewhere. The
files they write are :mod:`magnet_st.features.store`'s."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from magnet_st.errors import ConfigError
from magnet_st.features.jobs import (
    _default_workers,
    _device_list,
    _plan_job,
    _record,
    _run_job,
    _run_multi,
)
from magnet_st.features.store import (
    ALL_LEVELS,
    DEFAULT_LEVELS,
    FEATURES_DIR,
    META,
    _compatible,
    _is_complete,
    _Job,
    _level_paths,
    _read_json,
    _write_meta,
    check_float16,
)
from magnet_st.util.atomic import write_text
from magnet_st.util.lock import locked

__all__ = ["extract_features"]

log = logging.getLogger(__name__)


# Long: check args, build the encoder and its (dense) description, plan jobs, run them; meta.json is
# written before the jobs and again in `finally` from enc_desc, all_jobs, level_dims and run above.
@locked("dataset_path", "magnet features")
def extract_features(
    dataset_path: str | Path,
    encoder_name: str = "resnet50",
    levels: Sequence[str] = DEFAULT_LEVELS,
    weights: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    *,
    pretrained: bool = False,
    encoder_kwargs: dict[str, Any] | None = None,
    devices: int = 1,
    slides: Sequence[str] | None = None,
    precision: str = "auto",
    flush_every: int = 20,
    input_px: int | None = None,
    dense: Any = None,
) -> dict:
    """Encode every tile of ``levels`` of every slide of a prepared dataset; cache the features.

    Args:
        dataset_path: a dataset written by ``magnet prepare``.
        encoder_name: a timm model name, ``hf-hub:...`` name or ``efficientnet_lite0_imagenet``
            (see :func:`magnet_st.features.encoders.create_encoder`).
        levels: any of ``"bin"``, ``"spot"``, ``"region"``.
        weights: a state-dict file for the encoder; ``None``: random init, or timm's
            download with ``pretrained=True``.
        batch_size: tiles per forward pass.
        num_workers: reader processes; ``None``: 1 on the CPU (2 from 16 cores), else CPU
            count - 1, at most 8; 0 reads in the main process.
        device: ``"auto"`` (CUDA, else MPS, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``,
            ``"mps"``.
        overwrite: recompute slide/levels that are already complete.
        progress: show progress bars (tiles per second).
        pretrained: let timm download the encoder's pretrained weights (online only).
        encoder_kwargs: extra ``timm.create_model`` arguments (e.g. for UNI).
        devices: number of CUDA GPUs to use; slide/levels are split over one process per
            GPU. Anything but CUDA uses one device.
        slides: only these slides (default: all).
        precision: ``"auto"`` (bf16 autocast on CUDA, fp32 elsewhere), ``"fp32"``, ``"bf16"``.
        flush_every: save resumable progress every this many batches.
        input_px: encode tiles at this edge instead of the encoder's default input size
            (see :func:`magnet_st.features.encoders.create_encoder`).
        dense: a :class:`magnet_st.features.dense.DenseConfig`: one encoder pass per image tile,
            each unit's features its footprint's mean of the encoder's maps (see
            :mod:`magnet_st.features.dense`) instead of one pass per unit; the feature set's key
            gains a ``-dense<hash>`` suffix.

    Returns:
        ``{"key", "path", "encoder", "meta", "jobs"}``; ``jobs`` has one entry per
        slide/level with ``status`` ``"skipped"``, ``"done"`` or ``"resumed"``,
        ``rows``, ``processed_rows``, ``seconds`` and ``tiles_per_s``.
    """
    from magnet_st.data.dataset import Dataset
    from magnet_st.features.encoders import create_encoder, resolve_device

    ds = Dataset(dataset_path)
    levels = list(dict.fromkeys(levels))
    bad = [lv for lv in levels if lv not in ALL_LEVELS]
    if not levels or bad:
        raise ConfigError(f"levels must be among {list(ALL_LEVELS)}, got {list(levels)}")
    if int(batch_size) < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if int(flush_every) < 1:
        raise ConfigError(f"flush_every must be >= 1, got {flush_every}")
    if num_workers is not None and int(num_workers) < 0:
        raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
    chosen = list(ds.slides) if slides is None else list(slides)
    unknown = [s for s in chosen if s not in ds.slides]
    if unknown:
        raise ConfigError(f"slides {unknown} are not in the dataset; it has {ds.slides}")

    if dense is not None and input_px is not None:
        raise ConfigError(
            "input_px sets the patch size of per-unit features; dense features read the "
            "slide at their own resolution (dense mpp): give one or the other"
        )
    dev = resolve_device(device)
    device_names = _device_list(dev, int(devices))
    workers = _default_workers(dev.type) if num_workers is None else int(num_workers)
    if dev.type == "cuda":
        import torch

        torch.backends.cudnn.benchmark = True  # one input size throughout: autotune once
    enc_args = {
        "name": encoder_name,
        "weights": None if weights is None else str(weights),
        "pretrained": pretrained,
        "encoder_kwargs": encoder_kwargs,
        "precision": precision,
        "input_px": input_px,
    }
    encoder = create_encoder(device=dev, **enc_args)
    enc_desc = encoder.describe()
    level_dims: dict[str, int] = {}
    if dense is not None:
        from magnet_st.features import dense as dense_mod

        dense = dense.resolve(str(ds.config.get("preset", "hd"))).check()
        specs = dense_mod.map_specs(encoder.model, dense.strides)
        base = sum(s.channels for s in specs)
        parts = dense_mod.block_names(specs, dense.windows_um)
        level_dims = {lv: base for lv in ALL_LEVELS}
        level_dims["bin"] = sum(w for _, w in parts)
        enc_desc.update(
            key=f"{encoder.key}-{dense.suffix()}",
            feature_dim=base,
            dense={
                **dense.describe(),
                "maps": [dataclasses.asdict(s) for s in specs],
                "blocks": {lv: parts if lv == "bin" else parts[: len(specs)] for lv in ALL_LEVELS},
            },
        )
    if encoder.weights_checksum == "random-init":
        log.warning(
            "encoder %s has random weights (no weights file, not pretrained): fine for "
            "tests, useless for real predictions",
            encoder_name,
        )
    root = ds.path / FEATURES_DIR / enc_desc["key"]
    root.mkdir(parents=True, exist_ok=True)
    old_meta = _read_json(root / META)
    if not _compatible(old_meta, enc_desc):
        log.warning("%s: cached features were made with other settings; recomputing", root)
        overwrite = True

    plans: list[tuple[_Job, np.ndarray]] = []
    all_jobs: list[_Job] = []
    results: list[dict] = []
    for slide in chosen:
        for level in levels:
            job, centers = _plan_job(ds, slide, level, encoder.input_size)
            if dense is not None:  # the settings and the maps' measured geometry made them
                h = hashlib.sha256((job.fingerprint + json.dumps(enc_desc["dense"])).encode())
                job.fingerprint = "sha256:" + h.hexdigest()[:32]
            all_jobs.append(job)
            if not overwrite and _is_complete(
                root, job, level_dims.get(level, encoder.feature_dim)
            ):
                log.info("%s: complete; skipped", job.name)
                results.append(
                    {
                        "slide": slide,
                        "level": level,
                        "rows": job.n,
                        "status": "skipped",
                        "processed_rows": 0,
                        "seconds": 0.0,
                        "tiles_per_s": float("nan"),
                    }
                )
                continue
            if overwrite:
                p = _level_paths(root, job)
                for k in ("partial", "progress", "record", "npy"):
                    p[k].unlink(missing_ok=True)
            plans.append((job, centers))
    run = {
        "device": str(dev),
        "devices": devices,
        "batch_size": int(batch_size),
        "num_workers": workers,
        "precision": encoder.precision,
    }
    _write_meta(
        root, enc_desc, ds, all_jobs, levels, run, computed=bool(plans), level_dims=level_dims
    )
    opts = {
        "batch_size": int(batch_size),
        "num_workers": workers,
        "flush_every": int(flush_every),
        "progress": progress,
    }
    try:
        if dense is not None:
            by_slide: dict[str, dict[str, _Job]] = {}
            for job, _ in plans:
                by_slide.setdefault(job.slide, {})[job.level] = job
            for slide, jobs in by_slide.items():
                results += dense_mod.extract_slide(
                    encoder, ds, root, slide, jobs, dense, specs, progress=progress
                )
                ds.release_image(slide)  # one decoded image at a time
        elif len(device_names) > 1 and len(plans) > 1:
            del encoder
            import torch

            torch.cuda.empty_cache()  # leave the first GPU whole to its worker process
            results += _run_multi(
                device_names, [j for j, _ in plans], ds.path, enc_args, enc_desc["key"], opts
            )
        else:
            for i, (job, centers) in enumerate(plans):
                results.append(_run_job(encoder, ds, root, job, centers, **opts))
                if i + 1 == len(plans) or plans[i + 1][0].slide != job.slide:
                    ds.release_image(job.slide)  # one decoded image at a time
    finally:
        meta = _write_meta(
            root, enc_desc, ds, all_jobs, levels, run, computed=bool(plans), level_dims=level_dims
        )
    order = {(s, lv): i for i, (s, lv) in enumerate((s, lv) for s in chosen for lv in levels)}
    results.sort(key=lambda r: order[(r["slide"], r["level"])])
    return {
        "key": enc_desc["key"],
        "path": root,
        "encoder": enc_desc,
        "meta": meta,
        "jobs": results,
    }


def import_features(
    dataset_path: str | Path,
    name: str,
    features: Mapping[tuple[str, str], np.ndarray],
    *,
    description: str = "",
) -> dict:
    """Store features computed elsewhere as the feature set ``name`` of a dataset.

    ``features[(slide, level)]`` holds one row per unit of that level, in the dataset's
    order (``Dataset.level(slide, level)``). Training reads them like extracted ones;
    image-only prediction cannot rebuild their encoder, so it needs extracted features.
    Returns the feature set's ``meta.json`` content.
    """
    from types import SimpleNamespace

    from magnet_st.data.dataset import Dataset
    from magnet_st.features.encoders import encoder_key

    ds = Dataset(dataset_path)
    dims = {int(np.shape(a)[1]) for a in features.values()}
    if len(dims) != 1:
        raise ConfigError(f"features of one set must share one width, got {sorted(dims)}")
    dim = dims.pop()
    h = hashlib.sha256(json.dumps([name, description, dim]).encode())
    key = encoder_key(name, "imported:" + h.hexdigest())
    desc = {
        "key": key,
        "name": name,
        "weights_checksum": "imported:" + h.hexdigest(),
        "weights_path": None,
        "encoder_kwargs": {},
        "input_px": None,
        "feature_dim": dim,
        "input_size": [0, 0],
        "mean": [],
        "std": [],
        "interpolation": "none",
        "precision": "imported",
        "description": description,
    }
    enc = SimpleNamespace(key=key, feature_dim=dim, device="imported", precision="imported")
    root = ds.path / FEATURES_DIR / key
    planned = []
    for (slide, level), arr in features.items():  # check every array before writing any
        job, _ = _plan_job(ds, slide, level, (1, 1))
        if np.shape(arr)[0] != job.n:
            raise ConfigError(f"{slide}/{level}: {np.shape(arr)[0]} rows for {job.n} units")
        check_float16(arr, slide, level)
        planned.append((job, arr))
    jobs = []
    for job, arr in planned:
        p = _level_paths(root, job)
        p["dir"].mkdir(parents=True, exist_ok=True)
        np.save(p["partial"], check_float16(arr, job.slide, job.level))
        write_text(p["record"], json.dumps(_record(enc, job, 0.0), indent=1))
        os.replace(p["partial"], p["npy"])
        jobs.append(job)
    levels = sorted({lv for _, lv in features})
    return _write_meta(root, desc, ds, jobs, levels, {"device": "imported"})
