"""``magnet synth``: a seeded synthetic Visium HD slide in the Space Ranger layout."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from magnet_st.cli._common import _Formatter, _positive_float
from magnet_st.errors import MagnetError


# -- synth -----------------------------------------------------------------------------------
def cmd_synth(args: argparse.Namespace) -> int:
    from magnet_st.synthetic import write_synthetic_hd

    t0 = time.perf_counter()
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise MagnetError(f"{out}: already exists (use --overwrite to replace it)")
    info = write_synthetic_hd(
        out,
        width_um=args.size_mm * 1000,
        height_um=args.size_mm * 1000,
        seed=args.seed,
        bin_sizes=args.bin_sizes,
        microns_per_pixel=args.mpp,
        n_genes=args.genes,
        write_mtx=not args.no_mtx,
        write_raw=args.raw,
        progress=not args.quiet,
        cells=not args.no_cells,
        expression=args.expression,
    )
    print(f"wrote synthetic Visium HD slide {out} in {time.perf_counter() - t0:.1f} s")
    print(f"  image: {info.image_path}")
    for size, n in sorted(info.n_bins_in_tissue.items()):
        print(f"  {size:>2} um bins under tissue: {n:,}   ({info.bin_dirs[size]})")
    if info.cells_dir is not None:
        cells = json.loads(info.truth_path.read_text())["cells"]
        print(f"  cells: {cells['cells']:,}   ({info.cells_dir})")
    return 0


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic Visium HD slide (Space Ranger layout) for tests and demos",
        description="Write a seeded synthetic Visium HD slide in the exact Space Ranger "
        "layout: a procedural H&E-like pyramidal TIFF and counts at 2, 8 and 16 um whose "
        "expression is planted from the image (cell-driven and context-driven genes). "
        "See SYNTHETIC.md in the output for the expression model.",
        formatter_class=_Formatter,
    )
    p.add_argument("out", help="output folder (the 'run' folder; contains outs/)")
    p.add_argument(
        "--size-mm",
        type=_positive_float,
        default=1.0,
        help="edge of the square capture area in mm (6.5 = a full Visium HD slide, ~660k 8 um bins)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--bin-sizes",
        type=int,
        nargs="+",
        choices=[2, 8, 16],
        default=[2, 8, 16],
        help="bin sizes to write, in um",
    )
    p.add_argument(
        "--mpp",
        type=_positive_float,
        default=0.2738,
        help="microns per pixel of the full-resolution image",
    )
    p.add_argument("--genes", type=int, default=500, help="number of genes")
    p.add_argument("--no-mtx", action="store_true", help="skip the MTX copy of the matrices")
    p.add_argument(
        "--raw",
        action="store_true",
        help="also write raw_feature_bc_matrix.h5 (and raw_feature_cell_matrix.h5)",
    )
    p.add_argument(
        "--no-cells",
        action="store_true",
        help="skip Space Ranger 4's cell segmentation of the planted nuclei "
        "(outs/segmented_outputs/: cell and nucleus outlines as GeoJSON, the cell x gene "
        "matrix; outs/barcode_mappings.parquet); written by default",
    )
    p.add_argument(
        "--expression",
        choices=("bins", "cells"),  # synthetic.EXPRESSION_MODES (not imported: --help stays fast)
        default="bins",
        help="how the cell-driven UMIs are planted: 'bins' (each nucleus's UMIs in the 8 um "
        "bin that holds its centre) or 'cells' (each cell's UMIs spread over its own 2 um "
        "bins, across 8 um bin edges: cells, not bins, are the natural unit); see "
        "SYNTHETIC.md in the output",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_synth)
