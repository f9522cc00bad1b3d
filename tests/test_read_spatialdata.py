"""Tests of magnet_st.read.spatialdata_zarr on SpatialData stores written here.

``spatialdata`` is not installed in the test environment, so the stores are written with
zarr, anndata and pyarrow in the layout spatialdata writes; each attribute says which
spatialdata / spatialdata-io source file it mirrors.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import tifffile
import zarr
from PIL import Image

from magnet_st import read
from magnet_st.cli import main
from magnet_st.errors import InputError
from magnet_st.io.image import open_image

# zarr 3.1 warns when writing v3 arrays without a sharding choice (the writer side only)
pytestmark = pytest.mark.filterwarnings("ignore:zarr v3 autosharding:UserWarning")

# -- writing stores as spatialdata does -----------------------------------------------------


def _cs(name: str, axes: str) -> dict[str, Any]:
    """A coordinate system (transformations/ngff/ngff_coordinate_system.py to_dict; the
    default axes and their "unit" placeholder from transformations/ngff/_utils.py)."""
    return {
        "name": name,
        "axes": [
            {"name": a, "type": "channel"}
            if a == "c"
            else {"name": a, "type": "space", "unit": "unit"}
            for a in axes
        ],
    }


def ngff(kind: str, axes: str, target: str | None = "global", **values: Any) -> dict[str, Any]:
    """One NGFF transformation as spatialdata's ``to_ngff(...).to_dict()`` writes it
    (transformations/transformations.py, ngff/ngff_transformations.py): values ordered by
    the input axes (``axes``, e.g. "xy" for shapes, "cyx" for images); input named after
    its axes, output after the target coordinate system (``None``: inside a sequence)."""
    d = {"type": kind, **values, "input": _cs(axes, axes)}
    d["output"] = _cs(target or axes, axes)
    return d


def identity(axes: str, target: str = "global") -> dict[str, Any]:
    return ngff("identity", axes, target)


def wkb_square(cx: float, cy: float, half: float) -> bytes:
    """A square polygon as shapely's ``Point.buffer(half, cap_style=3)`` (spatialdata-io
    readers/visium_hd.py, bins_as_squares=True), as ISO WKB (little endian)."""
    ring = [(cx + half, cy + half), (cx + half, cy - half), (cx - half, cy - half)]
    ring += [(cx - half, cy + half), (cx + half, cy + half)]
    return struct.pack("<BIII", 1, 3, 1, 5) + struct.pack("<10d", *np.ravel(ring))


def wkb_point(x: float, y: float) -> bytes:
    return struct.pack("<BIdd", 1, 1, x, y)


def write_shapes(
    root: zarr.Group,
    name: str,
    geometries: list[bytes],
    ids: np.ndarray,
    transforms: list[dict[str, Any]],
    radius: np.ndarray | None = None,
    version: str = "0.3",
) -> None:
    """_io/io_shapes.py (format 0.2 / 0.3): GeoParquet ``shapes.parquet`` (geopandas
    to_parquet, WKB: the default of spatialdata.settings.shapes_geometry_encoding, the
    index kept as a column) in the group ``shapes/<name>``; _io/_utils.py _write_metadata
    and overwrite_coordinate_transformations_non_raster for the attributes."""
    group = root.require_group("shapes").require_group(name)
    df = pd.DataFrame({"geometry": geometries}, index=pd.Index(ids, name="location_id"))
    if radius is not None:
        df["radius"] = radius
    table = pa.Table.from_pandas(df, preserve_index=True)
    kind = "Point" if radius is not None else "Polygon"
    geo = {"version": "1.0.0", "primary_column": "geometry"}
    geo["columns"] = {"geometry": {"encoding": "WKB", "geometry_types": [kind]}}
    table = table.replace_schema_metadata({**table.schema.metadata, b"geo": json.dumps(geo)})
    pq.write_table(table, Path(group.store.root) / group.path / "shapes.parquet")
    group.attrs.update(
        {
            "encoding-type": "ngff:shapes",
            "axes": ["x", "y"],
            "coordinateTransformations": transforms,
            "spatialdata_attrs": {"version": version},
        }
    )


def write_image(
    root: zarr.Group, name: str, levels: list[np.ndarray], transforms: list[dict[str, Any]]
) -> None:
    """_io/io_raster.py: an OME-NGFF multiscale image written by ome-zarr (datasets "0",
    "1", ... with per-level scale transformations, _io/format.py CoordinateMixinV01), the
    element's transformations in multiscales[0]["coordinateTransformations"] (_io/_utils.py
    overwrite_coordinate_transformations_raster): top-level attributes for zarr v2 (raster
    format 0.2, NGFF "0.4-dev-spatialdata"), under "ome" for zarr v3 (0.3, "0.5-dev-...")."""
    group = root.require_group("images").require_group(name)
    axes = [{"name": "c", "type": "channel"}]
    axes += [{"name": a, "type": "space"} for a in "yx"]
    datasets = []
    for i, lv in enumerate(levels):  # lv: (y, x, c) -> stored as (c, y, x)
        data = np.moveaxis(lv, -1, 0)
        arr = group.create_array(str(i), shape=data.shape, dtype=data.dtype, chunks=(3, 96, 96))
        arr[:] = data
        scale = [1.0, levels[0].shape[0] / lv.shape[0], levels[0].shape[1] / lv.shape[1]]
        datasets.append(
            {"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        )
    ms = {"axes": axes, "datasets": datasets, "name": "/", "coordinateTransformations": transforms}
    omero = {"channels": [{"label": c} for c in (0, 1, 2)]}
    if root.metadata.zarr_format == 2:
        group.attrs.update(
            {"multiscales": [{**ms, "version": "0.4-dev-spatialdata"}], "omero": omero}
        )
    else:
        group.attrs["ome"] = {"version": "0.5-dev-spatialdata", "multiscales": [ms], "omero": omero}


def write_table(
    root: zarr.Group, name: str, adata: anndata.AnnData, region: str, instance_key: str
) -> None:
    """_io/io_table.py: the AnnData written with anndata's write_elem at tables/<name>, with
    models TableModel's uns["spatialdata_attrs"] and the group attributes."""
    adata.obs["region"] = pd.Categorical([region] * adata.n_obs)
    attrs = {"region": region, "region_key": "region", "instance_key": instance_key}
    adata.uns["spatialdata_attrs"] = attrs
    anndata.io.write_elem(root.require_group("tables"), name, adata)
    version = "0.1" if root.metadata.zarr_format == 2 else "0.2"
    root["tables"][name].attrs.update(
        {"spatialdata-encoding-type": "ngff:regions_table", **attrs, "version": version}
    )


