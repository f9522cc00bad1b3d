"""tables: the Markdown and CSV tables of a cross-validation (per fold, mean +- std,
per test slide, paired against ridge by fold, per gene group)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from magnet_st.data.levels import LEVELS
from magnet_st.model.metrics import summarize
from magnet_st.util.atomic import atomic_path, write_text

log = logging.getLogger(__name__)

METRICS = [
    "mse",
    "mae",
    "pcc_gene",
    "pcc_gene_top",
    "pcc_unit",
    "between_tile_share",
    "between_tile_share_true",
]
BASELINE = "mean_profile"
#: fold protocols: choices on the validation slides, then (``refit``) a refit on train + val
PROTOCOLS = ("select", "refit")
RIDGE = "ridge"
AGGREGATED = " (aggregated bins)"  # suffix of the rows scoring tiles by their bins' sum
HEAD = " (head)"  # suffix of the rows scoring a network's own coarse heads


def protocol_line(protocol: str) -> str:
    """One sentence for the tables: how every model of the run was fitted."""
    if protocol == PROTOCOLS[1]:
        return (
            "Protocol `refit`: every model made its choices (epochs, penalty) on the "
            "validation slides, then was fitted again on training + validation slides."
        )
    return (
        "Protocol `select`: every model fitted on the training slides, its choices "
        "(epochs, penalty) made on the validation slides."
    )


def write_tables(
    table: pd.DataFrame, out: Path, protocol: str | None = None, scale: str | None = None
) -> pd.DataFrame:
    """``metrics.csv`` (per fold), ``summary.csv`` and ``summary.md`` (the protocol and the
    scale of the scores, given; mean +- std, PCC-gene per test slide, then each model
    against ridge paired by fold)."""
    with atomic_path(out / "metrics.csv") as tmp:
        table.to_csv(tmp, index=False)
    summary = summary_table(table)
    with atomic_path(out / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    per_slide = markdown_per_slide(table, summary=summary)
    paired = markdown_paired(table)
    head = protocol_line(protocol) + "\n\n" if protocol else ""
    if scale:
        head += f"Targets and scores on {scale}.\n\n"
    body = markdown_summary(summary) + "\n" + per_slide + ("\n" + paired if paired else "")
    write_text(out / "summary.md", head + body)
    return summary


def paired_table(
    table: pd.DataFrame, reference: str = RIDGE, metric: str = "pcc_gene"
) -> pd.DataFrame:
    """Each model against ``reference``, paired by fold: per level, the mean and sample std
    over folds of (model - reference) of each fold's mean ``metric`` over its test slides,
    the folds the model is ahead in, and a verdict: ``tie`` when the mean difference is
    smaller than its spread over folds (or with one fold), else ``ahead`` / ``behind``
    (for MSE / MAE, lower is ahead)."""
    higher = metric.startswith("pcc")
    per_fold = table.groupby(["level", "model", "fold"])[metric].mean()
    rows = []
    for level in dict.fromkeys(table["level"]):
        if (level, reference) not in per_fold.index.droplevel("fold"):
            continue
        ref = per_fold.loc[(level, reference)]
        for model in dict.fromkeys(table.loc[table["level"] == level, "model"]):
            if model == reference:
                continue
            mine = per_fold.loc[(level, model)]
            d = (mine - ref).dropna()
            d = d if higher else -d  # positive: the model is ahead
            if d.empty:
                continue
            mean = float(d.mean())
            sd = float(d.std(ddof=1)) if len(d) > 1 else float("nan")
            tie = not np.isfinite(sd) or abs(mean) < sd
            rows.append(
                {
                    "level": level,
                    "model": model,
                    "reference": reference,
                    "metric": metric,
                    "folds": len(d),
                    "diff_mean": mean if higher else -mean,
                    "diff_std": sd,
                    "folds_ahead": int((d > 0).sum()),
                    "verdict": "tie" if tie else ("ahead" if mean > 0 else "behind"),
                }
            )
    return pd.DataFrame(rows)


def markdown_paired(table: pd.DataFrame, reference: str = RIDGE, metric: str = "pcc_gene") -> str:
    """One Markdown table per level from :func:`paired_table` (empty without the
    reference)."""
    paired = paired_table(table, reference, metric)
    if paired.empty:
        return ""
    label = {"pcc_gene": "PCC-gene", "pcc_unit": "PCC-unit", "mse": "MSE", "mae": "MAE"}
    lines = []
    for level, sub in paired.groupby("level", sort=False):
        lines += [
            f"### {level} level: {label.get(metric, metric)} against {reference}, paired by fold",
            "",
            f"| model | minus {reference} (mean ± std over folds) | folds ahead | verdict |",
            "|---|---|---|---|",
        ]
        for _, r in sub.iterrows():
            lines.append(
                f"| {r['model']} | {r['diff_mean']:+.4f} ± {_spread(r['diff_std'])} | "
                f"{r['folds_ahead']} of {r['folds']} | {r['verdict']} |"
            )
        lines.append("")
    return "\n".join(lines)


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over folds of each metric, per model and level; the mean profile's
    rows first, then the ridge probe's."""
    rows = []
    for (level, model), sub in table.groupby(["level", "model"], sort=False):
        fold_means = sub.groupby("fold")[[m for m in METRICS if m in sub]].mean()
        stats = summarize(fold_means.to_dict("records"), [m for m in METRICS if m in sub])
        row = {"level": level, "model": model, "folds": len(fold_means)}
        for m, (mu, sd) in stats.items():
            row[f"{m}_mean"], row[f"{m}_std"] = mu, sd
        if "train_seconds" in sub:  # one fit per fold serves every level: its wall time
            row["train_seconds_mean"] = sub.groupby("fold")["train_seconds"].first().mean()
        rows.append(row)
    df = pd.DataFrame(rows)
    order = {lv: i for i, lv in enumerate(LEVELS)}
    df["_l"] = df["level"].map(order)
    # the mean profile, ridge, then the rest; each model's "(head)" and "(aggregated bins)"
    # rows right after its own
    own = df["model"].str.removesuffix(AGGREGATED).str.removesuffix(HEAD)
    df["_b"] = own.map({BASELINE: 0, RIDGE: 1}).fillna(2)
    df["_o"] = own.map({m: i for i, m in enumerate(dict.fromkeys(own))})
    df["_k"] = np.where(df["model"].str.endswith(AGGREGATED), 2, (own != df["model"]) * 1)
    keys = ["_l", "_b", "_o", "_k"]
    return df.sort_values(keys, kind="stable").drop(columns=keys).reset_index(drop=True)


