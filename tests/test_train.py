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

from magnet_st.data.dataset import Dataset
from magnet_st.errors import ConfigError, InputError
from magnet_st.features.extract import extract_features
from magnet_st.model.batching import BlockDataset
from magnet_st.model.inputs import slide_arrays
from magnet_st.model.losses import LossWeights, magnet_loss
from magnet_st.model.magnet import create_model
from magnet_st.predict.modelfile import load_model, predict_slide
from magnet_st.prepare.build import prepare
from magnet_st.prepare.config import PrepareConfig
from magnet_st.train.config import TrainConfig
from magnet_st.train.module import MagNetModule
from magnet_st.train.trainer import PatchReader, build_model_config, fit, init_bin_encoder

ENC = "mobilenetv3_small_050"
KEY = f"{ENC}-random"
SMALL = {"features": KEY, "width": 32, "epochs": 2, "patience": 5}
TILES = ("spot", "region")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ds_path(tmp_path_factory: pytest.TempPathFactory, hd_runs) -> Path:
    return _synthetic_dataset(tmp_path_factory.mktemp("train"), hd_runs, 2)


@pytest.fixture(scope="module")
def ds3_path(tmp_path_factory: pytest.TempPathFactory, hd_runs) -> Path:
    """Three slides: a fold trains on one, validates on one, tests on one."""
    return _synthetic_dataset(tmp_path_factory.mktemp("train3"), hd_runs, 3, size_um=256)


def _synthetic_dataset(root: Path, hd_runs, n: int, size_um: int = 320) -> Path:
    prepare(hd_runs(root, n, size_um), root / "ds", PrepareConfig(n_genes=30), progress=False)
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
    arrays = slide_arrays(ds, "s0", KEY, genes=ds.all_slide_panel)
    tt = ds.all_slide_target_transforms
    data = BlockDataset([arrays], targets=lambda lv, c: tt[lv].transform(c))
    batch = data[0]
    model = create_model(build_model_config(ds, cfg, len(ds.all_slide_panel), "s0"))
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
    # no genes given: the panel is chosen on the training slide alone (not on s1)
    from magnet_st.data.panel import training_panel

    own = training_panel(ds, ["s0"], cfg.seed).genes
    assert payload["genes"] == own and len(payload["gene_names"]) == len(own)
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


def test_no_context_variant_predicts_coarse_levels_as_its_summed_bins(
    ds_path: Path, tmp_path: Path
) -> None:
    from magnet_st.predict.modelfile import aggregate_bins

    ds = Dataset(ds_path)
    res = fit(ds, ["s0"], [], TrainConfig(variant="no_context", **SMALL), tmp_path, progress=False)
    model, payload = load_model(res.model_path)
    arrays = slide_arrays(ds, "s1", KEY, with_counts=False)
    assert set(predict_slide(model, arrays, payload, raw=True)) == {"bin"}  # no heads
    out = predict_slide(model, arrays, payload)
    assert set(out) == {"bin", "spot", "region"}
    for lv, member in (("spot", arrays.bin_spot), ("region", arrays.bin_region)):
        want = aggregate_bins(out["bin"], member, ds.n_obs("s1", lv))
        np.testing.assert_array_equal(out[lv], want)


def test_aggregate_consistency_trains_rate_heads(ds_path: Path, tmp_path: Path) -> None:
    """The unbiased 'aggregate' consistency: rate heads starting at the training mean count,
    a Poisson term and a consistency term in the log; prediction returns log1p levels only."""
    ds = Dataset(ds_path)
    cfg = TrainConfig(**{**SMALL, "epochs": 1, "consistency": "aggregate", "pcc_axis": "gene"})
    res = fit(ds, ["s0"], [], cfg, tmp_path, progress=False)
    row = res.history[0]
    # both terms are live: a Poisson NLL, and a gap between tile and summed bin rates that
    # is not zero (complete tiles are in the batches); dropping either fails here
    assert np.isfinite(row["train/poisson"]) and row["train/poisson"] != 0
    assert np.isfinite(row["train/consistency"]) and row["train/consistency"] > 1e-6
    model, payload = load_model(res.model_path)
    assert payload["model_config"]["rate_heads"] is True
    out = predict_slide(model, slide_arrays(ds, "s1", KEY, with_counts=False), payload)
    assert set(out) == {"bin", "spot", "region"}


def test_canary_gene_of_a_scored_slide_never_enters_a_panel(ds_path: Path, tmp_path: Path) -> None:
    """A gene that varies only in s1 (and so tops a panel chosen on all slides, as prepare's
    default) never enters the panel of a model trained on s0, nor of the fold testing s1."""
    import shutil

    import anndata
    import scipy.sparse as sp

    from magnet_st.data.panel import select_panel
    from magnet_st.evaluate.cv import cross_validate
    from magnet_st.predict.image import seen_in_training

    ds_copy = tmp_path / "ds"
    shutil.copytree(ds_path, ds_copy)
    ds = Dataset(ds_copy)
    canary = next(g for g in ds.level("s1", "bin").var["gene_ids"] if g not in ds.all_slide_panel)
    ds.close()  # its level files are open (backed) and are rewritten below
    rng = np.random.default_rng(0)
    for slide in ("s0", "s1"):
        path = ds_copy / "slides" / slide / "bin.h5ad"
        ad = anndata.read_h5ad(path)
        x = sp.lil_matrix(ad.X)
        col = list(ad.var["gene_ids"]).index(canary)
        x[:, col] = rng.poisson(rng.choice([0, 50], ad.n_obs))[:, None] if slide == "s1" else 0
        ad.X = sp.csr_matrix(x, dtype=ad.X.dtype)
        ad.write_h5ad(path)
    manifest = json.loads((ds_copy / "manifest.json").read_text())
    ds = Dataset(ds_copy)
    everywhere = select_panel(
        [ds.level(s, "bin").X for s in ("s0", "s1")],
        [list(ds.level(s, "bin").var["gene_ids"]) for s in ("s0", "s1")],
        method="mean",
        n_genes=30,
    )
    assert canary in everywhere  # chosen on all slides, the canary is in
    manifest["panel"].update(method="mean", gene_ids=everywhere)  # as prepare on all slides
    (ds_copy / "manifest.json").write_text(json.dumps(manifest))
    ds = Dataset(ds_copy)
    res = fit(ds, ["s0"], [], TrainConfig(**{**SMALL, "epochs": 1}), tmp_path / "m", progress=False)
    payload = torch.load(res.model_path, weights_only=True)
    assert canary not in payload["genes"] and payload["training_slides"] == ["s0"]
    assert not seen_in_training(payload, "s1", None) and seen_in_training(payload, "s0", None)
    cfg = TrainConfig(**{**SMALL, "epochs": 1})
    cross_validate(ds_copy, tmp_path / "cv", cfg, variants=[], progress=False)
    folds = json.loads((tmp_path / "cv/folds.json").read_text())["folds"]
    (test_s1,) = [i for i, f in enumerate(folds) if f["test"] == ["s1"]]
    assert canary not in (tmp_path / f"cv/fold{test_s1}/panel.tsv").read_text()
    assert canary in (tmp_path / f"cv/fold{1 - test_s1}/panel.tsv").read_text()  # trained on s1


