"""dense: one encoder pass per tile, features pooled over each unit's exact footprint."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from magnet_st.errors import ConfigError
from magnet_st.features import dense as D
from magnet_st.features.dense import DenseConfig, Footprints
from magnet_st.features.extract import extract_features
from magnet_st.features.store import load_features
from magnet_st.prepare.build import prepare
from magnet_st.prepare.config import PrepareConfig
from magnet_st.read.specs import SlideSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ENC = "mobilenetv3_small_050"


def _brute_box(field: np.ndarray, box: np.ndarray, sub: int) -> np.ndarray:
    """Mean of a piecewise-constant field over a box whose edges are multiples of 1/sub."""
    fine = np.repeat(np.repeat(field, sub, 0), sub, 1)
    y0, y1, x0, x1 = (int(round(v * sub)) for v in box)
    return fine[y0:y1, x0:x1].reshape(-1, field.shape[2]).mean(0)


def test_box_means_are_exact_area_means_and_tiles_have_no_seams() -> None:
    rng = np.random.default_rng(0)
    field = rng.normal(size=(12, 12, 5))
    sub = 8
    lo = rng.integers(0, 9 * sub, size=(40, 2)) / sub
    size = rng.integers(1, 3 * sub, size=(40, 2)) / sub
    boxes = np.stack([lo[:, 0], lo[:, 0] + size[:, 0], lo[:, 1], lo[:, 1] + size[:, 1]], 1)
    whole, area = D.pool_tile(field, (0, 0), boxes)
    # the same boxes pooled from four 6 x 6 tiles and added up
    parts = np.zeros_like(whole)
    part_area = np.zeros_like(area)
    for ty in (0, 1):
        for tx in (0, 1):
            core = field[ty * 6 : ty * 6 + 6, tx * 6 : tx * 6 + 6]
            s, a = D.pool_tile(core, (ty * 6, tx * 6), boxes)
            parts += s
            part_area += a
    np.testing.assert_allclose(area, size[:, 0] * size[:, 1])
    np.testing.assert_allclose(part_area, area)
    np.testing.assert_allclose(parts, whole, atol=1e-9)
    for i in range(len(boxes)):
        np.testing.assert_allclose(whole[i] / area[i], _brute_box(field, boxes[i], sub), atol=1e-9)


def test_disc_means_weigh_cells_by_their_share_of_the_disc() -> None:
    rng = np.random.default_rng(1)
    field = rng.normal(size=(16, 16, 3))
    centres = np.array([[8.0, 8.0], [5.3, 9.7], [2.0, 14.5]])
    radii = np.array([3.0, 4.4, 2.5])
    sums, areas = D.pool_discs(field, (0, 0), centres, radii)
    n = 256  # brute force: 256 x 256 samples over the whole 16 x 16 map
    g = (np.arange(16 * n // 16) + 0.5) / (n // 16)
    yy, xx = np.meshgrid(g, g, indexing="ij")
    for i, ((cy, cx), r) in enumerate(zip(centres, radii, strict=True)):
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        cells = field[np.floor(yy[inside]).astype(int), np.floor(xx[inside]).astype(int)]
        np.testing.assert_allclose(sums[i] / areas[i], cells.mean(0), atol=0.03)
        assert areas[i] == pytest.approx(inside.sum() / (n // 16) ** 2, rel=0.02)
        assert areas[i] <= np.pi * r * r * 1.02  # the third disc is cut by the map's edge


def test_window_means_of_a_block_map() -> None:
    rng = np.random.default_rng(2)
    blocks = rng.normal(size=(10, 10, 4))
    centres = np.array([[40.0, 40.0], [12.0, 70.0]])  # px; blocks of 8 px from (0, 0)
    got = D.window_means(blocks, (0.0, 0.0), 8.0, centres, 24.0)
    # first window: x, y in [28, 52) px = blocks 3.5 .. 6.5
    want = _brute_box(blocks, np.array([3.5, 6.5, 3.5, 6.5]), 2)
    np.testing.assert_allclose(got[0], want, atol=1e-9)
    # second: x in [0, 24) (clipped at the map's edge), y in [58, 82) -> 7.25 .. 10 (clipped)
    want = _brute_box(blocks, np.array([7.25, 10.0, 0.0, 3.0]), 4)
    np.testing.assert_allclose(got[1], want, atol=1e-9)


class _BlockMean(torch.nn.Module):
    """A 'network' whose stride-16 map is the mean of each 16 x 16 px cell of its input."""

    feature_info = [{"num_chs": 3, "reduction": 16, "module": "pool"}]

    def forward_intermediates(self, x, indices, intermediates_only, stop_early):
        return [torch.nn.functional.avg_pool2d(x, 16)]


def _block_encoder(model: torch.nn.Module) -> SimpleNamespace:
    """What the row loop needs of an encoder, around a test 'network' (input 0..255)."""
    return SimpleNamespace(
        model=model,
        mean=(0.0, 0.0, 0.0),
        std=(1 / 255, 1 / 255, 1 / 255),
        device=torch.device("cpu"),
        precision="fp32",
    )


class _Image:
    """A slide image held in memory (white outside), read at its own resolution."""

    def __init__(self, rgb: np.ndarray):
        self.rgb = rgb

    def read_region(self, x, y, w, h, out_size):
        assert (w, h) == out_size and float(x).is_integer() and float(y).is_integer()
        w, h = out_size
        out = np.full((h, w, 3), 255, np.uint8)
        x, y = int(x), int(y)
        H, W = self.rgb.shape[:2]
        ys, xs = slice(max(0, y), min(H, y + h)), slice(max(0, x), min(W, x + w))
        if ys.start < ys.stop and xs.start < xs.stop:
            out[ys.start - y : ys.stop - y, xs.start - x : xs.stop - x] = self.rgb[ys, xs]
        return out


def test_unit_features_are_the_maps_mean_over_each_footprint_end_to_end() -> None:
    rng = np.random.default_rng(3)
    cells = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
    rgb = np.repeat(np.repeat(cells, 16, 0), 16, 1)  # constant within each 16 px cell
    model = _BlockMean()
    spec = D.map_specs(model, [16])[0]
    assert spec.offset == 8.0  # measured: cell k spans px [16k, 16k + 16)
    enc = _block_encoder(model)
    # 8 um bins at 0.5 um/px: 16 px squares at an offset of 5 px to the cells; 56 um tiles
    bins = np.array(
        [[5 + 16 * i + 8, 21 + 16 * j + 8] for i in range(15) for j in range(15)], float
    )
    tiles = np.array([[100.0, 120.0], [250.0, 200.0]])
    levels = {
        "bin": Footprints(bins, np.full(len(bins), 8.0)),
        "spot": Footprints(tiles, np.full(2, 56.0)),
    }
    out = {"bin": np.zeros((len(bins), 3)), "spot": np.zeros((2, 3))}
    cfg = DenseConfig(mpp=0.5, tile_px=64, margin_px=32)
    rows = []
    stats = D.run_slide(enc, _Image(rgb), 0.5, levels, cfg, [spec], out, on_row=rows.append)
    assert stats["tiles"] > 4 and rows == sorted(rows)
    for lv, fp in levels.items():
        for i, ((cx, cy), h) in enumerate(zip(fp.centres, fp.half, strict=True)):
            y0, y1, x0, x1 = int(cy - h), int(cy + h), int(cx - h), int(cx + h)
            want = rgb[y0:y1, x0:x1].reshape(-1, 3).mean(0)
            np.testing.assert_allclose(out[lv][i], want, atol=1e-6, err_msg=f"{lv} {i}")
    # resuming after row 2 recomputes only what was not written, with the same values
    again = {lv: np.full_like(a, np.nan) for lv, a in out.items()}
    done = levels["bin"].boxes(spec)[:, 1] <= 3 * cfg.tile_px // 16 - 1e-9
    again["bin"][done] = out["bin"][done]
    D.run_slide(enc, _Image(rgb), 0.5, levels, cfg, [spec], again, start_row=3)
    np.testing.assert_array_equal(again["bin"], out["bin"])


def test_polygon_means_weigh_cells_by_their_share_of_the_outline() -> None:
    rng = np.random.default_rng(4)
    field = rng.normal(size=(16, 16, 3))
    square = np.array([[2.25, 3.5], [7.0, 3.5], [7.0, 9.125], [2.25, 9.125]])  # x, y
    tri = np.array([[5.2, 1.1], [14.7, 6.3], [8.4, 13.9]])
    sums, areas = D.pool_polygons(field, (0, 0), [square, tri])
    # a square on the 1/8 grid: the exact area mean
    box = np.array([3.5, 9.125, 2.25, 7.0])
    np.testing.assert_allclose(sums[0] / areas[0], _brute_box(field, box, 8), atol=1e-9)
    assert areas[0] == pytest.approx(4.75 * 5.625)
    # a triangle: against 32 x 32 samples per cell
    from matplotlib.path import Path as MplPath

    g = (np.arange(16 * 32) + 0.5) / 32
    xx, yy = np.meshgrid(g, g)
    inside = MplPath(tri).contains_points(np.column_stack([xx.ravel(), yy.ravel()]))
    cells = field[
        np.floor(yy.ravel()[inside]).astype(int), np.floor(xx.ravel()[inside]).astype(int)
    ]
    np.testing.assert_allclose(sums[1] / areas[1], cells.mean(0), atol=0.02)
    shoelace = 0.5 * abs(np.cross(tri[1] - tri[0], tri[2] - tri[0]))
    assert areas[1] == pytest.approx(shoelace, rel=0.01)
    # split over four 8 x 8 tiles, the parts add up to the whole
    parts = sum(
        D.pool_polygons(field[ty : ty + 8, tx : tx + 8], (ty, tx), [square, tri])[0]
        for ty in (0, 8)
        for tx in (0, 8)
    )
    np.testing.assert_allclose(parts, sums, atol=1e-9)


def test_cell_outlines_are_pooled_end_to_end() -> None:
    """Cells (polygons) through the row loop: each gets the mean colour of the pixels inside
    its outline; the end-to-end branch's weights give the same means."""
    from matplotlib.path import Path as MplPath

    from magnet_st.data.shapes import Polygons
    from magnet_st.model.densebin import footprint_weights

    rng = np.random.default_rng(5)
    cells = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
    rgb = np.repeat(np.repeat(cells, 16, 0), 16, 1)
    model = _BlockMean()
    spec = D.map_specs(model, [16])[0]
    enc = _block_encoder(model)
    angle = np.linspace(0, 2 * np.pi, 9)[:-1]
    rings = []
    for i in range(12):  # octagons and slanted quads, some across tile edges
        c = rng.uniform(40, 280, 2)
        if i % 2:
            rings.append(
                c + np.column_stack([np.cos(angle), 0.7 * np.sin(angle)]) * rng.uniform(8, 30)
            )
        else:
            rings.append(c + np.array([[-20.0, -9.0], [14.0, -15.0], [22.0, 12.0], [-11.0, 18.0]]))
    polys = Polygons.from_rings(rings)
    centres = polys.centroids()
    half = np.array([np.abs(r - c).max() for r, c in zip(rings, centres, strict=True)])
    fp = Footprints(centres, half, D.POLYGON, polys)
    out = {"bin": np.zeros((len(rings), 3))}
    cfg = DenseConfig(mpp=0.5, tile_px=64, margin_px=32)
    D.run_slide(enc, _Image(rgb), 0.5, {"bin": fp}, cfg, [spec], out)
    yy, xx = np.mgrid[0 : rgb.shape[0], 0 : rgb.shape[1]] + 0.5
    px = np.column_stack([xx.ravel(), yy.ravel()])
    for i, ring in enumerate(rings):
        want = rgb.reshape(-1, 3)[MplPath(ring).contains_points(px)].mean(0)
        np.testing.assert_allclose(out["bin"][i], want, atol=1.5, err_msg=str(i))
    r, c, v = footprint_weights(fp, spec, 20, 20)
    maps = cells.reshape(-1, 3).astype(np.float64)
    e2e = np.zeros((len(rings), 3))
    np.add.at(e2e, r, v[:, None] * maps[c])
    np.testing.assert_allclose(e2e, out["bin"], atol=1e-6)


