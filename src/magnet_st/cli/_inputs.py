"""``magnet info`` and ``magnet prepare``: reading slides into a dataset."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from magnet_st.cli._common import (
    _Formatter,
    _positive_float,
    _positive_int,
)
from magnet_st.errors import MagnetError


# -- info ------------------------------------------------------------------------------------
def _format_summary(s: dict) -> str:
    q = s["counts_per_unit"]
    lines = [
        f"{s['name']}  ({s['technology']})",
        f"  {'cells' if s.get('median_area_um2') is not None else 'units under tissue':<20} "
        f"{s['units_under_tissue']:,}",
        f"  genes                {s['genes']:,}",
        f"  unit size            {s['unit_size_um']:g} um"
        + ("   (a disc of the median cell's area)" if "median_area_um2" in s else ""),
        f"  microns per pixel    {s['microns_per_pixel']:.4f}   "
        f"(from {s['sources'].get('microns_per_pixel', '?')})",
    ]
    if s.get("image_size_px"):
        w, h = s["image_size_px"]
        wu, hu = s["image_size_um"]
        lines.append(
            f"  image                {w:,} x {h:,} px = {wu / 1000:.2f} x {hu / 1000:.2f} mm"
        )
        lines.append(f"                       {s['sources'].get('image', s['image'])}")
    else:
        lines.append("  image                none given")
    lines.append(
        "  counts per unit      "
        f"min {q['min']:g}  q25 {q['q25']:g}  median {q['median']:g}  q75 {q['q75']:g}  "
        f"max {q['max']:g}"
    )
    lines.append(f"  total counts         {s['total_counts']:,}")
    if "median_area_um2" in s:
        lines.append(f"  median cell area     {s['median_area_um2']:g} um^2")
    lines.append(f"  counts from          {s['sources'].get('counts')}")
    lines.append(f"  positions from       {s['sources'].get('positions')}")
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    from magnet_st import read
    from magnet_st.cli._datasets import dataset_summary, format_dataset
    from magnet_st.data.format import MANIFEST

    summaries = []
    for path in args.paths:
        if (Path(path) / MANIFEST).is_file():  # a prepared dataset (magnet prepare)
            summaries.append(dataset_summary(Path(path)))
            if not args.json:
                print(format_dataset(summaries[-1]))
                print()
            continue
        slides = read.auto(
            path,
            image=args.image,
            microns_per_pixel=args.mpp,
            bin_size_um=args.bin_size,
            spot_pitch_um=args.spot_pitch,
            unit_size_um=args.unit_size,
            sections=args.section,
            table=args.table,
            cells=args.cells,
            segmentation=args.segmentation,
        )
        for slide in slides:
            summaries.append(slide.summary())
            try:  # info inspects; prepare and predict --spaceranger refuse such a slide
                slide.check_counts()
            except MagnetError as exc:
                import sys

                print(f"warning: {exc} (prepare and predict refuse it)", file=sys.stderr)
            if not args.json:
                print(_format_summary(summaries[-1]))
                print()
    if args.json:
        print(json.dumps(summaries, indent=2))
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="read slides and print what was found",
        description="Read one or more inputs and print, per slide: units under tissue, genes, "
        "unit size, microns per pixel, image size, and counts-per-unit quantiles. Given a "
        "dataset made by 'magnet prepare', print what it holds instead: its slides and units "
        "per level, panel, targets, tile sizes and feature sets (mode, dense settings, width, "
        "slides complete).\n\n"
        "PATH may be a Space Ranger Visium HD folder (run, outs/, binned_outputs/ or "
        "square_XXXum/), a standard Visium outs/ folder, a her2st-layout folder (every "
        "section is read), one her2st counts file (ST-cnts/C2.tsv.gz), an .h5ad file, or "
        "a SpatialData .zarr store as spatialdata-io writes it for Visium HD or Visium (its "
        "table, the shapes the table annotates and an image element: no extra package is "
        "needed).",
        formatter_class=_Formatter,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="inputs to read")
    p.add_argument(
        "--image",
        default=None,
        help="full-resolution H&E image of the slide (Space Ranger and .h5ad inputs; her2st "
        "images are found in ST-imgs/, and a run written by 'magnet synth' in its folder). "
        "Space Ranger's own spatial/tissue_hires_image.png or tissue_lowres_image.png is "
        "recognised and its scale factor applied, but gives coarse patches. For a "
        "SpatialData store: the name of one of its image elements (default: the "
        "*_full_image one)",
    )
    p.add_argument(
        "--mpp",
        type=_positive_float,
        default=None,
        help="microns per pixel of the full-resolution image; default: from the input "
        "(scalefactors_json.json, or the spot pitch for Visium and legacy ST; SpatialData: "
        "the bins' size in the image, or the spot pitch)",
    )
    p.add_argument(
        "--bin-size",
        type=int,
        choices=[2, 8, 16],
        default=None,
        help="Visium HD bin size in um (SpatialData: the square_XXXum table); default: 8 if "
        "present, else the finest available",
    )
    _add_cell_options(p)
    _add_unit_options(p)
    p.add_argument(
        "--section",
        action="append",
        default=None,
        help="her2st section to read (repeatable); default: all sections",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_info)


def _add_cell_options(p: argparse.ArgumentParser, rows: str = "") -> None:
    """--cells and --segmentation: a Visium HD run's units as cells."""
    p.add_argument(
        "--cells",
        action="store_true",
        help="Visium HD: the units are Space Ranger 4's cells (outs/segmented_outputs/: the "
        "cell x gene matrix and the cell outlines), not bins" + rows,
    )
    p.add_argument(
        "--segmentation",
        default=None,
        metavar="GEOJSON",
        help="Visium HD: the units are the cells of this segmentation, the run's 2 um bins "
        "summed into each (GeoJSON polygons in the full-resolution image's pixels, as Space "
        "Ranger, QuPath, StarDist or Cellpose write them; a bin goes to the cell that holds "
        "its centre); default: none" + rows,
    )


