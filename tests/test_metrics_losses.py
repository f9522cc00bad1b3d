"""Metrics and losses against numpy / scipy on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from magnet_st.losses import LossWeights, aggregate_bins, magnet_loss, pcc_rows
from magnet_st.metrics import evaluate, pcc_per_gene, pcc_per_unit, summarize


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.gamma(2.0, 1.0, (40, 12))
    p = y + rng.normal(0, 0.8, y.shape)
    return y, p


def test_pcc_gene_and_unit_match_scipy() -> None:
    y, p = _data()
    g = pcc_per_gene(y, p)
    u = pcc_per_unit(y, p)
    np.testing.assert_allclose(g, [pearsonr(y[:, j], p[:, j])[0] for j in range(12)], rtol=1e-10)
    np.testing.assert_allclose(u, [pearsonr(y[i], p[i])[0] for i in range(40)], rtol=1e-10)


def test_evaluate_values_and_skipped_constants() -> None:
    y, p = _data(1)
    y[:, 3] = 2.0  # a gene constant in this slide: skipped
    y[7] = 2.0  # a unit constant across genes: skipped
    p[5] = 1.0  # a unit predicted constant: r = 0
    m = evaluate(y, p, top_genes=np.array([0, 1]))
    assert m["mse"] == pytest.approx(np.mean((y - p) ** 2))
    assert m["mae"] == pytest.approx(np.mean(np.abs(y - p)))
    genes = [pearsonr(y[:, j], p[:, j])[0] for j in range(12) if j != 3]
    assert m["pcc_gene"] == pytest.approx(np.mean(genes))
    assert m["genes_skipped"] == 1 and m["units_skipped"] == 1
    units = [0.0 if i == 5 else pearsonr(y[i], p[i])[0] for i in range(40) if i != 7]
    assert m["pcc_unit"] == pytest.approx(np.mean(units))
    assert m["pcc_gene_top"] == pytest.approx(np.mean(genes[:2]))


def test_mean_profile_scores_high_pcc_unit_but_zero_pcc_gene() -> None:
    """Why the two PCCs must be named apart: a constant mean profile."""
    rng = np.random.default_rng(2)
    levels = np.linspace(0.1, 5, 30)
    y = levels + rng.normal(0, 0.3, (200, 30))
    mean_profile = np.tile(y.mean(axis=0), (200, 1))
    m = evaluate(y, mean_profile)
    assert m["pcc_unit"] > 0.9
    assert m["pcc_gene"] == 0.0 and m["genes_skipped"] == 0


def test_summarize_mean_std() -> None:
    rows = [{"a": 1.0}, {"a": 3.0}, {"a": float("nan")}]
    assert summarize(rows, ["a"])["a"] == pytest.approx((2.0, np.std([1, 3], ddof=1)))


def test_torch_pcc_rows_matches_numpy() -> None:
    y, p = _data(3)
    got = pcc_rows(torch.tensor(p), torch.tensor(y)).item()
    assert got == pytest.approx(np.mean(pcc_per_unit(y, p)), rel=1e-6)


def test_aggregate_bins_sums_counts_on_log1p_scale() -> None:
    counts = np.array([[1.0, 0.0], [2.0, 5.0], [0.0, 3.0]])
    member = torch.tensor([0, 0, 1])
    agg = aggregate_bins(torch.log1p(torch.tensor(counts)), member, 2)
    np.testing.assert_allclose(agg.numpy(), np.log1p([[3.0, 5.0], [0.0, 3.0]]), rtol=1e-6)


def test_magnet_loss_weights_and_consistency_forms() -> None:
    rng = np.random.default_rng(4)
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    out = {
        "bin": t(rng.random((6, 5))),
        "spot": t(rng.random((2, 5))),
        "region": t(rng.random((1, 5))),
    }
    batch = {
        "y_bin": t(rng.random((6, 5))),
        "y_spot": t(rng.random((2, 5))),
        "y_region": t(rng.random((1, 5))),
        "bin_spot": torch.tensor([0, 0, 0, 1, 1, 1]),
        "bin_region": torch.zeros(6, dtype=torch.long),
        "spot_complete": torch.tensor([True, False]),
        "region_complete": torch.tensor([True]),
    }
    w = LossWeights()
    parts = magnet_loss(out, batch, w, "aggregate")
    mse = np.mean((out["bin"].numpy() - batch["y_bin"].numpy()) ** 2)
    assert parts["mse"].item() == pytest.approx(mse, rel=1e-6)
    expect = (
        0.75 * parts["mse"]
        + 0.10 * parts["pcc"]
        + 0.05 * (parts["pcc_spot"] + parts["pcc_region"])
        + 0.05 * parts["consistency"]
    )
    assert parts["loss"].item() == pytest.approx(expect.item(), rel=1e-6)
    # aggregate form: only the complete spot tile 0 counts at the spot level
    agg = aggregate_bins(out["bin"], batch["bin_spot"], 2)
    agg_r = aggregate_bins(out["bin"], batch["bin_region"], 1)
    # as 1 - Pearson r across genes (scipy), per complete tile
    cons = (1 - pearsonr(out["spot"][0].numpy(), agg[0].numpy())[0]) + (
        1 - pearsonr(out["region"][0].numpy(), agg_r[0].numpy())[0]
    )
    assert parts["consistency"].item() == pytest.approx(cons, rel=1e-5)
    # paper form: coarse prediction per bin against the bin's truth
    parts = magnet_loss(out, batch, w, "paper")
    cons = ((out["spot"][batch["bin_spot"]] - batch["y_bin"]) ** 2).mean() + (
        (out["region"][batch["bin_region"]] - batch["y_bin"]) ** 2
    ).mean()
    assert parts["consistency"].item() == pytest.approx(cons.item(), rel=1e-6)
    # bin-only output (no-context ablation): no context terms
    parts = magnet_loss({"bin": out["bin"]}, batch, w, "aggregate")
    assert set(parts) == {"mse", "pcc", "loss"}
    # the optional MSE on the coarse heads (not in the paper) adds w * (MSE spot + MSE region)
    plain = magnet_loss(out, batch, w, "paper")
    extra = magnet_loss(out, batch, LossWeights(context_mse=0.2), "paper")
    mse_ctx = sum(
        np.mean((out[lv].numpy() - batch[f"y_{lv}"].numpy()) ** 2) for lv in ("spot", "region")
    )
    assert extra["loss"].item() == pytest.approx(plain["loss"].item() + 0.2 * mse_ctx, rel=1e-6)
    assert "mse_spot" not in plain