def test_resume_from_checkpoint(ds_path: Path, tmp_path: Path) -> None:
    ds = Dataset(ds_path)
    cfg = TrainConfig(**{**SMALL, "epochs": 1})
    fit(ds, ["s0"], ["s1"], cfg, tmp_path, progress=False)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert torch.load(last, weights_only=True)["epoch"] == 0
    res = fit(ds, ["s0"], ["s1"], TrainConfig(**SMALL), tmp_path, resume=last, progress=False)
    # the history of the resumed run starts at epoch 0: the checkpoint carries it
    assert res.epochs_run == 2 and [r["epoch"] for r in res.history] == [0, 1]


def test_end_to_end_bin_encoder_one_epoch_then_predict(ds_path: Path, tmp_path: Path) -> None:
    """The paper's bin branch (a CNN on the bin patches, trained end to end) with a timm
    model whose pooled output comes from a pre-logits head, started from a weights file;
    the model file records the weights' checksum and rebuilds without the file."""
    import time

    import timm

    from magnet_st.features.backbones import file_sha256

    ds = Dataset(ds_path)
    start = timm.create_model(ENC)  # with its classifier, which loading drops
    weights = tmp_path / "start.pth"
    torch.save(start.state_dict(), weights)
    cfg = TrainConfig(
        **{**SMALL, "epochs": 1},
        bin_encoder=ENC,
        bin_weights=str(weights),
        max_batches=2,
        block=1,  # ~250 bin patches of 112 px a batch
    )
    t0 = time.perf_counter()
    res = fit(ds, ["s0"], [], cfg, tmp_path / "run", progress=False)
    print(f"one epoch of 2 batches with {ENC} end to end: {time.perf_counter() - t0:.1f} s")
    assert res.epochs_run == 1 and len(res.history) == 1
    assert np.isfinite(res.history[0]["train/loss"])
    payload = torch.load(res.model_path, weights_only=True)
    assert payload["model_config"]["bin_encoder"] == ENC
    assert payload["model_config"]["bin_weights_checksum"] == file_sha256(weights)
    assert payload["train_config"]["bin_weights"] == str(weights)
    weights.unlink()  # the trained state dict holds the weights
    model, payload = load_model(res.model_path)
    trained = model.bin_encoder.backbone.conv_stem.weight
    assert trained.shape == start.conv_stem.weight.shape
    assert not torch.equal(trained, start.conv_stem.weight)  # trained end to end
    reader = PatchReader({"s1": ds.image("s1")}, ds.patch_um("bin"), ds.patch_px("bin"))
    arrays = slide_arrays(ds, "s1", KEY, bin_features=False, with_counts=False)
    pred = predict_slide(model, arrays, payload, patch_reader=reader)
    n = {lv: ds.level("s1", lv).n_obs for lv in ("bin", "spot", "region")}
    assert {lv: v.shape for lv, v in pred.items()} == {lv: (n[lv], 30) for lv in n}
    assert all(np.isfinite(v).all() for v in pred.values())


def test_bin_weights_load_into_the_backbone(ds_path: Path, tmp_path: Path) -> None:
    import timm

    from magnet_st.features.backbones import file_sha256
    from magnet_st.model.magnet import MagNetConfig

    src = timm.create_model(ENC)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    mcfg = MagNetConfig(n_genes=5, variant="no_context", bin_encoder=ENC, bin_patch_px=32, width=32)
    cfg = TrainConfig(variant="no_context", bin_encoder=ENC, bin_weights=str(path))
    module = MagNetModule(mcfg.to_dict(), cfg.to_dict(), {})
    backbone = module.model.bin_encoder.backbone
    assert not torch.equal(backbone.conv_stem.weight, src.conv_stem.weight)
    info = init_bin_encoder(module, cfg)
    want = src.state_dict()
    got = backbone.state_dict()
    assert set(got) == set(want) - {"classifier.weight", "classifier.bias"}
    for key, value in got.items():
        assert torch.equal(value, want[key]), key
    checksum = file_sha256(path)
    assert info["weights_checksum"] == checksum
    assert module.hparams["model_config"]["bin_weights_checksum"] == checksum
    # no file: random init, said so in the model config
    random = MagNetModule(mcfg.to_dict(), {**cfg.to_dict(), "bin_weights": None}, {})
    assert init_bin_encoder(random, TrainConfig(bin_encoder=ENC))["weights_checksum"] == (
        "random-init"
    )
    # weights of another architecture: an error naming the file
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "r18.pth")
    bad = TrainConfig(bin_encoder=ENC, bin_weights=str(tmp_path / "r18.pth"))
    with pytest.raises(InputError, match="r18.pth.*do not fit"):
        init_bin_encoder(module, bad)
    # cached (frozen) bin features have no CNN to start
    with pytest.raises(ConfigError, match="needs an end-to-end bin encoder"):
        fit(Dataset(ds_path), ["s0"], [], TrainConfig(**SMALL, bin_weights=str(path)), tmp_path)


