"""The dense end-to-end bin branch: footprint weights, crops and their augmentation, and a
training whose encoder learns and whose model file predicts."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from magnet_st.data.dataset import Dataset
from magnet_st.features.dense import (
    DISC,
    SQUARE,
    DenseConfig,
    Footprints,
    MapSpec,
    pool_discs,
    pool_tile,
)
from magnet_st.features.extract import extract_features
from magnet_st.model.batching import SlideArrays
from magnet_st.model.densebin import DenseTileReader, footprint_weights, pool_maps
from magnet_st.model.inputs import model_inputs, model_reader
from magnet_st.predict.modelfile import load_model, predict_slide
from magnet_st.train.config import TrainConfig
from magnet_st.train.trainer import fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENC = "mobilenetv3_small_050"


@pytest.mark.parametrize("shape", [SQUARE, DISC])
def test_footprint_weights_are_the_frozen_paths_area_means(shape: str) -> None:
    """The weights times a map give what the frozen path's summed-area tables (squares)
    and disc sub-samples give, for footprints at fractional positions."""
    rng = np.random.default_rng(0)
    h, w, c = 12, 15, 5
    fmap = rng.normal(size=(h, w, c))
    spec = MapSpec(0, 4, c, 1.5)
    centres = rng.uniform(12, 44, size=(20, 2))  # px, inside the map with room to spare
    half = rng.uniform(2, 9, size=20)
    fp = Footprints(centres, half, shape)
    r, col, v = footprint_weights(fp, spec, h, w)
    np.testing.assert_allclose(np.bincount(r, v, minlength=20), 1.0)
    got = np.zeros((20, c))
    np.add.at(got, r, v[:, None] * fmap.reshape(h * w, c)[col])
    boxes = fp.boxes(spec)
    if shape == SQUARE:
        sums, areas = pool_tile(fmap, (0, 0), boxes)
    else:
        mid = np.stack([(boxes[:, 0] + boxes[:, 1]) / 2, (boxes[:, 2] + boxes[:, 3]) / 2], 1)
        sums, areas = pool_discs(fmap, (0, 0), mid, (boxes[:, 1] - boxes[:, 0]) / 2)
    np.testing.assert_allclose(got, sums / areas[:, None], rtol=1e-10, atol=1e-12)
    # and in torch, differentiable in the map: d(sum of outputs) / d(cell) = its weights
    maps = torch.tensor(fmap.transpose(2, 0, 1)[None].copy(), requires_grad=True)
    out = pool_maps(maps, torch.from_numpy(np.stack([r, col])), torch.from_numpy(v), 20)
    np.testing.assert_allclose(out.detach().numpy(), got, rtol=1e-10)
    out.sum().backward()
    per_cell = np.bincount(col, v, minlength=h * w).reshape(h, w)
    np.testing.assert_allclose(maps.grad[0, 0].numpy(), per_cell, rtol=1e-10)


class _Array:
    """A slide image over an array at its native resolution (white outside)."""

    def __init__(self, rgb: np.ndarray):
        self.rgb = rgb

    def read_region(self, x, y, width, height, out_size):
        x, y, width, height = (int(round(v)) for v in (x, y, width, height))
        assert (width, height) == tuple(out_size)
        out = np.full((height, width, 3), 255, np.uint8)
        h, w = self.rgb.shape[:2]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, w), min(y + height, h)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self.rgb[y0:y1, x0:x1]
        return out


def _slide(n: int) -> SlideArrays:
    z = np.zeros((n, 2))
    i = np.zeros(n, np.int64)
    return SlideArrays("a", z, z[:1], z[:1], i, i, 1.0, 1.0, i[:1, None].repeat(2, 1), i, i)


@pytest.mark.parametrize("shape", [SQUARE, DISC])
@pytest.mark.parametrize("spread", [1.0, 8.0])
def test_crops_flip_and_turn_with_their_footprints(shape: str, spread: float) -> None:
    """Each unit's pooled colour is the same whichever flip and turn its crop gets (a
    stride-4 mean-colour "network" with centred cells, whose cell grid each of the 8
    transforms maps onto itself); close units share a crop, far ones get one each."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(1)
    noise = gaussian_filter(rng.normal(size=(600, 600, 3)), (5, 5, 0))
    rgb = np.clip(128 + 127 * noise / np.abs(noise).max(), 0, 255).astype(np.uint8)
    n = 12
    centres = rng.uniform(40, 60, size=(n, 2)) * spread
    fp = Footprints(centres, np.full(n, 6.5), shape)
    dense = {"mpp": 1.0, "margin_px": 8, "index": 0, "stride": 4, "channels": 3, "offset": 2.0}
    reader = DenseTileReader({"a": _Array(rgb)}, {"a": fp}, {"a": 1.0}, dense, seed=3)
    bins = np.arange(n)

    def pooled(batch: dict) -> np.ndarray:
        x = batch["bin_tiles"].float()
        maps = torch.nn.functional.avg_pool2d(x, 4)
        return pool_maps(maps, batch["bin_w_idx"], batch["bin_w_val"], n).numpy()

    plain = reader(_slide(n), bins, train=False)
    assert len(plain["bin_tiles"]) == (1 if spread == 1.0 else n)
    want = pooled(plain)
    seen = set()
    for key in range(12):
        batch = reader(_slide(n), bins, train=True, key=(key, 0))
        tiles = batch["bin_tiles"]
        seen.add(bytes(tiles[0, :, :2, :2].numpy().tobytes()))
        np.testing.assert_allclose(pooled(batch), want, rtol=1e-5, atol=1e-3)
    assert len(seen) > 2  # the crops were transformed
    # the pooled colour is the unit's own: its image's mean over the footprint, up to the
    # 4 px cells (a crop placed wrongly by one cell misses by far more)
    yy, xx = np.mgrid[0:600, 0:600] + 0.5
    for i, (cx, cy) in enumerate(centres):
        if shape == SQUARE:
            inside = (np.abs(xx - cx) <= 6.5) & (np.abs(yy - cy) <= 6.5)
        else:
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= 6.5**2
        direct = rgb[inside].mean(0)
        assert np.abs(want[i] - direct).max() < 4, (i, want[i], direct)


