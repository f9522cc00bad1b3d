"""magnet_st.io.export.write_spatialdata: a prediction as a SpatialData store.

The stores are checked with the repository's reader of such stores
(magnet_st.read.spatialdata, which mirrors spatialdata's layout), with anndata, zarr and
pyarrow, and with magnet_st.io.image.open_image; and, where the ``spatialdata`` extra is
installed (not in CI's environment), with the spatialdata package itself (test (e)).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import zarr

from magnet_st.io import export
from magnet_st.io.export import write_spatialdata
from magnet_st.io.image import open_image
from magnet_st.read import spatialdata as rs

MPP = 0.5
SLIDE = "s1"
HIRES, LOWRES = 0.25, 0.125  # thumbnail pixels per full-resolution pixel
TILE_UM = {"spot": 56.0, "region": 128.0}


def full_image(h: int = 640, w: int = 800) -> np.ndarray:
    """A full-resolution RGB image of random 8 x 8 blocks (so its 1/4 and 1/8 thumbnails
    taken by striding are exact)."""
    blocks = np.random.default_rng(1).integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)


def levels(integer: bool = False, slide: str = SLIDE, bin_um: float = 8.0) -> dict[str, Any]:
    """Per-level AnnData as magnet predict makes them: bins on a grid (16 px at 0.5 um/px),
    spot and region tiles, uns["spatial"] with hires and lowres thumbnails."""
    rng = np.random.default_rng(0)
    img = full_image()
    spatial = {
        slide: {
            "images": {"hires": img[::4, ::4], "lowres": img[::8, ::8]},
            "scalefactors": {
                "tissue_hires_scalef": HIRES,
                "tissue_lowres_scalef": LOWRES,
                "spot_diameter_fullres": bin_um / MPP,
                "bin_size_um": bin_um,
                "microns_per_pixel": MPP,
            },
        }
    }
    var = pd.DataFrame({"gene_ids": [f"ENSG{i:03d}" for i in range(5)]})
    var.index = pd.Index(["CD3E", "EPCAM", "KRT8", "PTPRC", "VIM"], name="gene")
    px = bin_um / MPP
    rows, cols = np.meshgrid(np.arange(9), np.arange(11), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    bins = pd.DataFrame(
        {
            "spot": (rows // 4 * 3 + cols // 4).astype(np.int32),
            "region": np.zeros(len(rows), np.int32),
            "array_row": rows,
            "array_col": cols,
            "in_tissue": np.int8(1),
        },
        index=pd.Index(
            [f"s_008um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)], name="barcode"
        ),
    )
    xy = {"bin": np.column_stack([40 + (cols + 0.5) * px, 24.5 + (rows + 0.5) * px])}
    obs = {"bin": bins}
    for lv, k in (("spot", 3), ("region", 2)):
        tr, tc = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
        edge = TILE_UM[lv] / MPP
        o = pd.DataFrame({"tile_row": tr.ravel(), "tile_col": tc.ravel()})
        o["n_units"] = np.full(k * k, 4, np.int32)
        if lv == "spot":
            o["region"] = np.zeros(k * k, np.int32)
        o.index = pd.Index(
            [f"{lv}_{r}_{c}" for r, c in zip(tr.ravel(), tc.ravel(), strict=True)], name="tile"
        )
        obs[lv] = o
        xy[lv] = np.column_stack([30 + (tc.ravel() + 0.5) * edge, 20 + (tr.ravel() + 0.5) * edge])
    out = {}
    for lv, o in obs.items():
        X = rng.poisson(2.0, (len(o), len(var))).astype(np.float32)
        ad = anndata.AnnData(X if integer else np.log1p(X + rng.random(X.shape, np.float32)))
        ad.obs, ad.var = o, var.copy()
        ad.obsm["spatial"] = xy[lv]
        ad.uns["spatial"] = spatial
        ad.uns["magnet"] = {"level": lv, "slide": slide, "scale": "log1p"}
        out[lv] = ad
    out["bin"].layers["measured"] = np.log1p(rng.poisson(1.0, out["bin"].shape)).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    lv = levels()
    path = tmp_path_factory.mktemp("sd") / "prediction.zarr"
    assert write_spatialdata(path, lv, SLIDE, 8.0, MPP, tile_um=TILE_UM) == path
    return path, lv


NAMES = {"bin": "square_008um", "spot": "spot_tiles", "region": "region_tiles"}


def test_reader_finds_tables_shapes_and_positions(store: tuple[Path, dict]) -> None:
    """(a) Container, tables and shapes as spatialdata lays them out: each table's region
    and instance key lead to square shapes centred on obsm["spatial"], identity to the
    slide's coordinate system."""
    path, lv = store
    root = zarr.open_group(str(path), mode="r")
    assert root.metadata.zarr_format == 3
    assert root.attrs["spatialdata_attrs"]["version"] == "0.2"
    assert rs.is_spatialdata_store(path) and rs._choose_table(path, None) == "square_008um"
    assert rs._names(path, "tables") == sorted(NAMES.values())
    for level, name in NAMES.items():
        group = root["tables"][name]
        assert group.attrs["spatialdata-encoding-type"] == "ngff:regions_table"
        assert group.attrs["version"] == "0.2"
        table = anndata.read_zarr(str(path / "tables" / name))
        sd = dict(table.uns["spatialdata_attrs"])
        assert sd == {k: group.attrs[k] for k in ("region", "region_key", "instance_key")}
        assert sd["region"] == f"{SLIDE}_{name}" and sd["instance_key"] == "location_id"
        assert list(table.obs[sd["region_key"]].cat.categories) == [sd["region"]]
        assert root["shapes"][sd["region"]].attrs["spatialdata_attrs"] == {"version": "0.3"}
        el = rs._read_element(path, sd["region"], sd["instance_key"])
        assert el["kind"] == "shapes" and el["what"] == "square edge"
        np.testing.assert_array_equal(el["ids"], table.obs["location_id"])
        np.testing.assert_allclose(el["centres"], lv[level].obsm["spatial"], rtol=0, atol=1e-6)
        edge = (8.0 if level == "bin" else TILE_UM[level]) / MPP
        np.testing.assert_allclose(el["size"], edge)
        np.testing.assert_array_equal(el["transforms"][SLIDE], np.eye(3))
        np.testing.assert_allclose(
            el["transforms"][f"{SLIDE}_downscaled_hires"][:2, :2], HIRES * np.eye(2)
        )
        # GeoParquet as geopandas writes it: WKB, no CRS, the ids as the pandas index
        pqt = pq.read_table(el["file"])
        geo = json.loads(pqt.schema.metadata[b"geo"])
        assert geo["columns"]["geometry"]["encoding"] == "WKB"
        assert geo["columns"]["geometry"]["crs"] is None
        assert pqt.to_pandas().index.name == "location_id"