def cell_spec(args: argparse.Namespace) -> str | None:
    """SlideSpec.cells from --cells / --segmentation."""
    from magnet_st.read.specs import SPACERANGER_CELLS

    if args.cells and args.segmentation:
        raise MagnetError("give --cells (Space Ranger's) or --segmentation GEOJSON, not both")
    return SPACERANGER_CELLS if args.cells else args.segmentation


def _add_unit_options(p: argparse.ArgumentParser, rows: str = "") -> None:
    """--spot-pitch and --unit-size, for inputs that do not state them."""
    p.add_argument(
        "--spot-pitch",
        type=_positive_float,
        default=None,
        metavar="UM",
        help="legacy ST: microns between neighbouring array positions (x to x+1), from "
        "which microns per pixel follow; default: 200 (the 1k array), or 100 when spots "
        "sit only where x + y has one parity (a checkerboard)" + rows,
    )
    p.add_argument(
        "--unit-size",
        type=_positive_float,
        default=None,
        metavar="UM",
        help=".h5ad, SpatialData and legacy ST: bin edge or spot diameter in microns, which "
        'the auto preset follows; default: uns["spatial"][lib]["scalefactors"]["bin_size_um"] '
        "(.h5ad), the square_XXXum table's bin or 55 (Visium circles) (SpatialData), 100 "
        "(legacy ST)" + rows,
    )
    p.add_argument(
        "--table",
        default=None,
        metavar="NAME",
        help="SpatialData: the table of units, when the store holds several (e.g. a cell "
        "table beside the bins); default: the square_XXXum table of --bin-size, or the only "
        "table" + rows,
    )


