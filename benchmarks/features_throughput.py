"""Throughput of magnet_st.features.store: end-to-end tiles/s versus the encoder's bare forward pass.

Writes a synthetic Visium HD slide (``magnet synth``) and prepares it once, then for each
encoder times:

* ``forward``: the encoder alone on random in-memory tensors of its input size, same batch
  size (the ceiling);
* ``read``: the DataLoader alone (cut + batch + on CPU also resample/normalise, no model);
* ``end-to-end``: ``extract_features(..., overwrite=True)`` for the level (reading, resampling,
  normalising, encoding, writing float16), timed by the extraction itself (encoder
  creation excluded);

and prints ``end-to-end / forward`` (goal: >= 80%). The forward pass is timed before and
after the end-to-end run and the better figure kept; on the CPU the script also prints the
CPU seconds per tile of both (reader processes included), a ratio that the load of other
processes on a shared machine does not distort. On CUDA the forward pass is timed in fp32
and bf16 autocast, and end-to-end uses bf16 (the default there).

    python benchmarks/features_throughput.py
    python benchmarks/features_throughput.py --size-mm 2 --encoders resnet50 --levels spot region

It prints figures; it asserts nothing and is not a test.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from magnet_st.data.dataset import Dataset
from magnet_st.features import extract as F
from magnet_st.features import jobs as J
from magnet_st.features.encoders import create_encoder, resolve_device
from magnet_st.prepare.build import prepare
from magnet_st.prepare.config import PrepareConfig
from magnet_st.read.specs import SlideSpec
from magnet_st.synthetic import write_synthetic_hd


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="work directory for the slide and dataset (default: a temporary directory, "
        "removed afterwards)",
    )
    ap.add_argument("--size-mm", type=float, default=1.0, help="edge of the synthetic slide, mm")
    ap.add_argument(
        "--encoders",
        nargs="+",
        default=["resnet50", "resnet18"],
        help="timm encoders to time (random init, their default input size)",
    )
    ap.add_argument(
        "--levels", nargs="+", default=["spot"], choices=["bin", "spot", "region"], help="levels"
    )
    ap.add_argument("--batch-size", type=int, default=32, help="tiles per forward pass")
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help="reader processes (default: as magnet features: 1 on the CPU, 2 from 16 cores; "
        "else CPU count - 1, at most 8)",
    )
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    ap.add_argument(
        "--forward-batches",
        type=int,
        default=0,
        help="batches in the forward-only timing (0: as many as the level has, at most 50)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return ap.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (readers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def forward_rate(enc, batch: int, n_batches: int, cpu: list[float] | None = None) -> float:
    """Tiles/s of the encoder alone on random, already normalised tensors (CPU seconds
    per tile appended to ``cpu``)."""
    h, w = enc.input_size
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(0)).to(enc.device)
    if enc.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    enc.forward(x)  # warm-up (cuDNN autotune, allocator, oneDNN primitives)
    enc.forward(x)
    _sync(enc.device)
    t0, c0 = time.perf_counter(), cpu_seconds()
    for _ in range(n_batches):
        enc.forward(x)
    _sync(enc.device)
    if cpu is not None:
        cpu.append((cpu_seconds() - c0) / (n_batches * batch))
    return n_batches * batch / (time.perf_counter() - t0)


def forward_rates(
    enc, batch: int, n_batches: int, cpu: list[float] | None = None
) -> dict[str, float]:
    """Forward tiles/s at the encoder's precision; on CUDA in fp32 and bf16 autocast."""
    if enc.device.type != "cuda":
        return {enc.precision: forward_rate(enc, batch, n_batches, cpu)}
    rates = {}
    for prec in ("fp32", "bf16"):
        enc.precision = prec
        rates[prec] = forward_rate(enc, batch, n_batches)
    enc.precision = "bf16"
    return rates


