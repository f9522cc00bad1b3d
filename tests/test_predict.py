"""Prediction on image-only slides and on Space Ranger bins (magnet_st.predict.image)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from magnet_st.data.dataset import Dataset
from magnet_st.errors import InputError
from magnet_st.features.extract import extract_features
from magnet_st.prepare.build import prepare
from magnet_st.prepare.config import PrepareConfig
from magnet_st.read.specs import SlideSpec
from magnet_st.train.config import TrainConfig
from magnet_st.train.trainer import fit

ENC = "mobilenetv3_small_050"
MARGIN_UM = 150.0  # write_synthetic_hd's default margin around the capture area

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from magnet_st.synthetic import write_synthetic_hd

    root = tmp_path_factory.mktemp("predict")
    runs = []
    for i in range(2):
        run = root / f"s{i}"
        write_synthetic_hd(
            run,
            width_um=320,
            height_um=320,
            seed=30 + i,
            bin_sizes=(8, 16),
            progress=False,
            write_mtx=False,
            write_raw=False,
        )
        runs.append(run)
    spec = SlideSpec(
        name="s0", path=str(runs[0]), image=str(runs[0] / "he_fullres.tif"), bin_size=8
    )
    prepare([spec], root / "ds", PrepareConfig(n_genes=20), progress=False)
    res = extract_features(
        root / "ds", ENC, levels=("bin", "spot", "region"), device="cpu", num_workers=0,
        progress=False,
    )  # fmt: skip
    cfg = TrainConfig(features=res["key"], width=32, epochs=1, patience=1)
    fit_res = fit(
        Dataset(root / "ds"),
        ["s0"],
        [],
        cfg,
        root / "model",
        progress=False,
    )
    return {"root": root, "model": fit_res.model_path, "new": runs[1]}


@pytest.fixture(scope="module")
def image_only(trained: dict) -> dict:
    from magnet_st.predict.image import predict

    res = predict(
        trained["model"],
        trained["root"] / "pred_image",
        image=trained["new"] / "he_fullres.tif",
        grid_origin_um=(MARGIN_UM, MARGIN_UM),
        device="cpu",
        num_workers=0,
        progress=False,
    )
    return {"res": res}


def test_image_only_prediction_bins_positions_and_files(trained: dict, image_only: dict) -> None:
    import anndata

    res = image_only["res"]
    ad = anndata.read_h5ad(res.files["bin"])
    mpp = 0.2738
    # every bin lies on the virtual grid that starts at the capture area's corner
    rc = ad.obs[["array_row", "array_col"]].to_numpy()
    expect = (MARGIN_UM + (rc[:, ::-1] + 0.5) * 8.0) / mpp
    np.testing.assert_allclose(ad.obsm["spatial"], expect, atol=1e-6)
    assert ad.obs_names[0].startswith("s_008um_")
    # the grid covers the tissue: nearly all bins Space Ranger has under tissue (the image's
    # tissue also reaches past the capture area, where Space Ranger has no bins)
    truth = pd.read_parquet(
        trained["new"] / "outs/binned_outputs/square_008um/spatial/tissue_positions.parquet"
    )
    sr = set(truth.loc[truth["in_tissue"] == 1, "barcode"])
    assert len(sr & set(ad.obs_names)) >= 0.97 * len(sr)
    # predictions: the model's panel, log1p scale, finite
    from magnet_st.predict.modelfile import load_model

    _, payload = load_model(trained["model"])
    assert list(ad.var["gene_ids"]) == payload["genes"]
    # finite, and read from the image: they vary between bins for most genes (a constant
    # profile, or predictions all clipped to 0, fail here)
    x = np.asarray(ad.X)
    assert np.isfinite(x).all() and (x.std(0) > 1e-4).mean() > 0.5
    assert ad.uns["magnet"]["scale"] == "log1p(counts)"
    sf = ad.uns["spatial"][ad.uns["magnet"]["slide"]]["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(8.0 / mpp)
    assert res.n["bin"] == ad.n_obs
    for lv in ("spot", "region"):
        assert anndata.read_h5ad(res.files[lv]).n_obs == res.n[lv] > 0
    assert (res.out / "tissue_mask.png").is_file()
    record = json.loads((res.out / "prediction.json").read_text())
    assert record["n"]["bin"] == ad.n_obs and record["source"] == "image"


def test_prediction_draws_with_scanpy(image_only: dict, tmp_path: Path) -> None:
    import anndata
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    ad = anndata.read_h5ad(image_only["res"].files["bin"])
    ax = sc.pl.spatial(ad, color=ad.var_names[0], show=False)
    ax = ax[0] if isinstance(ax, list) else ax
    assert len(ax.images) == 1  # the H&E image from uns["spatial"]
    ax.figure.savefig(tmp_path / "map.png")
    assert (tmp_path / "map.png").stat().st_size > 1000


def test_rerun_reuses_the_work_folder(trained: dict, image_only: dict) -> None:
    """A rerun reuses the cached features; with spatialdata=True it adds prediction.zarr,
    a SpatialData store of the three levels (checked in detail in test_export_spatialdata)."""
    import anndata

    from magnet_st.predict.image import predict
    from magnet_st.read.spatialdata import _images, _read_element

    feats = next((image_only["res"].out / "work/features").glob("*/*/bin.npy"))
    stamp = feats.stat().st_mtime_ns
    again = predict(
        trained["model"],
        image_only["res"].out,
        image=trained["new"] / "he_fullres.tif",
        grid_origin_um=(MARGIN_UM, MARGIN_UM),
        device="cpu",
        num_workers=0,
        spatialdata=True,
        progress=False,
    )
    assert feats.stat().st_mtime_ns == stamp
    assert again.n == image_only["res"].n
    store = again.files["spatialdata"]
    assert store == again.out / "prediction.zarr"
    record = json.loads((again.out / "prediction.json").read_text())
    assert record["files"]["spatialdata"] == str(store)
    bins = anndata.read_h5ad(again.files["bin"])
    slide = bins.uns["magnet"]["slide"]
    for lv, name in (("bin", "square_008um"), ("spot", "spot_tiles"), ("region", "region_tiles")):
        table = anndata.read_zarr(store / "tables" / name)
        assert table.n_obs == again.n[lv]
        shapes = _read_element(store, f"{slide}_{name}", "location_id")
        level = anndata.read_h5ad(again.files[lv])
        np.testing.assert_allclose(shapes["centres"], level.obsm["spatial"], atol=1e-6)
    np.testing.assert_array_equal(anndata.read_zarr(store / "tables/square_008um").X, bins.X)
    assert sorted(_images(store)) == [f"{slide}_hires_image", f"{slide}_lowres_image"]


def test_image_only_and_spaceranger_agree_at_shared_bins(trained: dict, image_only: dict) -> None:
    import anndata

    from magnet_st.predict.image import predict

    sr = predict(  # no --image: a 'magnet synth' run keeps its image in its folder
        trained["model"],
        trained["root"] / "pred_sr",
        spaceranger=trained["new"],
        device="cpu",
        num_workers=0,
        progress=False,
    )
    a = anndata.read_h5ad(image_only["res"].files["bin"])
    b = anndata.read_h5ad(sr.files["bin"])
    assert "measured" in b.layers and b.var["measured"].all()
    shared = a.obs_names.intersection(b.obs_names)
    assert len(shared) >= 0.9 * min(a.n_obs, b.n_obs)
    pa, pb = a[shared].X, b[shared].X
    np.testing.assert_allclose(a[shared].obsm["spatial"], b[shared].obsm["spatial"], atol=0.01)
    # same bins, same tiles, same features: only the batch graphs at the tissue edge differ
    r = np.corrcoef(pa.ravel(), pb.ravel())[0, 1]
    assert r > 0.99
    assert np.median(np.abs(pa - pb)) < 0.01


def test_a_bin_model_pools_its_bins_into_given_cells(trained: dict, tmp_path: Path) -> None:
    """A model of 8 um bins with --segmentation: its bins, then cells.h5ad, each cell the
    bins under its outline by the share of their area inside it (and QuPath's cells, and
    the SpatialData store's); the run's 2 um bins summed into the outlines are the cells'
    measured counts; without --segmentation, --qupath is refused in one line."""
    import anndata

    from magnet_st.errors import ConfigError
    from magnet_st.predict.image import predict
    from magnet_st.predict.pool import bin_cell_weights, pool_to_cells
    from magnet_st.read import visium_hd_cells
    from magnet_st.read.geojson import read_geojson
    from magnet_st.synthetic import write_synthetic_hd

    run = tmp_path / "s1"  # the fixture's second slide, with its 2 um bins this time
    write_synthetic_hd(run, width_um=320, height_um=320, seed=31, bin_sizes=(2, 8, 16),
                       progress=False, write_mtx=False, write_raw=False)  # fmt: skip
    seg = run / "outs" / "segmented_outputs" / "cell_segmentations.geojson"
    res = predict(trained["model"], tmp_path / "p", spaceranger=run, segmentation=seg,
                  qupath=True, spatialdata=True, device="cpu", num_workers=0, progress=False)  # fmt: skip
    assert res.files["cell"].name == "cells.h5ad" and res.files["qupath"].is_file()
    bins, cells = anndata.read_h5ad(res.files["bin"]), anndata.read_h5ad(res.files["cell"])
    lib = next(iter(bins.uns["spatial"].values()))
    ids, polys = read_geojson(seg)
    w = bin_cell_weights(
        bins.obsm["spatial"], 8.0 / lib["scalefactors"]["microns_per_pixel"], polys
    )
    keep = np.asarray(w.sum(axis=1)).ravel() > 0
    assert cells.n_obs == keep.sum() > 0.9 * len(polys)
    np.testing.assert_allclose(cells.X, pool_to_cells(np.asarray(bins.X), w[keep]), rtol=1e-5)
    np.testing.assert_allclose(
        cells.obsm["spatial"], polys.subset(np.flatnonzero(keep)).centroids()
    )
    assert cells.uns["magnet"]["pooled_from"] == "bin" and list(cells.var_names) == list(
        bins.var_names
    )
    # measured: Space Ranger's own cells (its 2 um bins in the same outlines), log1p, panel
    sr = visium_hd_cells(run)
    col = {g: i for i, g in enumerate(sr.gene_ids.astype(str))}
    want = np.log1p(sr.counts[:, [col[g] for g in bins.var["gene_ids"]]].toarray())
    rows = pd.Index(sr.unit_ids).get_indexer(cells.obs_names)
    assert (
        cells.obs["measured"].mean() > 0.95
        and (rows >= 0).tolist() == cells.obs["measured"].tolist()
    )
    got = cells.layers["measured"].toarray()
    np.testing.assert_allclose(got[rows >= 0], want[rows[rows >= 0]], rtol=1e-6)
    assert not got[rows < 0].any()
    meta = next(iter(cells.uns["spatial"].values()))
    assert meta["metadata"]["images_in"] == "bins.h5ad" and "images" not in meta
    assert json.loads((tmp_path / "p" / "prediction.json").read_text())["n"]["cell"] == cells.n_obs
    # the SpatialData store holds the bins and, as spatialdata-io names cells, the cells
    store = json.loads((res.files["spatialdata"] / "zarr.json").read_text())
    tables = store["attributes"]["magnet_st"]["tables"]
    assert tables["bin"] == "square_008um" and tables["cell"] == "cell_segmentations"
    assert (res.files["spatialdata"] / "shapes" / "s1_cell_segmentations").is_dir()
    sd = pytest.importorskip("spatialdata")
    sdata = sd.read_zarr(res.files["spatialdata"])
    assert {"square_008um", "cell_segmentations"} <= set(sdata.tables)
    assert sdata.tables["cell_segmentations"].n_obs == cells.n_obs
    from magnet_st.report import prediction_figures

    drawn = prediction_figures(res.files["cell"], tmp_path / "fig", n_genes=1, formats=("png",))
    assert {p.name for p in drawn} == {"cells_maps.png", "cells_gene_pcc.png"}
    with pytest.raises(ConfigError, match="--segmentation"):
        predict(trained["model"], tmp_path / "q", spaceranger=trained["new"], qupath=True)


def test_errors(trained: dict, tmp_path: Path) -> None:
    import tifffile
    from PIL import Image

    from magnet_st.predict.image import predict

    white = tmp_path / "white.tif"
    tifffile.imwrite(white, np.full((800, 800, 3), 245, np.uint8))
    with pytest.raises(InputError, match="no tissue"):
        predict(trained["model"], tmp_path / "o1", image=white, mpp=0.25, progress=False)
    png = tmp_path / "slide.png"
    Image.fromarray(np.full((200, 200, 3), 200, np.uint8)).save(png)
    with pytest.raises(InputError, match="microns per pixel"):
        predict(trained["model"], tmp_path / "o2", image=png, progress=False)
    with pytest.raises(InputError, match="not plausible"):
        predict(trained["model"], tmp_path / "o3", image=png, mpp=25.0, progress=False)
    with pytest.raises(InputError, match="upsampled"):
        predict(trained["model"], tmp_path / "o4", image=png, mpp=2.0, progress=False)
    with pytest.raises(InputError, match="image not found"):
        predict(trained["model"], tmp_path / "o5", image=tmp_path / "nope.tif", progress=False)
    src = trained["new"] / "he_fullres.tif"  # a truncated image: one line, no output folder
    cut = tmp_path / "cut.tif"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 3])
    with pytest.raises(InputError, match="cut.tif: cannot decode"):
        predict(trained["model"], tmp_path / "o8", image=cut, mpp=0.2738, progress=False)
    assert not (tmp_path / "o8").exists()
    # a Space Ranger run (not a synthetic one) without --image
    import shutil

    run = tmp_path / "sr_run"
    shutil.copytree(trained["new"] / "outs", run / "outs")
    with pytest.raises(InputError, match="needs --image"):
        predict(trained["model"], tmp_path / "o7", spaceranger=run, progress=False)
    assert not (tmp_path / "o7" / "bins.h5ad").exists()
    with pytest.raises(InputError, match="model file not found"):
        predict(tmp_path / "none.pt", tmp_path / "o6", image=png, progress=False)
    # an encoder other than the model's (other weights): refused before predicting
    import timm
    import torch

    other = tmp_path / "other.pth"
    torch.save(timm.create_model(ENC, num_classes=0).state_dict(), other)
    with pytest.raises(InputError, match="not the one the model was trained with"):
        predict(
            trained["model"],
            tmp_path / "o7",
            image=trained["new"] / "he_fullres.tif",
            weights=other,
            device="cpu",
            num_workers=0,
            progress=False,
        )


def test_a_name_that_is_a_path_is_refused_before_anything_is_written(
    trained: dict, tmp_path: Path
) -> None:
    from magnet_st.errors import ConfigError
    from magnet_st.predict.image import predict

    out = tmp_path / "a" / "b" / "pred"
    with pytest.raises(ConfigError, match="a name is not a path"):
        predict(
            trained["model"],
            out,
            image=trained["new"] / "he_fullres.tif",
            name="../../../escape_pred",
            device="cpu",
            progress=False,
        )
    assert not (tmp_path / "a").exists() and not list(tmp_path.rglob("escape_pred*"))


def test_roi_bounds_the_grid_max_bins_stops_and_the_slide_is_read_once(
    trained: dict, image_only: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import anndata

    from magnet_st.io.image import SlideImage
    from magnet_st.predict.image import predict

    full = anndata.read_h5ad(image_only["res"].files["bin"])
    mpp = full.uns["spatial"][full.uns["magnet"]["slide"]]["scalefactors"]["microns_per_pixel"]
    um = full.obsm["spatial"] * mpp
    roi = (float(um[:, 0].min()), float(um[:, 1].min()), float(np.median(um[:, 0])), 1e6)
    reads = {"n": 0}
    real = SlideImage.thumbnail

    def counting(self, max_size):
        reads["n"] += 1
        return real(self, max_size)

    monkeypatch.setattr(SlideImage, "thumbnail", counting)
    opts = {"device": "cpu", "num_workers": 0, "progress": False}
    res = predict(
        trained["model"], tmp_path / "roi", image=trained["new"] / "he_fullres.tif",
        grid_origin_um=(MARGIN_UM, MARGIN_UM), roi_um=roi, **opts,
    )  # fmt: skip
    assert reads["n"] == 1  # tissue mask, its overlay and every level's images: one read
    slide = full.uns["magnet"]["slide"]
    tiles = anndata.read_h5ad(res.files["spot"]).uns["spatial"][slide]
    assert "images" not in tiles and tiles["metadata"]["images_in"] == "bins.h5ad"
    assert set(anndata.read_h5ad(res.files["bin"]).uns["spatial"][slide]["images"]) == {
        "hires",
        "lowres",
    }  # the images once, in the bins' file
    part = anndata.read_h5ad(res.files["bin"])
    inside = (um[:, 0] >= roi[0]) & (um[:, 0] < roi[2])
    assert part.n_obs == int(inside.sum()) and 0 < part.n_obs < full.n_obs
    assert set(part.obs_names) == set(full.obs_names[inside])
    # --capture-area: the grid anchored at a capture area's corner stops 6.5 mm from it
    # (a corner 788 bins of 8 um up and left of the grid above: its bins, renumbered)
    corner = MARGIN_UM - 788 * 8
    cap = predict(
        trained["model"], tmp_path / "cap", image=trained["new"] / "he_fullres.tif",
        grid_origin_um=(corner, corner), capture_area=True, **opts,
    )  # fmt: skip
    got = anndata.read_h5ad(cap.files["bin"]).obsm["spatial"] * mpp
    edge = corner + 6500.0
    assert got.max() < edge < um.max()  # nothing past the capture area's far edges
    inside = (um < edge).all(1)
    shared = got[(got >= MARGIN_UM).all(1)]  # the first grid starts at MARGIN_UM
    assert len(shared) == int(inside.sum()) > 0
    np.testing.assert_allclose(np.sort(shared, 0), np.sort(um[inside], 0))
    assert json.loads((tmp_path / "cap" / "prediction.json").read_text())["capture_area"]
    # a grid larger than --max-bins stops before anything is computed, saying how to go on
    with pytest.raises(InputError, match=r"more than --max-bins 10 .*--roi X0 Y0 X1 Y1"):
        predict(trained["model"], tmp_path / "big", image=trained["new"] / "he_fullres.tif",
                max_bins=10, **opts)  # fmt: skip
    assert not (tmp_path / "big" / "work").exists()


def test_the_capture_area_is_a_box_from_its_corner(trained: dict, tmp_path: Path) -> None:
    from magnet_st.errors import ConfigError
    from magnet_st.predict.image import capture_area_box, predict

    assert capture_area_box((100.0, -50.0), None) == (100.0, -50.0, 6600.0, 6450.0)
    assert capture_area_box((0, 0), (-10, 20, 7000, 30)) == (0.0, 20, 6500.0, 30)
    with pytest.raises(ConfigError, match="outside the capture area"):
        capture_area_box((0, 0), (6600, 0, 7000, 10))
    with pytest.raises(ConfigError, match="--capture-area bounds a virtual grid"):
        predict(trained["model"], tmp_path / "x", image=trained["new"] / "he_fullres.tif",
                spaceranger=trained["new"], capture_area=True)  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_measured_counts_follow_the_model_panel_sparse(trained: dict, tmp_path: Path) -> None:
    import anndata
    import scipy.sparse as sp

    from magnet_st.predict.image import predict
    from magnet_st.read import visium_hd

    sr = predict(trained["model"], tmp_path / "sr", spaceranger=trained["new"], device="cpu",
                 num_workers=0, progress=False)  # fmt: skip
    b = anndata.read_h5ad(sr.files["bin"])
    run = visium_hd(trained["new"], 8)
    col = {g: i for i, g in enumerate(run.gene_ids.astype(str))}
    row = {u: i for i, u in enumerate(run.unit_ids.astype(str))}
    rows = [row[u] for u in b.obs_names]
    want = np.log1p(run.counts[rows][:, [col[g] for g in b.var["gene_ids"]]].toarray())
    assert sp.issparse(b.layers["measured"])
    np.testing.assert_allclose(b.layers["measured"].toarray(), want, rtol=1e-6)


def test_prediction_loads_no_training_stack(trained: dict, tmp_path: Path) -> None:
    """`magnet predict` in a fresh process: a whole image-only prediction, and no Lightning."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from magnet_st.predict.image import predict\n"
        f"predict({str(trained['model'])!r}, {str(tmp_path / 'p')!r}, "
        f"image={str(trained['new'] / 'he_fullres.tif')!r}, device='cpu', num_workers=0, "
        "progress=False)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning'}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "p" / "bins.h5ad").is_file()
