"""The paper's neural baselines (ST-Net, HisToGene, Hist2ST, BLEEP, EGN) and ``magnet
benchmark``, on a tiny prepared dataset whose imported features carry the targets: shapes
and scale at every level, save/load, determinism, learning from the input, retrieval banks
of training units only, and the benchmark's tables and resume."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from magnet_st.data.dataset import Dataset
from magnet_st.data.levels import LEVELS
from magnet_st.evaluate.baselines import BASELINE_NAMES, create_baseline, load_baseline
from magnet_st.model.metrics import pcc_per_gene

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN, HELD = ["s0", "s1"], "s2"
#: tiny networks and few steps: the whole module runs in well under a minute on a CPU
SMALL = {
    "width": 32,
    "epochs": 4,
    "batch_size": 64,
    "block": 8,
    "blocks_per_batch": 4,
    "neighbours": 10,
    "exemplars": 4,
    "retrieval_dim": 8,
    "lr": 3e-3,
}


def _neural_names() -> list[str]:
    from magnet_st.evaluate.baselines.paper import NEURAL_BASELINES

    names = [n for n in BASELINE_NAMES if n != "ridge"]
    assert sorted(names) == sorted(NEURAL_BASELINES)  # every registered one is tested here
    return names


NEURAL = _neural_names()


@pytest.fixture(scope="module")
def signal_ds(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> tuple[Path, str]:
    """Three 240 um synthetic slides (8 um bins, a 20-gene panel) and an imported feature
    set whose rows are a random linear map of each unit's log1p panel expression plus
    noise: a model that reads its input can predict the held-out slide."""
    from magnet_st.features.extract import import_features
    from magnet_st.prepare.build import prepare
    from magnet_st.prepare.config import PrepareConfig
    from magnet_st.read.specs import SlideSpec
    from magnet_st.synthetic import write_synthetic_hd

    root = tmp_path_factory.mktemp("neural")
    specs = []
    for i in range(3):
        run = root / f"s{i}"
        write_synthetic_hd(
            run,
            width_um=240,
            height_um=240,
            seed=20 + i,
            bin_sizes=(8,),
            n_genes=40,
            progress=False,
            write_mtx=False,
            write_raw=False,
        )
        specs.append(
            SlideSpec(name=f"s{i}", path=str(run), image=str(run / "he_fullres.tif"), bin_size=8)
        )
    prepare(specs, root / "ds", PrepareConfig(n_genes=20), progress=False)
    # writing synthetic slides then preparing them leaves torch at the machine's thread
    # count (something below them resets it): back to one_torch_thread's single thread,
    # without which this module runs several times slower on a busy 2-core machine
    torch.set_num_threads(1)
    ds = Dataset(root / "ds")
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (len(ds.all_slide_panel), 24))
    feats = {}
    for s in ds.slides:
        for lv in LEVELS:
            y = np.log1p(ds.counts(s, lv, ds.all_slide_panel).toarray())
            feats[s, lv] = (y @ w + rng.normal(0, 0.5, (len(y), w.shape[1]))).astype(np.float32)
    meta = import_features(root / "ds", "signal", feats, description="log1p @ W + noise")
    return root / "ds", meta["key"]


@pytest.fixture(scope="module")
def fitted(signal_ds: tuple[Path, str]) -> dict:
    """Every neural baseline fitted once on s0 and s1 (no validation slide)."""
    path, key = signal_ds
    ds = Dataset(path)
    return {n: create_baseline(n, key, **SMALL).fit(ds, TRAIN, ds.all_slide_panel) for n in NEURAL}


def _log1p(ds: Dataset, slide: str, level: str) -> np.ndarray:
    return np.log1p(ds.counts(slide, level, ds.all_slide_panel).toarray())


def test_every_neural_baseline_predicts_every_level_of_a_held_out_slide_in_log1p(
    signal_ds: tuple[Path, str], fitted: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from magnet_st.cli import _BASELINES

    assert tuple(_BASELINES) == tuple(BASELINE_NAMES)  # the CLI offers what the registry has
    path, _ = signal_ds
    ds = Dataset(path)
    train = {lv: np.vstack([_log1p(ds, s, lv) for s in TRAIN]) for lv in LEVELS}
    real = Dataset.counts

    def no_held_out_counts(self, slide, level, genes=None):
        assert slide != HELD, "prediction read the held-out slide's counts"
        return real(self, slide, level, genes)

    monkeypatch.setattr(Dataset, "counts", no_held_out_counts)
    for name, model in fitted.items():
        pred = model.predict(ds, HELD)
        assert sorted(pred) == sorted(LEVELS), name
        for lv in LEVELS:
            p = pred[lv]
            assert p.shape == (ds.level(HELD, lv).n_obs, len(ds.all_slide_panel)), (name, lv)
            assert np.isfinite(p).all() and (p >= 0).all(), (name, lv)
            # log1p units: bounded by the training units' log1p range, and near their mean
            # (counts of spot and region tiles run into the hundreds and thousands)
            assert p.max() <= 1.5 * train[lv].max(), (name, lv, p.max(), train[lv].max())
            assert abs(p.mean() - train[lv].mean()) < 0.35 * train[lv].mean(), (
                name,
                lv,
                p.mean(),
                train[lv].mean(),
            )


def test_each_baseline_learns_from_its_input(signal_ds: tuple[Path, str], fitted: dict) -> None:
    """The features are a noisy linear map of the targets: each model must beat the mean
    profile's PCC-gene (0: a constant prediction) on the held-out slide's bins by a margin;
    a model that ignored its features could not."""
    path, _ = signal_ds
    ds = Dataset(path)
    truth = _log1p(ds, HELD, "bin")
    mean = np.vstack([_log1p(ds, s, "bin") for s in TRAIN]).mean(0)
    floor = np.nanmean(pcc_per_gene(truth, np.tile(mean, (len(truth), 1))))
    scores = {
        name: float(np.nanmean(pcc_per_gene(truth, m.predict(ds, HELD)["bin"])))
        for name, m in fitted.items()
    }
    assert all(s > floor + 0.25 for s in scores.values()), (floor, scores)


def test_bleep_averages_the_reference_profiles_nearest_by_cosine(
    signal_ds: tuple[Path, str], fitted: dict
) -> None:
    """BLEEP's inference: the mean expression of the ``neighbours`` reference units whose
    expression embeddings are nearest (cosine) to the unit's image embedding."""
    from magnet_st.features.store import load_features

    path, key = signal_ds
    ds = Dataset(path)
    model = fitted["bleep"]
    net, bank = model.nets["bin"], model.banks["bin"]
    mean, std = model.norms["bin"]
    x = (load_features(path, key, HELD, "bin").astype(np.float32) - mean) / std
    with torch.no_grad():
        img = torch.nn.functional.normalize(net.image(torch.from_numpy(x)), dim=1)
        ref = torch.nn.functional.normalize(net.expression(torch.from_numpy(bank.y)), dim=1)
    top = torch.topk(img @ ref.T, SMALL["neighbours"], dim=1).indices.numpy()
    want = bank.y[top].mean(1)
    np.testing.assert_allclose(model.predict(ds, HELD)["bin"], want, rtol=1e-5, atol=1e-6)


