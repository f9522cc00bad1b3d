"""Readers: the real layouts in ../shared/data, synthetic Space Ranger runs, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from magnet_st import InputError, read

# -- real data -----------------------------------------------------------------------------


def test_her2st_c2_matches_the_published_numbers(her2st_root: Path) -> None:
    slide = read.her2st(her2st_root, "C2")
    assert slide.n_units == 187
    assert slide.n_genes == 15706
    assert slide.unit_size_um == 100.0
    assert slide.technology == "legacy_st"
    # the 200 um pitch is 290-292 px on these scans (pixel positions are exactly affine in
    # the spot table's new_x / new_y); the nearest-neighbour rule read 0.73
    assert slide.microns_per_pixel == pytest.approx(0.687, abs=0.004)
    assert "least-squares fit" in slide.sources["microns_per_pixel"]
    assert slide.counts.dtype.kind == "i"
    assert slide.image.size == (9274, 9911)
    # row "10x21" joins the spot table row x=10, y=21
    spots = pd.read_csv(her2st_root / "data/ST-spotfiles/C2_selection.tsv", sep="\t")
    i = list(slide.unit_ids).index("10x21")
    row = spots[(spots.x == 10) & (spots.y == 21)].iloc[0]
    np.testing.assert_allclose(slide.centers_px[i], [row.pixel_x, row.pixel_y])
    counts = pd.read_csv(her2st_root / "data/ST-cnts/C2.tsv.gz", sep="\t", index_col=0)
    np.testing.assert_array_equal(slide.counts[i].toarray().ravel(), counts.loc["10x21"].to_numpy())


def test_her2st_all_sections_inner_join(her2st_root: Path) -> None:
    slides = read.auto(her2st_root)
    assert [s.name for s in slides] == ["C2", "C3", "C4", "C5", "C6"]
    # C3 lists 182 selected spots of which 180 have counts
    assert {s.name: s.n_units for s in slides} == {
        "C2": 187,
        "C3": 180,
        "C4": 184,
        "C5": 181,
        "C6": 178,
    }
    for s in slides:
        s.check_image_bounds()


def test_mpp_override(her2st_root: Path) -> None:
    slide = read.her2st(her2st_root, "C2", microns_per_pixel=0.5)
    assert slide.microns_per_pixel == 0.5
    np.testing.assert_allclose(slide.centers_um, slide.centers_px * 0.5)


def test_hd_toy_layout(hd_toy: Path) -> None:
    slide = read.visium_hd(hd_toy, 2)
    assert (slide.n_units, slide.n_genes) == (10, 10)
    assert slide.unit_size_um == 2.0
    assert slide.microns_per_pixel == pytest.approx(0.2738242950835738)
    pos = pd.read_parquet(hd_toy / "square_002um/spatial/tissue_positions.parquet")
    pos = pos.set_index("barcode").loc[slide.unit_ids]
    np.testing.assert_allclose(
        slide.centers_px, pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    )
    np.testing.assert_array_equal(slide.array_coords, pos[["array_row", "array_col"]].to_numpy())
    assert slide.gene_names[0] == "Xkr4"


def test_hd_toy_mtx_equals_h5(hd_toy: Path) -> None:
    folder = hd_toy / "square_002um"
    a = read.read_10x_h5(folder / "filtered_feature_bc_matrix.h5")
    b = read.read_10x_mtx(folder / "filtered_feature_bc_matrix")  # .gz names, plain quoted text
    assert list(a.barcodes) == list(b.barcodes)
    assert list(a.gene_ids) == list(b.gene_ids)
    assert (a.counts != b.counts).nnz == 0


def test_hd_missing_bin_size_names_what_exists(hd_toy: Path) -> None:
    with pytest.raises(InputError, match=r"no folder for 8 um bins.*\[2\]"):
        read.visium_hd(hd_toy, 8)


# -- synthetic Space Ranger HD --------------------------------------------------------------


def _aggregate(fine, coarse, factor: int) -> sp.csr_matrix:
    """Sum the bins of ``fine`` into the bins of ``coarse`` by array coordinates."""
    key = {tuple(rc): i for i, rc in enumerate(coarse.array_coords)}
    rows = np.array([key.get((r // factor, c // factor), -1) for r, c in fine.array_coords])
    assert (rows >= 0).all(), "a fine bin under tissue has no coarse bin under tissue"
    M = sp.csr_matrix(
        (np.ones(len(rows), np.int64), (rows, np.arange(len(rows)))),
        shape=(coarse.n_units, fine.n_units),
    )
    return (M @ fine.counts).tocsr()


def test_synthetic_hd_levels_agree_exactly(synthetic_slide: Path) -> None:
    image = synthetic_slide / "he_fullres.tif"
    slides = {b: read.visium_hd(synthetic_slide, b, image=image) for b in (2, 8, 16)}
    for b, s in slides.items():
        assert s.unit_size_um == b
        assert s.counts.dtype.kind == "i"
        assert all(u.startswith(f"s_{b:03d}um_") for u in s.unit_ids)
        assert s.microns_per_pixel == pytest.approx(0.2738)
        s.check_image_bounds()
    assert slides[8].n_units > 1000
    assert abs(_aggregate(slides[2], slides[8], 4) - slides[8].counts).sum() == 0
    assert abs(_aggregate(slides[8], slides[16], 2) - slides[16].counts).sum() == 0
    # centres: a 16 um bin's centre is the mean of its four 8 um bins' centres
    s8, s16 = slides[8], slides[16]
    key = {tuple(rc): i for i, rc in enumerate(s8.array_coords)}
    checked = 0
    for j, (r, c) in enumerate(s16.array_coords):
        kids = [key.get((2 * r + a, 2 * c + b)) for a in (0, 1) for b in (0, 1)]
        if None not in kids:
            np.testing.assert_allclose(s8.centers_px[kids].mean(axis=0), s16.centers_px[j])
            checked += 1
    assert checked > 100


def test_synthetic_hd_equals_scanpy(synthetic_slide: Path) -> None:
    import scanpy as sc

    folder = synthetic_slide / "outs/binned_outputs/square_008um"
    ad = sc.read_10x_h5(folder / "filtered_feature_bc_matrix.h5")
    slide = read.visium_hd(synthetic_slide, 8)
    assert list(ad.obs_names) == list(slide.unit_ids)
    assert list(ad.var["gene_ids"]) == list(slide.gene_ids)
    assert abs(sp.csr_matrix(ad.X) - slide.counts).sum() == 0


def test_slide_anndata_round_trip(synthetic_slide: Path, tmp_path: Path) -> None:
    slide = read.visium_hd(synthetic_slide, 16)
    path = tmp_path / "s.h5ad"
    slide.to_anndata().write_h5ad(path)
    back = read.h5ad(path)
    assert back.unit_size_um == 16
    assert back.microns_per_pixel == pytest.approx(slide.microns_per_pixel)
    assert (back.counts != slide.counts).nnz == 0
    np.testing.assert_allclose(back.centers_px, slide.centers_px)
    np.testing.assert_array_equal(back.array_coords, slide.array_coords)


def test_auto_detects_every_hd_entry_point(synthetic_slide: Path) -> None:
    for p in (
        synthetic_slide,
        synthetic_slide / "outs",
        synthetic_slide / "outs/binned_outputs",
        synthetic_slide / "outs/binned_outputs/square_016um",
    ):
        (slide,) = read.auto(p, bin_size_um=16)
        assert slide.unit_size_um == 16
    (slide,) = read.auto(synthetic_slide)
    assert slide.unit_size_um == 8


@pytest.mark.parametrize("kind", ["hires", "lowres"])
def test_space_ranger_downsampled_image_is_scaled(
    synthetic_slide: Path, tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Space Ranger's own hires / lowres image: centres x scale factor, mpp / scale factor."""
    spatial = synthetic_slide / "outs/binned_outputs/square_008um/spatial"
    scalef = json.loads((spatial / "scalefactors_json.json").read_text())[f"tissue_{kind}_scalef"]
    assert scalef < 1
    full = read.visium_hd(synthetic_slide, 8, image=synthetic_slide / "he_fullres.tif")
    png = spatial / f"tissue_{kind}_image.png"
    with caplog.at_level("WARNING", logger="magnet_st"):
        small = read.visium_hd(synthetic_slide, 8, image=png)
    np.testing.assert_allclose(small.centers_px, full.centers_px * scalef)
    assert small.microns_per_pixel == pytest.approx(full.microns_per_pixel / scalef)
    np.testing.assert_allclose(small.centers_um, full.centers_um)
    assert f"tissue_{kind}_scalef" in small.sources["microns_per_pixel"]
    assert f"{small.microns_per_pixel:.4g} microns per pixel" in caplog.text
    assert "patches will be coarse" in caplog.text
    # a copy outside the run (same name and size), or that of another bin size's folder
    copy = tmp_path / png.name
    shutil.copyfile(png, copy)
    other = synthetic_slide / f"outs/binned_outputs/square_016um/spatial/{png.name}"
    for image in (copy, other):
        again = read.visium_hd(synthetic_slide, 8, image=image)
        np.testing.assert_allclose(again.centers_px, small.centers_px)


