"""Accuracy metrics, named apart because they are not comparable (docs/design.md).

- ``pcc_gene``: Pearson per gene across the units of a slide, averaged over genes (the
  field's usual metric: HEST, TRIPLEX, Img2ST-Net). Genes whose truth is constant in the
  slide are skipped and counted; a constant prediction scores 0 (so the mean-profile
  baseline scores exactly 0).
- ``pcc_unit``: Pearson per unit across genes, averaged over units (the MagNet paper's
  "PCC"). Inflated by genes' different mean levels: a constant mean profile already scores
  high. Units whose truth is constant across genes are skipped and counted; a constant
  prediction scores 0.
- ``mse`` and ``mae`` over all (unit, gene) values.
"""

from __future__ import annotations

import numpy as np


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r of each row pair, and a mask of rows where it is defined."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    na = np.sqrt((a * a).sum(axis=1))
    nb = np.sqrt((b * b).sum(axis=1))
    tol_a = 1e-9 * np.sqrt(a.shape[1]) * (1 + np.abs(a).max(axis=1, initial=0))
    tol_b = 1e-9 * np.sqrt(b.shape[1]) * (1 + np.abs(b).max(axis=1, initial=0))
    ok = na > tol_a
    r = np.full(len(a), np.nan)
    r[ok] = 0.0  # a constant prediction carries no correlation: r = 0
    both = ok & (nb > tol_b)
    r[both] = (a[both] * b[both]).sum(axis=1) / (na[both] * nb[both])
    return r, ok


