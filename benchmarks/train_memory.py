"""Peak memory of MagNet training vs slide size (memory must not grow with the slide).

For each slide edge (default 0.9 mm ~ 10k bins and 6.5 mm ~ 660k bins in the capture
area, 552k under tissue): write a synthetic Visium HD slide, prepare it, store random
features (``import_features``: encoding 552k bin patches would take hours on a CPU and
does not change what training holds in memory), then train MagNet for a fixed number of
batches (about 256 bins each) in a fresh process and report peak RSS and time per batch.
Counts and features stay on disk: each batch reads its own rows (``ondisk.PanelCounts``,
``ondisk.NpyRows``), so neither the slide's arrays nor the pages a memory map would have
visited accumulate in the process.

    python benchmarks/train_memory.py                       # 0.9 and 6.5 mm
    python benchmarks/train_memory.py --sizes 0.9 2.8 --batches 30 --work /tmp/trainmem
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
torch.set_num_threads(int(sys.argv[4]))
from magnet_st.data.dataset import Dataset
from magnet_st.train.config import TrainConfig
from magnet_st.train.trainer import fit
ds = Dataset(sys.argv[1])
cfg = TrainConfig(features=sys.argv[2], width=128, epochs=1, max_batches=int(sys.argv[3]))
t0 = time.perf_counter()
res = fit(ds, ds.slides, [], cfg, sys.argv[5], progress=False)
dt = time.perf_counter() - t0
# VmHWM: this process's own peak (ru_maxrss survives exec on Linux, so a child started by a
# large parent would report the parent's peak)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")]
rss = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": dt, "peak_rss_mb": rss, "steps": res.steps_per_epoch}))
"""


def setup(work: Path, size_mm: float, dim: int) -> tuple[Path, str, int]:
    import numpy as np

    from magnet_st.data.dataset import Dataset
    from magnet_st.features.extract import import_features
    from magnet_st.prepare.build import prepare
    from magnet_st.prepare.config import PrepareConfig
    from magnet_st.read.specs import SlideSpec
    from magnet_st.synthetic import write_synthetic_hd

    run = work / f"slide_{size_mm:g}mm"
    if not (run / "outs").is_dir():
        write_synthetic_hd(
            run, width_um=size_mm * 1000, height_um=size_mm * 1000, seed=1, bin_sizes=(8, 16),
            write_mtx=False, write_raw=False, progress=False,
        )  # fmt: skip
    ds_path = work / f"dataset_{size_mm:g}mm"
    spec = SlideSpec(name="s", path=str(run), image=str(run / "he_fullres.tif"), bin_size=8)
    prepare([spec], ds_path, PrepareConfig(n_genes=250), progress=False)
    ds = Dataset(ds_path)
    rng = np.random.default_rng(0)
    feats = {
        ("s", lv): rng.standard_normal((ds.level("s", lv).n_obs, dim)).astype(np.float16)
        for lv in ("bin", "spot", "region")
    }
    meta = import_features(ds_path, "random", feats, description="benchmark")
    return ds_path, meta["key"], ds.level("s", "bin").n_obs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[0.9, 6.5], help="slide edges, mm")
    ap.add_argument("--batches", type=int, default=20, help="training batches per size")
    ap.add_argument("--dim", type=int, default=1024, help="feature width")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--work", default="benchmark_train_memory", help="scratch folder")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        t0 = time.perf_counter()
        ds_path, key, n_bins = setup(work, size, args.dim)
        setup_s = time.perf_counter() - t0
        out = work / f"train_{size:g}mm"
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(ds_path), key, str(args.batches),
             str(args.threads), str(out)],
            capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )  # fmt: skip
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append((size, n_bins, res["peak_rss_mb"], res["seconds"] / args.batches, setup_s))
        print(
            f"{size:g} mm: {n_bins:,} bins, peak RSS {res['peak_rss_mb']:.0f} MB, "
            f"{res['seconds'] / args.batches:.2f} s per batch (incl. start-up; setup {setup_s:.0f} s)",
            flush=True,
        )
    print("\n| slide | bins under tissue | peak RSS (training) | s per batch |")
    print("|---|---|---|---|")
    for size, n, rss, spb, _ in rows:
        print(f"| {size:g} mm | {n:,} | {rss:.0f} MB | {spb:.2f} |")
    print(
        f"(setup process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)"
    )


if __name__ == "__main__":
    main()
