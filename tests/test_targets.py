"""targets: the one implementation of per-gene log1p moments, and the transforms built on it."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from magnet_st.data.targets import TargetTransform, log1p_moments


def _reference(dense: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    y = np.log1p(np.concatenate(dense).astype(np.float64))
    return y.mean(axis=0), y.var(axis=0)


def test_log1p_moments_match_numpy_over_chunks_and_matrices() -> None:
    rng = np.random.default_rng(0)
    mats = [
        sp.random(n, 7, density=0.3, format="csr", random_state=rng, dtype=np.float64)
        for n in (53, 1, 200)
    ]
    for m in mats:
        m.data = np.round(m.data * 50)
    dense = [m.toarray() for m in mats]
    mean, var = _reference(dense)
    for chunk in (1, 7, 64, 10_000):
        n, got_mean, got_var = log1p_moments(mats, chunk=chunk)
        assert n == 254
        np.testing.assert_allclose(got_mean, mean, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(got_var, var, rtol=1e-10, atol=1e-14)
    # dense input, other sparse formats and a generator give the same
    for counts in (dense, [m.tocsc() for m in mats], (m for m in mats)):
        n, got_mean, got_var = log1p_moments(counts, chunk=16)
        np.testing.assert_allclose(got_mean, mean, rtol=1e-12)
        np.testing.assert_allclose(got_var, var, rtol=1e-10)
    n, got_mean, got_var = log1p_moments([])
    assert n == 0 and got_mean.size == 0 and got_var.size == 0


def test_log1p_moments_accumulate_float32_input_in_float64() -> None:
    # 300,000 float32 units of large counts: float32 sums of log1p (~14 each, ~4e6 in all)
    # keep about 7 digits, so the variance (small beside the squared mean) would be lost
    rng = np.random.default_rng(1)
    n, g = 300_000, 3
    dense = rng.integers(1_000_000, 1_200_000, size=(n, g)).astype(np.float32)
    dense[:, 2] = 1_100_000.0  # one gene without variance
    counts = sp.csr_matrix(dense)
    assert counts.dtype == np.float32
    mean, var = _reference([dense])
    got_n, got_mean, got_var = log1p_moments([counts[: n // 2], counts[n // 2 :]], chunk=50_000)
    assert got_n == n and got_mean.dtype == np.float64 and got_var.dtype == np.float64
    np.testing.assert_allclose(got_mean, mean, rtol=1e-10)
    np.testing.assert_allclose(got_var[:2], var[:2], rtol=1e-6)
    assert got_var[2] < 1e-9
    # the statistics fitted for z-scores are these
    tt = TargetTransform("log1p_zscore").fit([counts[: n // 2], counts[n // 2 :]])
    np.testing.assert_allclose(tt.mean, mean, rtol=1e-10)
    np.testing.assert_allclose(tt.std[:2], np.sqrt(var[:2]), rtol=1e-6)
    assert tt.std[2] == 1.0  # no variance: unit scale


def test_target_mean_is_the_transformed_log1p_mean() -> None:
    from magnet_st.train.trainer import target_mean

    rng = np.random.default_rng(2)
    counts = [sp.random(n, 5, density=0.4, format="csr", random_state=rng) for n in (40, 90)]
    for c in counts:
        c.data = np.round(c.data * 20)
    y = np.log1p(np.concatenate([c.toarray() for c in counts]))
    log1p = TargetTransform("log1p")
    np.testing.assert_allclose(target_mean(log1p, counts, chunk=16), y.mean(axis=0), rtol=1e-6)
    z = TargetTransform("log1p_zscore").fit(counts)
    expect = np.concatenate([z.transform(c) for c in counts]).astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(target_mean(z, counts, chunk=16), expect, atol=1e-6)
    np.testing.assert_allclose(expect, 0.0, atol=1e-6)  # z-scored on these very counts


def test_fit_on_no_units_is_an_error() -> None:
    from magnet_st.errors import ConfigError

    with pytest.raises(ConfigError, match="no units"):
        TargetTransform("log1p_zscore").fit([sp.csr_matrix((0, 4))])
