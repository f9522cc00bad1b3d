"""Cells: Space Ranger 4-like segmented outputs of the synthetic slides (planted nuclei),
read back, and a run's 2 um bins pooled into a GeoJSON segmentation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from magnet_st.data.shapes import Polygons, assign_points
from magnet_st.errors import InputError
from magnet_st.read import (
    cells_from_bins,
    read_geojson,
    spatialdata_zarr,
    visium_hd,
    visium_hd_cells,
)
from magnet_st.synthetic import write_synthetic_hd


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("cells") / "run"
    return write_synthetic_hd(out, width_um=320, height_um=320, seed=3, n_genes=60, progress=False)


def test_synthetic_run_has_space_ranger_4_segmented_outputs(run) -> None:
    seg = run.cells_dir
    for name in (
        "filtered_feature_cell_matrix.h5",
        "raw_feature_cell_matrix.h5",
        "cell_segmentations.geojson",
        "nucleus_segmentations.geojson",
        "spatial/scalefactors_json.json",
    ):
        assert (seg / name).is_file(), name
    doc = json.loads((seg / "cell_segmentations.geojson").read_text())
    check_geojson(doc)
    feat = doc["features"][0]
    assert doc["type"] == "FeatureCollection" and feat["geometry"]["type"] == "Polygon"
    assert set(feat["properties"]) == {"cell_id"} and isinstance(feat["properties"]["cell_id"], int)
    ring = feat["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1]  # a closed GeoJSON ring
    bm = pd.read_parquet(run.out_dir / "outs" / "barcode_mappings.parquet")
    assert list(bm.columns) == [
        "square_002um",
        "square_008um",
        "square_016um",
        "cell_id",
        "in_nucleus",
        "in_cell",
    ]
    assert len(bm) == (320 // 2) ** 2  # every 2 um bin of the capture area
    assert (bm["cell_id"].notna() == bm["in_cell"]).all()
    assert not (bm["in_nucleus"] & ~bm["in_cell"]).any()
    row = bm.iloc[(4 * 7 + 1) * 160 + 4 * 3 + 2]  # 2 um bin (29, 14)
    assert (row.square_002um, row.square_008um, row.square_016um) == (
        "s_002um_00029_00014-1",
        "s_008um_00007_00003-1",
        "s_016um_00003_00001-1",
    )


def test_cell_matrix_is_the_sum_of_each_cells_2um_bins(run) -> None:
    """By barcode_mappings, independent of the outlines: Space Ranger's definition."""
    cells = visium_hd_cells(run.out_dir)
    bins = visium_hd(run.out_dir, 2)
    bm = pd.read_parquet(run.out_dir / "outs" / "barcode_mappings.parquet")
    bm = bm[bm["cell_id"].notna()].set_index("square_002um")["cell_id"]
    row = {b: i for i, b in enumerate(bins.unit_ids)}
    col = {c: i for i, c in enumerate(cells.unit_ids)}
    pairs = [(col[c], row[b]) for b, c in bm.items() if b in row and c in col]
    ci, bi = np.array(pairs).T
    pool = sp.csr_matrix((np.ones(len(ci)), (ci, bi)), shape=(cells.n_units, bins.n_units))
    assert (pool @ bins.counts != cells.counts).nnz == 0
    assert cells.counts.sum() > 0.5 * bins.counts.sum()  # most UMIs lie in cells


def test_pooling_bins_into_the_outlines_reproduces_space_rangers_cells(run) -> None:
    seg = run.cells_dir
    sr = visium_hd_cells(run.out_dir)
    mine = cells_from_bins(run.out_dir, seg / "cell_segmentations.geojson")
    assert list(mine.unit_ids) == list(sr.unit_ids)
    assert (mine.counts != sr.counts).nnz == 0
    np.testing.assert_allclose(mine.centers_px, sr.centers_px)
    # an outline 1 um off loses bins: the equality above depends on where the outlines are
    ids, polys = read_geojson(seg / "cell_segmentations.geojson")
    shifted = _geojson(ids, Polygons(polys.xy + 1.0 / run.microns_per_pixel, polys.offsets))
    path = seg.parent.parent / "shifted.geojson"
    path.write_text(json.dumps(shifted))
    moved = cells_from_bins(run.out_dir, path)
    row = {b: i for i, b in enumerate(sr.unit_ids)}
    same = [
        (moved.counts[i] != sr.counts[row[b]]).nnz == 0
        for i, b in enumerate(moved.unit_ids)
        if b in row
    ]
    assert np.mean(same) < 0.2


