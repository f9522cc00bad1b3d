"""Time and peak memory of image-only prediction (``magnet predict --image``) vs slide size.

Trains a throwaway model (a few batches on a 0.4 mm synthetic slide; the weights do not
change the cost of prediction), writes a synthetic slide of each requested size (6.5 mm
~ 660k 8 um bins in the capture area), then predicts it from the image alone in a fresh
process: tissue detection, the virtual 8 um grid, features of every bin, spot and region
tile, and MagNet. Prints seconds per stage, bins per second and peak RSS.

    python benchmarks/predict_scale.py --sizes 1 2 --encoder mobilenetv3_small_050   # CPU
    python benchmarks/predict_scale.py --sizes 6.5 --encoder resnet50 --device cuda  # GPU
    python benchmarks/predict_scale.py --sizes 0.5 1 2 --encoder efficientnet_lite0_imagenet \
        --dense-mpp 0.25 --threads 2                       # dense features (one pass per tile)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
args = json.loads(sys.argv[1])
if args["threads"]:
    torch.set_num_threads(args["threads"])
from magnet_st.predict.image import predict
t0 = time.perf_counter()
res = predict(args["model"], args["out"], image=args["image"], device=args["device"],
              batch_size=args["batch_size"], num_workers=args["workers"], progress=False)
# VmHWM: this process's own peak (ru_maxrss survives exec on Linux, so a child started by a
# large parent would report the parent's peak)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")]
rss = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"seconds": time.perf_counter() - t0, "stages": res.seconds, "n": res.n,
                  "peak_rss_mb": rss, "worker_peak_rss_mb": kids}))
"""


def train_model(
    work: Path, encoder: str, input_px: int | None, device: str, dense_mpp: float | None = None
) -> Path:
    from magnet_st.data.dataset import Dataset
    from magnet_st.features.extract import extract_features
    from magnet_st.prepare.build import prepare
    from magnet_st.prepare.config import PrepareConfig
    from magnet_st.read.specs import SlideSpec
    from magnet_st.synthetic import write_synthetic_hd
    from magnet_st.train.config import TrainConfig
    from magnet_st.train.trainer import fit

    mode = f"_dense{dense_mpp:g}" if dense_mpp else ""
    model = work / f"model_{encoder}{mode}" / "model.pt"
    if model.exists():
        return model
    run = work / "train_slide"
    if not (run / "outs").is_dir():
        write_synthetic_hd(run, width_um=400, height_um=400, seed=7, bin_sizes=(8, 16),
                           write_mtx=False, write_raw=False, progress=False)  # fmt: skip
    ds_path = work / "train_dataset"
    spec = SlideSpec(name="train", path=str(run), image=str(run / "he_fullres.tif"), bin_size=8)
    prepare([spec], ds_path, PrepareConfig(n_genes=250), progress=False)
    from magnet_st.features.dense import DenseConfig

    feats = extract_features(
        ds_path,
        encoder,
        ("bin", "spot", "region"),
        device=device,
        input_px=input_px,
        progress=False,
        dense=DenseConfig(mpp=dense_mpp) if dense_mpp else None,
    )
    cfg = TrainConfig(features=feats["key"], width=128, epochs=1, max_batches=3)
    fit(Dataset(ds_path), ["train"], [], cfg, model.parent, progress=False)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1.0], help="slide edges, mm")
    ap.add_argument("--encoder", default="mobilenetv3_small_050", help="feature encoder")
    ap.add_argument("--input-px", type=int, default=None, help="encoder input size (px)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    ap.add_argument("--batch-size", type=int, default=64, help="tiles per forward pass")
    ap.add_argument("--workers", type=int, default=None, help="image-reading workers")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--work", default="benchmark_predict_scale", help="scratch folder")
    ap.add_argument(
        "--dense-mpp",
        type=float,
        default=None,
        help="dense features at this working resolution (um/px); default: per-unit patches",
    )
    args = ap.parse_args()
    from magnet_st.synthetic import write_synthetic_hd

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = train_model(work, args.encoder, args.input_px, args.device, args.dense_mpp)
    rows = []
    for size in args.sizes:
        run = work / f"slide_{size:g}mm"
        if not (run / "outs").is_dir():
            t0 = time.perf_counter()
            write_synthetic_hd(run, width_um=size * 1000, height_um=size * 1000, seed=3,
                               bin_sizes=(8,), write_mtx=False, write_raw=False)  # fmt: skip
            print(f"wrote the {size:g} mm slide in {time.perf_counter() - t0:.0f} s", flush=True)
        mode = f"_dense{args.dense_mpp:g}" if args.dense_mpp else ""
        out = work / f"predict_{size:g}mm_{args.encoder}{mode}"
        job = {
            "model": str(model), "out": str(out), "image": str(run / "he_fullres.tif"),
            "device": args.device, "batch_size": args.batch_size, "workers": args.workers,
            "threads": args.threads,
        }  # fmt: skip
        if out.exists():
            import shutil

            shutil.rmtree(out)  # measure from scratch, not a resumed run
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(job)], capture_output=True, text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )  # fmt: skip
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        n = res["n"]["bin"]
        rows.append((size, n, res))
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in res["stages"].items())
        print(
            f"{size:g} mm: {n:,} bins in {res['seconds']:.0f} s ({n / res['seconds']:.0f} bins/s; "
            f"{stages}); peak RSS {res['peak_rss_mb']:.0f} MB "
            f"(workers {res['worker_peak_rss_mb']:.0f} MB)",
            flush=True,
        )
    how = f"dense at {args.dense_mpp:g} um/px" if args.dense_mpp else "per-unit patches"
    print(f"\nencoder {args.encoder} ({how}), device {args.device}, batch {args.batch_size}")
    print("| slide | bins | seconds | bins/s | peak RSS | worker peak RSS |")
    print("|---|---|---|---|---|---|")
    for size, n, r in rows:
        print(
            f"| {size:g} mm | {n:,} | {r['seconds']:.0f} | {n / r['seconds']:.0f} | "
            f"{r['peak_rss_mb']:.0f} MB | {r['worker_peak_rss_mb']:.0f} MB |"
        )


if __name__ == "__main__":
    main()