def read_rate(ds: Dataset, enc, level: str, batch: int, workers: int) -> float:
    """Tiles/s of the DataLoader alone (what the encoder is fed)."""
    job, centers = J._plan_job(ds, "syn", level, enc.input_size)
    order = J.spatial_order(centers, job.native_px)
    pre = enc.preprocess if workers and enc.device.type == "cpu" else None
    tb = J._TileBatches(
        ds.image("syn"),
        centers[order],
        job.native_px,
        job.read_px,
        job.mpp,
        job.patch_um,
        batch,
        0,
        preprocess=pre,
    )
    loader = torch.utils.data.DataLoader(
        tb,
        batch_size=None,
        num_workers=min(workers, len(tb)),
        prefetch_factor=(2 if enc.device.type == "cpu" else 4) if workers else None,
    )
    t0 = time.perf_counter()
    n = sum(len(b) for b in loader)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    workers = J._default_workers(device.type) if args.workers is None else args.workers
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    tmp = None
    work = args.out
    if work is None:
        tmp = tempfile.mkdtemp(prefix="magnet-features-bench-")
        work = Path(tmp)
    try:
        run, ds_path = work / "run", work / "ds"
        if not (ds_path / "manifest.json").is_file():
            t0 = time.perf_counter()
            size = args.size_mm * 1000
            write_synthetic_hd(run, width_um=size, height_um=size, seed=0, bin_sizes=(8,))
            spec = SlideSpec("syn", str(run), image=str(run / "he_fullres.tif"), bin_size=8)
            prepare([spec], ds_path, PrepareConfig(n_genes=50, panel="mean"), progress=False)
            print(
                f"synthetic {args.size_mm:g} mm slide prepared in {time.perf_counter() - t0:.1f} s"
            )
        ds = Dataset(ds_path)
        img = ds.image("syn")
        print(
            f"image {img.size[0]} x {img.size[1]} px, {img.microns_per_pixel} um/px, "
            f"batch {args.batch_size}, {workers} reader workers"
        )
        for name in args.encoders:
            enc = create_encoder(name, device=device)
            print(
                f"\n{name}: {enc.feature_dim}-d, input {enc.input_size[0]}x{enc.input_size[1]}, "
                f"{enc.interpolation}, precision {enc.precision}"
            )
            for level in args.levels:
                n = ds.level("syn", level).n_obs
                nb = args.forward_batches or min(50, math.ceil(n / args.batch_size))
                job, _ = J._plan_job(ds, "syn", level, enc.input_size)
                print(
                    f"  {level}: {n} tiles of {ds.patch_um(level):g} um = {job.native_px} px "
                    f"native" + ("" if job.read_px == job.native_px else f", read at {job.read_px}")
                )

                # forward before and after end-to-end, the better of the two: on a shared
                # machine the load of other processes varies
                fwd_cpu: list[float] = []
                before = forward_rates(enc, args.batch_size, nb, fwd_cpu)
                rr = read_rate(ds, enc, level, args.batch_size, workers)
                c0 = cpu_seconds()
                result = F.extract_features(
                    ds_path,
                    name,
                    levels=[level],
                    batch_size=args.batch_size,
                    num_workers=workers,
                    device=str(device),
                    overwrite=True,
                    progress=False,
                    precision=enc.precision,
                )
                e2e_cpu = (cpu_seconds() - c0) / n
                after = forward_rates(enc, args.batch_size, nb, fwd_cpu)
                for prec in before:
                    best = max(before[prec], after[prec])
                    print(
                        f"    forward {prec:<4}     {best:9.1f} tiles/s   "
                        f"(before {before[prec]:.1f}, after {after[prec]:.1f})"
                    )
                fwd = max(before[enc.precision], after[enc.precision])
                print(f"    read only        {rr:9.1f} tiles/s")
                (job_result,) = result["jobs"]
                e2e = job_result["tiles_per_s"]
                print(
                    f"    end-to-end {enc.precision:<4}  {e2e:9.1f} tiles/s   "
                    f"({job_result['seconds']:.1f} s)"
                )
                print(f"    end-to-end / forward = {100 * e2e / fwd:.0f}%")
                if device.type == "cpu":
                    # robust to other processes' load: CPU seconds per tile, readers included
                    # (end-to-end also pays for creating the encoder and writing the array)
                    c_fwd = min(fwd_cpu)
                    print(
                        f"    CPU s/tile: forward {c_fwd:.3f}, end-to-end {e2e_cpu:.3f} "
                        f"-> forward / end-to-end = {100 * c_fwd / e2e_cpu:.0f}%"
                    )
            del enc
        return 0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