def new_store(path: Path, zarr_format: int = 3) -> zarr.Group:
    """The container: _io/format.py SpatialDataContainerFormatV01 (zarr v2) / V02 (v3)."""
    root = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    version = "0.1" if zarr_format == 2 else "0.2"
    root.attrs["spatialdata_attrs"] = {"version": version, "spatialdata_software_version": "0.4.0"}
    return root


# -- the synthetic Visium HD slide as spatialdata-io writes it ---------------------------


def hd_table(run: Path, bin_um: int = 8) -> tuple[anndata.AnnData, dict[str, Any]]:
    """The table of spatialdata-io readers/visium_hd.py for one bin size: counts read by
    scanpy (gex_only=False), positions merged into obs, obsm["spatial"] = (x, y),
    obs["location_id"] = 0..n-1 (VisiumHDKeys.INSTANCE_KEY, _constants/_constants.py)."""
    import scanpy as sc

    folder = run / f"outs/binned_outputs/square_{bin_um:03d}um"
    adata = sc.read_10x_h5(folder / "filtered_feature_bc_matrix.h5", gex_only=False)
    pos = pd.read_parquet(folder / "spatial/tissue_positions.parquet").set_index("barcode")
    adata.obs = adata.obs.join(pos.loc[adata.obs_names])
    adata.obsm["spatial"] = adata.obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    adata.obs = adata.obs.drop(columns=["pxl_col_in_fullres", "pxl_row_in_fullres"])
    adata.obs["location_id"] = np.arange(adata.n_obs)
    adata.var_names_make_unique()
    sf = json.loads((folder / "spatial/scalefactors_json.json").read_text())
    return adata, sf


