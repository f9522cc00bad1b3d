"""Figures from results on disk: what ``magnet plot`` draws for each kind of input.

- a prediction (``bins.h5ad`` / ``cells.h5ad`` / ``spots.h5ad`` from ``magnet predict``, or a ``pred_<slide>_<level>.h5ad``
  from ``magnet cv``): gene maps, predicted beside measured where a ``"measured"`` layer
  is present, and a per-gene PCC bar chart;
- a cross-validation folder (``magnet cv``): the per-fold distribution of PCC-gene and
  PCC-unit per model and level, training curves of every fold and model, per-gene PCC
  bars (mean over folds) and gene maps of one fold's test slide per model;
- a training folder (``magnet train``, holding ``history.json``): training curves.

Each figure is written in every requested format (PNG and PDF by default) with
:func:`magnet_st.plot.save`, so nothing is half-written.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from magnet_st import plot
from magnet_st.errors import InputError

log = logging.getLogger(__name__)

FORMATS = ("png", "pdf")


def _read_anndata(path: Path):
    import anndata

    try:
        return anndata.read_zarr(path) if path.suffix == ".zarr" else anndata.read_h5ad(path)
    except Exception as exc:  # noqa: BLE001 - any read failure is a bad input file
        raise InputError(path, f"cannot read as AnnData ({exc})") from exc


def choose_genes(pred, genes: Sequence[str] | None, n_genes: int) -> tuple[list[str], str]:
    """The genes to map: those asked for, else the ``n_genes`` best predicted (by PCC
    against the measured layer), else the ``n_genes`` most variable predictions."""
    if genes:
        return list(genes), "as requested"
    if "measured" in pred.layers:
        r = plot.per_gene_pcc(pred).sort_values(ascending=False)
        return list(r.index[:n_genes]), "highest PCC against measured"
    import numpy as np
    import scipy.sparse as sp

    s1 = np.zeros(pred.n_vars)
    s2 = np.zeros(pred.n_vars)
    for start in range(0, pred.n_obs, 50_000):  # bounded memory on 660k-bin slides
        x = pred.X[start : start + 50_000]
        x = (x.toarray() if sp.issparse(x) else np.asarray(x)).astype(np.float64)
        s1 += x.sum(axis=0)
        s2 += (x * x).sum(axis=0)
    var = s2 / max(pred.n_obs, 1) - (s1 / max(pred.n_obs, 1)) ** 2
    order = np.argsort(-var, kind="stable")[:n_genes]
    return [str(pred.var_names[i]) for i in order], "most variable predictions"


def prediction_figures(
    path: Path,
    out: Path,
    genes: Sequence[str] | None = None,
    n_genes: int = 4,
    formats: Sequence[str] = FORMATS,
    stem: str | None = None,
) -> list[Path]:
    """Gene maps (and per-gene PCC bars where measured values exist) of one prediction."""
    pred = _read_anndata(path)
    if "spatial" not in pred.obsm:
        raise InputError(path, "no obsm['spatial']: not a magnet prediction")
    stem = stem or path.name.removesuffix(".h5ad").removesuffix(".zarr")
    chosen, why = choose_genes(pred, genes, n_genes)
    log.info("%s: mapping %s (%s)", path.name, ", ".join(chosen), why)
    try:
        fig = plot.gene_maps(pred, chosen)
    except KeyError as exc:
        raise InputError(path, str(exc.args[0])) from exc
    written = plot.save(fig, out / f"{stem}_maps", formats)
    if "measured" in pred.layers:
        r = plot.per_gene_pcc(pred)
        level = (pred.uns.get("magnet", {}) or {}).get("level", "unit")
        fig = plot.pcc_bars(r, title=f"{stem}: per-gene PCC across {level}s")
        written += plot.save(fig, out / f"{stem}_gene_pcc", formats)
    return written


def cv_figures(
    folder: Path,
    out: Path,
    genes: Sequence[str] | None = None,
    n_genes: int = 4,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Summary, training-curve, per-gene and map figures of a ``magnet cv`` folder."""
    metrics = pd.read_csv(folder / "metrics.csv")
    written: list[Path] = []
    for level in [lv for lv in ("bin", "spot", "region") if lv in set(metrics["level"])]:
        for metric in ("pcc_gene", "pcc_unit"):
            fig = plot.cv_summary(metrics, metric=metric, level=level)
            written += plot.save(fig, out / f"cv_{metric}_{level}", formats)
    for hist in sorted(folder.glob("fold*/*/history.json")):
        fold, model = hist.parent.parent.name, hist.parent.name
        data = json.loads(hist.read_text())
        if isinstance(data, dict) and "history" not in data:  # a neural baseline: per level
            for level, rows in data.items():
                fig = plot.training_curves(rows, title=f"{model}, {fold}, {level} level")
                written += plot.save(fig, out / f"training_{model}_{fold}_{level}", formats)
            continue
        fig = plot.training_curves(data, title=f"{model}, {fold}")
        written += plot.save(fig, out / f"training_{model}_{fold}", formats)
    gene_pcc = folder / "gene_pcc.csv"
    if gene_pcc.exists():
        table = pd.read_csv(gene_pcc)
        table = table[(table["level"] == "bin") & (table["model"] != "mean_profile")]
        for model, rows in table.groupby("model", sort=False):
            r = rows.groupby("gene_name")["pcc"].mean()
            fig = plot.pcc_bars(r, title=f"{model}: per-gene PCC across bins (mean over folds)")
            written += plot.save(fig, out / f"gene_pcc_{model}", formats)
    fold0 = sorted(folder.glob("fold*"))
    for pred in sorted(fold0[0].glob("*/pred_*_bin.h5ad")) if fold0 else []:
        stem = f"{pred.parent.name}_{pred.name.removesuffix('_bin.h5ad').removeprefix('pred_')}"
        written += prediction_figures(pred, out, genes, n_genes, formats, stem=stem)
    return written


def plot_results(
    inputs: Sequence[str | Path],
    out: str | Path,
    genes: Sequence[str] | None = None,
    n_genes: int = 4,
    formats: Sequence[str] = FORMATS,
) -> list[Path]:
    """Draw the figures of each input (a prediction, a cv folder or a training folder) into
    ``out`` and return the files written."""
    from magnet_st.predict.image import UNIT_FILES

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for item in map(Path, inputs):
        if not item.exists():
            raise InputError(item, "not found")
        if item.suffix in (".h5ad", ".zarr"):
            written += prediction_figures(item, out, genes, n_genes, formats)
        elif (item / "metrics.csv").exists() and (item / "folds.json").exists():
            written += cv_figures(item, out, genes, n_genes, formats)
        elif (item / "history.json").exists():
            fig = plot.training_curves(item / "history.json", title=f"training: {item.name}")
            written += plot.save(fig, out / f"training_{item.name}", formats)
        elif units := [
            item / f"{name}{suffix}"
            for name in dict.fromkeys(UNIT_FILES.values())
            for suffix in (".h5ad", ".zarr")
            if (item / f"{name}{suffix}").exists()
        ]:
            written += prediction_figures(units[0], out, genes, n_genes, formats)
        else:
            raise InputError(
                item,
                "not a prediction (.h5ad/.zarr), a 'magnet cv' folder (metrics.csv + "
                "folds.json), a 'magnet train' folder (history.json) or a 'magnet predict' "
                "folder (bins.h5ad, cells.h5ad or spots.h5ad)",
            )
    return written
