"""Cells predicted by a model trained on cells against the same cells pooled from a model
trained on 8 um bins, fold by fold.

For each fold of two cross-validations over the same slides (one prepared with ``--cells``,
one with 8 um bins), each model in both, and the fold's test slide: the bins' prediction is
pooled into the slide's Space Ranger cells (``outs/segmented_outputs/
cell_segmentations.geojson``; each bin weighted by the share of its area in the cell,
:mod:`magnet_st.predict.pool`) and scored, like the cells model's own prediction, by
PCC-gene across the cells against their measured counts (log1p), on the genes both panels
hold; per gene group for synthetic slides (``CELL_`` / ``CTX_`` / ``BG_``).

    python benchmarks/cells_from_bins.py CV_CELLS CV_BINS RUN [RUN ...]

RUN: the Space Ranger run folder of each slide, named as the slide. Prints a Markdown table;
it asserts nothing and is not a test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from magnet_st.model.metrics import pcc_per_gene
from magnet_st.predict.pool import bin_cell_weights, pool_to_cells
from magnet_st.read.cells import cell_names
from magnet_st.read.geojson import read_geojson

GROUPS = {"CELL": "cell", "CTX": "context", "BG": "background"}


def dense(x: object) -> np.ndarray:
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)  # type: ignore[union-attr]


def score(truth: np.ndarray, pred: np.ndarray, genes: pd.Index) -> dict[str, float]:
    r = pcc_per_gene(truth, pred)
    group = pd.Series(genes.str.split("_").str[0]).map(GROUPS).to_numpy()
    out = {"all": float(np.nanmean(r))}
    for g in GROUPS.values():
        if (group == g).any():
            out[g] = float(np.nanmean(r[group == g]))
    return out


def fold_rows(
    cells_cv: Path, bins_cv: Path, runs: dict[str, Path], targets: str = "auto"
) -> list[dict]:
    rows = []
    for fold in sorted(p for p in bins_cv.glob("fold*") if p.is_dir()):
        for model_dir in sorted(p for p in fold.iterdir() if p.is_dir()):
            model = model_dir.name
            for pred_file in sorted(model_dir.glob("pred_*_bin.h5ad")):
                slide = pred_file.name[len("pred_") : -len("_bin.h5ad")]
                cells_file = cells_cv / fold.name / model / pred_file.name
                if model == "mean_profile" or not cells_file.is_file() or slide not in runs:
                    continue
                bins, cells = ad.read_h5ad(pred_file), ad.read_h5ad(cells_file)
                genes = cells.var_names.intersection(bins.var_names, sort=False)
                seg = runs[slide] / "outs" / "segmented_outputs" / "cell_segmentations.geojson"
                ids, polys = read_geojson(seg)
                order = pd.Index(cell_names(ids)).get_indexer(cells.obs_names)
                if (order < 0).any():
                    raise SystemExit(f"{cells_file}: cells missing from {seg}")
                polys = polys.subset(order)
                mpp = float(cells.uns["spatial"][slide]["scalefactors"]["microns_per_pixel"])
                w = bin_cell_weights(bins.obsm["spatial"], 8.0 / mpp, polys)
                per_10k = (
                    targets == "cp10k"
                    if targets != "auto"
                    else "10,000" in str(bins.uns["magnet"].get("scale", ""))
                )
                pooled = pool_to_cells(dense(bins[:, genes].X), w, per_10k)
                truth = dense(cells[:, genes].layers["measured"])
                own = score(truth, dense(cells[:, genes].X), genes)
                via = score(truth, pooled, genes)
                for g in own:
                    rows.append(
                        {
                            "fold": fold.name,
                            "slide": slide,
                            "model": model,
                            "genes": g,
                            "cells": own[g],
                            "pooled": via[g],
                        }  # fmt: skip
                    )
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("cells_cv", type=Path, help="cross-validation folder of the cells")
    ap.add_argument("bins_cv", type=Path, help="cross-validation folder of the 8 um bins")
    ap.add_argument("runs", type=Path, nargs="+", help="Space Ranger run folders, one per slide")
    ap.add_argument("--csv", type=Path, default=None, help="also write the per-fold rows here")
    ap.add_argument(
        "--targets",
        choices=("auto", "counts", "cp10k"),
        default="auto",
        help="the bins' scale: log1p counts (pooled as sums) or counts per 10,000 (pooled as "
        "area-weighted means); auto: from the prediction files' uns['magnet']['scale'] "
        "(cv folders written before it was recorded say 'log1p': pass cp10k for those)",
    )
    args = ap.parse_args(argv)
    runs = {r.name: r for r in args.runs}
    rows = pd.DataFrame(fold_rows(args.cells_cv, args.bins_cv, runs, args.targets))
    if rows.empty:
        raise SystemExit("no fold has a model in both folders")
    if args.csv is not None:
        rows.to_csv(args.csv, index=False)
    print(
        "| model | genes | cells model | bins pooled into cells | cells - pooled | folds cells ahead |"
    )
    print("|---|---|---|---|---|---|")
    for (model, genes), d in rows.groupby(["model", "genes"], sort=False):
        diff = d.cells - d.pooled
        print(
            f"| {model} | {genes} | {d.cells.mean():.3f} ± {d.cells.std():.3f} | "
            f"{d.pooled.mean():.3f} ± {d.pooled.std():.3f} | {diff.mean():+.3f} ± "
            f"{diff.std():.3f} | {int((diff > 0).sum())} of {len(diff)} |"
        )


if __name__ == "__main__":
    main()