def write_hd_store(
    run: Path, path: Path, dataset_id: str = "run", zarr_format: int = 3, squares: bool = True
) -> Path:
    """Visium HD as spatialdata-io readers/visium_hd.py writes it: table "square_008um",
    shapes f"{dataset_id}_square_008um" (squares of edge spot_diameter_fullres, or circles of
    that diameter), images f"{dataset_id}_full_image" (identity to dataset_id; 2 levels
    here) and f"{dataset_id}_hires_image" (identity to f"{dataset_id}_downscaled_hires", the
    inverse hires scale to dataset_id)."""
    root = new_store(path, zarr_format)
    adata, sf = hd_table(run)
    shapes = f"{dataset_id}_square_008um"
    r = sf["spot_diameter_fullres"] / 2
    hires, lowres = sf["tissue_hires_scalef"], sf["tissue_lowres_scalef"]
    transforms = [
        identity("xy", dataset_id),
        ngff("scale", "xy", f"{dataset_id}_downscaled_hires", scale=[hires, hires]),
        ngff("scale", "xy", f"{dataset_id}_downscaled_lowres", scale=[lowres, lowres]),
    ]
    xy = adata.obsm["spatial"]
    geoms = [wkb_square(x, y, r) if squares else wkb_point(x, y) for x, y in xy]
    radius = None if squares else np.full(len(xy), r)
    write_shapes(root, shapes, geoms, adata.obs["location_id"].to_numpy(), transforms, radius)
    write_table(root, "square_008um", adata, shapes, "location_id")
    with tifffile.TiffFile(run / "he_fullres.tif") as tif:
        levels = [lv.asarray() for lv in tif.series[0].levels[:2]]
    write_image(root, f"{dataset_id}_full_image", levels, [identity("cyx", dataset_id)])
    png = run / "outs/binned_outputs/square_008um/spatial/tissue_hires_image.png"
    inverse = ngff("scale", "cyx", dataset_id, scale=[1.0, 1 / hires, 1 / hires])
    hires_t = [identity("cyx", f"{dataset_id}_downscaled_hires"), inverse]
    write_image(
        root, f"{dataset_id}_hires_image", [np.asarray(Image.open(png).convert("RGB"))], hires_t
    )
    return path


