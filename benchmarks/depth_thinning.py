"""Robustness to sequencing depth: thin each test section's counts and rescore.

For every fold of a finished ``magnet cv`` run, the held-out slide's counts are thinned
binomially (each read kept with probability ``--keep``, 0.1 = tenfold shallower; spot and
region tiles are the sums of their thinned units, so the levels stay consistent), and the
predictions the run already saved (``pred_<slide>_<level>.h5ad``) are scored against the
measured and against the thinned truth. The image, hence every prediction, is unchanged:
what moves is the truth. With raw ``log1p`` targets a shallower section's truth drops by
about ``log(1/keep)`` where genes are expressed, so MSE grows although the model is the
same; with ``log1p_cp10k`` targets (library-size normalised) the truth's level stays and
only its noise grows.

    python benchmarks/depth_thinning.py runs/her2st runs/her2st-cv --keep 0.1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp


def thinned_truth(ds, slide: str, genes: list[str], keep: float, seed: int) -> dict:
    """``{"measured": {level: y}, "thinned": {level: y}}`` on the dataset's target scale
    (log1p, or log1p of counts per 10,000), bins thinned and tiles summed from them."""
    from magnet_st.data.targets import per_10k_rows

    per_10k = ds.target_kind == "log1p_cp10k"
    rng = np.random.default_rng(seed)
    raw = ds.panel_counts(slide, "bin", genes, raw=True).to_memory()
    raw = sp.csr_matrix(raw, dtype=np.int64)
    total = ds.obs_column(slide, "bin", "total_counts").astype(np.int64)
    thin = raw.copy()
    thin.data = rng.binomial(thin.data, keep)
    # the other genes' reads are thinned too: the unit's new total
    rest = total - np.asarray(raw.sum(axis=1)).ravel()
    thin_total = rng.binomial(np.maximum(rest, 0), keep) + np.asarray(thin.sum(axis=1)).ravel()
    out: dict = {"measured": {}, "thinned": {}}
    for name, counts, tot in (("measured", raw, total), ("thinned", thin, thin_total)):
        for level in ("bin", "spot", "region"):
            if level == "bin":
                c, t = counts, tot
            else:  # tiles: sums of their units
                member = ds.membership(slide, level)
                n = ds.n_obs(slide, level)
                agg = sp.csr_matrix(
                    (np.ones(len(member)), (member, np.arange(len(member)))), shape=(n, len(member))
                )
                c, t = agg @ counts, agg @ tot
            c = per_10k_rows(c, t) if per_10k else sp.csr_matrix(c, dtype=np.float64)
            out[name][level] = np.log1p(c.toarray())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("dataset", help="the dataset the cross-validation ran on")
    ap.add_argument("cv", help="the 'magnet cv' output folder")
    ap.add_argument("--keep", type=float, default=0.1, help="read keep probability (0.1)")
    ap.add_argument("--seed", type=int, default=0, help="thinning seed (0)")
    ap.add_argument("--out", default=None, help="CSV of the rows (default: CV/thinning.csv)")
    args = ap.parse_args()
    import json

    import anndata

    from magnet_st.data.dataset import Dataset
    from magnet_st.model.metrics import evaluate

    ds = Dataset(args.dataset)
    cv = Path(args.cv)
    folds = json.loads((cv / "folds.json").read_text())["folds"]
    rows = []
    for i, fold in enumerate(folds):
        folder = cv / f"fold{i}"
        if not (folder / "panel.tsv").is_file():
            print(f"fold {i}: not run (yet), skipped")
            continue
        genes = pd.read_csv(folder / "panel.tsv", sep="\t")["gene_id"].astype(str).tolist()
        for slide in fold["test"]:
            truth = thinned_truth(ds, slide, genes, args.keep, args.seed)
            for model_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
                for level in ("bin", "spot", "region"):
                    f = model_dir / f"pred_{slide}_{level}.h5ad"
                    if not f.is_file():
                        continue
                    pred = np.asarray(anndata.read_h5ad(f).X, dtype=np.float64)
                    for which in ("measured", "thinned"):
                        m = evaluate(truth[which][level], pred)
                        rows.append(
                            {
                                "fold": i,
                                "slide": slide,
                                "model": model_dir.name,
                                "level": level,
                                "truth": which,
                                "mse": m["mse"],
                                "pcc_gene": m["pcc_gene"],
                                "pcc_unit": m["pcc_unit"],
                                "truth_mean": float(truth[which][level].mean()),
                            }
                        )
    table = pd.DataFrame(rows)
    out = Path(args.out) if args.out else cv / "thinning.csv"
    table.to_csv(out, index=False)
    cols = ["mse", "pcc_gene", "pcc_unit", "truth_mean"]
    summary = table.groupby(["level", "model", "truth"], sort=False)[cols].mean().reset_index()
    print(f"target scale: {ds.target_kind}; reads kept: {args.keep}")
    print("| level | model | truth | MSE | PCC-gene | PCC-unit | mean truth |")
    print("|---|---|---|---|---|---|---|")
    for r in summary.itertuples(index=False):
        print(
            f"| {r.level} | {r.model} | {r.truth} | {r.mse:.4f} | {r.pcc_gene:.4f} "
            f"| {r.pcc_unit:.4f} | {r.truth_mean:.3f} |"
        )
    print(f"rows: {out}")


if __name__ == "__main__":
    main()