class _Scaled(_Image):
    """An in-memory slide read at any whole-number downsampling (block means)."""

    def read_region(self, x, y, w, h, out_size):
        f = int(round(w / out_size[0]))
        big = super().read_region(x, y, w, h, (int(w), int(h))).astype(np.float64)
        small = big.reshape(out_size[1], f, out_size[0], f, 3).mean((1, 3))
        return np.round(small).astype(np.uint8)


def test_windows_from_a_second_pass_at_a_coarser_resolution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--dense-window-mpp: the units pooled at 0.5 um/px, their windows from a pass at
    1 um/px; both are the image's exact means over the squares, and a run killed in the
    second pass resumes to the same bytes."""
    from magnet_st.features.store import _Job

    rng = np.random.default_rng(11)
    cells = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
    rgb = np.repeat(np.repeat(cells, 32, 0), 32, 1)  # 16 um cells at 0.5 um/px (native)
    centres = rng.uniform(160, 480, size=(40, 2)).round()
    meta = {"microns_per_pixel": 0.5, "unit_size_um": 8.0, "technology": "visium_hd"}
    ds = SimpleNamespace(
        slide_meta=lambda s: meta,
        positions_px=lambda s, lv: centres,
        polygons=lambda s: None,
        image=lambda s: _Scaled(rgb),
    )
    model = _BlockMean()
    spec = D.map_specs(model, [16])[0]
    enc = _block_encoder(model)
    enc.feature_dim, enc.key = 3, "block-mean"
    cfg = DenseConfig(mpp=0.5, tile_px=64, margin_px=32, windows_um=(64.0,), window_mpp=1.0)
    assert cfg.separate_windows and "window_mpp" not in DenseConfig(mpp=0.5).describe()
    job = _Job("s", "bin", len(centres), 8.0, 0.5, 16, 16, "f", "img")

    def run(root: Path) -> np.ndarray:
        D.extract_slide(enc, ds, root, "s", {"bin": job}, cfg, [spec], progress=False)
        return np.load(root / "s" / "bin.npy").astype(np.float64)

    got = run(tmp_path / "a")
    for i, (cx, cy) in enumerate(centres):
        for j, half in enumerate((8, 64)):  # the 8 um bin, the 64 um window (native px)
            y0, y1, x0, x1 = int(cy - half), int(cy + half), int(cx - half), int(cx + half)
            want = rgb[y0:y1, x0:x1].reshape(-1, 3).mean(0)
            np.testing.assert_allclose(
                got[i, 3 * j : 3 * j + 3], want, atol=0.6, err_msg=f"{i} {j}"
            )
    # killed in the second pass (tiles of 64 + 2 x 32 px are read at 1 um/px there)
    real, orig, calls, coarse_tiles = D._forward_maps, D.run_slide, [], [0]

    def crash(m, x, indices):
        coarse_tiles[0] += calls[-1] == 1.0
        if coarse_tiles[0] == 3:
            raise KeyboardInterrupt
        return real(m, x, indices)

    def tracked(*a, **k):
        calls.append(a[4].mpp)  # the pass's working resolution
        return orig(*a, **k)

    monkeypatch.setattr(D, "run_slide", tracked)
    monkeypatch.setattr(D, "_forward_maps", crash)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    prog = json.loads((tmp_path / "b" / "s" / "dense.progress.json").read_text())
    assert prog["stage"] == "blocks" and calls == [0.5, 1.0]
    monkeypatch.setattr(D, "_forward_maps", real)
    calls.clear()
    again = run(tmp_path / "b")
    assert calls == [1.0]  # the units' pass is not run again
    assert (tmp_path / "b" / "s" / "bin.npy").read_bytes() == (
        tmp_path / "a" / "s" / "bin.npy"
    ).read_bytes()
    np.testing.assert_array_equal(again, got)


def test_cell_centres_are_measured_from_the_model() -> None:
    import timm

    tf = timm.create_model("tf_efficientnet_lite0", num_classes=0).eval()  # TF "same" padding
    rn = timm.create_model("resnet18", num_classes=0).eval()  # symmetric padding
    assert [s.offset for s in D.map_specs(tf, [16, 32])] == [15.5, 31.5]
    assert [s.offset for s in D.map_specs(rn, [16])] == [0.5]
    with pytest.raises(ConfigError, match="no stride-4 map.*16"):
        D.map_specs(_BlockMean(), [4])


@pytest.mark.parametrize(
    "bad",
    [
        {"tile_px": 500},
        {"margin_px": 10},
        {"strides": (12,)},
        {"mpp": 0},
        {"windows_um": (-1,)},
        {"window_mpp": float("nan")},
    ],
)
def test_bad_dense_settings_are_refused(bad: dict) -> None:
    with pytest.raises(ConfigError, match="dense"):
        DenseConfig(**bad).resolve("hd").check()


def test_settings_make_the_key_and_the_dict_round_trips() -> None:
    a = DenseConfig(windows_um=(300, 600)).resolve("hd")
    assert DenseConfig.from_dict(json.loads(json.dumps(a.describe()))) == a
    assert a.suffix() != DenseConfig().resolve("hd").suffix() != DenseConfig(mpp=0.5).suffix()
    # the preset's defaults fill what is not given: 0.25 um/px at HD, 0.5 and windows from
    # a 2 um/px pass for ST
    assert DenseConfig().resolve("hd") == DenseConfig(mpp=0.25, windows_um=(), window_mpp=2.0)
    st = DenseConfig().resolve("legacy_st")
    assert (st.mpp, st.windows_um, st.window_mpp) == (0.5, (300.0, 600.0), 2.0)
    assert st.separate_windows and "window_mpp" in st.describe()
    assert DenseConfig(mpp=1.0, windows_um=()).resolve("legacy_st").windows_um == ()
    assert DenseConfig(mpp=4.0).resolve("legacy_st").window_mpp == 4.0  # never finer
    # one pass (windows at the units' resolution, or none): the keys made before the option
    one = DenseConfig(window_mpp=0.5).resolve("legacy_st")
    assert not one.separate_windows and one.suffix() == "densef90f2b31"
    assert DenseConfig().resolve("hd").suffix() == "dense76159985"
    old = {k: v for k, v in one.describe().items() if k != "window_mpp"}  # recorded before
    assert DenseConfig.from_dict(old).resolve("legacy_st") == one
    with pytest.raises(ConfigError, match="not resolved"):
        DenseConfig().check()


@pytest.fixture(scope="module")
def prepared(synthetic_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dense") / "ds"
    spec = SlideSpec(
        name="syn",
        path=str(synthetic_slide),
        image=str(synthetic_slide / "he_fullres.tif"),
        bin_size=8,
    )
    prepare([spec], out, PrepareConfig(n_genes=30), progress=False)
    return out


def test_dense_feature_set_is_stored_resumes_and_is_skipped(
    prepared: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    ds = tmp_path / "ds"
    shutil.copytree(prepared, ds)
    cfg = DenseConfig(mpp=1.0, tile_px=128, margin_px=64, windows_um=(100.0,))
    opts = {"levels": ("bin", "spot", "region"), "device": "cpu", "progress": False, "dense": cfg}
    ref_ds = tmp_path / "ref"
    shutil.copytree(prepared, ref_ds)
    from magnet_st.data.dataset import Dataset

    released, release = [], Dataset.release_image  # each slide's image, once it is done
    monkeypatch.setattr(Dataset, "release_image", lambda d, s: [released.append(s), release(d, s)])
    ref = extract_features(ref_ds, ENC, **opts)
    assert released == ["syn"]
    assert ref["key"] == f"{ENC}-random-{cfg.resolve('hd').suffix()}"
    meta = json.loads((ref["path"] / "meta.json").read_text())
    dense = meta["encoder"]["dense"]
    width = dense["maps"][0]["channels"]
    assert dense["mpp"] == 1.0 and dense["maps"][0]["stride"] == 16
    assert dense["blocks"]["bin"] == [["s16", width], ["s16@100um", width]]
    arrays = {lv: load_features(ref_ds, ref["key"], "syn", lv) for lv in ("bin", "spot", "region")}
    assert arrays["bin"].shape[1] == 2 * width and arrays["spot"].shape[1] == width
    assert all(np.isfinite(a.astype(np.float32)).all() for a in arrays.values())
    assert float(np.std(arrays["bin"][:, :width].astype(np.float32), 0).mean()) > 0

    real = D._forward_maps
    calls = {"n": 0}

    def crash(model, x, indices):
        calls["n"] += x.shape[-1] == 256  # a tile (128 px and two margins of 64)
        if calls["n"] == ref["jobs"][0]["dense"]["tiles"] // 2:
            raise KeyboardInterrupt
        return real(model, x, indices)

    monkeypatch.setattr(D, "_forward_maps", crash)
    with pytest.raises(KeyboardInterrupt):
        extract_features(ds, ENC, **opts)
    folder = ds / "features" / ref["key"] / "syn"
    assert json.loads((folder / "dense.progress.json").read_text())["next_row"] >= 0
    assert not (folder / "bin.npy").exists()
    calls["n"] = -(10**6)
    res = extract_features(ds, ENC, **opts)
    assert {j["status"] for j in res["jobs"]} == {"resumed"}
    for lv in arrays:
        assert (folder / f"{lv}.npy").read_bytes() == (
            ref["path"] / "syn" / f"{lv}.npy"
        ).read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{lv}.{e}" for lv in arrays for e in ("json", "npy")
    )
    again = extract_features(ds, ENC, **opts)
    assert {j["status"] for j in again["jobs"]} == {"skipped"}
    # 'magnet info' on the dataset says what it holds, the feature set's settings too
    from magnet_st.cli import main

    capsys.readouterr()
    assert main(["info", str(ds)]) == 0
    text = capsys.readouterr().out
    assert "prepared dataset, preset hd" in text and "1 of 1 slides complete" in text
    assert f"dense at 1 um/px, stride 16, windows 100 um from 2 um/px; {width}-d" in text
    assert main(["info", str(ds), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)[0]
    assert info["units"]["syn"]["n"]["bin"] == arrays["bin"].shape[0]
    assert info["feature_sets"][0]["bin_dim"] == 2 * width


def test_ridge_gives_each_block_of_its_input_the_same_total_variance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from magnet_st.evaluate.baselines.ridge import RidgeBaseline

    parts = [["s16", 4], ["s32", 12]]
    meta = {"encoder": {"dense": {"blocks": {lv: parts for lv in ("bin", "spot", "region")}}}}
    monkeypatch.setattr("magnet_st.features.store.feature_set_meta", lambda path, key: meta)
    ridge, ds = RidgeBaseline("x"), SimpleNamespace(path="p")
    w = ridge._block_weights(ds, "bin", [16, 16, 16])
    per_block = np.add.reduceat(w**2, [0, 4, 16, 20, 32, 36])  # variance of each block
    np.testing.assert_allclose(per_block, 8.0)  # 48 dimensions over 6 blocks
    assert len(w) == 48
    meta["encoder"]["dense"] = None  # a per-unit feature set: one block per source, equal
    np.testing.assert_array_equal(ridge._block_weights(ds, "bin", [16, 16, 16]), 1.0)


def test_a_model_on_dense_features_predicts_from_the_image_with_the_same_features(
    prepared: Path, synthetic_slide: Path, tmp_path: Path
) -> None:
    from magnet_st.data.dataset import Dataset
    from magnet_st.predict.image import predict
    from magnet_st.train.config import TrainConfig
    from magnet_st.train.trainer import fit

    ds = tmp_path / "ds"
    shutil.copytree(prepared, ds)
    cfg = DenseConfig(mpp=1.0, tile_px=128, margin_px=64)
    feats = extract_features(ds, ENC, levels=("bin", "spot", "region"), device="cpu",
                             progress=False, dense=cfg)  # fmt: skip
    tc = TrainConfig(features=feats["key"], width=16, epochs=1, patience=1, max_batches=2)
    model = fit(Dataset(ds), ["syn"], [], tc, tmp_path / "model", progress=False).model_path
    res = predict(model, tmp_path / "pred", spaceranger=synthetic_slide, device="cpu",
                  num_workers=0, progress=False)  # fmt: skip
    record = json.loads((res.out / "prediction.json").read_text())
    assert record["encoder"] == feats["key"]  # the model's dense settings, rebuilt
    (made,) = [d for d in (res.out / "work" / "features" / feats["key"]).iterdir() if d.is_dir()]
    train_bins = load_features(ds, feats["key"], "syn", "bin").astype(np.float32)
    pred_bins = np.load(made / "bin.npy").astype(np.float32)
    # the same slide and bins: the same features, whichever run made them
    assert pred_bins.shape == train_bins.shape
    np.testing.assert_allclose(pred_bins, train_bins, atol=0.02, rtol=0.01)


def test_a_spot_model_predicts_a_virtual_array_of_its_spots(
    her2st_root: Path, tmp_path: Path
) -> None:
    """A model trained on legacy ST spots (her2st, dense features over 100 um discs)
    predicts an unseen section from its image alone, on a virtual 200 um array."""
    import anndata

    from magnet_st import read
    from magnet_st.data.dataset import Dataset
    from magnet_st.predict.image import predict
    from magnet_st.train.config import TrainConfig
    from magnet_st.train.trainer import fit

    specs = read.specs_from_paths([her2st_root])[:2]
    prepare(specs[:1], tmp_path / "ds", PrepareConfig(n_genes=30), progress=False)
    cfg = DenseConfig(mpp=4.0, tile_px=128, margin_px=32, windows_um=(600,))
    feats = extract_features(tmp_path / "ds", ENC, levels=("bin", "spot", "region"),
                             device="cpu", progress=False, dense=cfg)  # fmt: skip
    tc = TrainConfig(features=feats["key"], width=16, epochs=1, patience=1, max_batches=2)
    ds = Dataset(tmp_path / "ds")
    model = fit(ds, [specs[0].name], [], tc, tmp_path / "m", progress=False).model_path
    other = specs[1].load()
    res = predict(model, tmp_path / "pred", image=other.image_path, mpp=other.microns_per_pixel,
                  device="cpu", num_workers=0, progress=False)  # fmt: skip
    assert res.files["bin"].name == "spots.h5ad"  # named after its units
    bins = anndata.read_h5ad(res.files["bin"])
    um = bins.obsm["spatial"] * other.microns_per_pixel
    assert bins.n_obs > 50 and bins.obs_names[0].startswith("spot_")
    d = np.sqrt(((um[:, None] - um[None]) ** 2).sum(-1)) + np.eye(len(um)) * 1e9
    assert np.median(d.min(1)) == pytest.approx(200.0)  # the ST array's pitch
    assert np.isfinite(bins.X).all() and float(np.std(bins.X, 0).max()) > 0


def test_dense_is_the_cli_default_and_its_options_are_checked(
    prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from magnet_st.cli import main

    ds = tmp_path / "ds"
    shutil.copytree(prepared, ds)
    argv = ["features", str(ds), "--encoder", ENC, "--device", "cpu", "--quiet"]
    assert main([*argv, "--levels", "region", "--dense-mpp", "2"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"features/{ENC}-random-dense[0-9a-f]{{8}}: 1 slide/levels", out)
    assert "image tiles" in out
    for bad, said in (
        (["--input-px", "112"], "--input-px sets the patch size of --mode patches"),
        (["--mode", "patches", "--dense-mpp", "1"], "only apply with --mode dense"),
        (["--dense-tile", "100"], "multiple of 32"),
    ):
        assert main([*argv, *bad]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err


def test_a_vit_gives_its_patch_tokens_as_the_stride_16_map(prepared: Path, tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    shutil.copytree(prepared, ds)
    res = extract_features(ds, "vit_tiny_patch16_224", levels=("bin", "region"), device="cpu",
                           progress=False, encoder_kwargs={"dynamic_img_size": True},
                           dense=DenseConfig(mpp=2.0, tile_px=128, margin_px=32))  # fmt: skip
    (spec,) = res["encoder"]["dense"]["maps"]
    assert (spec["stride"], spec["channels"], spec["offset"]) == (16, 192, 8.0)
    x = load_features(ds, res["key"], "syn", "bin").astype(np.float32)
    assert x.shape[1] == 192 and np.isfinite(x).all() and x.std(0).mean() > 0
