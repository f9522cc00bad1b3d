"""Metrics and losses against numpy / scipy on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import pearsonr

from magnet_st.model.losses import (
    LossWeights,
    aggregate_bins,
    magnet_loss,
    pcc,
    pcc_rows,
    rate_consistency,
)
from magnet_st.model.metrics import evaluate, pcc_per_gene, pcc_per_unit, summarize


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
    one = summarize(rows[:1], ["a"])["a"]  # one fold: no spread, not a spread of 0
    assert one[0] == 1.0 and np.isnan(one[1])


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
    counts = {lv: rng.integers(0, 6, batch[f"y_{lv}"].shape) for lv in ("bin", "spot", "region")}
    for lv, c in counts.items():
        batch[f"y_{lv}"] = torch.log1p(t(c))
        out[f"rate_{lv}"] = t(rng.random(c.shape) * 3 + 0.1)
    parts = magnet_loss(out, batch, w, "aggregate")
    mse = np.mean((out["bin"].numpy() - batch["y_bin"].numpy()) ** 2)
    assert parts["mse"].item() == pytest.approx(mse, rel=1e-6)
    expect = (
        0.75 * parts["mse"]
        + 0.10 * parts["pcc"]
        + 0.05 * (parts["pcc_spot"] + parts["pcc_region"])
        + 0.05 * parts["consistency"]
        + 0.05 * parts["poisson"]
        + 0.75 * (parts["mse_spot"] + parts["mse_region"])  # context_mse (ours)
    )
    assert parts["loss"].item() == pytest.approx(expect.item(), rel=1e-6)
    spot_mse = np.mean((out["spot"].numpy() - batch["y_spot"].numpy()) ** 2)
    assert parts["mse_spot"].item() == pytest.approx(spot_mse, rel=1e-6)
    # Poisson term: mean(rate - counts * log(rate)) per level, summed over levels
    pois = sum(
        np.mean(out[f"rate_{lv}"].numpy() - c * np.log(out[f"rate_{lv}"].numpy() + 1e-8))
        for lv, c in counts.items()
    )
    assert parts["poisson"].item() == pytest.approx(pois, rel=1e-5)
    # aggregate form: only the complete spot tile 0 (bins 0-2) counts at the spot level;
    # squared log1p gap between the tile's rate and the sum of its bins' rates
    rb = out["rate_bin"].numpy()
    cons = np.mean((np.log1p(out["rate_spot"][0].numpy()) - np.log1p(rb[:3].sum(0))) ** 2)
    cons += np.mean((np.log1p(out["rate_region"][0].numpy()) - np.log1p(rb.sum(0))) ** 2)
    assert parts["consistency"].item() == pytest.approx(cons, rel=1e-5)
    with pytest.raises(ValueError, match="rate heads"):
        magnet_loss({k: v for k, v in out.items() if k != "rate_spot"}, batch, w, "aggregate")
    # paper form: coarse prediction per bin against the bin's truth
    parts = magnet_loss(out, batch, w, "paper")
    cons = ((out["spot"][batch["bin_spot"]] - batch["y_bin"]) ** 2).mean() + (
        (out["region"][batch["bin_region"]] - batch["y_bin"]) ** 2
    ).mean()
    assert parts["consistency"].item() == pytest.approx(cons.item(), rel=1e-6)
    # bin-only output (no-context ablation): no context terms
    parts = magnet_loss({"bin": out["bin"]}, batch, w, "aggregate")
    assert set(parts) == {"mse", "pcc", "loss"}
    parts = magnet_loss({"bin": out["bin"]}, batch, w, "paper")
    assert set(parts) == {"mse", "pcc", "loss"}
    # the optional MSE on the coarse heads (not in the paper) adds w * (MSE spot + MSE region)
    plain = magnet_loss(out, batch, LossWeights(context_mse=0.0), "paper")  # the paper's
    extra = magnet_loss(out, batch, LossWeights(context_mse=0.2), "paper")
    mse_ctx = sum(
        np.mean((out[lv].numpy() - batch[f"y_{lv}"].numpy()) ** 2) for lv in ("spot", "region")
    )
    assert extra["loss"].item() == pytest.approx(plain["loss"].item() + 0.2 * mse_ctx, rel=1e-6)
    assert "mse_spot" not in plain


def _poisson_log1p_mean(rate: np.ndarray) -> np.ndarray:
    """E[log1p X] for X ~ Poisson(rate), exactly (series)."""
    from scipy.stats import poisson

    k = np.arange(400)[:, None]
    return (poisson.pmf(k, np.ravel(rate)[None, :]) * np.log1p(k)).sum(0).reshape(np.shape(rate))


def test_aggregate_consistency_is_zero_for_the_true_model_on_poisson_bins() -> None:
    """49 Poisson bins per tile at rates 0.1 / 0.3 / 1 / 3 (one gene each): the true model
    scores 0 consistency; the earlier log1p aggregate was biased by 0.14-0.27 log1p units."""
    rates = np.array([0.1, 0.3, 1.0, 3.0])
    n_bins, n_tiles = 49, 3
    rng = np.random.default_rng(0)
    bin_rate = np.tile(rates, (n_bins * n_tiles, 1)) * rng.uniform(0.5, 1.5, (n_bins * n_tiles, 4))
    member = torch.arange(n_tiles).repeat_interleave(n_bins)
    tile_rate = np.stack([bin_rate[i * n_bins : (i + 1) * n_bins].sum(0) for i in range(n_tiles)])
    done = torch.ones(n_tiles, dtype=torch.bool)
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    # the true model: rate heads at the true expected counts
    true_cons = rate_consistency(t(tile_rate), t(bin_rate), member, done).item()
    assert true_cons == pytest.approx(0.0, abs=1e-12)
    # a model whose bin rates are what a log1p-MSE head implies, expm1(E[log1p X]): biased low
    implied = np.expm1(_poisson_log1p_mean(bin_rate))
    assert rate_consistency(t(tile_rate), t(implied), member, done).item() > 0.01
    # the earlier form: log1p(sum(expm1(E[log1p X_bin]))) vs the true coarse E[log1p T]
    agg = aggregate_bins(t(_poisson_log1p_mean(bin_rate)), member, n_tiles).numpy()
    gap = _poisson_log1p_mean(tile_rate) - agg
    assert np.all(gap > 0.1), gap  # Jensen: the aggregate of correct bin predictions is low
    # the Poisson term is minimised at the true rate (its gradient vanishes there)
    counts = rng.poisson(2.0, 20000).astype(float)
    r = torch.tensor([counts.mean()], requires_grad=True)
    F.poisson_nll_loss(r.expand(len(counts)), t(counts).float(), log_input=False).backward()
    assert abs(r.grad.item()) < 1e-6


def test_pcc_axes_match_scipy() -> None:
    y, p = _data(5)
    per_unit = pcc(torch.tensor(p), torch.tensor(y), "unit").item()
    per_gene = pcc(torch.tensor(p), torch.tensor(y), "gene").item()
    assert per_unit == pytest.approx(np.mean(pcc_per_unit(y, p)), rel=1e-6)
    assert per_gene == pytest.approx(np.mean(pcc_per_gene(y, p)), rel=1e-6)
    assert per_gene != pytest.approx(per_unit, rel=1e-3)
    # the loss uses the axis it is given
    batch = {"y_bin": torch.tensor(y, dtype=torch.float32)}
    out = {"bin": torch.tensor(p, dtype=torch.float32)}
    parts = magnet_loss(out, batch, LossWeights(), "none", pcc_axis="gene")
    assert parts["pcc"].item() == pytest.approx(1 - per_gene, rel=1e-5)
    with pytest.raises(ValueError, match="axis"):
        pcc(out["bin"], batch["y_bin"], "spot")


def test_streaming_evaluation_matches_evaluate_in_chunks_and_across_ranks() -> None:
    from magnet_st.model.metrics import GenePearson, StreamingEvaluation

    rng = np.random.default_rng(9)
    y = np.log1p(rng.poisson(rng.gamma(1.0, 2.0, 12), (500, 12))).astype(np.float32)
    p = (y + rng.normal(0, 0.7, y.shape)).astype(np.float32)
    y[:, 3] = 1.0  # a constant gene: skipped (NaN)
    p[:, 5] = 0.5  # a constant prediction: r = 0
    ref = evaluate(y, p, top_genes=np.array([0, 3, 5]))
    stream = StreamingEvaluation(12)
    for i in range(0, 500, 73):
        stream.update(y[i : i + 73], p[i : i + 73])
    got = stream.result(top_genes=np.array([0, 3, 5]))
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    # sums from two processes' parts add up to the whole slide's PCC-gene
    a, b = GenePearson(12), GenePearson(12)
    a.update(y[:200], p[:200])
    b.update(y[200:], p[200:])
    merged = GenePearson.from_state(a.state + b.state).compute()
    np.testing.assert_allclose(merged, pcc_per_gene(y, p), rtol=1e-9, atol=1e-12)
    assert np.isnan(merged[3]) and merged[5] == 0.0


def test_between_group_share_shows_collapse_to_tile_averages() -> None:
    from magnet_st.model.metrics import BetweenGroupShare

    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(40), 25)
    own = rng.normal(size=(1000, 6))  # every unit its own value: little between groups
    tile = rng.normal(size=(40, 6))[groups]  # every unit its tile's value: all between
    for values, lo, hi in ((own, 0.0, 0.1), (tile, 1 - 1e-9, 1 + 1e-9)):
        share = BetweenGroupShare(40, 6)
        for i in range(0, 1000, 300):  # streamed in chunks
            share.update(values[i : i + 300], groups[i : i + 300])
        assert lo <= share.compute() <= hi
    # against the definition: between-group over total sum of squares, pooled over genes
    mix = own + tile
    share = BetweenGroupShare(40, 6)
    share.update(mix, groups)
    means = np.stack([mix[groups == g].mean(0) for g in range(40)])
    between = ((means[groups] - mix.mean(0)) ** 2).sum()
    assert share.compute() == pytest.approx(between / ((mix - mix.mean(0)) ** 2).sum())


def test_between_group_share_of_a_constant_prediction_is_undefined() -> None:
    from magnet_st.model.metrics import BetweenGroupShare

    share = BetweenGroupShare(3, 4)
    const = np.tile(np.log1p(np.array([0.3, 1.7, 2.2, 0.01])), (30, 1)).astype(np.float32)
    share.update(const, np.repeat(np.arange(3), 10))
    assert np.isnan(share.compute())


def test_chosen_epochs_counts_up_to_the_first_best_validation_epoch() -> None:
    from magnet_st.model.metrics import chosen_epochs

    hist = [{"epoch": e, "val/pcc_gene": v} for e, v in enumerate([0.1, 0.3, 0.3, 0.2])]
    assert chosen_epochs(hist) == 2  # epochs 0 and 1: the checkpoint early stopping kept
    assert chosen_epochs([{"epoch": 0, "train/loss": 1.0}]) is None
