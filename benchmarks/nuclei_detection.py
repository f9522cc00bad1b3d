"""The built-in nucleus detector (magnet segment) against the nuclei a synthetic slide
planted: precision, recall and F1 at a matching radius, per slide and cell type.

    python benchmarks/nuclei_detection.py RUN [RUN ...] [--radius-um 3]

RUN: folders written by 'magnet synth' (their synthetic_nuclei.parquet is the truth).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from magnet_st.evaluate.detection import detection_scores, match_points
from magnet_st.io.image import open_image
from magnet_st.io.nuclei import NucleusConfig, detect_cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--radius-um", type=float, default=3.0, help="matching radius (default 3)")
    args = ap.parse_args()
    rows = []
    for run in args.runs:
        image = open_image(run / "he_fullres.tif")
        mpp = image.microns_per_pixel
        t0 = time.perf_counter()
        nuclei, _ = detect_cells(image, None, NucleusConfig())
        secs = time.perf_counter() - t0
        pred = np.array([r.mean(axis=0) for r in nuclei]).reshape(-1, 2)
        truth = pd.read_parquet(run / "synthetic_nuclei.parquet")
        xy = truth[["x_px", "y_px"]].to_numpy()
        hit = match_points(pred, xy, args.radius_um / mpp)
        s = detection_scores(hit, len(xy))
        found = np.zeros(len(xy), bool)
        found[hit[hit >= 0]] = True
        per_type = {
            f"recall {t}": found[truth["cell_type"].astype(str).to_numpy() == t].mean()
            for t in sorted(truth["cell_type"].astype(str).unique())
        }
        rows.append({"slide": run.name, **s, **per_type, "seconds": secs})
    table = pd.DataFrame(rows)
    print(table.round(3).to_string(index=False))
    mean = table[["precision", "recall", "f1"]].agg(["mean", "std"])
    print()
    print(mean.round(3).to_string())


if __name__ == "__main__":
    main()
