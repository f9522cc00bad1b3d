"""Benchmark: write a SYNTHETIC Visium HD slide and report time, peak memory and sizes.

Example (the full 6.5 x 6.5 mm capture area, 8 and 16 um bins, no MTX / raw matrices)::

    python benchmarks/synthetic_write.py
    python benchmarks/synthetic_write.py --size-mm 1 --bin-sizes 2 8 16 --mtx --raw
"""

from __future__ import annotations

import argparse
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _size_mb(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 1e6
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a synthetic Visium HD slide (magnet_st.synthetic) and report wall "
        "time, peak RSS, numbers of bins and file sizes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--size-mm",
        type=float,
        default=6.5,
        help="edge of the square capture area in mm (6.5 = a full Visium HD slide)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--bin-sizes",
        type=int,
        nargs="+",
        default=[8, 16],
        choices=[2, 8, 16],
        help="bin sizes (um) to write",
    )
    parser.add_argument("--n-genes", type=int, default=500, help="number of genes")
    parser.add_argument(
        "--mpp", type=float, default=0.2738, help="microns per pixel of the full-resolution image"
    )
    parser.add_argument(
        "--mtx", action="store_true", help="also write filtered_feature_bc_matrix/ (MTX)"
    )
    parser.add_argument("--raw", action="store_true", help="also write raw_feature_bc_matrix.h5")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run folder to write (kept); default: a temporary folder, deleted afterwards",
    )
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    parser.add_argument("--verbose", action="store_true", help="log timings of each step")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(message)s",
    )
    try:
        from magnet_st.synthetic import write_synthetic_hd
    except ImportError:  # run from a checkout without installing
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        from magnet_st.synthetic import write_synthetic_hd

    with tempfile.TemporaryDirectory(prefix="synthetic_bench_") as tmp:
        out = args.out if args.out is not None else Path(tmp) / "run"
        t0 = time.perf_counter()
        info = write_synthetic_hd(
            out,
            width_um=args.size_mm * 1000.0,
            height_um=args.size_mm * 1000.0,
            seed=args.seed,
            bin_sizes=tuple(args.bin_sizes),
            microns_per_pixel=args.mpp,
            n_genes=args.n_genes,
            write_mtx=args.mtx,
            write_raw=args.raw,
            progress=args.progress,
        )
        wall = time.perf_counter() - t0
        peak = _peak_rss_mb()
        h, w = info.image_shape
        print(f"synthetic slide {args.size_mm:g} x {args.size_mm:g} mm, seed {args.seed}")
        print(f"wall time      {wall:8.1f} s")
        print(f"peak RSS       {peak:8.0f} MB")
        print(f"image          {w} x {h} px, {_size_mb(info.image_path):.1f} MB")
        for s, folder in info.bin_dirs.items():
            print(
                f"square_{s:03d}um  {info.n_bins_in_tissue[s]:>9d} bins under tissue / "
                f"{info.n_bins_total[s]:>9d} total"
            )
            for name in (
                "filtered_feature_bc_matrix.h5",
                "raw_feature_bc_matrix.h5",
                "filtered_feature_bc_matrix",
                "spatial/tissue_positions.parquet",
            ):
                p = folder / name
                if p.exists():
                    print(f"    {name:36s} {_size_mb(p):9.1f} MB")
        print(f"total on disk  {_size_mb(out):8.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
