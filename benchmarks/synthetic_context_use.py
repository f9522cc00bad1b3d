"""Does a model use the tissue context? PCC-gene of the context genes inside tumour bins.

On ``magnet synth`` slides the two tumour domains look alike up close and differ only in
sparse cue cells visible in the 128 um region tile; their domain genes (``CTX_DOMA_*``,
``CTX_DOMB_*``) can only be predicted inside tumour bins from context. For every fold of a
finished ``magnet cv`` run on synthetic slides, this scores the saved bin predictions
(``pred_<slide>_bin.h5ad``, measured values in the layer ``"measured"``) on the tumour bins
of the held-out slide (the generator's ``synthetic_bins_008um.parquet``, domain TUM_A or
TUM_B) and prints the mean +- std over folds per model.

    python benchmarks/synthetic_context_use.py SLIDES_DIR CV_DIR [CV_DIR ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("slides", help="folder holding the synthetic runs (one per slide name)")
    ap.add_argument("cv", nargs="+", help="'magnet cv' output folders")
    args = ap.parse_args()
    import anndata

    rows = []
    for cv in map(Path, args.cv):
        folds = json.loads((cv / "folds.json").read_text())["folds"]
        for i, fold in enumerate(folds):
            if not (cv / f"fold{i}").is_dir():  # a run of some folds (--only-folds)
                continue
            for slide in fold["test"]:
                truth = Path(args.slides) / slide / "synthetic_bins_008um.parquet"
                bins = pd.read_parquet(truth).set_index("barcode")
                for model in sorted((cv / f"fold{i}").iterdir()):
                    f = model / f"pred_{slide}_bin.h5ad"
                    if not f.is_file():
                        continue
                    a = anndata.read_h5ad(f)
                    domain = bins.reindex(a.obs_names.astype(str))["domain"].astype(str)
                    tumour = np.isin(domain.to_numpy(), ["TUM_A", "TUM_B"])
                    pred = np.asarray(a.X)[tumour]
                    meas = a.layers["measured"]
                    meas = (meas.toarray() if hasattr(meas, "toarray") else np.asarray(meas))[
                        tumour
                    ]
                    names = a.var_names.astype(str)
                    for group in ("CTX_DOMA", "CTX_DOMB"):
                        r = [
                            np.corrcoef(pred[:, j], meas[:, j])[0, 1]
                            for j, n in enumerate(names)
                            if n.startswith(group) and pred[:, j].std() > 0 and meas[:, j].std() > 0
                        ]
                        rows.append(
                            {"cv": cv.name, "model": model.name, "group": group, "pcc": np.mean(r)}
                        )
    table = pd.DataFrame(rows).groupby(["cv", "model", "group"], sort=False)["pcc"]
    print("| cv | model | genes | PCC-gene in tumour bins |")
    print("|---|---|---|---|")
    for (cv, model, group), s in table:
        print(f"| {cv} | {model} | {group} | {s.mean():.3f} ± {s.std():.3f} |")


if __name__ == "__main__":
    main()