@pytest.fixture(scope="module")
def hd_store(synthetic_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hd_store(synthetic_slide, tmp_path_factory.mktemp("sd") / "run.zarr")


def test_hd_store_equals_space_ranger(synthetic_slide: Path, hd_store: Path) -> None:
    """Counts, genes, positions and microns per pixel as the Space Ranger reader's; the
    image element reads as the TIFF it was written from."""
    ref = read.visium_hd(synthetic_slide, 8, image=synthetic_slide / "he_fullres.tif")
    assert read.detect_format(hd_store) == "spatialdata"
    slide = read.spatialdata_zarr(hd_store)
    assert slide.technology == "visium_hd" and slide.unit_size_um == 8
    assert slide.name == "run"
    assert list(slide.unit_ids) == list(ref.unit_ids)
    assert list(slide.gene_ids) == list(ref.gene_ids)
    assert list(slide.gene_names) == list(ref.gene_names)
    assert slide.counts.dtype.kind == "i" and (slide.counts != ref.counts).nnz == 0
    np.testing.assert_allclose(slide.centers_px, ref.centers_px, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(slide.array_coords, ref.array_coords)
    assert slide.microns_per_pixel == pytest.approx(ref.microns_per_pixel, rel=1e-9)
    assert "8 um bin / square edge" in slide.sources["microns_per_pixel"]
    assert slide.image_path == hd_store / "images" / "run_full_image"
    tif = open_image(synthetic_slide / "he_fullres.tif", slide.microns_per_pixel)
    img = slide.image
    assert img is not None and img.backend == "zarr"
    assert img.level_dimensions == tif.level_dimensions[:2]
    for box, out in [((333, 517, 300, 200), (300, 200)), ((-40, 900.5, 640, 480), (320, 240))]:
        np.testing.assert_array_equal(img.read_region(*box, out), tif.read_region(*box, out))
    # the auto entry point and a named table
    (auto,) = read.auto(hd_store)
    np.testing.assert_allclose(auto.centers_px, slide.centers_px)
    assert read.spatialdata_zarr(hd_store, table=8).n_units == slide.n_units


def test_hd_hires_image_scales_positions(synthetic_slide: Path, hd_store: Path) -> None:
    """The hires image: positions x tissue_hires_scalef, microns per pixel / it."""
    full = read.spatialdata_zarr(hd_store)
    small = read.spatialdata_zarr(hd_store, image="run_hires_image")
    sf = json.loads(
        (
            synthetic_slide / "outs/binned_outputs/square_008um/spatial/scalefactors_json.json"
        ).read_text()
    )
    np.testing.assert_allclose(
        small.centers_px, full.centers_px * sf["tissue_hires_scalef"], atol=1e-6
    )
    assert small.microns_per_pixel == pytest.approx(
        full.microns_per_pixel / sf["tissue_hires_scalef"]
    )
    assert small.image_path == hd_store / "images" / "run_hires_image"


def test_hd_circles_and_zarr_v2(synthetic_slide: Path, tmp_path: Path) -> None:
    """bins_as_squares=False (circles of the bin's diameter) in a zarr v2 store."""
    ref = read.visium_hd(synthetic_slide, 8)
    store = write_hd_store(synthetic_slide, tmp_path / "c.zarr", zarr_format=2, squares=False)
    assert (store / ".zgroup").is_file()
    slide = read.spatialdata_zarr(store)
    np.testing.assert_allclose(slide.centers_px, ref.centers_px, rtol=0, atol=1e-6)
    assert slide.microns_per_pixel == pytest.approx(ref.microns_per_pixel, rel=1e-9)
    assert "circle diameter" in slide.sources["microns_per_pixel"]


def _read_in_child(img: Any) -> np.ndarray:
    return img.read_region(100, 200, 64, 48, (64, 48))


def test_zarr_image_pickles_and_reads_after_fork(hd_store: Path) -> None:
    import multiprocessing
    import pickle

    img = open_image(hd_store / "images" / "run_full_image", 0.2738)
    want = img.read_region(100, 200, 64, 48, (64, 48))
    again = pickle.loads(pickle.dumps(img))
    assert again.microns_per_pixel == 0.2738 and again.level_dimensions == img.level_dimensions
    np.testing.assert_array_equal(again.read_region(100, 200, 64, 48, (64, 48)), want)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        (child,) = pool.map(_read_in_child, [img])  # pickled to the worker
        np.testing.assert_array_equal(child, want)
    with pytest.raises(InputError, match="not an OME-NGFF image"):
        open_image(hd_store / "tables" / "square_008um")


def test_zarr_image_levels_channels_and_units(tmp_path: Path) -> None:
    """A plain OME-NGFF image (no SpatialData transformations): gray + 16-bit levels read
    as RGB uint8, microns per pixel from the x axis' unit and level 0's scale."""
    root = zarr.open_group(tmp_path / "img.zarr", mode="w", zarr_format=2)
    a0 = (np.arange(40 * 50, dtype=np.uint16).reshape(1, 40, 50) * 30).astype(np.uint16)
    for i, a in enumerate([a0, a0[:, ::2, ::2]]):
        root.create_array(str(i), shape=a.shape, dtype=a.dtype, chunks=(1, 16, 16))[:] = a
    axes = [{"name": "c", "type": "channel"}]
    axes += [{"name": n, "type": "space", "unit": "micrometer"} for n in "yx"]
    datasets = [
        {"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [1, s, s]}]}
        for i, s in enumerate((0.25, 0.5))
    ]
    root.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": datasets}]
    img = open_image(tmp_path / "img.zarr")
    assert img.microns_per_pixel == 0.25
    assert img.level_dimensions == [(50, 40), (25, 20)] and img.level_downsamples == [1, 2]
    out = img.read_region(0, 0, 50, 40, (50, 40))
    want = np.round(a0[0] / 65535 * 255).astype(np.uint8)
    np.testing.assert_array_equal(out, np.repeat(want[..., None], 3, axis=-1))


def test_cli_info_prepare_and_sample_sheet(
    synthetic_slide: Path, hd_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["info", str(hd_store)]) == 0
    out = capsys.readouterr().out
    assert "run_full_image" in out and "visium_hd" in out
    ds = tmp_path / "ds"
    assert main(["prepare", str(ds), str(hd_store), "--n-genes", "30", "--quiet"]) == 0
    manifest = json.loads((ds / "manifest.json").read_text())
    (record,) = manifest["slides"].values()
    assert record["image"] == str((hd_store / "images/run_full_image").resolve())
    ref = tmp_path / "ref"
    args = [str(synthetic_slide), "--image", str(synthetic_slide / "he_fullres.tif")]
    assert main(["prepare", str(ref), *args, "--n-genes", "30", "--quiet"]) == 0
    for level in ("bin", "spot", "region"):
        a = anndata.read_h5ad(ds / "slides/run" / f"{level}.h5ad")
        b = anndata.read_h5ad(ref / "slides/run" / f"{level}.h5ad")
        assert (sp.csr_matrix(a.X) != sp.csr_matrix(b.X)).nnz == 0
        np.testing.assert_allclose(a.obsm["spatial"], b.obsm["spatial"], atol=1e-6)
    # a sample sheet's image column names an image element (made relative to the sheet)
    sheet = tmp_path / "samples.csv"
    sheet.write_text(f"name,path,image,bin_size\nsyn,{hd_store},run_hires_image,8\n")
    (spec,) = read.specs_from_sheet(sheet)
    assert spec.load().image_path == hd_store / "images" / "run_hires_image"


# -- small stores ---------------------------------------------------------------------------


def small_store(
    path: Path,
    *,
    shapes_t: list[dict[str, Any]] | None = None,
    image_t: list[dict[str, Any]] | None = None,
    to_shapes: Any = None,
    zarr_format: int = 3,
) -> tuple[Path, np.ndarray]:
    """A 6 x 5 grid of 8 um bins at 0.5 um/px (16 px bins) in a 160 x 140 px image;
    ``to_shapes`` maps image pixels to the shapes' own coordinates."""
    rows, cols = np.meshgrid(np.arange(5), np.arange(6), indexing="ij")
    xy = np.column_stack([20 + 16 * cols.ravel() + 8, 24 + 16 * rows.ravel() + 8]).astype(float)
    n = len(xy)
    counts = sp.csr_matrix(np.arange(n * 4).reshape(n, 4) % 5, dtype=np.float32)
    obs = pd.DataFrame(
        {"array_row": rows.ravel(), "array_col": cols.ravel(), "location_id": np.arange(n) + 100},
        index=[f"s_008um_{i:05d}-1" for i in range(n)],
    )
    var = pd.DataFrame({"gene_ids": [f"ENSG{i}" for i in range(4)]}, index=list("ABCD"))
    adata = anndata.AnnData(counts, obs=obs, var=var)
    root = new_store(path, zarr_format)
    own = xy if to_shapes is None else to_shapes(xy)
    half = (
        8
        if to_shapes is None
        else np.linalg.norm(to_shapes(np.array([[8.0, 0]])) - to_shapes(np.zeros((1, 2))))
    )
    geoms = [wkb_square(x, y, half) for x, y in own]
    write_shapes(root, "s_square_008um", geoms, np.arange(n) + 100, shapes_t or [identity("xy")])
    write_table(root, "square_008um", adata, "s_square_008um", "location_id")
    img = np.full((140, 160, 3), 200, np.uint8)
    write_image(root, "s_full_image", [img], image_t or [identity("cyx")])
    return path, xy


def test_small_store_identity(tmp_path: Path) -> None:
    store, xy = small_store(tmp_path / "s.zarr")
    slide = read.spatialdata_zarr(store)
    np.testing.assert_allclose(slide.centers_px, xy)
    assert slide.microns_per_pixel == pytest.approx(0.5)
    assert slide.counts.dtype.kind == "i"
    np.testing.assert_array_equal(slide.array_coords[:3], [[0, 0], [0, 1], [0, 2]])


def test_points_element(tmp_path: Path) -> None:
    """Bins as a points element (_io/io_points.py: a parquet dataset written by dask,
    points.parquet/part.0.parquet, x and y columns); microns per pixel from the bin pitch."""
    store, xy = small_store(tmp_path / "p.zarr")
    shutil.rmtree(store / "shapes")
    group = zarr.open_group(store).require_group("points").require_group("s_square_008um")
    (store / "points/s_square_008um/points.parquet").mkdir()
    df = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1]}, index=pd.Index(np.arange(len(xy)) + 100))
    df.to_parquet(store / "points/s_square_008um/points.parquet/part.0.parquet")
    group.attrs.update(
        {
            "encoding-type": "ngff:points",
            "axes": ["x", "y"],
            "coordinateTransformations": [identity("xy")],
            "spatialdata_attrs": {"version": "0.2"},
        }
    )
    slide = read.spatialdata_zarr(store)
    np.testing.assert_allclose(slide.centers_px, xy)
    assert slide.microns_per_pixel == pytest.approx(0.5)
    assert "8 um centre-to-centre pitch" in slide.sources["microns_per_pixel"]