def test_training_reads_count_and_feature_rows_from_disk_as_in_memory(ds_path: Path) -> None:
    """Training reads each batch's count and feature rows from the files (the slide's
    counts and features stay on disk); the rows must be exactly those of the whole arrays
    read in memory, in the order asked for."""
    import pickle

    import anndata

    from magnet_st.data.ondisk import PanelCounts

    ds = Dataset(ds_path)
    path = ds_path / ds.slide_meta("s0")["dir"] / "bin.h5ad"
    whole = anndata.read_h5ad(path)  # everything in memory: the reference
    ids = list(whole.var["gene_ids"].astype(str))
    genes = [ids[7], ids[2], ids[30], ids[0]]
    ref = whole.X.tocsr()[:, [7, 2, 30, 0]].toarray()
    counts = ds.panel_counts("s0", "bin", genes)
    assert counts.shape == ref.shape
    rng = np.random.default_rng(0)
    rows = rng.choice(len(ref), 300)  # unsorted, with repeats
    np.testing.assert_array_equal(counts[rows].toarray(), ref[rows])
    np.testing.assert_array_equal(counts[5:60].toarray(), ref[5:60])
    np.testing.assert_array_equal(counts[np.arange(10, 90)].toarray(), ref[10:90])
    np.testing.assert_array_equal(ds.counts("s0", "bin", genes).toarray(), ref)
    # to a DataLoader worker: reopens its file there
    again = pickle.loads(pickle.dumps(counts))
    np.testing.assert_array_equal(again[rows].toarray(), ref[rows])
    # a gene the slide does not list: a zero column where allowed, else an error
    filled = PanelCounts(path, ids, [genes[0], "ABSENT", genes[1]], fill_absent=True)
    got = filled[rows].toarray()
    np.testing.assert_array_equal(got[:, [0, 2]], ref[rows][:, :2])
    assert not got[:, 1].any()
    with pytest.raises(KeyError):
        PanelCounts(path, ids, ["ABSENT"])
    # feature rows: one pread per run of rows, as np.load reads them
    from magnet_st.features.store import load_features

    feats = load_features(ds_path, KEY, "s0", "bin")
    on_disk = load_features(ds_path, KEY, "s0", "bin", on_disk=True)
    assert on_disk.shape == feats.shape and on_disk.dtype == feats.dtype
    np.testing.assert_array_equal(on_disk[rows], feats[rows])
    np.testing.assert_array_equal(on_disk[3:40], feats[3:40])
    np.testing.assert_array_equal(on_disk[np.array([-1, 0])], feats[[-1, 0]])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(on_disk))[rows], feats[rows])
    with pytest.raises(IndexError):
        on_disk[np.array([len(feats)])]
    # a batch's targets from the on-disk rows equal the slide's targets at those bins
    arrays = slide_arrays(ds, "s0", KEY, genes=genes)
    tt = ds.all_slide_target_transforms
    data = BlockDataset([arrays], batch_bins=64, targets=lambda lv, c: tt[lv].transform(c))
    batch = data[3]
    bins = batch["bin_index"].numpy()
    y = ds.targets("s0", "bin", genes, tt["bin"])[bins]
    np.testing.assert_allclose(batch["y_bin"].numpy(), y, rtol=1e-6)
    spots = batch["spot_index"].numpy()
    np.testing.assert_allclose(
        batch["y_spot"].numpy(), ds.targets("s0", "spot", genes, tt["spot"])[spots], rtol=1e-6
    )
    np.testing.assert_array_equal(batch["bin_x"].numpy(), feats[bins].astype(np.float32))


def test_patch_reader_cuts_bins_as_features_cut_tiles(ds_path: Path) -> None:
    """One patch-cutting path: PatchReader's patches are the feature cache's tiles for the
    same centres (whole native pixels, resampled in torch), normalised by the bin encoder
    with its backbone's timm mean / std; training batches are flipped / rotated copies."""
    from magnet_st.features import jobs as J
    from magnet_st.features.encoders import Preprocess, data_config
    from magnet_st.model.magnet import MagNetConfig, create_model

    ds = Dataset(ds_path)
    image = ds.image("s0")
    mpp = ds.slide_meta("s0")["microns_per_pixel"]
    arrays = slide_arrays(ds, "s0", KEY, bin_features=False, with_counts=False)
    bins = np.arange(40, 64)
    centers = arrays.bin_px[bins]
    patch_um = ds.patch_um("bin")
    native = round(patch_um / mpp)
    for px in (ds.patch_px("bin"), 48):  # as stored, and resampled
        reader = PatchReader({"s0": image}, patch_um, px, seed=1)
        got = reader(arrays, bins, train=False)
        assert got.dtype == torch.uint8 and got.shape == (len(bins), 3, px, px)
        tiles = J._TileBatches(image, centers, native, native, mpp, patch_um, len(bins), 0)[0]
        grey = Preprocess((px, px), (0.0,) * 3, (1 / 255,) * 3, "bicubic")
        torch.testing.assert_close(got.float(), grey(tiles), rtol=0, atol=1e-3)
        # normalised by the model as the features path normalises for the same backbone
        model = create_model(
            MagNetConfig(n_genes=3, variant="no_context", bin_encoder=ENC, bin_patch_px=px)
        )
        pre = data_config(model.bin_encoder.backbone)
        norm = Preprocess((px, px), pre.mean, pre.std, "bicubic")
        torch.testing.assert_close(model.bin_encoder.normalise(got), norm(tiles))
        # augmentation on training batches only: each patch a flip / rotation of itself
        aug = reader(arrays, bins, train=True)
        assert not torch.equal(aug, got)
        for a, b in zip(aug, got, strict=True):
            views = [torch.rot90(v, r, dims=(-2, -1)) for v in (b, b.flip(-1)) for r in range(4)]
            assert any(torch.equal(a, v) for v in views)
    assert native != 48  # the second size was resampled