def test_synthetic_run_finds_its_image(synthetic_slide: Path) -> None:
    slide = read.visium_hd(synthetic_slide, 16)
    assert slide.image_path == synthetic_slide.resolve() / "he_fullres.tif"
    assert "found in the run folder" in slide.sources["image"]
    slide.check_image_bounds()


# -- standard Visium -----------------------------------------------------------------------


def _write_10x_h5(path: Path, counts: sp.csr_matrix, barcodes: list[str], genes: list[str]) -> None:
    csc = sp.csr_matrix(counts)  # barcodes x genes CSR == genes x barcodes CSC
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["barcodes"] = np.array(barcodes, dtype="S")
        m["data"] = csc.data.astype(np.int32)
        m["indices"] = csc.indices.astype(np.int64)
        m["indptr"] = csc.indptr.astype(np.int64)
        m["shape"] = np.array([counts.shape[1], counts.shape[0]], dtype=np.int32)
        fe = m.create_group("features")
        fe["id"] = np.array([f"ENSG{i:05d}" for i in range(len(genes))], dtype="S")
        fe["name"] = np.array(genes, dtype="S")
        fe["feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")
        fe["genome"] = np.array(["GRCh38"] * len(genes), dtype="S")


def _visium_run(tmp_path: Path, header: bool, mpp: float = 0.5) -> Path:
    """A standard Visium run on a hexagonal grid: 100 um pitch at ``mpp`` um/px."""
    outs = tmp_path / "run" / "outs"
    (outs / "spatial").mkdir(parents=True)
    rows, cols = np.meshgrid(np.arange(6), np.arange(0, 12, 2), indexing="ij")
    cols = cols + (rows % 2)
    rows, cols = rows.ravel(), cols.ravel()
    x = 1000 + cols * 50 / mpp
    y = 800 + rows * 50 * np.sqrt(3) / mpp
    barcodes = [f"AAAC{i:04d}-1" for i in range(len(rows))]
    in_tissue = (np.arange(len(rows)) % 5 != 0).astype(int)
    df = pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": in_tissue,
            "array_row": rows,
            "array_col": cols,
            "pxl_row_in_fullres": y,
            "pxl_col_in_fullres": x,
        }
    )
    if header:
        df.to_csv(outs / "spatial/tissue_positions.csv", index=False)
    else:
        df.to_csv(outs / "spatial/tissue_positions_list.csv", index=False, header=False)
    (outs / "spatial/scalefactors_json.json").write_text(
        json.dumps({"spot_diameter_fullres": 65 / mpp, "tissue_hires_scalef": 0.1})
    )
    rng = np.random.default_rng(0)
    keep = [i for i in range(len(rows)) if in_tissue[i]]
    counts = sp.random(len(keep), 7, density=0.5, random_state=rng, format="csr") * 10
    counts.data = np.ceil(counts.data)
    _write_10x_h5(
        outs / "filtered_feature_bc_matrix.h5", counts, [barcodes[i] for i in keep], list("ABCDEFG")
    )
    return outs.parent


