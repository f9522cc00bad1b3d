"""How `magnet prepare` scales: seconds and peak memory at ~10k, ~100k and ~660k 8 um bins.

Writes synthetic Visium HD slides (8 and 16 um, Space Ranger layout) once into --cache,
then prepares each in a fresh process (so peak RSS is that process's own) and prints a
table. Growth should be near linear in the number of bins.

    python benchmarks/prepare_scale.py                     # 0.9, 2.8 and 6.5 mm slides
    python benchmarks/prepare_scale.py --sizes-mm 0.9 2.8  # quicker
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _one(run: Path, out: Path) -> None:
    from magnet_st.prepare.build import prepare
    from magnet_st.prepare.config import PrepareConfig
    from magnet_st.read.specs import SlideSpec

    t0 = time.perf_counter()
    spec = SlideSpec(name="slide", path=str(run), image=str(run / "he_fullres.tif"), bin_size=8)
    prepare([spec], out, PrepareConfig(), progress=False)
    seconds = time.perf_counter() - t0
    meta = json.loads((out / "manifest.json").read_text())["slides"]["slide"]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb, "n": meta["n"]}))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--sizes-mm",
        type=float,
        nargs="+",
        default=[0.9, 2.8, 6.5],
        help="edges of the synthetic capture areas in mm (default: 0.9 2.8 6.5)",
    )
    p.add_argument(
        "--cache",
        default="benchmarks/out/slides",
        help="folder that keeps the synthetic slides between runs (default: benchmarks/out/slides)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic slides (default: 0)")
    p.add_argument("--one", nargs=2, metavar=("RUN", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        _one(Path(args.one[0]), Path(args.one[1]))
        return

    from magnet_st.synthetic import write_synthetic_hd

    cache = Path(args.cache)
    rows = []
    for size in args.sizes_mm:
        run = cache / f"synthetic_{size:g}mm_seed{args.seed}"
        if not (run / "outs").is_dir():
            print(f"writing a {size:g} mm synthetic slide to {run} ...", flush=True)
            write_synthetic_hd(
                run,
                width_um=size * 1000,
                height_um=size * 1000,
                seed=args.seed,
                bin_sizes=(8, 16),
                write_mtx=False,
                write_raw=False,
                progress=False,
            )
        out = Path(tempfile.mkdtemp(prefix="prepare_bench_"))
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", str(run), str(out / "ds")],
                check=True,
                capture_output=True,
                text=True,
            )
        finally:
            shutil.rmtree(out, ignore_errors=True)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append((size, res))
        print(f"{size:g} mm: {res}", flush=True)

    print()
    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"python {platform.python_version()}"
    )
    print(
        "| slide | 8 um bins under tissue | spot tiles | region tiles | seconds | peak RSS (MB) | us per bin |"
    )
    print("|---|---|---|---|---|---|---|")
    for size, r in rows:
        n = r["n"]["bin"]
        print(
            f"| {size:g} mm | {n:,} | {r['n']['spot']:,} | {r['n']['region']:,} | "
            f"{r['seconds']:.1f} | {r['peak_mb']:.0f} | {1e6 * r['seconds'] / n:.0f} |"
        )


if __name__ == "__main__":
    main()
