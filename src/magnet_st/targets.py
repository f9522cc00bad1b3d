"""Regression targets from raw counts, and back.

``log1p`` (the default, as in the MagNet paper) needs no fitted statistics.
``log1p_zscore`` standardises each gene with a mean and standard deviation fitted on
the training slides; the statistics are stored with the dataset and the model, so a
new slide needs nothing from its own counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp

from magnet_st.errors import ConfigError

KINDS = ("log1p", "log1p_zscore")


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

    def fit(self, counts: list[sp.spmatrix | np.ndarray]) -> TargetTransform:
        """Fit statistics on the training slides' panel counts (units x panel genes)."""
        if not self.needs_fit:
            return self
        n = sum(c.shape[0] for c in counts)
        s1 = sum(np.asarray(_log1p(c).sum(axis=0), dtype=np.float64).ravel() for c in counts)
        s2 = sum(np.asarray(_log1p(c).power(2).sum(axis=0)).ravel() for c in counts)
        mean = s1 / n
        std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
        self.mean = mean.tolist()
        self.std = np.where(std > 1e-6, std, 1.0).tolist()
        return self

    def transform(self, counts: sp.spmatrix | np.ndarray) -> np.ndarray:
        """Dense float32 targets for ``counts`` (units x panel genes)."""
        y = np.asarray(_log1p(counts).todense(), dtype=np.float32)
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


def _log1p(counts: sp.spmatrix | np.ndarray) -> sp.csr_matrix:
    m = sp.csr_matrix(counts, dtype=np.float32)
    m.data = np.log1p(m.data)
    return m
