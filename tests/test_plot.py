"""Figures: bins land in the right raster cells, shared colour scales, scale bars, file
output, and the per-gene PCC against scipy."""

from __future__ import annotations

import json
import math

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from PIL import Image
from scipy.stats import pearsonr

from magnet_st import plot

ROWS, COLS = 15, 20
MPP = 0.25  # microns per full-resolution pixel
BIN_UM = 8.0
BIN_PX = BIN_UM / MPP  # 32 px
ORIGIN = (300.0, 500.0)  # top-left corner of the bin lattice, full-res px
GENES = ["GRAD", "NOISE", "FLAT"]


def _lattice() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, c = np.divmod(np.arange(ROWS * COLS), COLS)
    xy = np.column_stack([ORIGIN[0] + (c + 0.5) * BIN_PX, ORIGIN[1] + (r + 0.5) * BIN_PX])
    return xy, r, c


def _pred(seed: int = 0) -> anndata.AnnData:
    rng = np.random.default_rng(seed)
    xy, r, c = _lattice()
    x = np.column_stack(
        [c * 0.1 + r * 0.01, rng.gamma(2.0, 0.5, len(r)), np.full(len(r), 0.7)]
    ).astype(np.float32)
    var = pd.DataFrame({"gene_ids": ["ENSG1", "ENSG2", "ENSG3"]}, index=GENES)
    ad = anndata.AnnData(X=x, obs=pd.DataFrame(index=[f"bin{i}" for i in range(len(r))]), var=var)
    ad.obsm["spatial"] = xy
    hires = rng.integers(150, 255, (130, 120, 3), dtype=np.uint8)  # covers 1300 x 1200 px
    ad.uns["spatial"] = {
        "S1": {
            "images": {"hires": hires},
            "scalefactors": {
                "tissue_hires_scalef": 0.1,
                "spot_diameter_fullres": BIN_PX,
                "microns_per_pixel": MPP,
                "bin_size_um": BIN_UM,
            },
        }
    }
    ad.uns["magnet"] = {"level": "bin", "slide": "S1", "scale": "log1p"}
    return ad


def _measured_counts(pred: anndata.AnnData, seed: int = 1) -> anndata.AnnData:
    """Raw integer counts for a shuffled subset of the bins, genes in another order plus
    one the prediction lacks."""
    rng = np.random.default_rng(seed)
    truth = np.asarray(pred.X, dtype=np.float64) + rng.normal(0, 0.3, pred.shape)
    counts = np.round(np.expm1(np.clip(truth, 0, None)))
    order = rng.permutation(pred.n_obs)[: pred.n_obs - 40]  # 40 bins not measured
    x = np.column_stack([counts[order][:, [1, 0, 2]], rng.poisson(2, len(order))])
    var = pd.DataFrame(index=["NOISE", "GRAD", "FLAT", "EXTRA"])
    return anndata.AnnData(
        X=x.astype(np.float32), obs=pd.DataFrame(index=pred.obs_names[order]), var=var
    )


def _expression_images(fig) -> dict[str, object]:
    return {
        im.get_gid(): im
        for ax in fig.axes
        for im in ax.get_images()
        if (im.get_gid() or "").startswith("expression:")
    }


# -- rasteriser ------------------------------------------------------------------------------


def test_rasterize_puts_each_bin_in_its_cell() -> None:
    xy, r, c = _lattice()
    values = np.arange(len(xy), dtype=np.float64)
    drop = np.array([0, 37, 299])
    keep = np.setdiff1d(np.arange(len(xy)), drop)
    img = plot.rasterize(xy[keep], values[keep], BIN_PX)
    assert img.shape == (ROWS, COLS)
    for i in keep:
        assert img[r[i], c[i]] == values[i]
    for i in drop:
        assert np.isnan(img[r[i], c[i]])
    grid = plot.raster_grid(xy, BIN_PX)
    assert grid.extent == pytest.approx(
        (ORIGIN[0], ORIGIN[0] + COLS * BIN_PX, ORIGIN[1] + ROWS * BIN_PX, ORIGIN[1])
    )
    assert grid.cell(*xy[123]) == (r[123], c[123])
    # oversampled: each bin fills a 3 x 3 block of cells
    img3 = plot.rasterize(xy, values, BIN_PX, oversample=3)
    assert img3.shape == (3 * ROWS, 3 * COLS)
    np.testing.assert_array_equal(img3[3 * 4 : 3 * 5, 3 * 7 : 3 * 8], values[4 * COLS + 7])