def test_transformed_shapes_come_out_in_image_pixels(tmp_path: Path) -> None:
    """Shapes in microns from an origin (sequence: scale then translation to "global"),
    the image translated and scaled in "global"; another system only the shapes have."""
    mpp, origin = 0.5, np.array([1000.0, 2000.0])

    def to_microns(p: np.ndarray) -> np.ndarray:
        return p * mpp + origin

    # shapes (um) -> global: (u - origin) / mpp = image pixels of the unshifted image; the
    # image lies at global = 2 * (its pixels) + (-30, 10): so pixels = (global - t) / 2
    seq = {
        "type": "sequence",
        "transformations": [
            ngff("translation", "xy", None, translation=list(-origin)),
            ngff("scale", "xy", None, scale=[1 / mpp, 1 / mpp]),
        ],
        "input": _cs("xy", "xy"),
        "output": _cs("global", "xy"),
    }
    image_t = [
        ngff("affine", "cyx", "global", affine=[[1, 0, 0, 0], [0, 2, 0, 10], [0, 0, 2, -30]]),
    ]
    store, xy = small_store(
        tmp_path / "t.zarr",
        shapes_t=[ngff("scale", "xy", "microns", scale=[1.0, 1.0]), seq],
        image_t=image_t,
        to_shapes=to_microns,
    )
    slide = read.spatialdata_zarr(store, microns_per_pixel=None)
    expected = (xy - [-30, 10]) / 2
    np.testing.assert_allclose(slide.centers_px, expected, atol=1e-9)
    assert slide.microns_per_pixel == pytest.approx(2 * mpp)  # 8 um over 8 px squares
    assert "'global'" in slide.sources["positions"]