# -- prepare ---------------------------------------------------------------------------------
def cmd_prepare(args: argparse.Namespace) -> int:
    from magnet_st import read
    from magnet_st.prepare.build import prepare
    from magnet_st.prepare.config import PrepareConfig

    specs = []
    if args.samples:
        from dataclasses import replace

        specs += [
            replace(
                s,
                bin_size=s.bin_size or args.bin_size,
                mpp=s.mpp or args.mpp,
                spot_pitch_um=s.spot_pitch_um or args.spot_pitch,
                unit_size_um=s.unit_size_um or args.unit_size,
                table=s.table or args.table,
            )
            for s in read.specs_from_sheet(args.samples)
        ]
    if args.inputs:
        specs += read.specs_from_paths(
            args.inputs,
            image=args.image,
            mpp=args.mpp,
            bin_size=args.bin_size,
            spot_pitch_um=args.spot_pitch,
            unit_size_um=args.unit_size,
            table=args.table,
            cells=cell_spec(args),
        )
    specs = read.specs.check_unique(specs)
    if not specs:
        raise MagnetError("no inputs: give input paths and/or --samples SHEET")
    genes = None
    if args.genes:
        path = Path(args.genes)
        if not path.is_file():
            raise MagnetError(f"{path}: gene list not found")
        genes = [g.strip() for g in path.read_text().splitlines() if g.strip()]
    overrides = {
        "preset": args.preset,
        "working_mpp": args.working_mpp,
        "bin_patch_px": args.bin_patch_px,
        "spot_tile_px": args.spot_tile_px,
        "region_tile_px": args.region_tile_px,
        "k": args.k,
        "panel": "list" if genes else args.panel,
        "n_genes": args.n_genes,
        "genes": genes,
        "target": args.target,
        "train_slides": args.train_slides,
        "seed": args.seed,
    }
    if args.config:
        config = PrepareConfig.from_file(args.config, **overrides)
    else:
        config = PrepareConfig(**{k: v for k, v in overrides.items() if v is not None})
    t0 = time.perf_counter()
    result = prepare(
        specs, args.out, config, add=args.add, overwrite=args.overwrite, progress=not args.quiet
    )
    if result.nothing_to_do:
        print(f"{args.out}: up to date ({len(result.skipped)} slides); nothing to do")
    else:
        print(
            f"{args.out}: {len(result.processed)} slides prepared, {len(result.skipped)} "
            f"unchanged, panel of {len(result.panel)} genes, in {time.perf_counter() - t0:.1f} s"
        )
    if getattr(result, "tiles", None):
        from magnet_st.prepare.config import describe_tiles

        print(describe_tiles(result.tiles))
    for name, n in getattr(result, "filled", {}).items():
        if n:
            print(f"slide {name}: {n} panel genes not listed in its counts, filled with zeros")
    return 0


