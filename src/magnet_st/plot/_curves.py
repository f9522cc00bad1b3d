"""Per-gene accuracy bars, training curves and cross-validation summaries."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from magnet_st.plot._common import BASELINE, METRIC_LABELS, METRIC_NAMES, _figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# -- per-gene accuracy ----------------------------------------------------------------------


def pcc_bars(
    pcc: pd.Series | Mapping[str, float],
    *,
    top: int | None = 30,
    title: str = "Per-gene accuracy",
    xlabel: str = "Pearson r, predicted vs measured",
) -> Figure:
    """Horizontal bars of per-gene Pearson r, highest first, with the mean over all genes
    (not only those shown) as a labelled dashed line. ``top`` limits the bars drawn
    (``None``: all); NaN genes are left out."""
    s = pd.Series(pcc, dtype=np.float64)
    s.index = s.index.astype(str)
    s = s[np.isfinite(s)]
    if s.empty:
        raise ValueError("no finite per-gene PCC to draw")
    s = s.sort_values(ascending=False, kind="stable")
    shown = s if top is None else s.iloc[: max(1, int(top))]
    n = len(shown)
    fig = _figure(6.0, 1.5 + 0.22 * n)
    ax = fig.add_subplot()
    y = np.arange(n)
    colours = np.where(shown.to_numpy() >= 0, "#4c72b0", "#c44e52")
    ax.barh(y, shown.to_numpy(), color=colours, height=0.75)
    ax.set_yticks(y, shown.index, fontsize=8 if n > 40 else 9)
    ax.invert_yaxis()  # highest at the top
    mean = float(s.mean())
    ax.axvline(
        mean,
        color="black",
        linestyle="--",
        linewidth=1.2,
        label=f"mean over {len(s)} genes: {mean:.3f}",
        gid="mean",
    )
    ax.axvline(0, color="grey", linewidth=0.8)
    lo = min(0.0, float(shown.min()), mean)
    hi = max(0.0, float(shown.max()), mean)
    pad = 0.05 * max(hi - lo, 0.1)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlabel(xlabel)
    ax.legend(loc="lower right", fontsize=8, frameon=True)
    ax.grid(axis="x", alpha=0.3)
    extra = f" (top {n} of {len(s)} genes)" if n < len(s) else ""
    ax.set_title(title + extra, fontsize=11)
    return fig


# -- training -------------------------------------------------------------------------------


def _canonical(name: str) -> str:
    return str(name).replace("/", "_")


def load_history(history: Sequence[Mapping[str, Any]] | pd.DataFrame | str | Path) -> pd.DataFrame:
    """Training history as one row per epoch, sorted, with ``/`` in names turned into ``_``.

    Accepts the list of per-epoch dicts of :class:`magnet_st.train.trainer.FitResult`, a
    DataFrame, a ``history.json``, a Lightning ``metrics.csv`` (rows merged per epoch:
    the last value of each column wins; ``*_step`` columns dropped, ``*_epoch`` renamed)
    or a folder holding ``history.json``, ``metrics.csv`` or ``logs/metrics.csv``.
    Missing values stay NaN; without an ``epoch`` column rows are numbered from 0.
    """
    if isinstance(history, str | Path):
        path = Path(history)
        if path.is_dir():
            for name in ("history.json", "metrics.csv", "logs/metrics.csv"):
                if (path / name).is_file():
                    path = path / name
                    break
            else:
                raise FileNotFoundError(f"no history.json or metrics.csv in {path}")
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text())
            if isinstance(data, Mapping) and "history" in data:
                data = data["history"]
            df = pd.DataFrame(data)
        else:
            df = pd.read_csv(path)
    elif isinstance(history, pd.DataFrame):
        df = history.copy()
    else:
        df = pd.DataFrame(list(history))
    df = df.rename(columns=_canonical)
    df = df.loc[:, ~df.columns.duplicated()]
    df = df.drop(columns=[c for c in df.columns if c.endswith("_step")])
    for c in [c for c in df.columns if c.endswith("_epoch")]:
        base = c[: -len("_epoch")]
        df = df.drop(columns=c) if base in df.columns else df.rename(columns={c: base})
    df = df.apply(pd.to_numeric, errors="coerce")
    if "epoch" not in df.columns:
        df.insert(0, "epoch", np.arange(len(df)))
    df = df[np.isfinite(df["epoch"])]
    df = df.groupby("epoch", sort=True).last().reset_index()
    df["epoch"] = df["epoch"].astype(int)
    return df.drop(columns=[c for c in ("step",) if c in df.columns])


def _first(df: pd.DataFrame, names: Sequence[str]) -> str | None:
    for n in names:
        if n in df.columns and df[n].notna().any():
            return n
    return None


def _curve(ax: Axes, df: pd.DataFrame, col: str, label: str, **kw: Any) -> None:
    ok = df[col].notna() & np.isfinite(df[col])
    ax.plot(
        df.loc[ok, "epoch"], df.loc[ok, col], marker="o", markersize=3, label=label, gid=col, **kw
    )


def training_curves(
    history: Sequence[Mapping[str, Any]] | pd.DataFrame | str | Path,
    *,
    extra: Sequence[str] = (),
    logy: bool = False,
    title: str | None = "Training",
) -> Figure:
    """Loss per epoch (training and validation) above validation PCC-gene.

    ``history``: anything :func:`load_history` reads. Epochs where a value is missing are
    skipped, not drawn as zero. ``extra``: more loss columns (e.g. ``"train_mse"``) for
    the top panel. The best validation PCC-gene is marked.
    """
    from matplotlib.ticker import MaxNLocator

    df = load_history(history)
    fig = _figure(6.5, 5.5)
    ax_loss, ax_pcc = fig.subplots(2, 1, sharex=True)
    train = _first(df, ["train_loss", "loss"])
    val = _first(df, ["val_loss"])
    drawn = 0
    if train:
        _curve(ax_loss, df, train, "training loss", color="#4c72b0")
        drawn += 1
    if val:
        _curve(ax_loss, df, val, "validation loss", color="#dd8452")
        drawn += 1
    for col in extra:
        col = _canonical(col)
        if col in df.columns and df[col].notna().any():
            _curve(ax_loss, df, col, col.replace("_", " "), linestyle="--", linewidth=1)
            drawn += 1
    if drawn:
        ax_loss.legend(fontsize=8)
        if logy:
            ax_loss.set_yscale("log")
    else:
        ax_loss.text(
            0.5, 0.5, "no loss recorded", ha="center", va="center", transform=ax_loss.transAxes
        )
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)

    pcc = _first(df, ["val_pcc_gene", "val_pcc"])
    train_pcc = _first(df, ["train_pcc_gene"])
    if pcc:
        _curve(ax_pcc, df, pcc, "validation PCC-gene", color="#55a868")
        ok = df[pcc].notna()
        best = df.loc[ok].loc[df.loc[ok, pcc].idxmax()]
        ax_pcc.plot(
            [best["epoch"]],
            [best[pcc]],
            marker="*",
            markersize=12,
            color="#c44e52",
            linestyle="none",
            label=f"best {best[pcc]:.3f} (epoch {int(best['epoch'])})",
            gid="best",
        )
    if train_pcc:
        _curve(ax_pcc, df, train_pcc, "training PCC-gene", color="#8172b3")
    if pcc or train_pcc:
        ax_pcc.legend(fontsize=8)
    else:
        ax_pcc.text(
            0.5, 0.5, "no PCC-gene recorded", ha="center", va="center", transform=ax_pcc.transAxes
        )
    ax_pcc.set_ylabel("PCC-gene")
    ax_pcc.set_xlabel("epoch")
    ax_pcc.grid(alpha=0.3)
    ax_pcc.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


# -- cross-validation -----------------------------------------------------------------------


# Long: averages the metrics table per fold, then draws one axis in layers (boxes, jittered
# fold points, pairing lines, means, mean +- sd labels, limits, ticks, title).
def cv_summary(
    metrics: pd.DataFrame | str | Path,
    *,
    metric: str = "pcc_gene",
    level: str | None = "bin",
    order: Sequence[str] | None = None,
    paired: bool = True,
    title: str | None = None,
) -> Figure:
    """Per-model distribution of ``metric`` over cross-validation folds.

    ``metrics``: the cross-validation ``metrics.csv`` (or its folder, or its DataFrame).
    Rows of one fold (several test slides) are averaged first, as in ``summary.csv``, so
    each point is one fold; boxes show the spread, a white diamond the mean and the text
    above each box the mean +- standard deviation. The baseline (``mean_profile``) comes
    first unless ``order`` says otherwise. ``paired`` joins the points of one fold.
    """
    if isinstance(metrics, str | Path):
        path = Path(metrics)
        df = pd.read_csv(path / "metrics.csv" if path.is_dir() else path)
    else:
        df = metrics.copy()
    for col in ("model", metric):
        if col not in df.columns:
            raise KeyError(f"column {col!r} not in the metrics table (has {list(df.columns)})")
    if level is not None and "level" in df.columns:
        sub = df[df["level"] == level]
        if sub.empty:
            raise ValueError(f"no rows of level {level!r}; levels: {sorted(df['level'].unique())}")
        df = sub
    if "fold" not in df.columns:
        df = df.assign(fold=np.arange(len(df)))
    per_fold = df.groupby(["model", "fold"], sort=False)[metric].mean().reset_index()
    models = list(dict.fromkeys(per_fold["model"].astype(str)))
    if order is not None:
        models = [m for m in order if m in models] + [m for m in models if m not in order]
    elif BASELINE in models:
        models = [BASELINE] + [m for m in models if m != BASELINE]
    values = [per_fold.loc[per_fold["model"] == m, metric].dropna().to_numpy() for m in models]

    fig = _figure(max(3.8, 1.6 + 1.1 * len(models)), 4.6)
    ax = fig.add_subplot()
    pos = np.arange(1, len(models) + 1)
    ax.boxplot(
        [v if len(v) else [np.nan] for v in values],
        positions=pos,
        widths=0.5,
        whis=(0, 100),  # whiskers span every fold: there are few
        showfliers=False,
        patch_artist=True,
        boxprops={"facecolor": "#dbe4f0", "edgecolor": "#4c72b0"},
        medianprops={"color": "#4c72b0"},
    )
    rng = np.random.default_rng(0)
    folds = sorted(per_fold["fold"].unique(), key=str)
    xs: dict[Any, list[tuple[float, float]]] = {f: [] for f in folds}
    for p, m in zip(pos, models, strict=True):
        sub = per_fold[(per_fold["model"] == m) & per_fold[metric].notna()]
        jitter = rng.uniform(-0.12, 0.12, len(sub))
        x = p + jitter
        ax.scatter(x, sub[metric], s=22, color="#333333", zorder=3, gid=f"folds:{m}")
        for xi, (f, v) in zip(x, zip(sub["fold"], sub[metric], strict=True), strict=True):
            xs[f].append((xi, v))
    if paired and len(models) > 1:
        for pts in xs.values():
            if len(pts) > 1:
                a = np.array(pts)
                ax.plot(a[:, 0], a[:, 1], color="grey", alpha=0.35, linewidth=0.8, zorder=2)
    finite = [v for v in values if len(v)]
    means = [float(np.mean(v)) if len(v) else np.nan for v in values]
    ax.scatter(
        pos, means, marker="D", s=30, color="white", edgecolor="black", zorder=4, label="mean"
    )
    all_v = np.concatenate(finite) if finite else np.array([0.0])
    lo, hi = float(all_v.min()), float(all_v.max())
    span = max(hi - lo, 1e-3)
    for p, v in zip(pos, values, strict=True):
        if len(v):
            sd = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
            ax.text(
                p,
                hi + 0.06 * span,
                f"{np.mean(v):.3f}\n± {sd:.3f}",
                ha="center",
                va="bottom",
                fontsize=8,
            )
    ax.set_ylim(lo - 0.1 * span, hi + 0.3 * span)
    if metric.startswith("pcc") and lo - 0.1 * span < 0 < hi + 0.3 * span:
        ax.axhline(0, color="grey", linestyle=":", linewidth=0.8)
    long_names = max(len(m) for m in models) > 10
    ax.set_xticks(
        pos, models, rotation=30 if long_names else 0, ha="right" if long_names else "center"
    )
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if title is None:
        where = f", {level}s" if level else ""
        name = METRIC_NAMES.get(metric, metric)
        title = f"Cross-validation: {name}{where} ({len(folds)} folds)"
    ax.set_title(title, fontsize=11)
    return fig