def test_integer_store_reads_as_a_slide(tmp_path: Path) -> None:
    """(a) The whole reader on a store of integer values (it expects counts): positions in
    the hires image's pixels, microns per pixel from the bins' squares."""
    lv = levels(integer=True)
    path = write_spatialdata(tmp_path / "p.zarr", lv, SLIDE, 8.0, MPP, tile_um=TILE_UM)
    slide = rs.spatialdata_zarr(path, image=f"{SLIDE}_hires_image")
    assert slide.technology == "visium_hd" and slide.unit_size_um == 8
    np.testing.assert_allclose(slide.centers_px, lv["bin"].obsm["spatial"] * HIRES, atol=1e-6)
    assert slide.microns_per_pixel == pytest.approx(MPP / HIRES)
    np.testing.assert_array_equal(slide.counts.toarray(), lv["bin"].X)
    assert list(slide.unit_ids) == list(lv["bin"].obs_names)
    np.testing.assert_array_equal(slide.array_coords, lv["bin"].obs[["array_row", "array_col"]])


def test_tables_equal_the_predictions(store: tuple[Path, dict]) -> None:
    """(b) Each table read back with anndata holds the level's predictions unchanged."""
    path, lv = store
    for level, name in NAMES.items():
        ad, table = lv[level], anndata.read_zarr(str(path / "tables" / name))
        np.testing.assert_array_equal(table.X, ad.X)
        assert list(table.var_names) == list(ad.var_names)
        pd.testing.assert_frame_equal(table.var, ad.var)
        assert list(table.obs_names) == list(ad.obs_names)
        pd.testing.assert_frame_equal(table.obs[list(ad.obs.columns)], ad.obs)
        np.testing.assert_array_equal(table.obs["location_id"], np.arange(ad.n_obs))
        np.testing.assert_array_equal(table.obsm["spatial"], ad.obsm["spatial"])
        assert dict(table.uns["magnet"]) == ad.uns["magnet"] and "spatial" not in table.uns
    measured = anndata.read_zarr(str(path / "tables/square_008um")).layers["measured"]
    np.testing.assert_array_equal(measured, lv["bin"].layers["measured"])