# Long: argparse: the prepare parser's long description of the size presets, then 22 flat
# options, one add_argument and help text each.
def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="build the multi-level dataset (bins, spot tiles, region tiles)",
        description="Turn slides into MagNet's multi-level dataset: per slide, the target "
        "units (bin level), a grid of spot tiles and a grid of region tiles, each unit in "
        "the one tile of each grid that contains its centre; tile counts are sums of their "
        "units; k-nearest-neighbour graphs at each level; a gene panel chosen on the "
        "training slides. Unchanged slides are skipped, so reruns are cheap.\n\n"
        "Sizes default to a preset chosen from the unit size, whatever the container "
        "(Space Ranger, her2st, .h5ad or SpatialData): 'hd' (bins of 16 um or less): 112, 224, 512 px at "
        "0.25 um/px = 28, 56, 128 um; 'visium' (units up to 75 um, e.g. 55 um spots): 112, "
        "224, 448 px at 1 um/px; 'legacy_st' (larger, e.g. 100 um spots): 112, 400, 800 px "
        "at 1 um/px. Legacy ST tables list only the genes a section detected: a panel gene "
        "a section does not list is zero there (a line says how many per slide); a Space "
        "Ranger slide lacking one is refused. On Visium HD, spot and region "
        "tiles are snapped to a whole number of bins (56 um spot tiles over 16 um bins become "
        "64 um = 4 x 4 bins), and the summary line says so. Settings may also come from "
        "a TOML/JSON --config file whose keys are the long option names with underscores; "
        "options given on the command line win.",
        formatter_class=_Formatter,
    )
    p.add_argument("out", help="dataset folder to create or update")
    p.add_argument(
        "inputs",
        nargs="*",
        metavar="INPUT",
        help="slides to read, as for 'magnet info' (a her2st folder gives every section)",
    )
    p.add_argument(
        "--samples",
        default=None,
        help="sample sheet (CSV/TSV) with columns name, path and optionally image, mpp, "
        "bin_size, section, spot_pitch_um, unit_size_um; relative paths are relative to "
        "the sheet",
    )
    p.add_argument(
        "--image",
        default=None,
        help="full-resolution H&E image (only with a single INPUT; as for 'magnet info')",
    )
    p.add_argument(
        "--mpp",
        type=_positive_float,
        default=None,
        help="microns per pixel of the image(s); default: from the input",
    )
    p.add_argument(
        "--bin-size",
        type=int,
        choices=[2, 8, 16],
        default=None,
        help="Visium HD bin size (target level), um, for INPUTs and sample-sheet rows "
        "without one; default: 8",
    )
    _add_cell_options(
        p, " (for INPUTs; a sample sheet's cells column sets it per row: spaceranger or a GeoJSON)"
    )
    _add_unit_options(p, "; for INPUTs and sample-sheet rows without one")
    p.add_argument("--config", default=None, help="TOML or JSON file of settings")
    p.add_argument(
        "--preset",
        choices=["auto", "hd", "visium", "legacy_st"],
        default=None,
        help="size preset; default: auto, from the unit size: hd for bins of 16 um or less, "
        "visium up to 75 um, legacy_st above",
    )
    p.add_argument(
        "--working-mpp",
        type=_positive_float,
        default=None,
        help="microns per pixel at which patch sizes are given; default: preset's",
    )
    p.add_argument(
        "--bin-patch-px", type=int, default=None, help="bin patch edge, px; default: preset's"
    )
    p.add_argument(
        "--spot-tile-px", type=int, default=None, help="spot tile edge, px; default: preset's"
    )
    p.add_argument(
        "--region-tile-px", type=int, default=None, help="region tile edge, px; default: preset's"
    )
    p.add_argument(
        "--k", type=_positive_int, default=None, help="neighbours in the kNN graphs (default 8)"
    )
    p.add_argument(
        "--panel",
        choices=["hvg", "mean"],
        default=None,
        help="gene panel: highly variable genes (scanpy seurat_v3 on raw counts) or top by "
        "mean; default: hvg",
    )
    p.add_argument("--n-genes", type=_positive_int, default=None, help="panel size (default 250)")
    p.add_argument(
        "--genes", default=None, help="text file with one gene id per line: use it as the panel"
    )
    p.add_argument(
        "--target",
        choices=["log1p", "log1p_zscore", "log1p_cp10k"],
        default=None,
        help="regression target; log1p_zscore standardises genes with statistics fitted on "
        "the training slides; log1p_cp10k is log1p of counts per 10,000 of each unit's "
        "total (library-size normalised, as scanpy's normalize_total + log1p) (default: log1p)",
    )
    p.add_argument(
        "--train-slides",
        nargs="+",
        default=None,
        help="slides whose counts choose the panel and fit target statistics; default: all",
    )
    p.add_argument(
        "--seed", type=int, default=None, help="seed of the panel's unit sampling (default 0)"
    )
    p.add_argument(
        "--add",
        action="store_true",
        help="add INPUTs to an existing dataset, keeping its settings and panel",
    )
    p.add_argument("--overwrite", action="store_true", help="rebuild every slide")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_prepare)