def _spread(sd: float) -> str:
    """A standard deviation over folds for a table; "n/a" for one fold (no spread)."""
    return f"{sd:.4f}" if np.isfinite(sd) else "n/a"


def markdown_summary(summary: pd.DataFrame) -> str:
    """One Markdown table per level: rows models, columns metrics as mean +- std; the
    fitting time per fold where recorded (the same fit serves every level)."""
    names = {
        "mse": "MSE",
        "mae": "MAE",
        "pcc_unit": "PCC-unit",
        "pcc_gene": "PCC-gene",
        "pcc_gene_top": "PCC-gene top-50",
    }
    metrics = ("mse", "mae", "pcc_unit", "pcc_gene", "pcc_gene_top")
    lines = []
    for level, sub in summary.groupby("level", sort=False):
        cols = [m for m in metrics if f"{m}_mean" in sub]
        # the collapse diagnostic, where measured (bins): the prediction's share of variance
        # between spot tiles, with the truth's in brackets
        share = "between_tile_share_mean" in sub and np.isfinite(sub["between_tile_share_mean"])
        share = bool(np.any(share))
        timed = "train_seconds_mean" in sub and bool(np.isfinite(sub["train_seconds_mean"]).any())
        head = [names[c] for c in cols] + (["var. between spot tiles (truth)"] if share else [])
        head += ["fit s / fold"] if timed else []
        lines += [f"### {level} level", "", "| model | " + " | ".join(head) + " |"]
        lines.append("|---|" + "---|" * len(head))
        for _, r in sub.iterrows():
            cells = [
                "n/a"
                if not np.isfinite(r[f"{c}_mean"])
                else f"{r[f'{c}_mean']:.4f} ± {_spread(r[f'{c}_std'])}"
                for c in cols
            ]
            if share:
                p, t = r["between_tile_share_mean"], r["between_tile_share_true_mean"]
                cells.append("n/a" if not np.isfinite(p) else f"{p:.2f} ({t:.2f})")
            if timed:
                t = r["train_seconds_mean"]
                cells.append("" if not np.isfinite(t) else f"{t:.0f}")
            lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def markdown_per_slide(
    table: pd.DataFrame, metric: str = "pcc_gene", summary: pd.DataFrame | None = None
) -> str:
    """One Markdown table per level: rows models (in the summary's order), columns the test
    slides (by fold), the metric on each with the best of each column in bold, and the mean
    over folds (of each fold's mean over its test slides, as in the summary). ``summary``:
    :func:`summary_table` of ``table`` where the caller has it (computed otherwise)."""
    label = {"pcc_gene": "PCC-gene", "pcc_unit": "PCC-unit", "mse": "MSE", "mae": "MAE"}
    higher = metric.startswith("pcc")
    order = (summary_table(table) if summary is None else summary)[["level", "model"]]
    lines = []
    for level, sub in table.groupby("level", sort=False):
        slides = sub.sort_values(["fold", "test_slide"], kind="stable")["test_slide"]
        slides = list(dict.fromkeys(slides.astype(str)))
        by = sub.assign(test_slide=sub["test_slide"].astype(str)).pivot_table(
            index="model", columns="test_slide", values=metric, aggfunc="mean"
        )
        mean = sub.groupby(["model", "fold"])[metric].mean().groupby("model").mean()
        by = by.reindex(columns=slides).assign(mean=mean)
        models = [m for m in order[order["level"] == level]["model"] if m in by.index]
        best = by.loc[models].max() if higher else by.loc[models].min()
        lines += [
            f"### {level} level: {label.get(metric, metric)} per test slide",
            "",
            "| model | " + " | ".join(slides) + " | mean |",
            "|---|" + "---|" * (len(slides) + 1),
        ]
        for m in models:
            cells = []
            for c in [*slides, "mean"]:
                v = by.at[m, c]
                text = "" if not np.isfinite(v) else f"{v:.3f}"
                cells.append(f"**{text}**" if text and np.isclose(v, best[c]) else text)
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def group_summary(genes_table: pd.DataFrame, groups: dict[str, set[str]]) -> pd.DataFrame:
    """PCC-gene per group: the mean over the group's genes per fold (test slides pooled),
    then mean and std over folds, per level, model and group."""
    rows = []
    for group, members in groups.items():
        inside = genes_table["gene_id"].astype(str).isin(members) | genes_table["gene_name"].astype(
            str
        ).isin(members)
        sub = genes_table[inside]
        if sub.empty:
            continue
        for (level, model), s in sub.groupby(["level", "model"], sort=False):
            per_fold = s.groupby("fold")["pcc"].mean()
            stats = summarize([{"pcc": v} for v in per_fold], ["pcc"])["pcc"]
            rows.append(
                {
                    "level": level,
                    "model": model,
                    "group": group,
                    "n_genes": int(s["gene_id"].nunique()),
                    "folds": len(per_fold),
                    "pcc_gene_mean": stats[0],
                    "pcc_gene_std": stats[1],
                }
            )
    return pd.DataFrame(rows)


def markdown_groups(grouped: pd.DataFrame) -> str:
    """One Markdown table per level: rows groups, columns models (PCC-gene mean +- std)."""
    lines = []
    for level, sub in grouped.groupby("level", sort=False):
        models = list(dict.fromkeys(sub["model"]))
        lines += [
            f"### {level} level: PCC-gene by gene group",
            "",
            "| group | genes | " + " | ".join(models) + " |",
            "|---|---|" + "---|" * len(models),
        ]
        for group, g in sub.groupby("group", sort=False):
            cells = []
            for m in models:
                r = g[g["model"] == m]
                cells.append(
                    "n/a"
                    if r.empty or not np.isfinite(r["pcc_gene_mean"].iloc[0])
                    else f"{r['pcc_gene_mean'].iloc[0]:.4f} ± {_spread(r['pcc_gene_std'].iloc[0])}"
                )
            lines.append(f"| {group} | {int(g['n_genes'].max())} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
