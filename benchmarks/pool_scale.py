"""Time and memory of pooling a prediction of 8 um bins into cells (``magnet predict
--segmentation`` with a model of bins) at growing slide sizes.

Writes a synthetic slide of each size (its Space Ranger 4 cells: the planted nuclei grown
by 4 um), then times :func:`magnet_st.predict.pool.bin_cell_weights` (each bin's area share
in each cell, 16 points per bin) and :func:`magnet_st.predict.pool.pool_to_cells` on a
random prediction of ``--genes`` genes, and prints the peak RSS of each step's process.

    python benchmarks/pool_scale.py --sizes 1 2 [--genes 500] [--work DIR]

It prints figures; it asserts nothing and is not a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import numpy as np
from magnet_st.predict.pool import bin_cell_weights, pool_to_cells
from magnet_st.read import visium_hd
from magnet_st.read.geojson import read_geojson
run, genes = sys.argv[1], int(sys.argv[2])
bins = visium_hd(run, 8)
ids, polys = read_geojson(f"{run}/outs/segmented_outputs/cell_segmentations.geojson")
pred = np.random.default_rng(0).gamma(0.5, 1.0, (bins.n_units, genes)).astype(np.float32)
t = time.perf_counter()
w = bin_cell_weights(bins.centers_px, 8.0 / bins.microns_per_pixel, polys)
t_w = time.perf_counter() - t
t = time.perf_counter()
cells = pool_to_cells(pred, w)
t_p = time.perf_counter() - t
print(json.dumps({"bins": bins.n_units, "cells": len(polys), "weights_s": t_w, "pool_s": t_p,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--sizes", type=float, nargs="+", default=[1.0, 2.0], help="slide edges, mm")
    ap.add_argument("--genes", type=int, default=500, help="genes in the prediction")
    ap.add_argument("--work", type=Path, default=Path("benchmark_pool_scale"), help="scratch")
    args = ap.parse_args()
    from magnet_st.synthetic import write_synthetic_hd

    print("| slide | 8 um bins | cells | weights s | pool s | peak RSS |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        run = args.work / f"slide_{size:g}mm"
        if not (run / "outs").is_dir():
            write_synthetic_hd(run, width_um=size * 1000, height_um=size * 1000, seed=3,
                               bin_sizes=(8,), write_mtx=False, write_raw=False,
                               progress=False)  # fmt: skip
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(run), str(args.genes)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"| {size:g} mm | {r['bins']:,} | {r['cells']:,} | {r['weights_s']:.1f} | "
            f"{r['pool_s']:.1f} | {r['peak_rss_mb']:.0f} MB |  (process {time.perf_counter() - t:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
