"""jobs: one slide and level of the feature store encoded by a frozen encoder: planned, cut
into spatially ordered tile batches, run resumably on one device or spread over several.
:func:`magnet_st.features.extract.extract_features` plans and runs them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from magnet_st.errors import ConfigError, MagnetError
from magnet_st.features import patches
from magnet_st.features.store import (
    DTYPE,
    FEATURES_DIR,
    FeatureOverflowError,
    _Job,
    _level_paths,
    _read_json,
    check_float16,
)
from magnet_st.util.atomic import new_memmap, write_text

log = logging.getLogger(__name__)


def _read_px(native_px: int, input_size: tuple[int, int]) -> int:
    return patches.read_px(native_px, max(input_size))


def _image_checksum(meta: dict) -> str:
    image = str(meta.get("image"))
    rec = (meta.get("files") or {}).get(image)
    if rec:
        return str(rec.get("checksum") or f"{rec.get('size')}:{rec.get('mtime_ns')}")
    try:
        st = Path(image).stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "unknown"


def _plan_job(ds: Any, slide: str, level: str, input_size: tuple[int, int]) -> tuple[_Job, Any]:
    meta = ds.slide_meta(slide)
    centers = ds.positions_px(slide, level)
    mpp = float(meta["microns_per_pixel"])
    patch_um = float(ds.patch_um(level))
    native = max(1, round(patch_um / mpp))
    read = _read_px(native, input_size)
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(centers, dtype=np.float64).tobytes())
    h.update(json.dumps([patch_um, mpp, native, read, _image_checksum(meta)]).encode())
    job = _Job(
        slide=slide,
        level=level,
        n=len(centers),
        patch_um=patch_um,
        mpp=mpp,
        native_px=native,
        read_px=read,
        fingerprint="sha256:" + h.hexdigest()[:32],
        image=str(meta["image"]),
    )
    return job, centers


def spatial_order(centers: np.ndarray, tile_px: float) -> np.ndarray:
    """Indices of ``centers`` in raster order: bands of ``tile_px`` rows, then x."""
    c = np.asarray(centers, dtype=np.float64)
    if len(c) == 0:
        return np.zeros(0, dtype=np.int64)
    band = np.floor((c[:, 1] - c[:, 1].min()) / max(float(tile_px), 1.0))
    return np.lexsort((c[:, 0], band)).astype(np.int64)


class _TileBatches:
    """A map-style dataset whose items are whole batches of tiles, in processing order.

    Item ``b`` is a uint8 tensor ``(B, P, P, 3)`` of the tiles ``order[start + b*B : ...]``,
    or, given ``preprocess``, that batch resampled and normalised (``(B, 3, H, W)`` float).
    Batch-sized items keep each worker on a contiguous run of neighbouring tiles. Tiles
    are cut by a :class:`magnet_st.features.patches.TileCutter`, as the end-to-end bin encoder's.
    """

    def __init__(
        self,
        image: Any,
        centers: np.ndarray,
        native_px: int,
        read_px: int,
        mpp: float,
        patch_um: float,
        batch_size: int,
        start: int,
        preprocess: Any = None,
    ):
        self.image = image
        self.preprocess = preprocess
        self.centers = np.asarray(centers, dtype=np.float64)
        self.cutter = patches.TileCutter(int(native_px), int(read_px), patch_um / mpp)
        self.batch_size = int(batch_size)
        self.start = int(start)

    def __len__(self) -> int:
        return math.ceil(max(0, len(self.centers) - self.start) / self.batch_size)

    def bounds(self, b: int) -> tuple[int, int]:
        i0 = self.start + b * self.batch_size
        return i0, min(len(self.centers), i0 + self.batch_size)

    def __getitem__(self, b: int) -> Any:
        import torch

        i0, i1 = self.bounds(b)
        batch = torch.from_numpy(self.cutter.cut(self.image, self.centers[i0:i1]))
        if self.preprocess is not None:
            with torch.inference_mode():
                return self.preprocess(batch)
        return batch


def _default_workers(device_type: str = "cpu") -> int:
    """Reader processes: on the CPU one or two suffice (a tile costs ~1-3 ms to cut and
    resample, the encoder >= 10 ms) and more would take cores from the model; an
    accelerator is fed by up to 8 (CPU count - 1)."""
    n = os.cpu_count() or 1
    if device_type == "cpu":
        return 1 if n < 16 else 2
    return max(1, min(8, n - 1))


class _Pending:
    """Features of a batch on their way to the host."""

    def __init__(self, host: Any, event: Any = None):
        self.host = host
        self.event = event

    def result(self) -> np.ndarray:
        if self.event is not None:
            self.event.synchronize()
        return self.host.numpy()


def _encode_batch(encoder: Any, batch: Any) -> _Pending:
    """Start encoding one batch (a seam for tests).

    On CUDA the work and the copy to the host are only queued, so that the caller can
    write the previous batch to disk while the GPU computes this one.
    """
    import torch

    feats = encoder.encode(batch)
    if feats.device.type == "cuda":
        host = feats.to("cpu", non_blocking=True)  # into pinned memory
        event = torch.cuda.Event()
        event.record()
        return _Pending(host, event)
    return _Pending(feats.cpu())


# Long: one resumable encode loop: reopen or start the partial memmap, then encode with one batch in
# flight; closures store()/save_progress() share `done`, the memmap, order and bar with the except
# branches that save progress (or drop the partial file) when the loop stops.
def _run_job(
    encoder: Any,
    ds: Any,
    root: Path,
    job: _Job,
    centers: np.ndarray,
    *,
    batch_size: int,
    num_workers: int,
    flush_every: int,
    progress: bool,
    position: int = 0,
) -> dict:
    """Encode one slide/level into ``root``; resume from a partial file when possible."""
    import torch
    from tqdm.auto import tqdm

    dim = encoder.feature_dim
    p = _level_paths(root, job)
    p["dir"].mkdir(parents=True, exist_ok=True)
    p["record"].unlink(missing_ok=True)  # incomplete until the record is rewritten
    p["npy"].unlink(missing_ok=True)
    order = spatial_order(centers, job.native_px)
    state = {
        "fingerprint": job.fingerprint,
        "encoder": encoder.key,
        "rows": job.n,
        "feature_dim": dim,
        "order": hashlib.sha256(order.tobytes()).hexdigest()[:16],
    }
    if job.n == 0:
        return _finish_empty(encoder, p, job)
    done = 0
    prog = _read_json(p["progress"])
    out = None
    if prog and p["partial"].is_file() and {k: prog.get(k) for k in state} == state:
        try:
            out = np.lib.format.open_memmap(p["partial"], mode="r+")
            if out.shape != (job.n, dim) or out.dtype != DTYPE:
                out = None
            else:
                done = int(prog["rows_done"])
        except (OSError, ValueError):
            out = None
    if out is None:
        p["progress"].unlink(missing_ok=True)
        p["partial"].unlink(missing_ok=True)
        out = new_memmap(p["partial"], DTYPE, (job.n, dim))
        done = 0
    resumed = done
    if resumed:
        log.info("%s: resuming at tile %d of %d", job.name, done, job.n)
    image = ds.image(job.slide)
    n_batches = math.ceil((job.n - done) / batch_size)
    workers = min(num_workers, n_batches)
    # On the CPU, the readers also resample and normalise, leaving the main process's
    # threads to the model; on an accelerator that is done there, on the batch.
    batches = _TileBatches(
        image,
        centers[order],
        job.native_px,
        job.read_px,
        job.mpp,
        job.patch_um,
        batch_size,
        done,
        preprocess=encoder.preprocess if workers and encoder.device.type == "cpu" else None,
    )
    loader = torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=encoder.device.type == "cuda",
        prefetch_factor=(2 if encoder.device.type == "cpu" else 4) if workers else None,
        persistent_workers=False,
    )
    log.info(
        "%s: %d tiles of %g um = %d px native%s -> %dx%d, batch %d, %d reader workers, %s",
        job.name,
        job.n - done,
        job.patch_um,
        job.native_px,
        "" if job.read_px == job.native_px else f", read at {job.read_px} px",
        *encoder.input_size,
        batch_size,
        workers,
        encoder.device,
    )

    def save_progress(arr: np.ndarray) -> None:
        arr.flush()
        write_text(p["progress"], json.dumps({**state, "rows_done": done}))

    t0 = time.perf_counter()
    bar = tqdm(
        total=job.n,
        initial=done,
        desc=job.name,
        unit="tile",
        disable=not progress,
        position=position,
        leave=True,
        dynamic_ncols=True,
    )

    def store(arr: np.ndarray, b: int, pending: _Pending) -> None:
        nonlocal done
        i0, i1 = batches.bounds(b)
        feats = pending.result()
        if feats.shape != (i1 - i0, dim):
            raise MagnetError(
                f"{job.name}: encoder returned {feats.shape}, expected {(i1 - i0, dim)}"
            )
        arr[order[i0:i1]] = check_float16(feats, job.slide, job.level)
        done = i1
        bar.update(i1 - i0)
        if (b + 1) % flush_every == 0:
            save_progress(arr)

    queued: tuple[int, _Pending] | None = None  # one batch in flight on accelerators
    try:
        for b, batch in enumerate(loader):
            pending = _encode_batch(encoder, batch)
            if queued is not None:
                store(out, *queued)
            queued = (b, pending)
        if queued is not None:
            store(out, *queued)
            queued = None
    except FeatureOverflowError:
        # a rerun would compute the same values: keep no partial file to resume from
        del out
        p["partial"].unlink(missing_ok=True)
        p["progress"].unlink(missing_ok=True)
        raise
    except BaseException:
        if queued is not None:  # keep the batch that was already encoded
            with contextlib.suppress(Exception):
                store(out, *queued)
        save_progress(out)
        log.info("%s: stopped at tile %d of %d; a rerun resumes there", job.name, done, job.n)
        raise
    finally:
        bar.close()
    out.flush()
    del out
    seconds = time.perf_counter() - t0
    record = _record(encoder, job, seconds)
    write_text(p["record"], json.dumps(record, indent=1))
    os.replace(p["partial"], p["npy"])
    p["progress"].unlink(missing_ok=True)
    processed = job.n - resumed
    rate = processed / seconds if seconds > 0 else float("nan")
    log.info("%s: %d tiles in %.1f s (%.1f tiles/s)", job.name, processed, seconds, rate)
    return {
        "slide": job.slide,
        "level": job.level,
        "rows": job.n,
        "status": "resumed" if resumed else "done",
        "processed_rows": processed,
        "seconds": seconds,
        "tiles_per_s": rate,
    }


def _record(encoder: Any, job: _Job, seconds: float) -> dict:
    return {
        "slide": job.slide,
        "level": job.level,
        "rows": job.n,
        "feature_dim": encoder.feature_dim,
        "dtype": np.dtype(DTYPE).name,
        "fingerprint": job.fingerprint,
        "patch_um": job.patch_um,
        "native_px": job.native_px,
        "read_px": job.read_px,
        "encoder": encoder.key,
        "device": str(encoder.device),
        "precision": encoder.precision,
        "seconds": round(seconds, 3),
    }


def _finish_empty(encoder: Any, p: dict[str, Path], job: _Job) -> dict:
    """A slide/level without units: an empty ``(0, dim)`` array."""
    np.save(p["partial"], np.zeros((0, encoder.feature_dim), DTYPE))
    write_text(p["record"], json.dumps(_record(encoder, job, 0.0), indent=1))
    os.replace(p["partial"], p["npy"])
    p["progress"].unlink(missing_ok=True)
    return {
        "slide": job.slide,
        "level": job.level,
        "rows": 0,
        "status": "done",
        "processed_rows": 0,
        "seconds": 0.0,
        "tiles_per_s": float("nan"),
    }


def _device_worker(
    rank: int,
    devices: list[str],
    assignments: list[list[tuple[str, str]]],
    dataset_path: str,
    enc_args: dict,
    key: str,
    opts: dict,
    results_dir: str,
) -> None:
    """One process of a multi-device run: encode the slide/levels assigned to ``rank``."""
    import torch

    from magnet_st.data.dataset import Dataset
    from magnet_st.features.encoders import create_encoder

    if devices[rank].startswith("cpu"):  # processes sharing the CPU share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // len(devices)))
    ds = Dataset(dataset_path)
    enc = create_encoder(device=devices[rank], **enc_args)
    if enc.key != key:
        raise MagnetError(f"worker {rank}: encoder key {enc.key} differs from {key}")
    root = ds.path / FEATURES_DIR / key
    results = []
    for slide, level in assignments[rank]:
        job, centers = _plan_job(ds, slide, level, enc.input_size)
        results.append(_run_job(enc, ds, root, job, centers, position=rank, **opts))
    write_text(Path(results_dir) / f"rank{rank}.json", json.dumps(results))


def _assign(jobs: list[_Job], n: int) -> list[list[tuple[str, str]]]:
    """Split jobs over ``n`` devices, largest first onto the least-loaded device."""
    load = [0] * n
    out: list[list[tuple[str, str]]] = [[] for _ in range(n)]
    for job in sorted(jobs, key=lambda j: -j.n * j.read_px**2):
        i = load.index(min(load))
        out[i].append((job.slide, job.level))
        load[i] += job.n * job.read_px**2
    return out


def _run_multi(
    devices: list[str],
    jobs: list[_Job],
    dataset_path: Path,
    enc_args: dict,
    key: str,
    opts: dict,
) -> list[dict]:
    """Encode ``jobs`` with one spawned process per device over disjoint slide/levels."""
    import tempfile

    import torch.multiprocessing as tmp_mp

    assignments = _assign(jobs, len(devices))
    log.info("splitting %d slide/levels over %s", len(jobs), ", ".join(devices))
    with tempfile.TemporaryDirectory(prefix="magnet-features-") as results_dir:
        try:
            tmp_mp.spawn(
                _device_worker,
                args=(devices, assignments, str(dataset_path), enc_args, key, opts, results_dir),
                nprocs=len(devices),
                join=True,
            )
        except tmp_mp.ProcessRaisedException as exc:
            last = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
            raise MagnetError(f"a device process failed: {last}") from exc
        except tmp_mp.ProcessExitedException as exc:
            raise MagnetError(f"a device process died: {exc}") from exc
        results: list[dict] = []
        for r in range(len(devices)):
            f = Path(results_dir) / f"rank{r}.json"
            if f.is_file():
                results += json.loads(f.read_text())
    return results


def _device_list(device: Any, devices: int) -> list[str]:
    """The devices to run on: one, or ``devices`` CUDA GPUs of this machine."""
    if devices < 1:
        raise ConfigError(f"devices must be >= 1, got {devices}")
    if devices == 1:
        return [str(device)]
    if device.type != "cuda":
        log.warning("--devices %d: only CUDA runs on several devices; using %s", devices, device)
        return [str(device)]
    import torch

    have = torch.cuda.device_count()
    if devices > have:
        log.warning("--devices %d but %d GPUs are visible; using %d", devices, have, have)
    return [f"cuda:{i}" for i in range(min(devices, have))]