def test_visium_circles(tmp_path: Path) -> None:
    """Standard Visium as spatialdata-io readers/visium.py writes it (zarr v2 here): table
    "table" annotating circles named after the dataset (instance key "spot_id", radius =
    spot_diameter_fullres / 2 of a 65 um spot), coordinate systems global /
    downscaled_hires / downscaled_lowres; microns per pixel from the 100 um pitch."""
    mpp = 0.5
    rows, cols = np.meshgrid(np.arange(6), np.arange(0, 12, 2), indexing="ij")
    cols = cols + rows % 2
    xy = np.column_stack([100 + cols.ravel() * 50 / mpp, 80 + rows.ravel() * 50 * np.sqrt(3) / mpp])
    n = len(xy)
    root = new_store(tmp_path / "v.zarr", zarr_format=2)
    scale = ngff("scale", "xy", "downscaled_hires", scale=[0.1, 0.1])  # Scale(axes=("y", "x"))
    write_shapes(
        root,
        "V1",
        [wkb_point(x, y) for x, y in xy],
        np.arange(n),
        [identity("xy"), scale],
        radius=np.full(n, 65 / mpp / 2),
        version="0.2",
    )
    obs = pd.DataFrame(
        {"in_tissue": 1, "spot_id": np.arange(n)}, index=[f"AAAC{i:04d}-1" for i in range(n)]
    )
    adata = anndata.AnnData(sp.csr_matrix(np.ones((n, 3), np.float32)), obs=obs)
    write_table(root, "table", adata, "V1", "spot_id")
    write_image(root, "V1_full_image", [np.full((1000, 1300, 3), 255, np.uint8)], [identity("cyx")])
    slide = read.spatialdata_zarr(tmp_path / "v.zarr")
    assert slide.technology == "visium" and slide.unit_size_um == 55
    np.testing.assert_allclose(slide.centers_px, xy)
    assert slide.microns_per_pixel == pytest.approx(mpp)
    assert "100 um centre-to-centre pitch" in slide.sources["microns_per_pixel"]