def test_images_map_onto_the_full_resolution_frame(store: tuple[Path, dict]) -> None:
    """(c) The thumbnails as image elements: readable by open_image, and their transformation
    to the slide's system takes each pixel to the full-resolution pixels it shows."""
    path, lv = store
    full = full_image()
    images = rs._images(path)
    assert sorted(images) == [f"{SLIDE}_hires_image", f"{SLIDE}_lowres_image"]
    points = np.random.default_rng(2).uniform([0, 0], [799, 639], (200, 2))
    for kind, scale in (("hires", HIRES), ("lowres", LOWRES)):
        name = f"{SLIDE}_{kind}_image"
        thumb = lv["bin"].uns["spatial"][SLIDE]["images"][kind]
        img = open_image(path / "images" / name)
        assert img.size == (thumb.shape[1], thumb.shape[0])
        np.testing.assert_array_equal(img.read_region(0, 0, *img.size, img.size), thumb)
        tf = images[name]["transforms"]
        np.testing.assert_allclose(tf[SLIDE], np.diag([1 / scale, 1 / scale, 1]))
        np.testing.assert_array_equal(tf[f"{SLIDE}_downscaled_{kind}"], np.eye(3))
        # full-resolution points -> the image's pixels: same colour
        m = np.linalg.inv(tf[SLIDE])
        ij = np.floor(points @ m[:2, :2].T + m[:2, 2]).astype(int)
        fp = np.floor(points).astype(int)
        np.testing.assert_array_equal(thumb[ij[:, 1], ij[:, 0]], full[fp[:, 1], fp[:, 0]])
        # the reader places the bins on this image at their full-resolution positions x scale
        el = rs._read_element(path, f"{SLIDE}_square_008um", "location_id")
        to_img, _ = rs._to_image(path, el, f"{SLIDE}_square_008um", name, images[name])
        got = el["centres"] @ to_img[:2, :2].T + to_img[:2, 2]
        np.testing.assert_allclose(got, lv["bin"].obsm["spatial"] * scale, atol=1e-9)