@pytest.mark.parametrize("header", [True, False])
def test_visium_positions_csv_and_headerless_list(tmp_path: Path, header: bool) -> None:
    run = _visium_run(tmp_path, header=header, mpp=0.5)
    slide = read.visium(run)
    assert slide.technology == "visium"
    assert slide.n_units == 28  # 36 spots, 8 of them (every 5th) off tissue
    assert slide.n_genes == 7
    assert slide.unit_size_um == 55.0
    assert slide.microns_per_pixel == pytest.approx(0.5)  # from the 100 um pitch
    assert read.detect_format(run) == "visium"


# -- bad input -----------------------------------------------------------------------------


def _hd_folder(run: Path, b: int = 8) -> Path:
    return run / f"outs/binned_outputs/square_{b:03d}um"


def test_error_missing_run(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found") as e:
        read.visium_hd(tmp_path / "nope", 8)
    assert "nope" in str(e.value)


def test_error_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no binned_outputs"):
        read.visium_hd(tmp_path, 8)
    with pytest.raises(InputError, match="unknown input folder"):
        read.auto(tmp_path)


def test_error_missing_scalefactors(synthetic_copy: Path) -> None:
    (_hd_folder(synthetic_copy) / "spatial/scalefactors_json.json").unlink()
    with pytest.raises(InputError, match="scalefactors_json.json: scale factors file not found"):
        read.visium_hd(synthetic_copy, 8)


def test_error_broken_scalefactors(synthetic_copy: Path) -> None:
    (_hd_folder(synthetic_copy) / "spatial/scalefactors_json.json").write_text("{not json")
    with pytest.raises(InputError, match="scalefactors_json.json: not valid JSON"):
        read.visium_hd(synthetic_copy, 8)


def test_error_missing_positions(synthetic_copy: Path) -> None:
    (_hd_folder(synthetic_copy) / "spatial/tissue_positions.parquet").unlink()
    with pytest.raises(InputError, match="tissue positions not found"):
        read.visium_hd(synthetic_copy, 8)


def test_error_misnamed_position_columns(synthetic_copy: Path) -> None:
    path = _hd_folder(synthetic_copy) / "spatial/tissue_positions.parquet"
    df = pd.read_parquet(path).rename(columns={"pxl_row_in_fullres": "pxl_row"})
    df.to_parquet(path)
    with pytest.raises(
        InputError, match=r"tissue_positions.parquet: missing columns \['pxl_row_in_fullres'\]"
    ):
        read.visium_hd(synthetic_copy, 8)


def test_error_nan_positions(synthetic_copy: Path) -> None:
    path = _hd_folder(synthetic_copy) / "spatial/tissue_positions.parquet"
    df = pd.read_parquet(path)
    df.loc[3, "pxl_col_in_fullres"] = np.nan
    df.to_parquet(path)
    with pytest.raises(
        InputError, match="tissue_positions.parquet: pixel positions contain missing"
    ):
        read.visium_hd(synthetic_copy, 8)


def test_error_barcodes_absent_from_positions(synthetic_copy: Path) -> None:
    path = _hd_folder(synthetic_copy) / "spatial/tissue_positions.parquet"
    df = pd.read_parquet(path)
    df = df[df.in_tissue == 1].iloc[5:]  # drop 5 bins that are in the matrix
    df.to_parquet(path)
    with pytest.raises(InputError, match=r"5 of \d+ barcodes .* are absent from the positions"):
        read.visium_hd(synthetic_copy, 8)


def test_error_missing_matrix(synthetic_copy: Path) -> None:
    folder = _hd_folder(synthetic_copy)
    (folder / "filtered_feature_bc_matrix.h5").unlink()
    shutil.rmtree(folder / "filtered_feature_bc_matrix")
    with pytest.raises(InputError, match="no count matrix"):
        read.visium_hd(synthetic_copy, 8)


def test_mtx_used_when_h5_absent(synthetic_copy: Path) -> None:
    a = read.visium_hd(synthetic_copy, 8)
    (_hd_folder(synthetic_copy) / "filtered_feature_bc_matrix.h5").unlink()
    b = read.visium_hd(synthetic_copy, 8)
    assert b.sources["counts"].endswith("matrix.mtx.gz")
    assert list(a.unit_ids) == list(b.unit_ids)
    assert (a.counts != b.counts).nnz == 0


def test_error_corrupt_h5(synthetic_copy: Path) -> None:
    (_hd_folder(synthetic_copy) / "filtered_feature_bc_matrix.h5").write_bytes(b"garbage")
    with pytest.raises(InputError, match="filtered_feature_bc_matrix.h5: cannot read"):
        read.visium_hd(synthetic_copy, 8)


def test_error_empty_matrix(tmp_path: Path) -> None:
    run = _visium_run(tmp_path, header=True)
    _write_10x_h5(
        run / "outs/filtered_feature_bc_matrix.h5", sp.csr_matrix((0, 7)), [], list("ABCDEFG")
    )
    with pytest.raises(
        InputError, match=r"filtered_feature_bc_matrix.h5: the count matrix is empty \(0 x 7\)"
    ):
        read.visium(run)


def test_error_image_smaller_than_coordinates(synthetic_slide: Path, tmp_path: Path) -> None:
    from PIL import Image

    small = tmp_path / "small.png"
    Image.new("RGB", (200, 150), "white").save(small)
    with pytest.raises(
        InputError, match=r"small.png: image is 200 x 150 px but \d+ of \d+ unit centres"
    ):
        read.visium_hd(synthetic_slide, 8, image=small)


def test_error_unreadable_image(synthetic_slide: Path, tmp_path: Path) -> None:
    bad = tmp_path / "slide.tif"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="slide.tif"):
        read.visium_hd(synthetic_slide, 8, image=bad)
    with pytest.raises(InputError, match="missing.tif"):
        read.visium_hd(synthetic_slide, 8, image=tmp_path / "missing.tif")