def pcc_per_gene(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Pearson r per gene (column) across units; NaN where the truth is constant, 0 where
    only the prediction is."""
    return _pearson_rows(np.asarray(y_true).T, np.asarray(y_pred).T)[0]


def pcc_per_unit(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Pearson r per unit (row) across genes; NaN where the truth is constant, 0 where only
    the prediction is."""
    return _pearson_rows(y_true, y_pred)[0]


def evaluate(
    y_true: np.ndarray, y_pred: np.ndarray, top_genes: np.ndarray | None = None
) -> dict[str, float]:
    """All metrics for one slide: ``units x genes`` arrays on the same (log1p) scale.

    ``top_genes``: column indices of the genes for ``pcc_gene_top`` (e.g. the 50 most
    variable genes of the training slides).
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"shapes differ: {y_true.shape} vs {y_pred.shape}")
    diff = y_pred - y_true
    r_gene = pcc_per_gene(y_true, y_pred)
    r_unit = pcc_per_unit(y_true, y_pred)
    out = {
        "mse": float(np.mean(diff**2)),
        "mae": float(np.mean(np.abs(diff))),
        "pcc_gene": float(np.nanmean(r_gene)) if np.isfinite(r_gene).any() else float("nan"),
        "pcc_unit": float(np.nanmean(r_unit)) if np.isfinite(r_unit).any() else float("nan"),
        "genes_skipped": int(np.isnan(r_gene).sum()),
        "units_skipped": int(np.isnan(r_unit).sum()),
        "n_units": int(y_true.shape[0]),
        "n_genes": int(y_true.shape[1]),
    }
    if top_genes is not None:
        top = r_gene[np.asarray(top_genes)]
        out["pcc_gene_top"] = float(np.nanmean(top)) if np.isfinite(top).any() else float("nan")
    return out


class GenePearson:
    """PCC-gene from streamed chunks of units: per-gene sums in float64 (memory: a few
    vectors of length ``genes``, whatever the number of units). ``state`` is a
    ``(7, genes)`` array that adds up across chunks, slides' parts or processes (sum it over
    DDP ranks, then :meth:`from_state`; its last row, the largest value seen, only sets the
    tolerance for "constant", so a sum of it just loosens that tolerance). ``shift``: per-gene values subtracted before
    summing (e.g. the training mean), which keeps the sums well conditioned; 0 by default.
    Same conventions as :func:`pcc_per_gene`: NaN where the truth is constant, 0 where only
    the prediction is."""

    def __init__(self, n_genes: int, shift: np.ndarray | None = None):
        self.shift = np.zeros(n_genes) if shift is None else np.asarray(shift, np.float64)
        # rows: n, sum t, sum p, sum t^2, sum p^2, sum t*p, max(|t|, |p|)
        self.state = np.zeros((7, n_genes))

    def update(self, y_true: np.ndarray, y_pred: np.ndarray) -> None:
        t = np.asarray(y_true, np.float64) - self.shift
        p = np.asarray(y_pred, np.float64) - self.shift
        s = self.state
        s[0] += t.shape[0]
        s[1] += t.sum(0)
        s[2] += p.sum(0)
        s[3] += (t * t).sum(0)
        s[4] += (p * p).sum(0)
        s[5] += (t * p).sum(0)
        if t.shape[0]:
            s[6] = np.maximum(s[6], np.maximum(np.abs(t).max(0), np.abs(p).max(0)))

    @classmethod
    def from_state(cls, state: np.ndarray, shift: np.ndarray | None = None) -> GenePearson:
        out = cls(np.shape(state)[1], shift)
        out.state = np.array(state, dtype=np.float64)
        return out

    def compute(self) -> np.ndarray:
        n, st, sp_, stt, spp, stp, peak = self.state
        with np.errstate(invalid="ignore", divide="ignore"):
            var_t = np.maximum(stt - st * st / np.maximum(n, 1), 0.0)
            var_p = np.maximum(spp - sp_ * sp_ / np.maximum(n, 1), 0.0)
            cov = stp - st * sp_ / np.maximum(n, 1)
            # a spread this small relative to the values is rounding, not signal
            tol = 1e-7 * np.sqrt(np.maximum(n, 1)) * (1 + peak)
            ok_t = np.sqrt(var_t) > tol
            ok_p = np.sqrt(var_p) > tol
            r = np.full(len(n), np.nan)
            r[ok_t] = 0.0
            both = ok_t & ok_p
            r[both] = cov[both] / np.sqrt(var_t[both] * var_p[both])
        return np.clip(r, -1.0, 1.0)


class StreamingEvaluation:
    """:func:`evaluate` over chunks of units (rows), with bounded memory: MSE and MAE from
    sums, PCC-gene from :class:`GenePearson`, PCC-unit row by row. Feed every chunk of a
    slide with :meth:`update`, then :meth:`result`."""

    def __init__(self, n_genes: int):
        self.genes = GenePearson(n_genes)
        self.n, self.sq, self.abs = 0, 0.0, 0.0
        self.r_unit: list[np.ndarray] = []

    def update(self, y_true: np.ndarray, y_pred: np.ndarray) -> None:
        y_true = np.asarray(y_true, dtype=np.float64)
        y_pred = np.asarray(y_pred, dtype=np.float64)
        if y_true.shape != y_pred.shape:
            raise ValueError(f"shapes differ: {y_true.shape} vs {y_pred.shape}")
        diff = y_pred - y_true
        self.n += diff.size
        self.sq += float((diff * diff).sum())
        self.abs += float(np.abs(diff).sum())
        self.genes.update(y_true, y_pred)
        self.r_unit.append(pcc_per_unit(y_true, y_pred))

    def result(self, top_genes: np.ndarray | None = None) -> dict[str, float]:
        r_gene = self.genes.compute()
        r_unit = np.concatenate(self.r_unit) if self.r_unit else np.zeros(0)
        out = {
            "mse": self.sq / max(self.n, 1),
            "mae": self.abs / max(self.n, 1),
            "pcc_gene": float(np.nanmean(r_gene)) if np.isfinite(r_gene).any() else float("nan"),
            "pcc_unit": float(np.nanmean(r_unit)) if np.isfinite(r_unit).any() else float("nan"),
            "genes_skipped": int(np.isnan(r_gene).sum()),
            "units_skipped": int(np.isnan(r_unit).sum()),
            "n_units": int(len(r_unit)),
            "n_genes": int(len(r_gene)),
        }
        if top_genes is not None:
            top = r_gene[np.asarray(top_genes)]
            out["pcc_gene_top"] = float(np.nanmean(top)) if np.isfinite(top).any() else float("nan")
        return out


class BetweenGroupShare:
    """The share of a prediction's variance that lies between groups of units (e.g. the
    bins of one spot tile), pooled over genes: sum over genes of the between-group sum of
    squares over the sum over genes of the total sum of squares. 1 means every unit of a
    group gets the same values (predictions collapsed to tile averages); the truth's share
    says what to expect. Streamed: per-group sums only."""

    def __init__(self, n_groups: int, n_genes: int):
        self.sums = np.zeros((n_groups, n_genes))
        self.n = np.zeros(n_groups)
        self.total = np.zeros(n_genes)
        self.total_sq = np.zeros(n_genes)

    def update(self, values: np.ndarray, groups: np.ndarray) -> None:
        v = np.asarray(values, np.float64)
        np.add.at(self.sums, groups, v)
        np.add.at(self.n, groups, 1)
        self.total += v.sum(0)
        self.total_sq += (v * v).sum(0)

    def compute(self) -> float:
        n = self.n.sum()
        if n < 2:
            return float("nan")
        seen = self.n > 0
        between = (self.sums[seen] ** 2 / self.n[seen, None]).sum(0) - self.total**2 / n
        total = self.total_sq - self.total**2 / n
        # a constant prediction (the mean profile) has no variance to share: rounding only
        if total.sum() <= 1e-9 * max(float(self.total_sq.sum()), 1e-300):
            return float("nan")
        return float(between.sum() / total.sum())


def summarize(rows: list[dict[str, float]], keys: list[str]) -> dict[str, tuple[float, float]]:
    """Mean and sample standard deviation (ddof=1) of ``keys`` over folds; one fold has no
    spread: its standard deviation is NaN (tables print "n/a"), never 0."""
    out = {}
    for k in keys:
        v = np.array([r[k] for r in rows if k in r], dtype=np.float64)
        v = v[np.isfinite(v)]
        if len(v) == 0:
            out[k] = (float("nan"), float("nan"))
        else:
            out[k] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"))
    return out


def chosen_epochs(history: list[dict]) -> int | None:
    """The number of epochs early stopping chose: up to the first epoch with the best
    validation PCC-gene (the checkpoint kept); ``None`` without validation scores."""
    scored = [(r["val/pcc_gene"], -int(r["epoch"])) for r in history if "val/pcc_gene" in r]
    if not scored:
        return None
    return -max(scored)[1] + 1