def test_cells_grow_from_the_planted_nuclei(run) -> None:
    nuclei = pd.read_parquet(run.nuclei_path)
    cells = visium_hd_cells(run.out_dir)
    ids = np.array([int(b[7:16]) for b in cells.unit_ids])
    # a cell's id is its nucleus's row + 1, and its outline holds that nucleus's centre
    own = nuclei.iloc[ids - 1]
    centres = own[["x_px", "y_px"]].to_numpy()
    assert (assign_points(cells.polygons, centres) == np.arange(cells.n_units)).mean() > 0.97
    # nearly every nucleus of the capture area under tissue has a cell
    ox = 150.0  # the default margin, um
    inside = nuclei[
        nuclei.x_um.between(ox + 4, ox + 316) & nuclei.y_um.between(ox + 4, ox + 316)
    ].index
    assert np.isin(inside + 1, ids).mean() > 0.95
    # nuclei are inside their cells, which are 4 um larger all round
    nuc = visium_hd_cells(run.out_dir, outline="nucleus")
    assert list(nuc.unit_ids) == list(cells.unit_ids)
    a_cell = cells.polygons.areas() * run.microns_per_pixel**2
    a_nuc = nuc.polygons.areas() * run.microns_per_pixel**2
    assert (a_nuc <= a_cell + 1e-6).all()
    assert 30 < np.median(a_cell) < 150 and np.median(a_nuc) < 0.6 * np.median(a_cell)


def _cell_gene_purity(info) -> tuple[float, np.ndarray, np.ndarray]:
    """Of the UMIs of cell-driven genes in the run's cells: the share of other types' genes
    than the cell's own (its nucleus's type); and each cell's own-type UMIs and type."""
    cells = visium_hd_cells(info.out_dir)
    nuclei = pd.read_parquet(info.nuclei_path)
    ids = np.array([int(b[7:16]) for b in cells.unit_ids])
    own = nuclei.cell_type.astype(str).to_numpy()[ids - 1]
    gtype = np.array([g.split("_")[1] if g.startswith("CELL_") else "" for g in cells.gene_names])
    x = cells.counts.toarray()
    cell_genes = x[:, gtype != ""].sum()
    mine = np.stack([x[i, gtype == t].sum() for i, t in enumerate(own)])
    return float(1 - mine.sum() / cell_genes), mine, own


def test_expression_planted_per_cell(run, tmp_path: Path) -> None:
    """``expression="cells"``: a cell's cell-driven UMIs are its own type's only, ~S_T of
    them; its 8 and 16 um bins are still the sums of their 2 um bins; planted per 8 um bin
    (the default), cells hold their neighbours' types too."""
    pc = write_synthetic_hd(
        tmp_path / "pc",
        width_um=320,
        height_um=320,
        seed=3,
        n_genes=60,
        progress=False,
        expression="cells",
    )
    foreign, mine, own = _cell_gene_purity(pc)
    assert foreign == 0.0
    assert _cell_gene_purity(run)[0] > 0.05  # per bin: neighbours leak into a cell
    # Poisson(e S_T) per cell, e ~ 1: the mean over the cells of each type (cells cut by
    # the capture edge hold all of their UMIs in the part inside)
    truth = json.loads(pc.truth_path.read_text())
    per_nucleus = {c["name"]: c["umi_per_nucleus"] for c in truth["cell_types"]}
    for t, n in zip(*np.unique(own, return_counts=True), strict=True):
        if n >= 30:
            s = per_nucleus[t]
            assert abs(mine[own == t].mean() / s - 1) < 5 / np.sqrt(n * s) + 0.1, t
    x2 = visium_hd(pc.out_dir, 2)
    x8 = visium_hd(pc.out_dir, 8)
    assert x2.counts.sum() == x8.counts.sum() == visium_hd(pc.out_dir, 16).counts.sum()
    assert truth["parameters"]["expression"] == "cells"
    assert "each cell k" in truth["formulas"]["rate"]
    with pytest.raises(ValueError, match="expression"):
        write_synthetic_hd(tmp_path / "bad", width_um=160, height_um=160, expression="nuclei")


