"""Cost of the windows around every unit: pooled from the units' own dense pass, or from a
second pass at a coarser resolution (``--dense-window-mpp``).

For each setting the script extracts dense features of the chosen slides of a prepared
dataset into a scratch copy (the dataset's slides copied, its features not) and prints the
wall time, the tiles and megapixels encoded per pass, and the peak resident memory of the
process so far. Settings run in the order given; the first is the reference.

    python benchmarks/dense_windows.py runs/her2st --slides C2 --window-mpp same 2 1
    python benchmarks/dense_windows.py runs/ds --slides syn0 --windows 300 600 --window-mpp same 2

It prints figures; it asserts nothing and is not a test.
"""

from __future__ import annotations

import argparse
import logging
import resource
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from magnet_st.data.dataset import Dataset
from magnet_st.features.dense import DenseConfig
from magnet_st.features.extract import extract_features


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("dataset", type=Path, help="a prepared dataset (magnet prepare)")
    ap.add_argument("--slides", nargs="+", default=None, help="slides to encode (default: all)")
    ap.add_argument("--encoder", default="efficientnet_lite0_imagenet", help="encoder name")
    ap.add_argument(
        "--windows",
        type=float,
        nargs="+",
        default=None,
        help="window sizes, um (default: the dataset preset's)",
    )
    ap.add_argument(
        "--window-mpp",
        nargs="+",
        default=["same", "2"],
        help="where the windows come from: 'same' (the units' pass) or a resolution, um/px",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="dense_windows_") as tmp:
        print(f"{'windows from':>14} {'seconds':>8} {'tiles':>7} {'Mpx':>7} {'peak RSS GB':>12}")
        for setting in args.window_mpp:
            ds = Path(tmp) / setting
            shutil.copytree(args.dataset, ds, ignore=shutil.ignore_patterns("features"))
            preset = str(Dataset(ds).config.get("preset", "hd"))
            cfg = DenseConfig(windows_um=None if args.windows is None else tuple(args.windows))
            units_mpp = cfg.resolve(preset).mpp  # windows at it: from the units' own pass
            cfg = replace(cfg, window_mpp=units_mpp if setting == "same" else float(setting))
            t0 = time.perf_counter()
            res = extract_features(
                ds,
                args.encoder,
                levels=("bin", "spot", "region"),
                slides=args.slides,
                device="cpu",
                progress=False,
                dense=cfg,
            )
            secs = time.perf_counter() - t0
            stats = {}
            for job in res["jobs"]:  # every level of a slide shares one run's figures
                stats[job["slide"]] = job.get("dense") or {}
            tiles = sum(s.get("tiles", 0) for s in stats.values())
            mpx = sum(s.get("megapixels", 0) for s in stats.values())
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
            label = "same pass" if setting == "same" else f"{setting} um/px"
            print(f"{label:>14} {secs:8.1f} {tiles:7d} {mpx:7.0f} {rss:12.2f}", flush=True)
            shutil.rmtree(ds)


if __name__ == "__main__":
    main()
