"""The ridge probe on synthetic features: near-constant dimensions, alpha by cross-validation
on the training slides only, spatial blocks for a single slide."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from magnet_st.evaluate.baselines.ridge import ALPHAS, RidgeBaseline, x_blocks


@dataclass
class _Level:
    obs: pd.DataFrame

    @property
    def n_obs(self) -> int:
        return len(self.obs)


@dataclass
class FakeDataset:
    """What the ridge probe reads of a prepared dataset, from arrays: per slide a ``side`` x
    ``side`` grid of bins, 2 x 2 bins per spot tile and 4 x 4 per region tile; features and
    log1p targets given per slide and level. Every read is recorded in ``reads``."""

    side: int
    features: dict[tuple[str, str], np.ndarray]
    log1p: dict[tuple[str, str], np.ndarray]
    path: Path = Path("fake")
    reads: set = field(default_factory=set)

    def _grid(self, tile: int) -> tuple[np.ndarray, np.ndarray]:
        r, c = np.divmod(np.arange(self.side * self.side), self.side)
        per_row = -(-self.side // tile)
        return (r // tile) * per_row + c // tile, np.stack([c, r], 1).astype(float) + 0.5

    def membership(self, slide: str, level: str) -> np.ndarray:
        self.reads.add(slide)
        return self._grid(2 if level == "spot" else 4)[0]

    def positions_px(self, slide: str, level: str) -> np.ndarray:
        self.reads.add(slide)
        if level == "bin":
            return self._grid(1)[1]
        tile = 2 if level == "spot" else 4
        per_row = -(-self.side // tile)
        r, c = np.divmod(np.arange(per_row * per_row), per_row)
        return (np.stack([c, r], 1) + 0.5) * tile

    def level(self, slide: str, level: str) -> _Level:
        self.reads.add(slide)
        n = {"bin": self.side**2, "spot": (self.side // 2) ** 2, "region": (self.side // 4) ** 2}
        obs = pd.DataFrame(index=range(n[level]))
        if level == "spot":  # the region of each spot tile, as prepare writes it
            per_row = self.side // 2
            r, c = np.divmod(np.arange(n["spot"]), per_row)
            obs["region"] = (r // 2) * (self.side // 4) + c // 2
        return _Level(obs)

    def counts(self, slide: str, level: str, genes) -> sp.csr_matrix:
        self.reads.add(slide)
        return sp.csr_matrix(np.expm1(self.log1p[slide, level]))


class ArrayRidge(RidgeBaseline):
    def _features(self, ds: FakeDataset, slide: str, level: str) -> np.ndarray:
        ds.reads.add(slide)
        return ds.features[slide, level]


def _linear_slides(slides, side, dim, noise, seed, nan=()):
    """Features of every level, and targets linear in the bins' own features plus noise."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, size=(dim, 3))
    n = {"bin": side**2, "spot": (side // 2) ** 2, "region": (side // 4) ** 2}
    feats, y = {}, {}
    for s in slides:
        for lv, m in n.items():
            x = rng.normal(size=(m, dim)).astype(np.float32)
            feats[s, lv] = np.full_like(x, np.nan) if s in nan else x
            y[s, lv] = np.maximum(2.0 + x @ w + rng.normal(0, noise, size=(m, 3)), 0)
    return feats, y


def test_near_constant_dimension_does_not_blow_up() -> None:
    """One feature dimension is constant up to 1e-6 noise on the training slide and another
    constant on the test slide: standardising it would scale the test shift by 1e6."""
    rng = np.random.default_rng(0)
    side, dim = 16, 12
    feats, y = {}, {}
    w = rng.normal(0, 0.3, size=(dim, 4))
    for s, const in (("train", 5.0), ("test", 6.0)):
        for lv, m in (("bin", side**2), ("spot", (side // 2) ** 2), ("region", (side // 4) ** 2)):
            x = rng.normal(size=(m, dim))
            x[:, 0] = const + (rng.normal(0, 1e-6, size=m) if s == "train" else 0.0)
            feats[s, lv] = x.astype(np.float64)
            y[s, lv] = np.log1p(rng.poisson(np.exp(0.5 + 0.3 * x[:, 1:] @ w[1:])))
    ds = FakeDataset(side, feats, y)
    model = ArrayRidge("fake", n_components=8, alpha=1e-2).fit(ds, ["train"], ["g"] * 4)
    keep = model.params["bin"]["keep"]  # dim 0 of the bin's, its spot's and region's features
    assert keep.sum() == 3 * dim - 3 and not keep[[0, dim, 2 * dim]].any()
    pred = model.predict(ds, "test")
    for lv, p in pred.items():
        top = y["train", lv].max()
        assert np.isfinite(p).all() and p.max() <= 1.5 * top, (lv, p.max(), top)


def test_alpha_chosen_on_the_validation_slide_grows_with_noise() -> None:
    side, dim = 12, 30
    chosen = {}
    for noise in (0.01, 2.0):
        feats, y = _linear_slides(["a", "b", "c", "test"], side, dim, noise, 1, nan={"test"})
        ds = FakeDataset(side, feats, y)
        model = ArrayRidge("fake", context=False).fit(ds, ["a", "b"], ["g"] * 3, val=["c"])
        # the test slide (NaN features) is never read: everything fitted is finite
        assert ds.reads == {"a", "b", "c"}
        for p in model.params.values():
            assert np.isfinite(p["coef"]).all() and np.isfinite(p["cv_pcc_gene"]).all()
        chosen[noise] = float(model.params["bin"]["alpha"])
        report = model.report()["levels"]["bin"]
        assert report["cv"]["groups"] == "validation slides c"
        assert report["cv"]["alphas"] == list(ALPHAS) and report["alpha"] == chosen[noise]
        # without a validation slide: cross-validated over the training slides
        inner = ArrayRidge("fake", context=False).fit(ds, ["a", "b"], ["g"] * 3)
        assert inner.report()["levels"]["bin"]["cv"]["groups"] == "slides"
    assert chosen[2.0] > chosen[0.01], chosen


def _pcc_gene(pred: np.ndarray, true: np.ndarray) -> float:
    p, t = pred - pred.mean(0), true - true.mean(0)
    return float(np.mean((p * t).sum(0) / np.sqrt((p * p).sum(0) * (t * t).sum(0))))


def test_ridge_fits_on_training_slides_chooses_on_validation_then_refits() -> None:
    """The fold protocol: parameters from the training slides only, the penalty scored on
    the validation slide (exactly each fixed-alpha model's PCC-gene there), and with
    ``refit`` the model of training + validation slides at the alpha chosen."""
    side, dim = 12, 30
    feats, y = _linear_slides(["a", "b", "c"], side, dim, 0.5, 3)
    ds = FakeDataset(side, feats, y)
    genes = ["g"] * 3
    model = ArrayRidge("fake", context=False).fit(ds, ["a", "b"], genes, val=["c"])
    p = model.params["bin"]
    assert int(p["n_train"]) == 2 * side**2  # the validation slide's bins are not fitted
    # each alpha's score is the PCC-gene on c of the model fitted on a and b alone
    for alpha, score in zip(ALPHAS[::3], p["cv_pcc_gene"][::3], strict=True):
        fixed = ArrayRidge("fake", context=False, alpha=alpha).fit(ds, ["a", "b"], genes)
        x = fixed._project_slide(fixed.params["bin"], fixed._inputs(ds, "c", "bin"), side**2)
        pred = np.vstack([xb @ fixed.params["bin"]["coef"][:-1] for _, xb in x])
        pred += fixed.params["bin"]["coef"][-1]
        assert score == pytest.approx(_pcc_gene(pred, y["c", "bin"]), abs=1e-6)
    alpha = float(p["alpha"])
    assert p["cv_pcc_gene"][list(ALPHAS).index(alpha)] == np.nanmax(p["cv_pcc_gene"])
    refit = ArrayRidge("fake", context=False).fit(ds, ["a", "b"], genes, val=["c"], refit=True)
    r = refit.params["bin"]
    assert int(r["n_train"]) == 3 * side**2 and float(r["alpha"]) == alpha
    same = ArrayRidge("fake", context=False, alpha=alpha).fit(ds, ["a", "b", "c"], genes)
    np.testing.assert_allclose(r["coef"], same.params["bin"]["coef"], rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(r["cv_pcc_gene"], p["cv_pcc_gene"])  # the choice is kept
    assert refit.report()["levels"]["bin"]["refit_on_validation_slides"] is True
    # each coarse level from its own ridge or from the summed bins, chosen on c, kept by
    # the refit; predict follows the choice, raw=True gives the level's own ridge
    from magnet_st.predict.modelfile import aggregate_bins

    chosen = model.coarse_from
    assert set(chosen) == {"spot", "region"} and refit.coarse_from == chosen
    raw, pred = model.predict(ds, "c", raw=True), model.predict(ds, "c")
    for lv, src in chosen.items():
        agg = aggregate_bins(raw["bin"], ds.membership("c", lv), len(raw[lv]))
        np.testing.assert_array_equal(pred[lv], agg if src == "bins" else raw[lv])
        scores = {name: _pcc_gene(p, y["c", lv]) for name, p in (("head", raw[lv]), ("bins", agg))}
        assert scores[src] >= max(scores.values()) - 1e-9, (lv, scores)
    # given alpha: no cross-validation
    fixed = ArrayRidge("fake", context=False, alpha=2.0).fit(ds, ["a", "b"], ["g"] * 3)
    assert float(fixed.params["bin"]["alpha"]) == 2.0 and "cv_alphas" not in fixed.params["bin"]


def test_one_training_slide_cross_validates_over_x_blocks(tmp_path: Path) -> None:
    side, dim = 16, 10
    feats, y = _linear_slides(["a", "b"], side, dim, 0.5, 2)
    ds = FakeDataset(side, feats, y)
    model = ArrayRidge("fake", n_components=16).fit(ds, ["a"], ["g"] * 3)
    assert ds.reads == {"a"}
    rep = model.report()["levels"]
    assert rep["bin"]["sources"] == ["bin", "spot", "region"]
    assert rep["spot"]["sources"] == ["spot", "region"] and rep["region"]["sources"] == ["region"]
    assert rep["bin"]["cv"]["groups"] == "3 x-blocks of a"
    model.save(tmp_path / "model.npz")
    again = RidgeBaseline.load(tmp_path / "model.npz")
    assert again.report() == model.report()
    # blocks along x follow the region tiles: no tile's features on both sides
    region_x = ds.positions_px("a", "region")[:, 0][ds.membership("a", "region")]
    blocks = model._blocks(ds, "a", "bin")
    np.testing.assert_array_equal(blocks, x_blocks(region_x, 3))
    for x in np.unique(region_x):
        assert len(np.unique(blocks[region_x == x])) == 1
    assert sorted(np.bincount(blocks)) == [64, 64, 128]
