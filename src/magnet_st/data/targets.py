"""Regression targets from raw counts, and back.

``log1p`` (the default, as in the MagNet paper) needs no fitted statistics.
``log1p_zscore`` standardises each gene with a mean and standard deviation fitted on
the training slides; the statistics are stored with the dataset and the model, so a
new slide needs nothing from its own counts. ``log1p_cp10k`` is log1p of library-size
normalised counts (counts per 10,000 of the unit's total over all genes, as scanpy's
``normalize_total(target_sum=1e4)`` then ``log1p``): the dataset scales each unit's
counts when it reads them (:func:`per_10k_rows`, ``Dataset.counts``). It takes a
section's sequencing depth out of the targets; measured on her2st it also takes out the
cellularity that a spot's total counts follow (every model's PCC-gene fell by a third,
docs/results.md), so ``log1p`` stays the default.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp

from magnet_st.errors import ConfigError

KINDS = ("log1p", "log1p_zscore", "log1p_cp10k")
TARGET_SUM = 1e4


def per_10k_scale(totals: np.ndarray) -> np.ndarray:
    """Factors that bring each unit's counts to counts per 10,000 of its total
    (``totals``: every gene's counts of the unit, not only the panel's); a unit without
    counts keeps factor 1e4 on its zeros."""
    return TARGET_SUM / np.maximum(np.asarray(totals, dtype=np.float64).ravel(), 1.0)


def per_10k_rows(counts: sp.spmatrix, totals: np.ndarray) -> sp.csr_matrix:
    """Counts per 10,000 of each unit's total (:func:`per_10k_scale`), as float32 CSR."""
    if len(np.ravel(totals)) != counts.shape[0]:
        raise ValueError(f"{len(np.ravel(totals))} totals for {counts.shape[0]} units")
    return sp.csr_matrix(sp.diags(per_10k_scale(totals)) @ sp.csr_matrix(counts), dtype=np.float32)


@dataclass
class TargetTransform:
    kind: str = "log1p"
    mean: list[float] | None = None
    std: list[float] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown target transform {self.kind!r}; choose one of {KINDS}")

    @property
    def needs_fit(self) -> bool:
        return self.kind == "log1p_zscore"

    @property
    def per_10k(self) -> bool:
        """Whether counts are library-size normalised (:func:`per_10k_rows`) before ``log1p``."""
        return self.kind == "log1p_cp10k"

    @property
    def scale(self) -> str:
        """The scale predictions are reported on, in words."""
        return "log1p(counts per 10,000)" if self.per_10k else "log1p(counts)"

    def fit(self, counts: Iterable[sp.spmatrix | np.ndarray]) -> TargetTransform:
        """Fit statistics on the training slides' panel counts (units x panel genes; any
        iterable of matrices, e.g. a generator of row chunks)."""
        if not self.needs_fit:
            return self
        n, mean, var = log1p_moments(counts)
        if n == 0:
            raise ConfigError("cannot fit target statistics on no units")
        std = np.sqrt(var)
        self.mean = mean.tolist()
        self.std = np.where(std > 1e-6, std, 1.0).tolist()
        return self

    def transform(self, counts: sp.spmatrix | np.ndarray) -> np.ndarray:
        """Dense float32 targets for ``counts`` (units x panel genes)."""
        return self.from_log1p(np.asarray(_log1p(counts).todense(), dtype=np.float32))

    def from_log1p(self, y: np.ndarray) -> np.ndarray:
        """Targets from values on the log1p scale (the inverse of :meth:`inverse`); since
        the transform is affine per gene, it also maps a log1p mean to the target mean."""
        y = np.asarray(y, dtype=np.float32)
        if self.kind == "log1p_zscore":
            self._check_fitted()
            y = (y - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return y

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """Targets back to the log1p scale (the scale predictions are reported on)."""
        if self.kind == "log1p_zscore":
            self._check_fitted()
            return y * np.asarray(self.std, np.float32) + np.asarray(self.mean, np.float32)
        return y

    def _check_fitted(self) -> None:
        if self.mean is None or self.std is None:
            raise ConfigError("target transform 'log1p_zscore' used before it was fitted")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TargetTransform:
        return cls(**d)


def log1p_moments(
    counts: Iterable[sp.spmatrix | np.ndarray], chunk: int = 20_000
) -> tuple[int, np.ndarray, np.ndarray]:
    """``(n, mean, var)``: the number of rows and each gene's mean and (population)
    variance of ``log1p(counts)`` over the rows of every matrix of ``counts`` (units x
    genes, sparse or dense; consumed one at a time, so a generator keeps one in memory).

    The one implementation of these statistics (target z-scores, the mean-profile baseline,
    the head bias, the top-variable genes). Rows are read ``chunk`` at a time and converted
    to float64 before ``log1p``; each chunk's mean and sum of squared deviations are merged
    into the running ones (Chan et al.), all in float64, so float32 counts, millions of
    rows or a gene of nearly constant value lose no precision; memory is bounded by one
    chunk. With no rows, the mean and variance are zeros.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    n, mean, m2 = 0, None, None
    for c in counts:
        if mean is None or m2 is None:
            mean = np.zeros(c.shape[1], np.float64)
            m2 = np.zeros(c.shape[1], np.float64)
        elif c.shape[1] != len(mean):
            raise ValueError(f"matrices of {len(mean)} and {c.shape[1]} genes")
        if sp.issparse(c):
            c = sp.csr_matrix(c)
        for i in range(0, c.shape[0], chunk):
            rows, m_c, m2_c = _chunk_moments(c[i : i + chunk])
            if rows == 0:
                continue
            delta = m_c - mean
            total = n + rows
            mean += delta * (rows / total)
            m2 += m2_c + delta**2 * (n * rows / total)
            n = total
    if mean is None or m2 is None:
        return 0, np.zeros(0), np.zeros(0)
    return n, mean, (m2 / n if n else m2)


def _chunk_moments(part: sp.spmatrix | np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Rows, per-gene mean and sum of squared deviations of ``log1p(part)``, in float64."""
    rows = part.shape[0]
    if not sp.issparse(part):
        y = np.log1p(np.asarray(part, dtype=np.float64))
        mean = y.mean(axis=0) if rows else np.zeros(y.shape[1])
        return rows, mean, ((y - mean) ** 2).sum(axis=0)
    y = sp.csr_matrix(part, dtype=np.float64, copy=True)
    y.sum_duplicates()
    y.data = np.log1p(y.data)
    g = y.shape[1]
    mean = np.asarray(y.sum(axis=0)).ravel() / max(rows, 1)
    d = y.data - mean[y.indices]
    nnz = np.bincount(y.indices, minlength=g)
    m2 = np.bincount(y.indices, weights=d * d, minlength=g) + (rows - nnz) * mean**2
    return rows, mean, m2


def _log1p(counts: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    m = sp.csr_matrix(counts, dtype=np.float32)
    m.data = np.log1p(m.data)
    return m
