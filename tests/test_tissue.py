"""Tests of magnet_st.io.tissue: tissue detection and the virtual Visium HD bin grid."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from magnet_st.errors import ConfigError, InputError
from magnet_st.io.image import open_image
from magnet_st.io.tissue import TissueMask, _otsu, detect_tissue, virtual_bins

MPP = 0.2738


# --------------------------------------------------------------------------- helpers


def _truth(slide: Path) -> dict:
    return json.loads((slide / "synthetic_truth.json").read_text())


def _positions(slide: Path, size: int = 8) -> pd.DataFrame:
    path = slide / "outs" / "binned_outputs" / f"square_{size:03d}um" / "spatial"
    return pd.read_parquet(path / "tissue_positions.parquet")


@pytest.fixture(scope="module")
def detected(synthetic_slide: Path) -> TissueMask:
    mpp = _truth(synthetic_slide)["parameters"]["microns_per_pixel"]
    with open_image(synthetic_slide / "he_fullres.tif", mpp) as image:
        return detect_tissue(image)


def _full_mask(width: int, height: int, mpp: float = MPP, shape: int = 64) -> TissueMask:
    """A mask that is tissue everywhere, ``shape`` pixels on the longer side."""
    scale = shape / max(width, height)
    h, w = math.ceil(height * scale), math.ceil(width * scale)
    return TissueMask(np.ones((h, w), bool), scale, mpp, 0.1, (width, height))


# --------------------------------------------------------------------------- detection


def test_otsu_splits_two_modes() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.02, 5000), rng.normal(0.6, 0.05, 2000)])
    t, between = _otsu(np.clip(values, 0, 1))
    assert 0.25 < t < 0.35  # the middle of the empty gap between the modes (0.299)
    assert between > 0


def test_detected_tissue_agrees_with_space_ranger(
    detected: TissueMask, synthetic_slide: Path
) -> None:
    pos = _positions(synthetic_slide)
    xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    pred = detected.contains_px(xy)
    truth = pos["in_tissue"].to_numpy().astype(bool)
    # Measured on seed 3 (default 4 um mask pixels): agreement 98.9% of the 2500 8 um
    # bins, sensitivity 98.8%, specificity 100%; every disagreement is an edge bin with
    # less than half of its area under tissue (Space Ranger counts a bin as in tissue
    # when any of its 2 um bins is, the mask looks at the bin centre).
    agreement = float((pred == truth).mean())
    assert agreement >= 0.95, agreement
    assert pred[truth].mean() >= 0.95
    assert (~pred[~truth]).mean() >= 0.95
    bins = pd.read_parquet(synthetic_slide / "synthetic_bins_008um.parquet")
    assert (bins["barcode"].to_numpy() == pos["barcode"].to_numpy()).all()
    tf = bins["tissue_fraction"].to_numpy()
    assert (pred == (tf >= 0.5)).mean() >= 0.97  # measured 99.2%
    # metadata
    assert detected.microns_per_pixel == pytest.approx(MPP)
    assert detected.image_size_px == (2557, 2557)
    assert detected.microns_per_mask_pixel == pytest.approx(4.0, rel=0.02)
    assert 0.05 <= detected.threshold < 0.5
    assert detected.low_threshold is not None
    assert 0.05 <= detected.low_threshold < detected.threshold
    assert detected.thumbnail is not None
    assert detected.thumbnail.shape[:2] == detected.mask.shape
    # the glass margin (150 um on every side) holds no tissue; the capture centre does
    w, h = detected.image_size_px
    corners = np.array([[10, 10], [w - 10, 10], [10, h - 10], [w - 10, h - 10]], float)
    assert not detected.contains_px(corners).any()
    assert detected.contains_px(np.array([[w / 2, h / 2]]))[0]
    assert 0.2 < detected.fraction < 0.45  # measured 0.33
    assert detected.area_um2 == pytest.approx(detected.fraction * 700.0**2, rel=0.02)


def test_contains_px_outside_and_nan() -> None:
    m = TissueMask(np.ones((4, 5), bool), 0.5, 1.0, 0.1, (10, 8))
    xy = np.array([[0, 0], [9.9, 7.9], [-0.1, 1], [10, 1], [1, 8.0], [np.nan, 1], [1, np.inf]])
    assert m.contains_px(xy).tolist() == [True, True, False, False, False, False, False]
    m.mask[1, 2] = False  # full-res x in [4, 6), y in [2, 4)
    assert m.contains_px(np.array([[4.0, 2.0], [5.99, 3.99], [6.0, 3.0]])).tolist() == [
        False,
        False,
        True,
    ]
    with pytest.raises(ValueError):
        m.contains_px(np.zeros(3))


def test_blank_image_raises_input_error(tmp_path: Path) -> None:
    path = tmp_path / "blank.tif"
    tifffile.imwrite(path, np.full((300, 400, 3), 255, np.uint8), photometric="rgb")
    with open_image(path, 0.5) as image, pytest.raises(InputError) as err:
        detect_tissue(image)
    assert err.value.path == path
    assert str(path) in str(err.value)
    assert "no tissue" in str(err.value)
    # a uniform grey-pink (tinted glass) image is no tissue either
    tinted = tmp_path / "tinted.png"
    Image.fromarray(np.full((200, 200, 3), (200, 180, 190), np.uint8)).save(tinted)
    with open_image(tinted, 0.5) as image, pytest.raises(InputError, match="no tissue"):
        detect_tissue(image)


def test_specks_only_and_unknown_mpp(tmp_path: Path) -> None:
    rgb = np.full((400, 400, 3), 240, np.uint8)
    rgb[100:110, 100:110] = (150, 60, 140)  # 10 x 10 px = 25 um^2 at 0.5 um/px
    rgb[200:320, 200:320] = (200, 120, 190)  # 60 x 60 um = 3600 um^2
    path = tmp_path / "specks.png"
    Image.fromarray(rgb).save(path)
    with open_image(path, 0.5) as image:
        with pytest.raises(InputError, match="min_area_um2"):
            detect_tissue(image, mask_um_per_px=1.0)
        m = detect_tissue(image, mask_um_per_px=1.0, min_area_um2=1000.0)
        assert m.contains_px(np.array([[260.0, 260.0], [105.0, 105.0]])).tolist() == [
            True,
            False,
        ]
        assert m.area_um2 == pytest.approx(3600.0, rel=0.1)
        for bad in ({"mask_um_per_px": 0}, {"min_area_um2": -1}, {"threshold": 1.5}):
            with pytest.raises(ConfigError):
                detect_tissue(image, **bad)
    with open_image(path) as image, pytest.raises(InputError, match="microns per pixel"):
        detect_tissue(image)


def test_save_png(detected: TissueMask, tmp_path: Path) -> None:
    out = tmp_path / "qc" / "tissue.png"
    written = detected.save_png(out, detected.thumbnail)
    assert written == [out, tmp_path / "qc" / "tissue_overlay.png"]
    with Image.open(out) as img:
        mask = np.asarray(img)
    assert mask.shape == detected.mask.shape
    assert set(np.unique(mask).tolist()) == {0, 255}
    np.testing.assert_array_equal(mask == 255, detected.mask)
    with Image.open(written[1]) as img:
        overlay = np.asarray(img.convert("RGB"))
    assert overlay.shape == detected.thumbnail.shape
    assert not np.array_equal(overlay, detected.thumbnail)  # tinted
    assert sorted(p.name for p in out.parent.iterdir()) == ["tissue.png", "tissue_overlay.png"]
    # mask only
    assert detected.save_png(tmp_path / "m.png") == [tmp_path / "m.png"]


# --------------------------------------------------------------------------- virtual bins


def test_virtual_bins_formula() -> None:
    width, height, mpp = 1000, 700, 0.5  # 500 x 350 um
    mask = _full_mask(width, height, mpp)
    origin = (13.0, 7.5)
    v = virtual_bins(mask, 8.0, origin_um=origin)
    # columns: centre 13 + (c + 0.5) * 8 < 500 -> c <= 60; rows: 7.5 + (r + .5) 8 < 350 -> r <= 42
    assert v.grid_shape == (43, 61)
    assert len(v) == 43 * 61
    r, c = v.array_rc[:, 0], v.array_rc[:, 1]
    assert v.array_rc.dtype == np.int64 and v.centers_px.dtype == np.float64
    np.testing.assert_array_equal(r, np.repeat(np.arange(43), 61))  # row-major
    np.testing.assert_array_equal(c, np.tile(np.arange(61), 43))
    np.testing.assert_allclose(v.centers_px[:, 0], (origin[0] + (c + 0.5) * 8.0) / mpp)
    np.testing.assert_allclose(v.centers_px[:, 1], (origin[1] + (r + 0.5) * 8.0) / mpp)
    assert v.barcodes.dtype.kind == "U"
    assert v.barcodes[0] == "s_008um_00000_00000-1"
    assert v.barcodes[61 * 12 + 34] == "s_008um_00012_00034-1"
    assert len(set(v.barcodes.tolist())) == len(v)
    assert v.bin_um == 8.0 and v.origin_um == origin and v.microns_per_pixel == mpp
    assert v.bin_px == pytest.approx(16.0)

    # a negative origin drops the bins whose centre falls left of / above the image
    v = virtual_bins(mask, 10.0, origin_um=(-12.0, 0.0))
    assert v.array_rc[:, 1].min() == 1  # centre of col 0 at x = -7 um
    assert v.centers_px[:, 0].min() == pytest.approx(3.0 / mpp)

    # only bins whose centre is under tissue: tissue in the left half of the image
    mask.mask[:, mask.mask.shape[1] // 2 :] = False
    half_px = (mask.mask.shape[1] // 2) / mask.scale
    v = virtual_bins(mask, 8.0, origin_um=origin)
    assert len(v) > 0
    assert (v.centers_px[:, 0] < half_px).all()
    inside = (origin[0] + (np.arange(61) + 0.5) * 8.0) / mpp < half_px
    assert len(v) == 43 * int(inside.sum())
    assert mask.contains_px(v.centers_px).all()

    # image_size_px overrides the mask's
    assert virtual_bins(mask, 8.0, image_size_px=(80, 80)).grid_shape == (5, 5)


def test_virtual_bins_nest() -> None:
    mask = _full_mask(900, 800)
    mask.mask[::3, ::2] = False  # keep some bins and drop others
    origin = (5.0, 9.0)
    v8 = virtual_bins(mask, 8.0, origin_um=origin)
    v16 = virtual_bins(mask, 16.0, origin_um=origin)
    assert 0 < len(v16) < len(v8)
    r, c = v16.array_rc[:, 0], v16.array_rc[:, 1]
    # 16 um bin (r, c) = 8 um bins (2r..2r+1, 2c..2c+1): same box, centre = their mean
    lo16 = np.column_stack([origin[0] + c * 16.0, origin[1] + r * 16.0])
    hi16 = lo16 + 16.0
    for dr in (0, 1):
        for dc in (0, 1):
            lo8 = np.column_stack([origin[0] + (2 * c + dc) * 8.0, origin[1] + (2 * r + dr) * 8.0])
            assert ((lo8 >= lo16) & (lo8 + 8.0 <= hi16)).all()
    children = (
        np.array([[2 * c + dc, 2 * r + dr] for dr in (0, 1) for dc in (0, 1)], float) + 0.5
    ) * 8.0  # (4, 2, n) child centres (x, y), um from the origin
    mean_child = (children.mean(axis=0).T + np.array(origin)) / MPP
    np.testing.assert_allclose(v16.centers_px, mean_child, rtol=0, atol=1e-9)
    # kept 8 um bins map to 16 um parents of the same grid
    parents = {tuple(x) for x in (v8.array_rc // 2).tolist()}
    full16 = virtual_bins(_full_mask(900, 800), 16.0, origin_um=origin)
    assert parents <= {tuple(x) for x in full16.array_rc.tolist()}


def test_virtual_bins_match_space_ranger(detected: TissueMask, synthetic_slide: Path) -> None:
    geo = _truth(synthetic_slide)["geometry"]
    origin = tuple(geo["capture_origin_um"])
    assert origin == (150.0, 150.0)  # the synthetic margin
    for size in (8, 16):
        pos = _positions(synthetic_slide, size).set_index("barcode")
        v = virtual_bins(detected, float(size), origin_um=origin)
        common, iv, ip = np.intersect1d(v.barcodes, pos.index.to_numpy(), return_indices=True)
        assert len(common) >= 0.9 * int(pos["in_tissue"].sum())
        sr = pos.iloc[ip]
        np.testing.assert_allclose(
            v.centers_px[iv],
            sr[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(),
            rtol=0,
            atol=0.01,
        )
        np.testing.assert_array_equal(v.array_rc[iv], sr[["array_row", "array_col"]].to_numpy())
        # the virtual bins are (almost all) those Space Ranger has in tissue
        assert sr["in_tissue"].mean() == 1.0
        df = v.to_tissue_positions()
        assert list(df.columns) == ["barcode", *pos.columns]
        assert df["barcode"].tolist()[:3] == v.barcodes[:3].tolist()


def test_virtual_bins_validation() -> None:
    mask = _full_mask(100, 100)
    for bad in (0, -8, math.nan, math.inf, "x"):
        with pytest.raises(ConfigError, match="bin_um"):
            virtual_bins(mask, bad)  # type: ignore[arg-type]
    for origin in ((math.nan, 0.0), (0.0, math.inf), (1.0,), None):
        with pytest.raises(ConfigError, match="origin_um"):
            virtual_bins(mask, 8.0, origin_um=origin)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="image_size_px"):
        virtual_bins(mask, 8.0, image_size_px=(0, 10))
    empty = virtual_bins(TissueMask(np.zeros((4, 4), bool), 0.04, MPP, 0.1, (100, 100)), 8.0)
    assert len(empty) == 0 and empty.centers_px.shape == (0, 2) and empty.barcodes.shape == (0,)
    # origin past the image: no bins
    assert len(virtual_bins(mask, 8.0, origin_um=(1000.0, 0.0))) == 0


def test_virtual_bins_cover_a_full_capture_area() -> None:
    """A whole 6.5 mm Visium HD capture area in 8 um bins: 812 x 812 = 659,344 bins (its
    time is measured by benchmarks/virtual_bins.py, not here)."""
    width = int(6500 / MPP)  # 6499.7 um: the centre of bin 812 (6500 um) is outside
    mask = _full_mask(width, width, shape=4096)
    v = virtual_bins(mask, 8.0)
    assert len(v) == 812 * 812
    assert v.barcodes[0] == "s_008um_00000_00000-1"
    assert v.barcodes[-1] == "s_008um_00811_00811-1"
    np.testing.assert_allclose(v.centers_px[-1], [(811.5 * 8.0) / MPP] * 2)


def test_virtual_spots_lay_out_visium_and_st_arrays_over_tissue() -> None:
    from magnet_st.io.tissue import virtual_spots

    mpp = 0.5  # a 2 x 1.5 mm image; tissue on its left half only
    mask = np.zeros((150, 200), bool)
    mask[:, :100] = True
    m = TissueMask(mask, 0.05, mpp, 0.1, (4000, 3000))
    vis = virtual_spots(m, "visium")
    um = vis.centers_px * mpp
    assert (um[:, 0] < 1000).all() and len(vis.barcodes) == len(um) > 50
    r, c = vis.array_rc.T
    assert ((r % 2) == (c % 2)).all()  # Space Ranger's hexagonal numbering
    # neighbours in a row 100 um apart, rows 86.6 um apart, odd rows shifted by 50 um
    np.testing.assert_allclose(um[:, 0], c * 50.0)
    np.testing.assert_allclose(um[:, 1], r * 100 * math.sqrt(3) / 2)
    d = np.sqrt(((um[:, None] - um[None]) ** 2).sum(-1)) + np.eye(len(um)) * 1e9
    np.testing.assert_allclose(d.min(1), 100.0)  # every spot's nearest neighbour
    st = virtual_spots(m, "legacy_st", origin_um=(100.0, 100.0))
    su = st.centers_px * mpp
    np.testing.assert_allclose(
        su, np.stack([100 + st.array_rc[:, 1] * 200.0, 100 + st.array_rc[:, 0] * 200.0], 1)
    )
    assert st.barcodes[0] == f"spot_{st.array_rc[0, 0]}_{st.array_rc[0, 1]}"
    assert len(st.barcodes) == 5 * 7  # x 100..900 um on tissue (5 columns), y 100..1300 (7 rows)
    with pytest.raises(ConfigError, match="no virtual spot array"):
        virtual_spots(m, "visium_hd")