def test_interrupted_run_resumes_exactly(ds_path: Path, tmp_path: Path) -> None:
    """Killed after epoch 1 of 3 and resumed from its last checkpoint, a run ends with the
    weights of one that never stopped (dropout on: the random streams are restored too)."""
    import lightning as L

    class Kill(L.Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            if trainer.current_epoch == 1:  # epoch 1 of 3 is done and saved
                raise RuntimeError("killed")

    class Final(L.Callback):
        def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            self.step = trainer.global_step

    ds = Dataset(ds_path)
    cfg = TrainConfig(**{**SMALL, "epochs": 3, "dropout": 0.3})
    full, resumed = Final(), Final()
    fit(ds, ["s0"], ["s1"], cfg, tmp_path / "full", progress=False, callbacks=[full])
    # last.ckpt follows every epoch, improved or not (it is what a resume starts from)
    saved = torch.load(tmp_path / "full/checkpoints/last.ckpt", weights_only=True)
    assert saved["global_step"] == full.step
    with pytest.raises(RuntimeError, match="killed"):
        fit(ds, ["s0"], ["s1"], cfg, tmp_path / "cut", progress=False, callbacks=[Kill()])
    last = tmp_path / "cut/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0
    fit(ds, ["s0"], ["s1"], cfg, tmp_path / "cut", resume=last, progress=False, callbacks=[resumed])
    assert resumed.step == full.step > 0
    a, b = full.state, resumed.state
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    # the resumed run's history holds the epoch before the interruption too
    hist = lambda run: json.loads((tmp_path / run / "history.json").read_text())  # noqa: E731
    assert [r["epoch"] for r in hist("cut")] == [r["epoch"] for r in hist("full")] == [0, 1, 2]
    assert hist("cut")[0]["train/loss"] == pytest.approx(hist("full")[0]["train/loss"])


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


def test_cross_validation_ddp_two_cpu_processes(ds_path: Path, tmp_path: Path) -> None:
    """'magnet cv --devices 2' (gloo): each fold trains in two processes, rank 0 saves,
    predicts and scores after a barrier; the table has the rows of a one-process run."""
    import pandas as pd

    from magnet_st.evaluate.cv import cross_validate

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PL_DISABLE_FORK": "1"}
    out = tmp_path / "cv2"
    cmd = [sys.executable, "-m", "magnet_st", "cv", str(ds_path), str(out)]
    cmd += ["--features", KEY, "--width", "32", "--epochs", "1", "--variants", "no_context"]
    cmd += ["--accelerator", "cpu", "--devices", "2", "--quiet", "--only-folds", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # summary, per test slide, paired with ridge and groups, once, by rank 0
    assert proc.stdout.count("### bin level") == 4
    _, payload = load_model(out / "fold0" / "no_context" / "model.pt")
    assert json.loads(json.dumps(payload["train_config"]))["devices"] == 2
    cfg = TrainConfig(features=KEY, width=32, epochs=1)
    one = cross_validate(ds_path, tmp_path / "cv1", cfg, variants=["no_context"],
                         only_folds=[0], progress=False)  # fmt: skip
    two = pd.read_csv(out / "metrics.csv")
    key = ["fold", "model", "level", "test_slide"]
    one, two = (t.sort_values(key).reset_index(drop=True) for t in (one, two))
    pd.testing.assert_frame_equal(one[key], two[key], check_dtype=False)
    assert np.isfinite(two["pcc_gene"]).all()
    # the models that are not trained match exactly
    fixed = one["model"].isin(["mean_profile", "ridge"])
    np.testing.assert_allclose(two[fixed]["mse"], one[fixed]["mse"], rtol=1e-9)


def test_cross_validation_tables_and_resume(ds_path: Path, tmp_path: Path) -> None:
    import pandas as pd

    from magnet_st.evaluate.cv import cross_validate, make_folds, read_gene_groups
    from magnet_st.evaluate.tables import (
        group_summary,
        markdown_groups,
        markdown_summary,
        summary_table,
    )

    cfg = TrainConfig(**{**SMALL, "epochs": 1})
    panel = Dataset(ds_path).all_slide_panel
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
    models = {"mean_profile", "ridge", "no_context"}
    assert set(table["model"]) == models | {f"{m} (aggregated bins)" for m in models}
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
    # mean profile, ridge and the no-context model (its coarse levels: its bins summed) at 3
    # levels; each one's bins summed at 2 levels
    assert len(table) == 2 * (3 + 3 + 3 + 3 * 2)
    plan = json.loads((tmp_path / "cv/folds.json").read_text())
    assert plan["folds"] == make_folds(["s0", "s1"])
    summary = pd.read_csv(tmp_path / "cv/summary.csv")
    assert summary.iloc[0]["model"] == "mean_profile" and summary.iloc[0]["level"] == "bin"
    # the collapse diagnostic on bins: the prediction's and the truth's between-tile share
    bins = table[(table["level"] == "bin") & (table["model"] == "no_context")]
    assert bins["between_tile_share"].between(0, 1).all()
    assert bins["between_tile_share_true"].between(0, 1).all()
    assert table[table["level"] == "spot"]["between_tile_share"].isna().all()
    assert "var. between spot tiles (truth)" in (tmp_path / "cv/summary.md").read_text()
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
    assert pred.uns["magnet"]["scale"] == "log1p(counts)"
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


def test_cross_validation_ensemble_scores_the_mean_of_its_seeds(
    ds_path: Path, tmp_path: Path
) -> None:
    """--ensemble N: N seeds per fold, each in its own folder, scored on the mean of their
    predictions; a rerun trains nothing; another N in the same folder is refused."""
    import anndata

    from magnet_st.evaluate.cv import cross_validate

    cfg = TrainConfig(**{**SMALL, "epochs": 1, "max_batches": 2, "seed": 3})
    run = lambda n: cross_validate(  # noqa: E731
        ds_path, tmp_path / "cv", cfg, variants=["no_context"], ensemble=n, progress=False
    )
    table = run(2)
    fold = tmp_path / "cv/fold0/no_context"
    members = [fold / "seed3", fold / "seed4"]
    assert all((m / "model.pt").is_file() for m in members)
    ds = Dataset(ds_path)
    preds = []
    for m in members:
        model, payload = load_model(m / "model.pt")
        arrays = slide_arrays(ds, "s0", KEY, genes=payload["genes"], with_counts=False)
        preds.append(predict_slide(model, arrays, payload)["bin"])
    assert not np.allclose(preds[0], preds[1])  # the seeds differ
    saved = anndata.read_h5ad(fold / "pred_s0_bin.h5ad").X
    np.testing.assert_allclose(saved, (preds[0] + preds[1]) / 2, rtol=1e-5, atol=1e-6)
    assert table[table["model"] == "no_context"]["train_seconds"].gt(0).all()
    stamp = (members[0] / "model.pt").stat().st_mtime_ns
    (fold / "metrics.json").unlink()  # rescoring from the members trains nothing
    run(2)
    assert (members[0] / "model.pt").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="other folds or settings"):
        run(3)


def test_summary_gives_each_models_fitting_seconds_per_fold() -> None:
    import pandas as pd

    from magnet_st.evaluate.tables import markdown_summary, summary_table

    toy = pd.DataFrame(
        {
            "model": ["m"] * 4 + ["mean_profile"] * 2,
            "level": ["bin", "spot", "bin", "spot", "bin", "bin"],
            "fold": [0, 0, 1, 1, 0, 1],
            "mse": [1.0] * 6,
            "pcc_gene": [0.2] * 6,
            "train_seconds": [10.0, 10.0, 30.0, 30.0, np.nan, np.nan],
        }
    )
    s = summary_table(toy)
    assert s.set_index(["level", "model"]).loc[("bin", "m"), "train_seconds_mean"] == 20.0
    md = markdown_summary(s)
    assert "| model | MSE | PCC-gene | fit s / fold |" in md
    assert "| m | 1.0000 ± 0.0000 | 0.2000 ± 0.0000 | 20 |" in md
    assert "| mean_profile | 1.0000 ± 0.0000 | 0.2000 ± 0.0000 |  |" in md
    assert "fit s" not in markdown_summary(summary_table(toy.drop(columns="train_seconds")))


def test_summary_gives_each_test_slide_with_its_best_model_in_bold() -> None:
    """Per test slide, hand-computed: fold 1 tests two slides, so the mean is over the fold
    means ((0.4 + (0.1 + 0.3) / 2) / 2 = 0.3 for m), not over the three slides; the best
    of each column is bold; MSE's best is the lowest."""
    import pandas as pd

    from magnet_st.evaluate.tables import markdown_per_slide

    toy = pd.DataFrame(
        {
            "model": ["m"] * 3 + ["mean_profile"] * 3,
            "level": ["bin"] * 6,
            "fold": [0, 1, 1, 0, 1, 1],
            "test_slide": ["A", "B", "C", "A", "B", "C"],
            "pcc_gene": [0.4, 0.1, 0.3, 0.0, 0.2, 0.0],
            "mse": [1.0, 2.0, 3.0, 1.5, 1.0, 4.0],
        }
    )
    md = markdown_per_slide(toy)
    assert "### bin level: PCC-gene per test slide" in md
    assert "| model | A | B | C | mean |" in md
    assert "| mean_profile | 0.000 | **0.200** | 0.000 | 0.050 |" in md
    assert "| m | **0.400** | 0.100 | **0.300** | **0.300** |" in md
    assert md.index("| mean_profile |") < md.index("| m |")
    md = markdown_per_slide(toy, "mse")
    assert "| m | **1.000** | 2.000 | **3.000** | **1.750** |" in md
    assert "| mean_profile | 1.500 | **1.000** | 4.000 | 2.000 |" in md


def test_cross_validation_runs_only_the_folds_asked_then_the_rest(
    ds_path: Path, tmp_path: Path
) -> None:
    import pandas as pd

    from magnet_st.evaluate.cv import cross_validate

    cfg = TrainConfig(**SMALL)
    table = cross_validate(
        ds_path, tmp_path / "cv", cfg, variants=[], only_folds=[1], progress=False
    )
    assert set(table["fold"]) == {1} and not (tmp_path / "cv/fold0").exists()
    stamp = (tmp_path / "cv/fold1/ridge/metrics.json").stat().st_mtime_ns
    full = cross_validate(ds_path, tmp_path / "cv", cfg, variants=[], progress=False)
    assert set(full["fold"]) == {0, 1}
    assert (tmp_path / "cv/fold1/ridge/metrics.json").stat().st_mtime_ns == stamp  # reused
    one = full[full["fold"] == 1].reset_index(drop=True)
    pd.testing.assert_frame_equal(one, table.reset_index(drop=True), check_dtype=False)
    with pytest.raises(ConfigError, match="no fold \\[2\\]"):
        cross_validate(ds_path, tmp_path / "cv", cfg, variants=[], only_folds=[2], progress=False)


def test_cross_validation_runs_the_ridge_probe_unasked(
    ds_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import pandas as pd

    import magnet_st.features.store
    from magnet_st.evaluate.cv import _ridge_ready, cross_validate

    cfg = TrainConfig(**SMALL)
    table = cross_validate(ds_path, tmp_path / "cv", cfg, variants=[], progress=False)
    agg = ["mean_profile (aggregated bins)", "ridge (aggregated bins)"]
    assert sorted(set(table["model"])) == sorted(["mean_profile", "ridge", *agg])
    assert len(table) == 2 * (6 + 4)
    # other baseline settings in the same folder would reuse finished folds: refused
    with pytest.raises(ConfigError, match="other folds or settings"):
        cross_validate(
            ds_path,
            tmp_path / "cv",
            cfg,
            variants=[],
            baseline_settings={"epochs": 3},
            progress=False,
        )
    summary = pd.read_csv(tmp_path / "cv/summary.csv")
    coarse = ["mean_profile", agg[0], "ridge", agg[1]]
    assert list(summary["model"]) == ["mean_profile", "ridge", *coarse, *coarse]
    # synthetic slides bring their planted gene groups: PCC-gene per group without a flag
    groups = pd.read_csv(tmp_path / "cv/groups.csv")
    assert {"cell", "context"} <= set(groups["group"])  # those with genes in the panels
    assert set(groups["model"]) == {"mean_profile", "ridge", *agg}
    report = json.loads((tmp_path / "cv/fold0/ridge/ridge_cv.json").read_text())
    # one training slide per fold: alpha cross-validated over x-blocks of it
    assert report["levels"]["bin"]["cv"]["groups"].endswith("x-blocks of s1")
    assert report["levels"]["bin"]["sources"] == ["bin", "spot", "region"]
    # a feature set without bin features: the probe is skipped, and a log line says why
    real = magnet_st.features.store.resolve_feature_set

    def no_bins(path, key):
        fs = real(path, key)
        return {**fs, "slides": {s: {lv: {"complete": True} for lv in TILES} for s in fs["slides"]}}

    monkeypatch.setattr(magnet_st.features.store, "resolve_feature_set", no_bins)
    with caplog.at_level("INFO", logger="magnet_st.evaluate.cv"):
        assert not _ridge_ready(Dataset(ds_path), KEY, ["s0", "s1"])
    assert "ridge probe skipped" in caplog.text and "s0/bin" in caplog.text


def test_ridge_baseline_matches_sklearn_and_round_trips(ds_path: Path, tmp_path: Path) -> None:
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from magnet_st.evaluate.baselines import RidgeBaseline, create_baseline
    from magnet_st.features.store import load_features

    ds = Dataset(ds_path)
    genes = ds.all_slide_panel
    model = RidgeBaseline(KEY, n_components=8, alpha=2.0, chunk=300).fit(ds, ["s0"], genes)
    pred = model.predict(ds, "s1")
    for lv in ("bin", "spot", "region"):
        assert pred[lv].shape == (ds.level("s1", lv).n_obs, len(genes))

    # the same model as scikit-learn's pipeline on the unit's features and its tiles':
    # near-constant dimensions dropped -> StandardScaler -> PCA(8) -> Ridge(alpha * n)
    def inputs(slide: str, lv: str) -> np.ndarray:
        own = load_features(ds_path, KEY, slide, lv).astype(np.float64)
        if lv == "spot":
            region = ds.level(slide, "spot").obs["region"].to_numpy()
            return np.hstack([own, load_features(ds_path, KEY, slide, "region")[region]])
        tiles = [load_features(ds_path, KEY, slide, t)[ds.membership(slide, t)] for t in TILES]
        return np.hstack([own, *tiles]).astype(np.float64)

    for lv in ("bin", "spot"):
        x0 = inputs("s0", lv)
        std = x0.std(0)
        keep = (std > 1e-2 * np.median(std)) & (std > 0)
        np.testing.assert_array_equal(model.params[lv]["keep"], keep)
        y0 = np.log1p(ds.counts("s0", lv, genes).toarray())
        ridge = Ridge(alpha=2.0 * len(x0))
        ref = make_pipeline(StandardScaler(), PCA(8, svd_solver="full"), ridge).fit(x0[:, keep], y0)
        want = np.maximum(ref.predict(inputs("s1", lv)[:, keep]), 0)
        np.testing.assert_allclose(pred[lv], want, atol=2e-4)
    # it learns: in-sample error well below the mean profile's
    y0 = np.log1p(ds.counts("s0", "bin", genes).toarray())
    fit_mse = np.mean((model.predict(ds, "s0")["bin"] - y0) ** 2)
    assert fit_mse < 0.97 * np.mean((y0 - y0.mean(0)) ** 2)
    model.save(tmp_path / "ridge.npz")
    again = RidgeBaseline.load(tmp_path / "ridge.npz")
    for lv, p in again.predict(ds, "s1").items():
        np.testing.assert_array_equal(p, pred[lv])
    with pytest.raises(ConfigError, match="unknown baseline"):
        create_baseline("stnet9", KEY)


def test_every_model_follows_one_fold_protocol(ds3_path: Path, tmp_path: Path) -> None:
    """'select': every model (mean profile and ridge too) fits on the training slide and
    makes its choices on the validation slide; 'refit': the same choices, then every model
    is fitted again on training + validation slides (the network for the epochs chosen)."""
    import anndata
    import pandas as pd

    from magnet_st.data.panel import training_panel
    from magnet_st.evaluate.cv import aggregate_bins, cross_validate, make_folds
    from magnet_st.model.metrics import chosen_epochs

    cfg = TrainConfig(**{**SMALL, "epochs": 3, "patience": 2})
    fold = make_folds(["s0", "s1", "s2"])[0]
    test = fold["test"][0]
    ds = Dataset(ds3_path)
    runs = {}
    for refit in (False, True):
        out = runs[refit] = tmp_path / ("refit" if refit else "select")
        cross_validate(
            ds3_path, out, cfg, variants=["magnet"], only_folds=[0], refit=refit, progress=False
        )
        md = (out / "summary.md").read_text()
        assert md.startswith("Protocol `refit`" if refit else "Protocol `select`")
        assert "Targets and scores on log1p(counts)." in md
        slides = fold["train"] + (fold["val"] if refit else [])
        # the mean profile: the mean over exactly the fitting slides, on their panel
        profile = np.load(out / "fold0/mean_profile/profile.npz")
        genes = list(profile["genes"])
        assert genes == training_panel(ds, slides).genes
        assert list(profile["slides"]) == slides
        y = np.concatenate([np.log1p(ds.counts(s, "bin", genes).toarray()) for s in slides])
        np.testing.assert_allclose(profile["bin"], y.mean(0), rtol=1e-5, atol=1e-6)
        # and the network's predictions carry the same panel
        pred = anndata.read_h5ad(out / f"fold0/magnet/pred_{test}_bin.h5ad")
        assert list(pred.var["gene_ids"]) == genes
        # every coarse tile is scored on the sum of the model's bins too, beside its head
        table = pd.read_csv(out / "metrics.csv")
        row = table[(table["model"] == "magnet (aggregated bins)") & (table["level"] == "spot")]
        member = ds.membership(test, "spot")
        agg = aggregate_bins(np.asarray(pred.X), member, ds.level(test, "spot").n_obs)
        true = np.log1p(ds.counts(test, "spot", genes).toarray())
        assert row["mse"].iloc[0] == pytest.approx(np.mean((agg - true) ** 2), rel=1e-5)
        assert {"ridge", "ridge (aggregated bins)"} <= set(
            table[table["level"] == "region"]["model"]
        )
        # ridge: its coefficients from the fitting slides' bins, its penalty from the
        # validation slide
        report = json.loads((out / "fold0/ridge/ridge_cv.json").read_text())["levels"]["bin"]
        assert report["n_train"] == sum(ds.level(s, "bin").n_obs for s in slides)
        assert report["cv"]["groups"] == f"validation slides {fold['val'][0]}"
        assert report["refit_on_validation_slides"] is refit
        # the network
        folder = out / "fold0/magnet"
        hist = json.loads((folder / "history.json").read_text())
        payload = torch.load(folder / "model.pt", weights_only=True)
        if refit:
            choice = json.loads((folder / "choice/history.json").read_text())
            n = chosen_epochs(choice)
            assert int((folder / "choice/chosen_epochs.txt").read_text()) == n
            assert [r["epoch"] for r in hist] == list(range(n))
            assert not any("val/pcc_gene" in r for r in hist)  # nothing left to validate on
            assert payload["training_slides"] == slides
            # the refitted model keeps the coarse choice its validation run made
            made = torch.load(folder / "choice/model.pt", weights_only=True)
            assert payload["coarse_from"] == made["coarse_from"]
        else:
            assert all("val/pcc_gene" in r for r in hist)
            assert not (folder / "choice").exists()
            # each coarse level from the source with the better validation PCC-gene
            scores = payload["coarse_choice"]["scores"]
            assert payload["coarse_choice"]["slides"] == fold["val"]
            assert set(payload["coarse_from"]) == {"spot", "region"}
            for lv, src in payload["coarse_from"].items():
                assert scores[lv][src] == max(scores[lv].values()), (lv, scores)
                # the model's rows are its chosen source's; its head is scored in any case
                at = table[table["level"] == lv].set_index("model")["mse"]
                used = "magnet (aggregated bins)" if src == "bins" else "magnet (head)"
                assert at["magnet"] == at[used] and "magnet (head)" in at
    # a folder of one protocol is not reused by the other
    with pytest.raises(ConfigError, match="protocol 'select', not 'refit'"):
        cross_validate(
            ds3_path,
            runs[False],
            cfg,
            variants=["magnet"],
            only_folds=[0],
            refit=True,
            progress=False,
        )


def test_augmented_end_to_end_run_resumes_exactly_with_other_workers(
    ds_path: Path, tmp_path: Path
) -> None:
    """The end-to-end bin encoder's flips and rotations are a function of (seed, epoch,
    batch): a run with two workers killed after epoch 1 of 3 and resumed with none ends
    with the weights of one that never stopped."""
    import lightning as L

    class Kill(L.Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            if trainer.current_epoch == 1:
                raise RuntimeError("killed")

    class Final(L.Callback):
        def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}

    ds = Dataset(ds_path)
    cfg = TrainConfig(
        **{**SMALL, "epochs": 3, "dropout": 0.3},
        variant="no_context",
        bin_encoder=ENC,
        bin_weights="random",
        max_batches=2,
        batch_bins=64,
        num_workers=2,
    )
    full, resumed = Final(), Final()
    fit(ds, ["s0"], [], cfg, tmp_path / "full", progress=False, callbacks=[full])
    with pytest.raises(RuntimeError, match="killed"):
        fit(ds, ["s0"], [], cfg, tmp_path / "cut", progress=False, callbacks=[Kill()])
    last = tmp_path / "cut/checkpoints/last.ckpt"
    fit(
        ds,
        ["s0"],
        [],
        replace_cfg(cfg, num_workers=0),
        tmp_path / "cut",
        resume=last,
        progress=False,
        callbacks=[resumed],
    )
    a, b = full.state, resumed.state
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-6


def replace_cfg(cfg: TrainConfig, **changes) -> TrainConfig:
    from dataclasses import replace

    return replace(cfg, **changes)


def test_a_timm_bin_encoder_without_weights_is_refused_unless_asked() -> None:
    """--variant paper's ResNet50 (any timm bin encoder) without --bin-weights would train
    from random weights: refused with one line, unless --bin-weights random."""
    from magnet_st.train.trainer import check_bin_start

    paper = TrainConfig.for_variant("paper", features=KEY)
    assert paper.bin_encoder == "resnet50"
    with pytest.raises(ConfigError, match="would train from random ones.*--bin-weights random"):
        check_bin_start(paper)
    check_bin_start(replace_cfg(paper, bin_weights="random"))  # asked for by name
    check_bin_start(replace_cfg(paper, bin_weights="r50.pth"))
    check_bin_start(TrainConfig(**SMALL))  # frozen features need no weights
    check_bin_start(TrainConfig(**SMALL, bin_encoder="efficientnet_lite0_imagenet"))


def test_aggregate_bins_sums_expression_over_each_tile() -> None:
    from magnet_st.evaluate.cv import aggregate_bins

    counts = np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 0.0], [7.0, 7.0]])
    member = np.array([0, 0, 1, -1])  # the last bin is in no tile
    got = aggregate_bins(np.log1p(counts), member, 3, chunk=2)
    np.testing.assert_allclose(got, np.log1p([[4.0, 2.0], [5.0, 0.0], [0.0, 0.0]]), rtol=1e-6)