def test_bins_pooled_into_cells_by_area_share(run) -> None:
    """A bin's weight in a cell is the share of its area inside the outline; pooled counts
    add up (log1p of the weighted sum), counts per 10,000 average; the 2 um bins pooled at
    one point each give Space Ranger's cell matrix exactly."""
    from magnet_st.predict.pool import bin_cell_weights, pool_to_cells

    ring = np.array([[0, 0], [12, 0], [12, 8], [0, 8], [0, 0]], dtype=float)  # px
    one = Polygons(ring, np.array([0, len(ring)]))
    w = bin_cell_weights(np.array([[4.0, 4.0], [12.0, 4.0], [28.0, 4.0]]), 8.0, one)
    np.testing.assert_allclose(w.toarray(), [[1.0, 0.5, 0.0]])
    pred = np.log1p(np.array([[4.0, 1.0], [2.0, 3.0], [9.0, 9.0]]))
    np.testing.assert_allclose(pool_to_cells(pred, w), np.log1p([[5.0, 2.5]]), rtol=1e-6)
    np.testing.assert_allclose(
        pool_to_cells(pred, w, per_10k=True), np.log1p([[5.0 / 1.5, 2.5 / 1.5]]), rtol=1e-6
    )
    cells = visium_hd_cells(run.out_dir)
    bins = visium_hd(run.out_dir, 2)
    w2 = bin_cell_weights(bins.centers_px, 2.0 / run.microns_per_pixel, cells.polygons, sub=1)
    got = pool_to_cells(np.log1p(bins.counts.toarray()), w2)
    np.testing.assert_allclose(np.expm1(got), cells.counts.toarray(), atol=1e-3)


def check_geojson(doc: dict) -> None:
    """RFC 7946's rules for what the writers produce: a FeatureCollection of Features, each
    with a Polygon geometry of linear rings (at least four [x, y] numbers, first = last)
    and a properties object; JSON numbers only (no NaN)."""
    assert doc["type"] == "FeatureCollection" and isinstance(doc["features"], list)
    for f in doc["features"]:
        assert f["type"] == "Feature" and isinstance(f["properties"], dict)
        g = f["geometry"]
        assert g["type"] == "Polygon" and len(g["coordinates"]) >= 1
        for ring in g["coordinates"]:
            assert len(ring) >= 4 and ring[0] == ring[-1]
            assert all(len(p) == 2 and all(np.isfinite(v) for v in p) for p in ring)
    json.loads(json.dumps(doc, allow_nan=False))  # raises on NaN / inf


def test_qupath_detections_carry_the_genes_as_measurements(tmp_path: Path) -> None:
    from magnet_st.io.qupath import write_qupath_geojson

    polys = Polygons.from_rings([np.array(SQUARE), np.array(SQUARE) + 20.0])
    values = np.array([[1.5, np.nan], [0.25, 3.0]])
    path = write_qupath_geojson(
        tmp_path / "q.geojson", polys, ["a", "b"], values, ["G1", "G2"], ["c1", "c2"]
    )
    doc = json.loads(path.read_text())
    check_geojson(doc)
    p0, p1 = (f["properties"] for f in doc["features"])
    assert p0["measurements"] == {"G1": 1.5, "G2": None}  # NaN is not JSON: null
    assert p1["objectType"] == "detection" and p1["name"] == "b"
    assert (
        p0["classification"]["name"] == "c1"
        and p0["classification"]["color"] != (p1["classification"]["color"])
    )
    ids, back = read_geojson(path)  # our own reader takes QuPath's file back
    np.testing.assert_allclose(back.areas(), polys.areas())