def test_raster_grid_rotated_lattice() -> None:
    xy, _, _ = _lattice()
    theta = math.radians(30)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    xy_rot = (xy - xy.mean(0)) @ rot.T + 2000
    spacing, angle = plot.lattice_geometry(xy_rot)
    assert spacing == pytest.approx(BIN_PX)
    assert angle == pytest.approx(theta)
    grid = plot.raster_grid(xy_rot, BIN_PX, oversample=4)
    for i in (0, 57, 150, 299):  # the cell under a bin centre shows that bin
        assert grid.index[grid.cell(*xy_rot[i])] == i
    covered = (grid.index >= 0).sum() * grid.pitch**2
    assert covered == pytest.approx(len(xy) * BIN_PX**2, rel=0.05)  # squares, no gaps


def test_nice_length() -> None:
    assert plot.nice_length(32) == 20
    assert plot.nice_length(500) == 500
    assert plot.nice_length(0.74) == 0.5
    assert plot.nice_length(1999) == 1000


# -- gene maps -------------------------------------------------------------------------------


def test_gene_maps_with_measured_shares_colour_scale() -> None:
    pred = _pred()
    meas = _measured_counts(pred)
    fig = plot.gene_maps(pred, GENES[:2], meas)
    images = _expression_images(fig)
    assert set(images) == {
        f"expression:{g}:{k}" for g in GENES[:2] for k in ("predicted", "measured")
    }
    rows = meas.obs_names.get_indexer(pred.obs_names)
    for gene in GENES[:2]:
        p_img, m_img = images[f"expression:{gene}:predicted"], images[f"expression:{gene}:measured"]
        assert p_img.get_clim() == m_img.get_clim()
        p = np.asarray(pred[:, gene].X).ravel().astype(np.float64)
        m = np.log1p(np.asarray(meas[:, gene].X).ravel().astype(np.float64))[rows[rows >= 0]]
        lo, hi = np.percentile(np.concatenate([p, m]), [1, 99])
        assert p_img.get_clim() == pytest.approx((lo, hi), rel=1e-6)
        # the measured map holds log1p counts where measured, NaN elsewhere
        arr = np.asarray(m_img.get_array().filled(np.nan))
        _, r, c = _lattice()
        assert np.isnan(arr[r[rows < 0], c[rows < 0]]).all()
        np.testing.assert_allclose(arr[r[rows >= 0], c[rows >= 0]], m, rtol=1e-6)
        ax = m_img.axes
        assert gene in ax.get_title() and "measured" in ax.get_title()
        r_expected = pearsonr(m, p[rows >= 0])[0]
        assert f"r = {r_expected:.2f}" in ax.get_title()
        assert "predicted" in p_img.axes.get_title()
        assert not ax.axison and ax.get_aspect() == 1.0
    labels = [a.get_ylabel() for a in fig.axes if a.get_ylabel()]
    assert labels == ["log1p(counts)", "log1p(counts)"]  # one colour bar per gene


def test_gene_maps_scale_bar_and_background() -> None:
    fig = plot.gene_maps(_pred(), ["GRAD"])
    ax = fig.axes[0]
    bars = [ln for ln in ax.get_lines() if ln.get_gid() == "scalebar"]
    assert len(bars) == 1
    x = bars[0].get_xdata()
    width_um = COLS * BIN_UM  # 160 um: a fifth is 32, rounded down to 20 um
    assert x[1] - x[0] == pytest.approx(20 / MPP)
    assert width_um / 5 >= 20
    label = [t for t in ax.texts if t.get_gid() == "scalebar-label"][0]
    assert label.get_text() == "20 µm"
    assert len(ax.get_images()) == 2  # faint H&E behind the map
    fig = plot.gene_maps(_pred(), ["GRAD"], image=False, scale_bar_um=50)
    ax = fig.axes[0]
    assert len(ax.get_images()) == 1
    bar = [ln for ln in ax.get_lines() if ln.get_gid() == "scalebar"][0]
    assert np.ptp(bar.get_xdata()) == pytest.approx(50 / MPP)


def test_gene_maps_without_measured_and_layer() -> None:
    pred = _pred()
    fig = plot.gene_maps(pred, GENES, image=False)
    assert len(_expression_images(fig)) == 3
    assert "predicted" in fig.get_suptitle() and "measured" not in fig.get_suptitle()
    # the flat gene still gets a valid colour scale
    flat = _expression_images(fig)["expression:FLAT:predicted"]
    lo, hi = flat.get_clim()
    assert hi > lo
    pred.layers["measured"] = np.asarray(pred.X) * 0.5 + 0.1
    fig = plot.gene_maps(pred, ["ENSG2"], image=False)  # found by gene id
    images = _expression_images(fig)
    assert set(images) == {"expression:ENSG2:predicted", "expression:ENSG2:measured"}
    assert "r = 1.00" in images["expression:ENSG2:measured"].axes.get_title()
    with pytest.raises(KeyError, match="NOPE"):
        plot.gene_maps(pred, ["GRAD", "NOPE"])