@pytest.fixture(scope="module")
def dense_ds(tmp_path_factory: pytest.TempPathFactory, hd_runs) -> tuple[Path, str]:
    """Two synthetic HD slides with a dense feature set (0.5 um/px, a 64 um window)."""
    from magnet_st.prepare.build import prepare
    from magnet_st.prepare.config import PrepareConfig

    root = tmp_path_factory.mktemp("densebin")
    specs = hd_runs(root, 2, size_um=256, seed=40)
    prepare(specs, root / "ds", PrepareConfig(n_genes=20), progress=False)
    dense = DenseConfig(mpp=0.5, windows_um=(64.0,))
    levels = ("bin", "spot", "region")
    res = extract_features(root / "ds", ENC, levels=levels, dense=dense, progress=False)
    return root / "ds", res["key"]


def test_dense_branch_trains_its_encoder_and_predicts(dense_ds, tmp_path: Path) -> None:
    path, key = dense_ds
    ds = Dataset(path)
    cfg = TrainConfig(
        features=key,
        width=32,
        epochs=1,
        patience=5,
        bin_encoder=ENC,
        bin_weights="random",
        bin_input="dense",
        bin_lr_scale=0.5,
        max_batches=2,
        variant="no_context",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fit(ds, ["s0"], [], cfg, tmp_path / "run", progress=False)
    # its frozen batch norm is on purpose: Lightning's warning about it is not shown
    assert not [w for w in caught if "eval mode" in str(w.message)]
    model, payload = load_model(res.model_path)
    dense = payload["model_config"]["bin_dense"]
    # the feature set's resolution and margin, its stride-16 map, its window kept frozen
    assert (dense["mpp"], dense["margin_px"], dense["stride"]) == (0.5, 128, 16)
    assert dense["columns_from"] == dense["channels"] == dense["extra"]
    # the encoder learned; its batch-norm statistics did not move
    start = type(model)(model.cfg)
    bb, bb0 = model.bin_encoder.backbone, start.bin_encoder.backbone
    bns = [m for m in bb.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in bns)
    assert not torch.equal(bb.conv_stem.weight, bb0.conv_stem.weight)
    # the frozen window columns and the crops reach the model; it predicts every bin
    arrays = model_inputs(ds, "s1", key, payload["model_config"], with_counts=False)
    assert arrays.bin_x.shape == (ds.level("s1", "bin").n_obs, dense["extra"])
    reader = model_reader(ds, ["s1"], payload["model_config"])
    pred = predict_slide(model, arrays, payload, patch_reader=reader)
    assert pred["bin"].shape == (ds.level("s1", "bin").n_obs, 20)
    assert np.isfinite(pred["bin"]).all()


def test_dense_branch_starts_from_the_frozen_dense_features(dense_ds) -> None:
    """In eval mode the untrained branch's unit features are the feature set's own columns
    (same weights, resolution, margin and cell grid; the crops' context differs only
    beyond the margin)."""
    from magnet_st.features.backbones import create_backbone
    from magnet_st.features.encoders import create_encoder
    from magnet_st.features.store import load_features
    from magnet_st.model.inputs import slide_arrays
    from magnet_st.model.magnet import BinEncoder, MagNetConfig
    from magnet_st.train.trainer import dense_bin_settings

    path, key = dense_ds
    ds = Dataset(path)
    cfg = TrainConfig(features=key, bin_encoder=ENC, bin_weights="random", bin_input="dense")
    dense = dense_bin_settings(ds, cfg)
    enc = BinEncoder(
        MagNetConfig(n_genes=3, variant="no_context", bin_encoder=ENC, bin_dense=dense, width=8)
    ).eval()
    frozen_model = create_encoder(ENC).model  # the feature set's (seeded random) weights
    enc.backbone.load_state_dict(frozen_model.state_dict(), strict=False)
    assert create_backbone  # same architecture
    arrays = slide_arrays(ds, "s0", key, bin_features=False, with_counts=False)
    reader = DenseTileReader.from_dataset(ds, ["s0"], dense)
    bins = np.arange(0, arrays.n_bins, 7)[:200]
    batch = reader(arrays, bins, train=False)
    batch["bin_index"] = torch.from_numpy(bins)
    with torch.no_grad():
        got = enc._dense({**batch, "bin_x": torch.zeros(len(bins), dense["extra"])}).numpy()
    want = np.asarray(load_features(path, key, "s0", "bin"))[bins, : dense["channels"]]
    got = got[:, : dense["channels"]]
    r = np.corrcoef(got.ravel(), want.ravel())[0, 1]
    assert r > 0.999, r  # one cell off: 0.94