def test_error_mid_write_leaves_no_store(
    store: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(d) A failure after the tables and shapes are written: no store, no temporary entry;
    an existing store is left as it was."""
    _, lv = store

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    dest = tmp_path / "prediction.zarr"
    monkeypatch.setattr(export, "_write_image", fail)
    with pytest.raises(OSError, match="disk full"):
        write_spatialdata(dest, lv, SLIDE, 8.0, MPP, tile_um=TILE_UM)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    write_spatialdata(dest, {"bin": lv["bin"]}, SLIDE, 8.0, MPP)
    before = sorted(p.relative_to(dest) for p in dest.rglob("*"))
    monkeypatch.setattr(export, "_write_image", fail)
    with pytest.raises(OSError, match="disk full"):
        write_spatialdata(dest, lv, SLIDE, 8.0, MPP, tile_um=TILE_UM)
    assert [p.name for p in tmp_path.iterdir()] == ["prediction.zarr"]
    assert sorted(p.relative_to(dest) for p in dest.rglob("*")) == before


def test_names_follow_the_bin_size_and_slide(tmp_path: Path) -> None:
    """16 um bins: table square_016um; a slide name with characters spatialdata refuses in
    element names; tile edges from uns["spatial"] when not given; no image: shapes only."""
    lv = levels(slide="run 1/A", bin_um=16.0)
    for ad in lv.values():
        sf = ad.uns["spatial"]["run 1/A"]["scalefactors"]
        ad.uns["spatial"] = {"run 1/A": {"scalefactors": {**sf, "bin_size_um": 56.0}}}
    path = write_spatialdata(tmp_path / "p.zarr", lv, "run 1/A", 16.0, MPP)
    assert rs._names(path, "tables") == ["region_tiles", "spot_tiles", "square_016um"]
    assert rs._names(path, "shapes") == [f"run_1_A_{n}" for n in rs._names(path, "tables")]
    assert rs._names(path, "images") == []
    el = rs._read_element(path, "run_1_A_square_016um", "location_id")
    np.testing.assert_allclose(el["size"], 32.0)
    assert list(el["transforms"]) == ["run_1_A"]
    np.testing.assert_allclose(
        rs._read_element(path, "run_1_A_spot_tiles", "location_id")["size"], 112.0
    )
    assert export.element_name("__x") == "x" and export.element_name("..") == "slide"


def test_the_spatialdata_package_reads_validates_and_uses_the_store(
    store: tuple[Path, dict],
) -> None:
    """(e) With the ``spatialdata`` extra installed (skipped without it): spatialdata's own
    reader opens the store, its models validate every element, and its tools work on it:
    the shapes' centres are the bins' positions, ``get_values`` returns the predictions,
    ``rasterize_bins`` puts each bin's prediction at its array row and column, a bounding
    box query keeps the bins it covers, and the images span the full-resolution frame."""
    sd = pytest.importorskip("spatialdata")
    from spatialdata.models import Image2DModel, ShapesModel, TableModel

    path, lv = store
    sdata = sd.read_zarr(path)
    shapes = {lvl: f"{SLIDE}_{name}" for lvl, name in NAMES.items()}
    assert sorted(sdata.tables) == sorted(NAMES.values())
    assert sorted(sdata.shapes) == sorted(shapes.values())
    assert sorted(sdata.images) == [f"{SLIDE}_hires_image", f"{SLIDE}_lowres_image"]
    for level, name in NAMES.items():
        table, ad = sdata.tables[name], lv[level]
        TableModel().validate(table)
        assert table.uns["spatialdata_attrs"]["region"] == shapes[level]
        ShapesModel.validate(sdata.shapes[shapes[level]])
        geom = sdata.shapes[shapes[level]].geometry
        centres = np.column_stack([geom.centroid.x, geom.centroid.y])
        np.testing.assert_allclose(centres, ad.obsm["spatial"], atol=1e-9)
        edge = 8.0 / MPP if level == "bin" else TILE_UM[level] / MPP
        np.testing.assert_allclose(geom.area, edge**2)
        got = sd.get_values(
            value_key=list(ad.var_names), sdata=sdata, element_name=shapes[level], table_name=name
        )
        np.testing.assert_array_equal(got.to_numpy(), ad.X)
    for image in sdata.images.values():
        Image2DModel().validate(image)
    extent = sd.get_extent(sdata, coordinate_system=SLIDE, elements=list(sdata.images))
    assert extent == {"y": (0.0, 640.0), "x": (0.0, 800.0)}
    bins = lv["bin"]
    raster = sd.rasterize_bins(
        sdata, shapes["bin"], "square_008um", col_key="array_col", row_key="array_row"
    )
    assert raster.shape == (bins.n_vars, 9, 11)
    rows, cols = bins.obs["array_row"].to_numpy(), bins.obs["array_col"].to_numpy()
    np.testing.assert_allclose(raster.values[:, rows, cols], bins.X.T, rtol=1e-6)
    # bins of array rows 0-1 and columns 0-2 (a box 1 px inside their outer edges)
    query = sd.bounding_box_query(
        sdata.subset([shapes["bin"]]),
        axes=("x", "y"),
        min_coordinate=[40 + 1, 24.5 + 1],
        max_coordinate=[40 + 3 * 16 - 1, 24.5 + 2 * 16 - 1],
        target_coordinate_system=SLIDE,
    )
    kept = np.sort(query.shapes[shapes["bin"]].index.to_numpy())
    np.testing.assert_array_equal(kept, np.flatnonzero((rows < 2) & (cols < 3)))