def test_gene_maps_gene_not_measured() -> None:
    pred = _pred()
    meas = _measured_counts(pred)[:, ["GRAD"]]
    fig = plot.gene_maps(pred, ["GRAD", "NOISE"], meas, image=False)
    images = _expression_images(fig)
    assert "expression:NOISE:measured" not in images
    assert any(t.get_text() == "not measured" for ax in fig.axes for t in ax.texts)


def test_save_png_and_pdf(tmp_path) -> None:
    fig = plot.gene_maps(_pred(), GENES[:2], _measured_counts(_pred()))
    files = plot.save(fig, tmp_path / "maps.png", dpi=80)
    assert files == [tmp_path / "maps.png", tmp_path / "maps.pdf"]
    assert all(f.stat().st_size > 0 for f in files)
    assert files[1].read_bytes().startswith(b"%PDF")
    with Image.open(files[0]) as im:
        w, h = im.size
    fw, fh = fig.get_size_inches() * 80
    assert abs(w - fw) <= 2 and abs(h - fh) <= 2
    one = plot.gene_maps(_pred(), ["GRAD"], _measured_counts(_pred()))
    assert fig.get_size_inches()[1] > 1.8 * one.get_size_inches()[1]  # a row per gene
    assert fig.get_size_inches()[0] == one.get_size_inches()[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps.pdf", "maps.png"]  # no temp
    # a suffix that is not a format is kept
    assert plot.save(fig, tmp_path / "slide.v2", formats=("png",), dpi=30) == [
        tmp_path / "slide.v2.png"
    ]
    with pytest.raises(ValueError, match="unsupported"):
        plot.save(fig, tmp_path / "x", formats=("docx",))


# -- per-gene PCC ----------------------------------------------------------------------------


def test_per_gene_pcc_matches_scipy() -> None:
    pred = _pred()
    meas = _measured_counts(pred)
    meas.X[:, 2] = 3.0  # FLAT measured constant: no correlation, left out
    s = plot.per_gene_pcc(pred, meas)
    assert list(s.index) == ["GRAD", "NOISE"] and s.name == "pcc"
    rows = meas.obs_names.get_indexer(pred.obs_names)
    ok = rows >= 0
    for gene in s.index:
        p = np.asarray(pred[:, gene].X, dtype=np.float64).ravel()[ok]
        m = np.log1p(np.asarray(meas[:, gene].X, dtype=np.float64).ravel()[rows[ok]])
        assert s[gene] == pytest.approx(pearsonr(m, p)[0], rel=1e-9)
    sparse = meas.copy()
    sparse.X = sp.csr_matrix(sparse.X)
    pd.testing.assert_series_equal(plot.per_gene_pcc(pred, sparse), s)
    # measured already on the log1p scale, as a layer
    pred.layers["measured"] = np.log1p(np.asarray(pred.X, dtype=np.float64) ** 2 + 0.5)
    s2 = plot.per_gene_pcc(pred)
    assert list(s2.index) == ["GRAD", "NOISE"]  # FLAT: constant measured values
    x = np.asarray(pred.X[:, 0], dtype=np.float64)
    assert s2["GRAD"] == pytest.approx(pearsonr(pred.layers["measured"][:, 0], x)[0])
    with pytest.raises(ValueError, match="no measured"):
        plot.per_gene_pcc(_pred())


# -- bars, training curves, cross-validation -------------------------------------------------


def test_pcc_bars_sorted_with_mean() -> None:
    rng = np.random.default_rng(0)
    pcc = pd.Series(rng.uniform(-0.2, 0.9, 12), index=[f"G{i}" for i in range(12)])
    pcc["BAD"] = np.nan
    fig = plot.pcc_bars(pcc, top=5)
    ax = fig.axes[0]
    bars = sorted(ax.patches, key=lambda p: p.get_y())  # top of the chart first
    widths = [b.get_width() for b in bars]
    assert widths == sorted(pcc.dropna(), reverse=True)[:5]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == list(pcc.dropna().sort_values(ascending=False).index[:5])
    mean = [ln for ln in ax.get_lines() if ln.get_gid() == "mean"][0]
    assert mean.get_xdata()[0] == pytest.approx(pcc.mean())  # over all 12 genes
    assert "mean over 12 genes" in mean.get_label()
    assert "top 5 of 12" in ax.get_title()
    assert len(plot.pcc_bars(pcc, top=None).axes[0].patches) == 12


def test_training_curves_missing_keys_and_nans(tmp_path) -> None:
    history = [
        {"epoch": 0, "train/loss": 1.0},
        {"epoch": 1, "train/loss": 0.8, "val/loss": 0.9, "val/pcc_gene": 0.10},
        {"epoch": 2, "train/loss": 0.7, "val/loss": float("nan"), "val/pcc_gene": 0.25},
        {"epoch": 3, "train/loss": 0.6, "val/loss": 0.85, "val/pcc_gene": 0.20, "lr": 1e-4},
    ]
    path = tmp_path / "history.json"
    path.write_text(json.dumps(history).replace("NaN", "null"))
    for source in (history, path, tmp_path):
        fig = plot.training_curves(source)
        ax_loss, ax_pcc = fig.axes
        lines = {ln.get_gid(): ln for ln in ax_loss.get_lines()}
        np.testing.assert_array_equal(lines["train_loss"].get_xdata(), [0, 1, 2, 3])
        np.testing.assert_array_equal(lines["val_loss"].get_xdata(), [1, 3])
        np.testing.assert_allclose(lines["val_loss"].get_ydata(), [0.9, 0.85])
        best = [ln for ln in ax_pcc.get_lines() if ln.get_gid() == "best"][0]
        assert (best.get_xdata()[0], best.get_ydata()[0]) == (2, 0.25)
    # training loss only: the PCC panel says so instead of failing
    fig = plot.training_curves([{"train_loss": 1.0}, {"train_loss": 0.5}])
    assert any("no PCC-gene" in t.get_text() for t in fig.axes[1].texts)


def test_training_curves_lightning_csv(tmp_path) -> None:
    csv = tmp_path / "metrics.csv"
    pd.DataFrame(
        {
            "epoch": [0, 0, 0, 1, 1, 1],
            "step": [4, 9, 9, 14, 19, 19],
            "train/loss_step": [1.1, 0.9, np.nan, 0.8, 0.7, np.nan],
            "train/loss_epoch": [np.nan, np.nan, 0.95, np.nan, np.nan, 0.72],
            "val/loss": [np.nan, 0.99, np.nan, np.nan, 0.8, np.nan],
            "val/pcc_gene": [np.nan, 0.05, np.nan, np.nan, 0.15, np.nan],
        }
    ).to_csv(csv, index=False)
    df = plot.load_history(csv)
    assert list(df["epoch"]) == [0, 1]
    np.testing.assert_allclose(df["train_loss"], [0.95, 0.72])
    np.testing.assert_allclose(df["val_pcc_gene"], [0.05, 0.15])
    assert "step" not in df and "train_loss_step" not in df
    fig = plot.training_curves(csv)
    gids = {ln.get_gid() for ln in fig.axes[0].get_lines()}
    assert {"train_loss", "val_loss"} <= gids


def test_cv_summary_points_per_fold(tmp_path) -> None:
    rows = []
    for fold in range(4):
        for model, base in [("magnet", 0.3), ("mean_profile", 0.0)]:
            for level in ("bin", "spot"):
                for slide in ("a", "b"):  # two test slides per fold: averaged
                    v = base + 0.01 * fold + (0.02 if slide == "b" else 0.0)
                    rows.append(
                        {"fold": fold, "model": model, "level": level, "test_slide": slide,
                         "pcc_gene": v, "mse": 1 - v}
                    )  # fmt: skip
    df = pd.DataFrame(rows)
    df.to_csv(tmp_path / "metrics.csv", index=False)
    for source in (df, tmp_path / "metrics.csv", tmp_path):
        fig = plot.cv_summary(source)
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["mean_profile", "magnet"]
        pts = {c.get_gid(): c.get_offsets() for c in ax.collections if c.get_gid()}
        np.testing.assert_allclose(
            np.sort(pts["folds:magnet"][:, 1]), 0.3 + 0.01 * np.arange(4) + 0.01
        )
        assert len(pts["folds:mean_profile"]) == 4
        assert "4 folds" in ax.get_title()
    fig = plot.cv_summary(df, metric="mse", level="spot")
    assert "MSE" in fig.axes[0].get_ylabel()
    with pytest.raises(ValueError, match="region"):
        plot.cv_summary(df, level="region")