def test_save_load_round_trip_and_same_seed_give_identical_predictions(
    signal_ds: tuple[Path, str], fitted: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, key = signal_ds
    ds = Dataset(path)
    for name, model in fitted.items():
        want = model.predict(ds, HELD)
        model.save(tmp_path / f"{name}.pt")
        with monkeypatch.context() as m:  # a loaded bank keeps its PCA basis: no new SVD
            m.setattr(np.linalg, "svd", lambda *a, **k: pytest.fail("SVD on load"))
            loaded = load_baseline(tmp_path / f"{name}.pt")
        assert type(loaded) is type(model) and loaded.genes == model.genes
        again = create_baseline(name, key, **SMALL).fit(ds, TRAIN, ds.all_slide_panel)
        for other in (loaded, again):
            got = other.predict(ds, HELD)
            for lv in LEVELS:
                np.testing.assert_array_equal(got[lv], want[lv], err_msg=f"{name} {lv}")
    # the seed is used: another one gives another network
    other_seed = create_baseline("stnet", key, **{**SMALL, "seed": 1}).fit(
        ds, TRAIN, ds.all_slide_panel
    )
    assert not np.array_equal(
        other_seed.predict(ds, HELD)["bin"], fitted["stnet"].predict(ds, HELD)["bin"]
    )


def test_retrieval_banks_hold_only_training_units(signal_ds: tuple[Path, str]) -> None:
    """BLEEP's reference and EGN's exemplars: units of the training slides only, never of
    the validation slide read while fitting (nor, so, of a test slide), with their own
    features and expression; in training a unit never retrieves itself."""
    from magnet_st.features.store import load_features

    path, key = signal_ds
    ds = Dataset(path)
    for name in ("bleep", "egn"):
        cap = 200  # fewer than the training bins: the bank is a sample
        model = create_baseline(name, key, **{**SMALL, "epochs": 1, "bank": cap})
        model.fit(ds, TRAIN, ds.all_slide_panel, val=[HELD])
        assert sorted(model.banks) == sorted(LEVELS)
        for lv, bank in model.banks.items():
            n = [ds.level(s, lv).n_obs for s in TRAIN]
            assert len(bank.y) == len(bank.x) == len(bank.ids) == min(cap, sum(n)), (name, lv)
            slide, row = np.divmod(bank.ids, 2**40)
            assert set(slide) <= {0, 1}, (name, lv)  # indices into TRAIN
            assert len(np.unique(bank.ids)) == len(bank.ids)
            mean, std = model.norms[lv]
            for i, s in enumerate(TRAIN):
                rows = row[slide == i]
                assert (rows < n[i]).all()
                np.testing.assert_allclose(bank.y[slide == i], _log1p(ds, s, lv)[rows], rtol=1e-6)
                x = (load_features(path, key, s, lv).astype(np.float32)[rows] - mean) / std
                np.testing.assert_allclose(bank.x[slide == i], x, rtol=1e-5, atol=1e-5)
        if name == "egn":  # exemplars of a training unit: never the unit itself
            bank = model.banks["bin"]
            own = {"x": torch.from_numpy(bank.x[:50])}
            model.extend_batch(own, "bin", bank.ids[:50])  # as in training
            same = (own["ex_x"].numpy() == bank.x[:50, None]).all(-1)
            assert not same.any()
            # in prediction (no ids) a unit in the bank is its own nearest exemplar
            pred = {"x": torch.from_numpy(bank.x[:50])}
            model.extend_batch(pred, "bin", None)
            assert (pred["ex_x"][:, 0].numpy() == bank.x[:50]).all()


def test_benchmark_tables_per_level_and_resume_model_by_model(
    signal_ds: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import magnet_st.report
    from magnet_st.cli import main
    from magnet_st.evaluate.baselines.neural import NeuralBaseline
    from magnet_st.evaluate.baselines.ridge import RidgeBaseline

    path, key = signal_ds
    out = tmp_path / "bench"
    args = ["benchmark", str(path), str(out), "--models", "mean_profile", "ridge", "stnet"]
    args += ["--baseline-epochs", "1", "--max-batches", "2", "--features", key]
    args += ["--slides", *TRAIN, "--seed", "3", "--quiet"]  # two folds: s0 out, s1 out
    assert main(args) == 0
    # --seed seeds the neural baselines too
    assert torch.load(out / "fold0/stnet/model.pt", weights_only=True)["config"]["seed"] == 3
    # each level's training curve is kept beside the model (one epoch here)
    curves = json.loads((out / "fold0/stnet/history.json").read_text())
    assert set(curves) == set(LEVELS) and all(len(c) == 1 for c in curves.values())
    assert all(c[0]["train/loss"] > 0 and c[0]["epoch"] == 0 for c in curves.values())
    models = ["mean_profile", "ridge", "stnet"]
    # each coarse level scores every model's head, then its bins summed over each tile
    at = {lv: models for lv in LEVELS}
    at["spot"] = at["region"] = [n for m in models for n in (m, f"{m} (aggregated bins)")]
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["level"]) == [lv for lv in LEVELS for _ in at[lv]]
    assert list(summary["model"]) == [m for lv in LEVELS for m in at[lv]]
    assert (summary["folds"] == 2).all()
    for m in ("mse", "mae", "pcc_unit", "pcc_gene", "pcc_gene_top"):
        assert np.isfinite(summary[f"{m}_mean"]).all() and np.isfinite(summary[f"{m}_std"]).all()
    md = (out / "summary.md").read_text()
    blocks = md.split("### ")[1:]
    per_slide = [f"{lv} level: PCC-gene per test slide" for lv in LEVELS]
    paired = [f"{lv} level: PCC-gene against ridge, paired by fold" for lv in LEVELS]
    heads = [b.splitlines()[0] for b in blocks]
    assert heads == [f"{lv} level" for lv in LEVELS] + per_slide + paired
    for lv, block in zip(LEVELS, blocks[len(LEVELS) : 2 * len(LEVELS)], strict=True):
        rows = [line for line in block.splitlines()[4:] if line.startswith("| ")]
        assert [r.split(" | ")[0][2:] for r in rows] == at[lv]
    for lv, block in zip(LEVELS, blocks[: len(LEVELS)], strict=True):
        lines = block.splitlines()
        assert lines[2].startswith("| model | MSE | MAE | PCC-unit | PCC-gene | PCC-gene top-50 |")
        rows = [line for line in lines[4:] if line.startswith("| ")]
        assert [r.split(" | ")[0][2:] for r in rows] == at[lv]
        assert all(r.count("±") == 5 for r in rows)
    assert (out / "figures" / "cv_pcc_gene_bin.png").is_file()
    # a baseline's training curves: one figure per level (its history.json is per level)
    assert {f"training_stnet_fold0_{lv}.png" for lv in LEVELS} <= {
        p.name for p in (out / "figures").iterdir()
    }

    # resume: fold 1's ST-Net is unfinished; a rerun trains it alone and keeps the rest
    (out / "fold1" / "stnet" / "metrics.json").unlink()
    kept = {p: p.stat().st_mtime_ns for p in out.glob("fold*/*/model.*")}
    fits = []
    for cls in (NeuralBaseline, RidgeBaseline):
        real = cls.fit

        def counted(self, ds, slides, *a, _real=real, **k):
            fits.append((self.name if hasattr(self, "name") else "ridge", tuple(slides)))
            return _real(self, ds, slides, *a, **k)

        monkeypatch.setattr(cls, "fit", counted)
    monkeypatch.setattr(magnet_st.report, "plot_results", lambda *a, **k: None)
    assert main(args) == 0
    assert fits == [("stnet", ("s0",))]  # fold 1 tests s1 and trains on s0
    changed = {p for p, t in kept.items() if p.stat().st_mtime_ns != t}
    assert changed == {out / "fold1" / "stnet" / "model.pt"}
    # the retrained fold repeats the first run exactly (same seed; its wall time aside)
    timing = ["train_seconds_mean"]
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "summary.csv").drop(columns=timing), summary.drop(columns=timing)
    )


def test_each_baseline_names_its_paper_and_what_was_simplified() -> None:
    from magnet_st.evaluate.baselines.paper import NEURAL_BASELINES

    papers = {
        "stnet": ("He et al", "2020"),
        "histogene": ("Pang et al", "2021"),
        "his2st": ("Zeng et al", "2022"),
        "bleep": ("Xie et al", "2023"),
        "egn": ("Yang et al", "2023"),
    }
    assert sorted(papers) == sorted(NEURAL_BASELINES)
    for name, cls in NEURAL_BASELINES.items():
        doc = inspect.getdoc(cls) or ""
        assert all(w in doc for w in papers[name]), name
        assert "Here:" in doc, name  # what this reimplementation changed, and why


def test_a_width_the_attention_heads_cannot_split_is_refused_up_front() -> None:
    from magnet_st.errors import ConfigError
    from magnet_st.evaluate.baselines.neural import BaselineConfig

    assert BaselineConfig(width=64).width == 64
    with pytest.raises(ConfigError, match="multiple of 8, got 12"):
        BaselineConfig(width=12)