# -- bad input ------------------------------------------------------------------------------


def _error(store: Path, **kw: Any) -> InputError:
    with pytest.raises(InputError) as info:
        read.spatialdata_zarr(store, **kw)
    assert str(store) in str(info.value)
    return info.value


def test_error_no_table(tmp_path: Path) -> None:
    store, _ = small_store(tmp_path / "s.zarr")
    shutil.rmtree(store / "tables" / "square_008um")
    assert "no table" in _error(store).problem


def test_error_unknown_table(tmp_path: Path) -> None:
    store, _ = small_store(tmp_path / "s.zarr")
    err = _error(store, table="square_016um")
    assert "'square_016um'" in err.problem and "square_008um" in err.problem


def test_error_instance_ids_do_not_match(tmp_path: Path) -> None:
    store, xy = small_store(tmp_path / "s.zarr")
    geoms = [wkb_square(x, y, 8) for x, y in xy]
    write_shapes(
        zarr.open_group(store), "s_square_008um", geoms, np.arange(len(xy)), [identity("xy")]
    )
    err = _error(store)
    assert "location_id absent from shapes" in err.problem


def test_error_shapes_not_found(tmp_path: Path) -> None:
    store, _ = small_store(tmp_path / "s.zarr")
    shutil.rmtree(store / "shapes" / "s_square_008um")
    assert "no shapes or points" in _error(store).problem


def test_error_no_image(tmp_path: Path) -> None:
    store, _ = small_store(tmp_path / "s.zarr")
    shutil.rmtree(store / "images")
    assert "no image element" in _error(store).problem
    store2, _ = small_store(tmp_path / "t.zarr")
    assert "no image element 'other'" in _error(store2, image="other").problem


@pytest.mark.parametrize("kind", ["rotation", "displacements"])
def test_error_unsupported_transformation(tmp_path: Path, kind: str) -> None:
    t = {"type": kind, "input": _cs("xy", "xy"), "output": _cs("global", "xy")}
    store, _ = small_store(tmp_path / "s.zarr", shapes_t=[t])
    assert f"unsupported coordinate transformation {kind!r}" in _error(store).problem


def test_error_no_shared_coordinate_system(tmp_path: Path) -> None:
    store, _ = small_store(tmp_path / "s.zarr", image_t=[identity("cyx", "other")])
    assert "share no coordinate system" in _error(store).problem


def test_a_store_with_several_tables_takes_table(
    tmp_path: Path, synthetic_slide: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, xy = small_store(tmp_path / "s.zarr")
    tables = store / "tables"
    (tables / "square_008um").rename(tables / "bins")
    shutil.copytree(tables / "bins", tables / "cells")
    assert main(["info", str(store)]) == 2
    err = capsys.readouterr().err
    assert "2 tables; choose one" in err
    assert main(["info", str(store), "--table", "bins", "--mpp", "0.5"]) == 0
    assert "30" in capsys.readouterr().out  # the 6 x 5 bins
    slide = read.SlideSpec(name="s", path=str(store), table="cells").load()
    np.testing.assert_allclose(slide.centers_px, xy)
    sheet = tmp_path / "sheet.csv"
    sheet.write_text(f"name,path,table\ns,{store},bins\n")
    (spec,) = read.specs_from_sheet(sheet)
    assert spec.table == "bins" and spec.to_dict()["table"] == "bins"
    assert "table" not in read.SlideSpec(name="t", path="x").to_dict()  # unset: not recorded
    assert main(["info", str(synthetic_slide), "--table", "bins"]) == 2  # Space Ranger
    assert "--table" in capsys.readouterr().err