def _geojson(ids, polys: Polygons, **props) -> dict:
    feats = []
    for i, cid in enumerate(ids):
        ring = np.vstack([polys.ring(i), polys.ring(i)[:1]]).tolist()
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"cell_id": int(cid), **props},
            }
        )
    return {"type": "FeatureCollection", "features": feats}


SQUARE = [[0.0, 0.0], [10.0, 0.0], [10.0, 10.0], [0.0, 10.0], [0.0, 0.0]]


def test_geojson_reads_qupath_and_stardist_exports(tmp_path: Path) -> None:
    small = [[[20.0, 20.0], [22.0, 20.0], [22.0, 22.0], [20.0, 20.0]]]
    feats = [
        {  # QuPath annotation: a tissue outline, skipped
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [SQUARE]},
            "properties": {"objectType": "annotation"},
        },
        {
            "type": "Feature",
            "id": "a1b2",
            "geometry": {"type": "MultiPolygon", "coordinates": [small, [SQUARE]]},
            "properties": {"objectType": "cell"},
        },
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [SQUARE]}},
    ]
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps(feats))  # a bare list, as QuPath can export
    ids, polys = read_geojson(path)
    assert list(ids) == ["a1b2", "3"]  # QuPath's id; else the position in the file
    np.testing.assert_allclose(polys.areas(), [100.0, 100.0])  # the larger part of a multi
    np.testing.assert_allclose(polys.centroids(), [[5.0, 5.0], [5.0, 5.0]])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"type": "Topology"}', "not a GeoJSON FeatureCollection"),
        ('{"type": "FeatureCollection", "features": []}', "no cell polygons"),
        (
            '{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}',
            "feature 0: geometry 'Point' is not a Polygon",
        ),
        (
            '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}}',
            "at least 3",
        ),
        (
            json.dumps(
                [
                    {
                        "type": "Feature",
                        "geometry": {"type": "Polygon", "coordinates": [SQUARE]},
                        "properties": {"cell_id": 4},
                    }
                ]
                * 2
            ),
            "cell id '4' appears 2 times",
        ),
    ],
)
def test_bad_geojson_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "seg.geojson"
    path.write_text(text)
    with pytest.raises(InputError, match=message) as info:
        read_geojson(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_overlapping_outlines_give_a_bin_to_the_nearest_centroid() -> None:
    polys = Polygons.from_rings(
        [np.array(SQUARE), np.array(SQUARE) + [6.0, 0.0], np.array(SQUARE) + [100.0, 100.0]]
    )
    pts = np.array([[2.0, 5.0], [7.0, 5.0], [9.0, 5.0], [14.0, 5.0], [50.0, 50.0]])
    assert list(assign_points(polys, pts)) == [0, 0, 1, 1, -1]
    sub = polys.subset([2, 0])  # the polygons at these indices, in that order
    np.testing.assert_array_equal(sub.xy, np.vstack([polys.ring(2), polys.ring(0)]))
    np.testing.assert_array_equal(sub.offsets, [0, 4, 8])


def test_magnet_info_reports_cells(run, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "magnet_st", "info", str(run.out_dir), "--cells", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    (s,) = json.loads(out.stdout)
    cells = visium_hd_cells(run.out_dir)
    assert s["technology"] == "visium_hd_cells" and s["units_under_tissue"] == cells.n_units
    area = cells.polygons.areas() * run.microns_per_pixel**2
    assert s["median_area_um2"] == pytest.approx(np.median(area), abs=0.05)
    assert s["counts_per_unit"]["median"] == np.median(np.asarray(cells.counts.sum(axis=1)))
    bad = tmp_path / "bad.geojson"
    bad.write_text('{"type": "Feature", "geometry": {"type": "LineString", "coordinates": []}}')
    cmd = [sys.executable, "-m", "magnet_st", "info", str(run.out_dir), "--segmentation", str(bad)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        f"magnet info: error: {bad}: feature 0: geometry 'LineString' is not a Polygon"
    ]


def test_cells_keep_their_outlines_in_anndata(run) -> None:
    cells = visium_hd_cells(run.out_dir)
    ad = cells.to_anndata()
    np.testing.assert_allclose(ad.obsm["spatial"], cells.polygons.centroids())
    back = Polygons(ad.uns["polygons"]["xy"], ad.uns["polygons"]["offsets"])
    np.testing.assert_array_equal(back.xy, cells.polygons.xy)
    assert len(back) == ad.n_obs


def test_cells_through_prepare_features_cv_and_predict(
    tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None
) -> None:
    """Space Ranger 4-like cells as the unit of the whole pipeline: prepare keeps their
    outlines, dense features pool over them, cross-validation scores cells, and a fold's
    model predicts the cells of a run and, from the image alone, those of a GeoJSON."""
    import anndata

    from magnet_st.data.dataset import Dataset
    from magnet_st.evaluate.cv import cross_validate
    from magnet_st.features.dense import POLYGON, DenseConfig, footprints
    from magnet_st.features.extract import extract_features
    from magnet_st.predict.image import predict
    from magnet_st.prepare.build import prepare
    from magnet_st.prepare.config import PrepareConfig
    from magnet_st.read.specs import SlideSpec
    from magnet_st.train.config import TrainConfig

    root = tmp_path_factory.mktemp("cellpipe")
    specs = []
    for i in range(3):
        write_synthetic_hd(
            root / f"c{i}", width_um=192, height_um=192, seed=40 + i, n_genes=40,
            bin_sizes=(8,), write_mtx=False, write_raw=False, progress=False,
        )  # fmt: skip
        specs.append(SlideSpec(name=f"c{i}", path=str(root / f"c{i}"), cells="spaceranger"))
    ds_path = root / "ds"
    prepare(specs, ds_path, PrepareConfig(n_genes=30), progress=False)
    ds = Dataset(ds_path)
    # the same cells from a GeoJSON segmentation (Space Ranger's outlines, the 2 um bins
    # pooled into them) prepare to the same counts
    geo = root / "c0" / "outs" / "segmented_outputs" / "cell_segmentations.geojson"
    write_synthetic_hd(root / "g0", width_um=192, height_um=192, seed=40, n_genes=40,
                       bin_sizes=(2,), progress=False)  # fmt: skip
    one = SlideSpec(name="g0", path=str(root / "g0"), cells=str(geo))
    prepare([one], root / "dsg", PrepareConfig(n_genes=30), progress=False)
    g = Dataset(root / "dsg")
    assert list(g.level("g0", "bin").obs_names) == list(ds.level("c0", "bin").obs_names)
    assert (g.level("g0", "bin").X[:] != ds.level("c0", "bin").X[:]).nnz == 0
    sr = visium_hd_cells(root / "c2")
    assert ds.slide_meta("c2")["technology"] == "visium_hd_cells"
    assert list(ds.level("c2", "bin").obs_names) == list(sr.unit_ids)
    np.testing.assert_array_equal(ds.polygons("c2").xy, sr.polygons.xy)
    fp = footprints(ds, "c2", "bin", 1.0)
    assert fp.shape == POLYGON and len(fp.half) == sr.n_units
    dense = DenseConfig(mpp=1.0, tile_px=128, margin_px=64)
    feats = extract_features(ds_path, "mobilenetv3_small_050", levels=("bin", "spot", "region"),
                             device="cpu", progress=False, dense=dense)  # fmt: skip
    cfg = TrainConfig(features=feats["key"], width=16, epochs=1, patience=1, max_batches=2)
    table = cross_validate(ds_path, root / "cv", cfg, variants=["no_context"], only_folds=[2],
                           progress=False)  # fmt: skip
    cells = table[(table["level"] == "bin") & (table["test_slide"] == "c2")]
    assert set(cells["model"]) >= {"no_context", "ridge", "mean_profile"}
    assert np.isfinite(cells["pcc_gene"]).all()
    model = root / "cv" / "fold2" / "no_context" / "model.pt"
    assert model.is_file()
    run = predict(model, root / "pred_run", spaceranger=root / "c2", device="cpu", progress=False)
    assert run.files["bin"] == root / "pred_run" / "cells.h5ad"  # named after its units
    got = anndata.read_h5ad(run.files["bin"])
    assert list(got.obs_names) == list(sr.unit_ids) and "measured" in got.layers
    tiles = anndata.read_h5ad(run.files["spot"]).uns["spatial"]
    assert next(iter(tiles.values()))["metadata"]["images_in"] == "cells.h5ad"
    np.testing.assert_array_equal(got.uns["polygons"]["xy"], sr.polygons.xy)
    seg = root / "c2" / "outs" / "segmented_outputs" / "cell_segmentations.geojson"
    img = predict(model, root / "pred_img", image=root / "c2" / "he_fullres.tif",
                  segmentation=seg, device="cpu", progress=False, qupath=True)  # fmt: skip
    alone = anndata.read_h5ad(img.files["bin"])
    from magnet_st.report import plot_results  # 'magnet plot' finds the cells of the folder

    figs = plot_results([root / "pred_img"], root / "figs", None, 2, ["png"])
    assert figs and all(f.is_file() for f in figs)
    doc = json.loads(img.files["qupath"].read_text())
    check_geojson(doc)
    assert len(doc["features"]) == alone.n_obs
    first = doc["features"][0]["properties"]
    assert first["objectType"] == "detection" and first["name"] == alone.obs_names[0]
    np.testing.assert_allclose(list(first["measurements"].values()), alone.X[0], rtol=1e-6)
    assert list(first["measurements"]) == list(alone.var_names)
    row = {b: i for i, b in enumerate(alone.obs_names)}
    idx = [row[b] for b in got.obs_names]
    np.testing.assert_allclose(alone.X[idx], got.X, atol=1e-5)  # the same cells, same image
    # no outlines: the built-in detector's cells
    det = predict(model, root / "pred_det", image=root / "c2" / "he_fullres.tif",
                  device="cpu", progress=False)  # fmt: skip
    found = anndata.read_h5ad(det.files["bin"])
    n_found = len(read_geojson(root / "pred_det" / "cells_detected.geojson")[0])
    assert found.n_obs == n_found and 0.7 * sr.n_units < n_found < 1.3 * sr.n_units


def test_cells_in_a_spatialdata_store_as_spatialdata_io_names_them(run, tmp_path: Path) -> None:
    """Predicted cells in the SpatialData store: the table ``cell_segmentations`` annotates
    the shapes ``<slide>_cell_segmentations``, each cell's outline a Polygon (read back and
    validated by spatialdata itself)."""
    sd = pytest.importorskip("spatialdata")
    from spatialdata.models import ShapesModel, TableModel

    from magnet_st.io.export import write_spatialdata

    cells = visium_hd_cells(run.out_dir)
    ad = cells.to_anndata()
    ad.X = ad.X.toarray().astype(np.float32)  # counts: our reader reads them back
    thumb, scale = cells.image.thumbnail(600)
    path = write_spatialdata(tmp_path / "p.zarr", {"bin": ad}, "run", 8.0, cells.microns_per_pixel,
                             images={"hires": (np.asarray(thumb), scale)})  # fmt: skip
    # our own reader takes the cells back with their outlines (in the image element's pixels)
    back = spatialdata_zarr(path, microns_per_pixel=cells.microns_per_pixel / scale)
    assert back.technology == "visium_hd_cells" and list(back.unit_ids) == list(cells.unit_ids)
    np.testing.assert_allclose(back.polygons.xy / scale, cells.polygons.xy, atol=1e-6)
    np.testing.assert_allclose(back.centers_px / scale, cells.centers_px, atol=1e-6)
    assert back.unit_size_um == pytest.approx(cells.unit_size_um)
    sdata = sd.read_zarr(path)
    assert list(sdata.tables) == ["cell_segmentations"]
    assert list(sdata.shapes) == ["run_cell_segmentations"]
    table = sdata.tables["cell_segmentations"]
    TableModel().validate(table)
    shapes = sdata.shapes["run_cell_segmentations"]
    ShapesModel.validate(shapes)
    assert set(shapes.geometry.geom_type) == {"Polygon"}
    np.testing.assert_allclose(shapes.geometry.area, cells.polygons.areas(), rtol=1e-9)
    centroid = np.column_stack([shapes.geometry.centroid.x, shapes.geometry.centroid.y])
    np.testing.assert_allclose(centroid, cells.centers_px, atol=1e-6)
    got = sd.get_values(value_key=list(ad.var_names[:3]), sdata=sdata,
                        element_name="run_cell_segmentations", table_name="cell_segmentations")  # fmt: skip
    np.testing.assert_allclose(got.to_numpy(), ad.X[:, :3])


def test_points_match_one_to_one_nearest_first() -> None:
    from magnet_st.evaluate.detection import detection_scores, match_points

    truth = np.array([[0.0, 0.0], [10.0, 0.0], [50.0, 50.0]])
    pred = np.array([[1.0, 0.0], [0.5, 0.0], [10.0, 2.5], [30.0, 30.0]])
    # (0.5, 0) is nearer to truth 0 than (1, 0): it takes it; (1, 0) is left unmatched
    assert list(match_points(pred, truth, 3.0)) == [-1, 0, 1, -1]
    s = detection_scores(match_points(pred, truth, 3.0), len(truth))
    assert (s["precision"], s["recall"]) == (0.5, 2 / 3)


def test_the_detector_finds_the_planted_nuclei_once_across_tiles(run, tmp_path: Path) -> None:
    from magnet_st.evaluate.detection import detection_scores, match_points
    from magnet_st.io.image import open_image
    from magnet_st.io.nuclei import NucleusConfig, detect_cells

    image = open_image(run.image_path)
    mpp = run.microns_per_pixel
    truth = pd.read_parquet(run.nuclei_path)[["x_px", "y_px"]].to_numpy()
    region = (150 / mpp, 150 / mpp, 330 / mpp, 330 / mpp)  # 180 um inside the capture area
    inside = (truth[:, 0] >= region[0]) & (truth[:, 0] < region[2])
    inside &= (truth[:, 1] >= region[1]) & (truth[:, 1] < region[3])
    nuclei, cells = detect_cells(image, region, NucleusConfig(tile_px=96, margin_px=32))
    assert len(nuclei) == len(cells)
    pred = np.array([r.mean(axis=0) for r in nuclei])
    s = detection_scores(match_points(pred, truth[inside], 3.0 / mpp), int(inside.sum()))
    assert s["precision"] > 0.85 and s["recall"] > 0.75, s  # measured: 0.95 and 0.87
    # 96 px tiles (48 um) cut many nuclei: each is still found once
    gaps = np.sort(np.linalg.norm(pred[:, None] - pred[None], axis=2), axis=1)[:, 1]
    assert gaps.min() * mpp > 1.0
    whole, _ = detect_cells(image, region, NucleusConfig())
    assert abs(len(whole) - len(nuclei)) <= 0.03 * len(whole)
    # cells hold their nuclei: a nucleus's centroid lies in its cell
    from matplotlib.path import Path as MplPath

    assert all(MplPath(c).contains_point(p) for c, p in zip(cells, pred, strict=True))


def test_magnet_segment_writes_a_segmentation_the_bins_pool_into(run, tmp_path: Path) -> None:
    out = tmp_path / "cells.geojson"
    cmd = [sys.executable, "-m", "magnet_st", "segment", str(run.image_path), "--out", str(out)]
    cmd += ["--roi", "150", "150", "300", "300", "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    check_geojson(doc)
    ids, polys = read_geojson(out)
    assert list(ids) == list(range(1, len(ids) + 1)) and len(ids) > 40
    cells = cells_from_bins(run.out_dir, out)
    assert cells.n_units > 0.9 * len(ids) and cells.counts.sum() > 0
    bad = subprocess.run(cmd[:4] + [str(tmp_path / "none.tif"), "--out", str(out)],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
