"""Training: overfitting, determinism, the model file, resume, DDP on CPU, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from magnet_st.batching import BlockDataset
from magnet_st.dataset import Dataset
from magnet_st.errors import ConfigError, InputError
from magnet_st.features import extract_features
from magnet_st.losses import LossWeights, magnet_loss
from magnet_st.model import create_model
from magnet_st.prepare import PrepareConfig, prepare
from magnet_st.read.specs import SlideSpec
from magnet_st.train import (
    TrainConfig,
    build_model_config,
    fit,
    load_model,
    predict_slide,
    slide_arrays,
)

ENC = "mobilenetv3_small_050"
KEY = f"{ENC}-random"
SMALL = {"features": KEY, "width": 32, "epochs": 2, "patience": 5}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ds_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from magnet_st.synthetic import write_synthetic_hd

    root = tmp_path_factory.mktemp("train")
    specs = []
    for i in range(2):
        run = root / f"s{i}"
        write_synthetic_hd(
            run,
            width_um=320,
            height_um=320,
            seed=20 + i,
            bin_sizes=(8, 16),
            progress=False,
            write_mtx=False,
            write_raw=False,
        )
        specs.append(
            SlideSpec(name=f"s{i}", path=str(run), image=str(run / "he_fullres.tif"), bin_size=8)
        )
    prepare(specs, root / "ds", PrepareConfig(n_genes=30), progress=False)
    extract_features(
        root / "ds",
        ENC,
        levels=("bin", "spot", "region"),
        device="cpu",
        batch_size=32,
        num_workers=0,
        progress=False,
    )
    return root / "ds"


def test_tiny_slide_overfits(ds_path: Path) -> None:
    ds = Dataset(ds_path)
    torch.manual_seed(0)
    cfg = TrainConfig(**SMALL)
    arrays = slide_arrays(ds, "s0", KEY)
    tt = ds.target_transforms
    data = BlockDataset([arrays], targets=lambda lv, c: tt[lv].transform(c))
    batch = data[0]
    model = create_model(build_model_config(ds, cfg, len(ds.panel), "s0"))
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses, mses = [], []
    for _ in range(40):
        parts = magnet_loss(model(batch), batch, LossWeights())
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
        losses.append(float(parts["loss"].detach()))
        mses.append(float(parts["mse"].detach()))
    # the bin MSE falls by a factor of 5; the total, which holds bounded 1 - PCC terms, by 2.5
    assert mses[-1] < mses[0] / 5, mses[::8]
    assert losses[-1] < losses[0] / 2.5, losses[::8]


def test_fit_is_deterministic_and_the_model_file_round_trips(ds_path: Path, tmp_path: Path) -> None:
    ds = Dataset(ds_path)
    cfg = TrainConfig(**SMALL)
    a = fit(ds, ["s0"], ["s1"], cfg, tmp_path / "a", progress=False)
    b = fit(ds, ["s0"], ["s1"], cfg, tmp_path / "b", progress=False)
    assert a.epochs_run == 2 and len(a.history) == 2
    assert a.history == b.history
    assert a.best_score == b.best_score and a.best_score is not None
    # weights_only load, and the payload carries what prediction needs
    payload = torch.load(a.model_path, weights_only=True)
    assert payload["genes"] == ds.panel and len(payload["gene_names"]) == len(ds.panel)
    assert payload["features"]["key"] == KEY
    model, payload = load_model(a.model_path)
    arrays = slide_arrays(ds, "s1", KEY, with_counts=False)
    p1 = predict_slide(model, arrays, payload)
    p2 = predict_slide(load_model(b.model_path)[0], arrays, payload)
    n = {lv: ds.level("s1", lv).n_obs for lv in ("bin", "spot", "region")}
    assert {lv: v.shape for lv, v in p1.items()} == {lv: (n[lv], 30) for lv in n}
    for lv in p1:
        np.testing.assert_array_equal(p1[lv], p2[lv])
        assert np.isfinite(p1[lv]).all()


def test_no_context_variant_predicts_bins_only(ds_path: Path, tmp_path: Path) -> None:
    ds = Dataset(ds_path)
    res = fit(ds, ["s0"], [], TrainConfig(variant="no_context", **SMALL), tmp_path, progress=False)
    model, payload = load_model(res.model_path)
    out = predict_slide(model, slide_arrays(ds, "s1", KEY, with_counts=False), payload)
    assert set(out) == {"bin"}


def test_resume_from_checkpoint(ds_path: Path, tmp_path: Path) -> None:
    ds = Dataset(ds_path)
    cfg = TrainConfig(**{**SMALL, "epochs": 1})
    fit(ds, ["s0"], ["s1"], cfg, tmp_path, progress=False)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert torch.load(last, weights_only=True)["epoch"] == 0
    res = fit(ds, ["s0"], ["s1"], TrainConfig(**SMALL), tmp_path, resume=last, progress=False)
    assert res.epochs_run == 2 and [r["epoch"] for r in res.history] == [1]


def test_errors(ds_path: Path, tmp_path: Path) -> None:
    ds = Dataset(ds_path)
    with pytest.raises(InputError, match="run 'magnet features"):
        fit(
            ds,
            ["s0"],
            [],
            TrainConfig(**{**SMALL, "features": "resnet50"}),
            tmp_path,
            progress=False,
        )
    with pytest.raises(InputError, match=r"lacks genes \['NOPE'\]"):
        fit(ds, ["s0"], [], TrainConfig(**SMALL), tmp_path, genes=["NOPE"], progress=False)
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ConfigError, match="consistency"):
        TrainConfig(consistency="both")
    with pytest.raises(InputError, match="not a magnet-st model file"):
        (tmp_path / "x.pt").write_bytes(b"nope")
        load_model(tmp_path / "x.pt")
    with pytest.raises(InputError, match="no manifest.json"):
        Dataset(tmp_path)


def test_ddp_two_cpu_processes_gloo(ds_path: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    cmd = [
        sys.executable,
        "-m",
        "magnet_st",
        "train",
        str(ds_path),
        str(tmp_path / "run"),
        "--features",
        KEY,
        "--width",
        "32",
        "--epochs",
        "1",
        "--accelerator",
        "cpu",
        "--devices",
        "2",
        "--train-slides",
        "s0",
        "s1",
        "--val-slides",
        "--quiet",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained on ['s0', 's1']" in proc.stdout
    model, payload = load_model(tmp_path / "run" / "model.pt")
    assert json.loads(json.dumps(payload["train_config"]))["devices"] == 2


def test_cross_validation_tables_and_resume(ds_path: Path, tmp_path: Path) -> None:
    import pandas as pd

    from magnet_st.cv import (
        cross_validate,
        group_summary,
        make_folds,
        markdown_groups,
        markdown_summary,
        read_gene_groups,
        summary_table,
    )

    cfg = TrainConfig(**{**SMALL, "epochs": 1})
    panel = Dataset(ds_path).panel
    groups_file = tmp_path / "groups.tsv"
    groups_file.write_text("gene\tgroup\n" + "".join(f"{g}\tfirst\n" for g in panel[:3]))
    groups = read_gene_groups(groups_file)
    table = cross_validate(
        ds_path,
        tmp_path / "cv",
        cfg,
        variants=["no_context"],
        gene_groups=groups,
        baselines=["ridge"],
        progress=False,
    )
    assert set(table["model"]) == {"mean_profile", "ridge", "no_context"}
    genes = pd.read_csv(tmp_path / "cv/gene_pcc.csv")
    # the per-gene PCCs average to the table's PCC-gene (no constant genes here)
    for (fold, model, level), sub in genes.groupby(["fold", "model", "level"]):
        row = table[(table["fold"] == fold) & (table["model"] == model) & (table["level"] == level)]
        assert sub["pcc"].mean() == pytest.approx(row["pcc_gene"].iloc[0])
    grouped = pd.read_csv(tmp_path / "cv/groups.csv")
    first = genes[genes["gene_id"].isin(panel[:3]) & (genes["model"] == "no_context")]
    per_fold = first[first["level"] == "bin"].groupby("fold")["pcc"].mean()
    got = grouped[(grouped["model"] == "no_context") & (grouped["level"] == "bin")].iloc[0]
    assert got["n_genes"] == 3 and got["pcc_gene_mean"] == pytest.approx(per_fold.mean())
    assert "| first | 3 |" in (tmp_path / "cv/groups.md").read_text()
    assert len(table) == 2 * (3 + 3 + 1)  # mean profile, ridge at 3 levels, bins-only model
    plan = json.loads((tmp_path / "cv/folds.json").read_text())
    assert plan["folds"] == make_folds(["s0", "s1"])
    summary = pd.read_csv(tmp_path / "cv/summary.csv")
    assert summary.iloc[0]["model"] == "mean_profile" and summary.iloc[0]["level"] == "bin"
    assert (tmp_path / "cv/fold0/no_context/model.pt").is_file()
    assert (tmp_path / "cv/fold1/no_context/pred_s1_bin.h5ad").is_file()
    # a rerun finds every fold done and trains nothing
    stamp = (tmp_path / "cv/fold0/no_context/model.pt").stat().st_mtime_ns
    again = cross_validate(
        ds_path, tmp_path / "cv", cfg, variants=["no_context"], baselines=["ridge"], progress=False
    )
    assert (tmp_path / "cv/fold0/no_context/model.pt").stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(again, table)

    # predictions carry the measured log1p counts; 'magnet plot' draws the cv folder
    import anndata

    from magnet_st.cli import main

    pred = anndata.read_h5ad(tmp_path / "cv/fold1/no_context/pred_s1_bin.h5ad")
    fold_panel = list(pred.var["gene_ids"])  # each fold selects its panel on its own slides
    counts = Dataset(ds_path).counts("s1", "bin", fold_panel).toarray()
    np.testing.assert_allclose(pred.layers["measured"].toarray(), np.log1p(counts), rtol=1e-6)
    hist = json.loads((tmp_path / "cv/fold0/no_context/history.json").read_text())
    # two slides: no validation slide is left, so the history holds the training losses
    assert len(hist) == 1 and hist[0]["train/loss"] > 0 and "val/pcc_gene" not in hist[0]
    assert (
        main(["plot", str(tmp_path / "cv"), "--out", str(tmp_path / "figs"), "--formats", "png"])
        == 0
    )
    drawn = {p.name for p in (tmp_path / "figs").iterdir()}
    assert {
        "cv_pcc_gene_bin.png",
        "cv_pcc_unit_spot.png",
        "training_no_context_fold0.png",
        "training_no_context_fold1.png",
        "gene_pcc_no_context.png",
        "no_context_s0_maps.png",
        "no_context_s0_gene_pcc.png",
    } <= drawn
    assert main(["plot", str(tmp_path / "nothing"), "--out", str(tmp_path / "figs")]) == 2

    # the summary is the mean and sample std over folds, formatted per level
    toy = pd.DataFrame(
        {
            "model": ["m", "m", "mean_profile", "mean_profile"],
            "level": ["bin"] * 4,
            "fold": [0, 1, 0, 1],
            "mse": [1.0, 3.0, 2.0, 2.0],
            "mae": [0.5, 0.5, 1.0, 1.0],
            "pcc_gene": [0.2, 0.4, 0.0, 0.0],
            "pcc_unit": [0.9, 0.7, 0.8, 0.8],
        }
    )
    s = summary_table(toy)
    assert list(s["model"]) == ["mean_profile", "m"]
    assert s.iloc[1]["mse_mean"] == 2.0 and s.iloc[1]["mse_std"] == pytest.approx(np.sqrt(2))
    md = markdown_summary(s)
    assert "| m | 2.0000 ± 1.4142 | 0.5000 ± 0.0000 | 0.8000 ± 0.1414 | 0.3000 ± 0.1414 |" in md
    # groups: mean over a group's genes per fold, then mean +- std over folds
    toy_genes = pd.DataFrame(
        {
            "fold": [0, 0, 1, 1, 0],
            "model": ["m"] * 5,
            "level": ["bin"] * 5,
            "gene_id": ["a", "b", "a", "b", "c"],
            "gene_name": ["A", "B", "A", "B", "C"],
            "pcc": [0.1, 0.3, 0.5, 0.7, 0.9],
        }
    )
    g = group_summary(toy_genes, {"ab": {"a", "B"}, "none": {"zz"}})
    assert len(g) == 1 and g.iloc[0]["n_genes"] == 2
    assert g.iloc[0]["pcc_gene_mean"] == pytest.approx(0.4)
    assert g.iloc[0]["pcc_gene_std"] == pytest.approx(np.std([0.2, 0.6], ddof=1))
    assert "| ab | 2 | 0.4000 ± 0.2828 |" in markdown_groups(g)
    with pytest.raises(InputError, match="missing columns"):
        (tmp_path / "bad.csv").write_text("name,kind\nx,y\n")
        read_gene_groups(tmp_path / "bad.csv")


def test_ridge_baseline_matches_sklearn_and_round_trips(ds_path: Path, tmp_path: Path) -> None:
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from magnet_st.baselines import RidgeBaseline, create_baseline
    from magnet_st.features import load_features

    ds = Dataset(ds_path)
    genes = ds.panel
    model = RidgeBaseline(KEY, n_components=8, alpha=2.0, chunk=300).fit(ds, ["s0"], genes)
    pred = model.predict(ds, "s1")
    for lv in ("bin", "spot", "region"):
        assert pred[lv].shape == (ds.level("s1", lv).n_obs, len(genes))
    # the same model as scikit-learn's StandardScaler -> PCA(8) -> Ridge(alpha), clipped at 0
    x0 = load_features(ds_path, KEY, "s0", "bin").astype(np.float64)
    y0 = np.log1p(ds.counts("s0", "bin", genes).toarray())
    ref = make_pipeline(StandardScaler(), PCA(8, svd_solver="full"), Ridge(alpha=2.0)).fit(x0, y0)
    x1 = load_features(ds_path, KEY, "s1", "bin").astype(np.float64)
    np.testing.assert_allclose(pred["bin"], np.maximum(ref.predict(x1), 0), atol=2e-4)
    # it learns: in-sample error well below the mean profile's
    fit_mse = np.mean((model.predict(ds, "s0")["bin"] - y0) ** 2)
    assert fit_mse < 0.97 * np.mean((y0 - y0.mean(0)) ** 2)
    model.save(tmp_path / "ridge.npz")
    again = RidgeBaseline.load(tmp_path / "ridge.npz")
    for lv, p in again.predict(ds, "s1").items():
        np.testing.assert_array_equal(p, pred[lv])
    with pytest.raises(ConfigError, match="unknown baseline"):
        create_baseline("stnet9", KEY)