def test_error_legacy_st_missing_columns(her2st_root: Path, tmp_path: Path) -> None:
    spots = pd.read_csv(her2st_root / "data/ST-spotfiles/C2_selection.tsv", sep="\t")
    bad = tmp_path / "C2_selection.tsv"
    spots.drop(columns=["pixel_x"]).to_csv(bad, sep="\t", index=False)
    with pytest.raises(InputError, match=r"C2_selection.tsv: missing columns \['pixel_x'\]"):
        read.legacy_st(her2st_root / "data/ST-cnts/C2.tsv.gz", bad)


def test_error_legacy_st_no_matching_rows(her2st_root: Path, tmp_path: Path) -> None:
    spots = pd.read_csv(her2st_root / "data/ST-spotfiles/C2_selection.tsv", sep="\t")
    spots["x"] += 100
    bad = tmp_path / "C2_selection.tsv"
    spots.to_csv(bad, sep="\t", index=False)
    with pytest.raises(InputError, match="C2.tsv.gz: no row name matches"):
        read.legacy_st(her2st_root / "data/ST-cnts/C2.tsv.gz", bad)


def test_error_unknown_her2st_section(her2st_root: Path) -> None:
    with pytest.raises(InputError, match=r"no counts for section 'Z9'.*C2"):
        read.her2st(her2st_root, "Z9")