def test_a_one_fold_table_has_no_spread() -> None:
    import pandas as pd

    from magnet_st.evaluate.tables import markdown_summary, summary_table

    one = pd.DataFrame(
        {"model": ["m"], "level": ["bin"], "fold": [0], "mse": [1.0], "pcc_gene": [0.25]}
    )
    md = markdown_summary(summary_table(one))
    assert "| m | 1.0000 ± n/a | 0.2500 ± n/a |" in md and "± 0.0000" not in md


def test_models_are_compared_with_ridge_paired_by_fold() -> None:
    """Differences are read from the paired per-fold differences: mean, spread, folds won;
    a gain smaller than its spread is a tie."""
    import pandas as pd

    from magnet_st.evaluate.tables import markdown_paired, paired_table

    toy = pd.DataFrame(
        {
            "model": ["ridge"] * 3 + ["a"] * 3 + ["b"] * 3,
            "level": ["bin"] * 9,
            "fold": [0, 1, 2] * 3,
            "pcc_gene": [0.20, 0.30, 0.40, 0.25, 0.34, 0.46, 0.30, 0.20, 0.41],
            "mse": [1.0, 1.0, 1.0, 0.9, 0.8, 0.9, 1.0, 1.1, 1.2],
        }
    )
    p = paired_table(toy).set_index("model")
    assert p.loc["a", "diff_mean"] == pytest.approx(0.05)  # +0.05, +0.04, +0.06
    assert p.loc["a", "diff_std"] == pytest.approx(0.01)
    assert p.loc["a", "folds_ahead"] == 3 and p.loc["a", "verdict"] == "ahead"
    assert p.loc["b", "folds_ahead"] == 2 and p.loc["b", "verdict"] == "tie"  # +0.1, -0.1, +0.01
    m = paired_table(toy, metric="mse").set_index("model")  # lower is ahead
    assert m.loc["a", "diff_mean"] == pytest.approx(-2 / 15) and m.loc["a", "verdict"] == "ahead"
    assert m.loc["b", "folds_ahead"] == 0 and m.loc["b", "verdict"] == "behind"
    assert "| a | +0.0500 ± 0.0100 | 3 of 3 | ahead |" in markdown_paired(toy)
    assert markdown_paired(toy[toy["model"] != "ridge"]) == ""


def test_diverging_training_stops_and_broken_models_are_refused(
    ds_path: Path, tmp_path: Path
) -> None:
    """A non-finite loss stops training with one line naming epoch and step (no model file);
    a model file with non-finite weights is refused; a slide in two roles is refused."""
    from magnet_st.train.config import TrainingDiverged

    ds = Dataset(ds_path)
    cfg = TrainConfig(**{**SMALL, "epochs": 2, "lr": 1e30})
    with pytest.raises(
        TrainingDiverged, match=r"diverged: the loss is (nan|inf) at epoch \d+, step"
    ):
        fit(ds, ["s0"], [], cfg, tmp_path / "nan", progress=False)
    assert not (tmp_path / "nan/model.pt").exists()
    with pytest.raises(ConfigError, match=r"\['s0'\] are given twice .* one role"):
        fit(ds, ["s0"], ["s0"], TrainConfig(**SMALL), tmp_path / "twice", progress=False)
    # a killed run's checkpoints do not survive a fresh run in the same folder
    (tmp_path / "ok/checkpoints").mkdir(parents=True)
    (tmp_path / "ok/checkpoints/best-epoch=0.ckpt").write_bytes(b"stale")
    good = fit(
        ds, ["s0"], [], TrainConfig(**{**SMALL, "epochs": 1}), tmp_path / "ok", progress=False
    )
    assert not (tmp_path / "ok/checkpoints/best-epoch=0.ckpt").exists()
    payload = torch.load(good.model_path, weights_only=True)
    name = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][name] = payload["state_dict"][name] * float("nan")
    torch.save(payload, tmp_path / "nan.pt")
    with pytest.raises(InputError, match="weights are not finite"):
        load_model(tmp_path / "nan.pt")
    # the model file has a schema, checked on load with one line
    ok = torch.load(good.model_path, weights_only=True)
    for change, message in (
        ({"format_version": 99}, "format version 99; this release reads version 1"),
        ({"genes": None}, "'genes' is a NoneType, not a list"),
    ):
        torch.save({**ok, **change}, tmp_path / "bad.pt")
        with pytest.raises(InputError, match=message):
            load_model(tmp_path / "bad.pt")
    torch.save({k: v for k, v in ok.items() if k != "genes"}, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="lacks 'genes'"):
        load_model(tmp_path / "bad.pt")