def test_error_h5ad_without_spatial_or_with_normalised_values(tmp_path: Path) -> None:
    import anndata

    a = anndata.AnnData(X=np.ones((3, 2), dtype=np.float32))
    a.write_h5ad(tmp_path / "a.h5ad")
    with pytest.raises(InputError, match=r'a.h5ad: no obsm\["spatial"\]'):
        read.h5ad(tmp_path / "a.h5ad", microns_per_pixel=1, unit_size_um=8)
    a.X = np.full((3, 2), 0.5, dtype=np.float32)
    a.obsm["spatial"] = np.zeros((3, 2))
    a.write_h5ad(tmp_path / "b.h5ad")
    with pytest.raises(InputError, match="b.h5ad: X: the count matrix holds non-integer values"):
        read.h5ad(tmp_path / "b.h5ad", microns_per_pixel=1, unit_size_um=8)


# -- legacy ST arrays and AnnData options (issue 15) ------------------------------------------


def test_legacy_st_checkerboard_array_gives_the_true_mpp(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from legacy_files import array_grid, write_section

    genes = [f"g{i}" for i in range(5)]
    # a checkerboard: spots where x + y is even, 100 um between array positions
    write_section(tmp_path, "M1", genes, array_grid(8, 8, True), pitch_um=100, mpp=(0.5, 0.5))
    with caplog.at_level("WARNING"):
        slide = read.her2st(tmp_path, "M1")
    assert slide.microns_per_pixel == pytest.approx(0.5)
    assert "100 um array pitch (checkerboard layout;" in slide.sources["microns_per_pixel"]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    # the 1k array (spots on every position, 200 um apart) keeps its rule
    write_section(tmp_path, "K1", genes, array_grid(6, 5), pitch_um=200, mpp=(0.8, 0.8))
    assert read.her2st(tmp_path, "K1").microns_per_pixel == pytest.approx(0.8)
    # a pitch given by the user wins over the layout's
    (given,) = read.auto(tmp_path / "ST-cnts/M1.tsv.gz", spot_pitch_um=150)
    assert given.microns_per_pixel == pytest.approx(0.75)
    assert given.sources["microns_per_pixel"].startswith("given 150 um array pitch")
    assert not slide.lists_all_genes  # legacy ST tables list only detected genes


def test_legacy_st_mpp_is_unbiased_when_centres_lie_off_the_grid(tmp_path: Path) -> None:
    """Detected spot centres off the array grid (her2st: ~17 um rms) bias the median
    nearest-neighbour distance low (the smallest of four noisy distances); the least-squares
    fit over every spot is not."""
    from legacy_files import array_grid, write_section
    from magnet_st.read.geometry import mpp_from_pitch

    write_section(tmp_path, "J1", ["a", "b"], array_grid(30, 30), mpp=(0.7, 0.7), jitter_um=20)
    slide = read.her2st(tmp_path, "J1")
    assert slide.microns_per_pixel == pytest.approx(0.7, rel=0.01)
    # the nearest-neighbour rule on the same spots is off by more than 3 %
    nn = mpp_from_pitch(slide.centers_px, 200.0, "J1")
    assert nn / 0.7 - 1 > 0.03


def test_legacy_st_stretched_image_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from legacy_files import array_grid, write_section

    genes = ["a", "b"]
    write_section(tmp_path, "S1", genes, array_grid(6, 6), mpp=(1.0, 1.05))  # 5 % taller
    write_section(tmp_path, "S2", genes, array_grid(6, 6), mpp=(1.0, 1.01))  # within 2 %
    with caplog.at_level("WARNING"):
        read.her2st(tmp_path, "S2")
    assert not caplog.records
    with caplog.at_level("WARNING"):
        read.her2st(tmp_path, "S1")
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "pixels are 1.0000 um wide but 1.0500 um tall" in msg and "stretched" in msg


def test_unit_size_and_spot_pitch_options(synthetic_slide: Path, tmp_path: Path) -> None:
    from legacy_files import array_grid, write_section

    write_section(tmp_path, "C1", ["a", "b"], array_grid(4, 4))
    slide = read.her2st(tmp_path, "C1")
    ad = slide.to_anndata()
    del ad.uns["spatial"]["C1"]["scalefactors"]["bin_size_um"]
    ad.write_h5ad(tmp_path / "c1.h5ad")
    with pytest.raises(InputError, match=r"unit size unknown: pass it \(--unit-size UM"):
        read.h5ad(tmp_path / "c1.h5ad")
    (back,) = read.auto(tmp_path / "c1.h5ad", unit_size_um=100)
    assert back.unit_size_um == 100 and not back.lists_all_genes  # kept from the metadata
    (spots55,) = read.auto(tmp_path / "c1.h5ad", unit_size_um=55)
    assert spots55.unit_size_um == 55
    with pytest.raises(InputError, match="--spot-pitch given for a visium_hd input"):
        read.auto(synthetic_slide, spot_pitch_um=100)
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("name,path,spot_pitch_um,unit_size_um\nx,c1.h5ad,,55\ny,ST-cnts,150,\n")
    x, y = read.specs_from_sheet(sheet)
    assert (x.spot_pitch_um, x.unit_size_um, y.spot_pitch_um, y.unit_size_um) == (
        None,
        55.0,
        150.0,
        None,
    )
    assert "spot_pitch_um" not in x.to_dict()  # unset: specs recorded earlier stay equal
    sheet.write_text("name,path,unit_size_um\nx,c1.h5ad,-3\n")
    with pytest.raises(InputError, match="row 2: unit_size_um must be a positive number"):
        read.specs_from_sheet(sheet)


def test_microns_per_pixel_that_cannot_be_right_stop_with_both_figures(
    synthetic_slide: Path,
) -> None:
    """Space Ranger's hires image with the hires microns per pixel as --mpp divides by the
    scale factor twice; any --mpp that puts 8 um bins 32 um apart is refused, naming the
    pitch found, the pitch expected and the factor; a right one passes."""
    img = synthetic_slide / "he_fullres.tif"
    ok = read.visium_hd(synthetic_slide, 8, image=img)
    mpp = float(ok.microns_per_pixel)
    with pytest.raises(InputError, match=r"32 um apart .* are 8 um apart: .*wrong by 4x"):
        read.visium_hd(synthetic_slide, 8, image=img, microns_per_pixel=4 * mpp)
    read.visium_hd(synthetic_slide, 8, image=img, microns_per_pixel=1.1 * mpp)  # within 25 %
    # an image larger than a glass slide at its microns per pixel
    from magnet_st.data.slide import MAX_IMAGE_MM

    big = read.visium_hd(synthetic_slide, 8, image=img)
    big.microns_per_pixel = MAX_IMAGE_MM[0] * 1000 / min(big.image.size) * 1.01
    with pytest.raises(InputError, match=r"image is .* mm at .* larger than a 30 x 80 mm"):
        big.check_scale()


def test_sample_sheets_are_read_as_csv_or_tsv_never_sniffed(tmp_path: Path) -> None:
    """A sheet with only a 'path' column was split on the letter t by a CSV sniffer
    (found ['pa', 'h']): sheets are CSV, or TSV by their extension."""
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("path\nrun_a\n")
    with pytest.raises(InputError, match=r"missing columns \['name'\]; found \['path'\]"):
        read.specs_from_sheet(sheet)
    tsv = tmp_path / "sheet.tsv"
    tsv.write_text("name\tpath\nA1\trun,a\n")  # a comma inside a TSV field stays in it
    (spec,) = read.specs_from_sheet(tsv)
    assert spec.name == "A1" and spec.path.endswith("run,a")


def test_slide_names_are_names_not_paths(tmp_path: Path) -> None:
    """A sheet name '../../escaped' made prepare write two folders above the dataset: every
    name that becomes a file or folder name is refused with one line if it is a path."""
    from magnet_st.errors import ConfigError, check_name

    sheet = tmp_path / "sheet.csv"
    for bad in ("../../escaped", "/abs/name", ".hidden", "a\\b"):
        sheet.write_text(f"name,path\n{bad},run\n")
        with pytest.raises(InputError, match="a name is not a path"):
            read.specs_from_sheet(sheet)
    with pytest.raises(ConfigError, match=r"--name '\.\./x' holds a path separator"):
        check_name("../x", "--name")
    assert check_name("C2 section_1.v2", "--name") == "C2 section_1.v2"
    assert not list(tmp_path.parent.glob("escaped"))
