"""The MagNet model and spatial batches on hand-made geometry (no files)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from magnet_st.errors import ConfigError
from magnet_st.model.batching import BlockDataset, SlideArrays, blocks, make_batch
from magnet_st.model.magnet import MagNetConfig, create_model


def _slide(
    n_side: int = 24,
    bin_um: float = 8.0,
    spot_um: float = 32.0,
    region_um: float = 64.0,
    feat: int = 16,
    genes: int = 7,
    seed: int = 0,
) -> SlideArrays:
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    r, c = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
    pos = np.column_stack([c.ravel(), r.ravel()]) * bin_um + bin_um / 2

    def grid(size: float):
        cell = np.floor(pos / size).astype(int)[:, ::-1]
        tiles, idx = np.unique(cell, axis=0, return_inverse=True)
        return tiles, idx.ravel(), (tiles[:, ::-1] + 0.5) * size

    s_rc, bin_spot, s_pos = grid(spot_um)
    r_rc, bin_region, r_pos = grid(region_um)
    n = len(pos)
    counts = sp.csr_matrix(rng.poisson(1.0, (n, genes)))
    M = lambda idx, m: sp.csr_matrix((np.ones(n), (idx, np.arange(n))), shape=(m, n))  # noqa: E731
    return SlideArrays(
        name="toy",
        bin_pos=pos,
        spot_pos=s_pos,
        region_pos=r_pos,
        bin_spot=bin_spot,
        bin_region=bin_region,
        spot_size_um=spot_um,
        region_size_um=region_um,
        region_rc=r_rc,
        spot_n_units=np.bincount(bin_spot),
        region_n_units=np.bincount(bin_region),
        bin_x=rng.normal(size=(n, feat)).astype(np.float16),
        spot_x=rng.normal(size=(len(s_pos), feat)).astype(np.float16),
        region_x=rng.normal(size=(len(r_pos), feat)).astype(np.float16),
        counts_bin=counts,
        counts_spot=(M(bin_spot, len(s_pos)) @ counts).tocsr(),
        counts_region=(M(bin_region, len(r_pos)) @ counts).tocsr(),
    )


def _log1p(_level: str, c) -> np.ndarray:
    return np.log1p(np.asarray(c.todense(), dtype=np.float32))


def test_blocks_partition_the_bins() -> None:
    s = _slide()
    bl = blocks(s, 2)
    allbins = np.concatenate(bl)
    assert len(allbins) == s.n_bins and len(np.unique(allbins)) == s.n_bins
    # 24 bins of 8 um = 192 um = 3 regions of 64 um per side; blocks of 2x2 regions -> 4 blocks
    assert len(bl) == 4
    for b in bl:  # a block holds whole region tiles
        regions = np.unique(s.bin_region[b])
        assert np.isin(np.flatnonzero(np.isin(s.bin_region, regions)), b).all()


def test_context_puts_the_containing_tile_first() -> None:
    s = _slide()
    ctx = s.context("spot", 5)
    assert ctx.shape == (s.n_bins, 5)
    np.testing.assert_array_equal(ctx[:, 0], s.bin_spot)
    assert all(len(set(row)) == 5 for row in ctx)
    # the others are the nearest other tiles (compared by distance: ties may swap tiles)
    d = np.linalg.norm(s.spot_pos[ctx] - s.bin_pos[:, None], axis=-1)
    all_d = np.linalg.norm(s.spot_pos[None] - s.bin_pos[:, None], axis=-1)
    all_d[np.arange(s.n_bins), s.bin_spot] = np.inf
    np.testing.assert_allclose(np.sort(d[:, 1:], axis=1), np.sort(all_d, axis=1)[:, :4])


def test_batch_geometry_only_and_indices_are_local() -> None:
    s = _slide()
    bins = blocks(s, 2)[0]
    b = make_batch(s, bins, context_tokens=3, targets=_log1p)
    n = len(bins)
    assert b["bin_x"].shape == (n, 16) and b["y_bin"].shape == (n, 7)
    ns = len(b["spot_index"])
    assert b["bin_spot"].max() < ns and b["bin_spot_ctx"].max() < ns
    np.testing.assert_array_equal(b["spot_index"][b["bin_spot"]].numpy(), s.bin_spot[bins])
    assert b["bin_edges"].max() < n and b["spot_edges"].max() < ns
    # the offset of the containing tile is within half a tile width
    assert b["bin_spot_offset"][:, 0].abs().max() <= 0.5 + 1e-6
    # targets of complete tiles equal the log1p of their members' summed counts
    full = b["spot_complete"].numpy()
    assert full.any()
    tiles = b["spot_index"].numpy()
    np.testing.assert_allclose(b["y_spot"].numpy(), _log1p("spot", s.counts_spot[tiles]))
    in_batch = np.bincount(b["bin_spot"].numpy(), minlength=len(tiles))
    np.testing.assert_array_equal(full, in_batch == s.spot_n_units[tiles])
    # without targets nothing reads counts
    s2 = _slide()
    s2.counts_bin = s2.counts_spot = s2.counts_region = None
    b2 = make_batch(s2, bins, with_targets=False)
    assert "y_bin" not in b2 and torch.equal(b2["bin_edges"], make_batch(s, bins)["bin_edges"])


@pytest.mark.parametrize("variant", ["magnet", "paper", "no_context"])
def test_model_shapes(variant: str) -> None:
    s = _slide()
    cfg = MagNetConfig(
        n_genes=7,
        spot_feature_dim=16,
        region_feature_dim=16,
        bin_feature_dim=16,
        variant=variant,
        width=32,
        heads=4,
        context_tokens=1 if variant == "paper" else 4,
    )
    model = create_model(cfg.to_dict())
    data = BlockDataset(
        [s], context_tokens=cfg.context_tokens, with_context=cfg.uses_context, targets=_log1p
    )
    out = model(data[0])
    n = len(data.items[0][1])
    assert out["bin"].shape == (n, 7)
    if variant == "no_context":
        assert set(out) == {"bin"}
    else:
        assert out["spot"].shape == (len(data[0]["spot_index"]), 7)
        assert out["region"].shape == (len(data[0]["region_index"]), 7)


def test_context_changes_the_bin_prediction() -> None:
    """The context cross-attention reaches the bin prediction once its gate opens: the
    tiles' offsets from the bin enter nowhere else, so moving them changes the bins only
    through the attention (with the gate closed, tanh(0) = 0, they change nothing)."""
    torch.manual_seed(0)
    s = _slide()
    cfg = MagNetConfig(
        n_genes=7, spot_feature_dim=16, region_feature_dim=16, bin_feature_dim=16, width=32
    )
    model = create_model(cfg).eval()
    b = make_batch(s, blocks(s, 2)[0], context_tokens=5, with_targets=False)
    moved = dict(b)
    for lv in ("spot", "region"):
        key = f"bin_{lv}_offset"
        moved[key] = b[key] + torch.randn_like(b[key])
    with torch.no_grad():
        assert torch.equal(model(moved)["bin"], model(b)["bin"])  # gates closed at the start
        for attn in (model.spot_attn, model.region_attn):
            attn.gate.fill_(1.0)
        base = model(b)["bin"]
        assert (model(moved)["bin"] - base).abs().max() > 1e-3
        # the coarse heads do not see the bins' offsets
        torch.testing.assert_close(model(moved)["spot"], model(b)["spot"])


def test_bad_model_configs() -> None:
    with pytest.raises(ConfigError, match="unknown variant"):
        MagNetConfig(
            n_genes=3, variant="nope", bin_feature_dim=4, spot_feature_dim=4, region_feature_dim=4
        )
    with pytest.raises(ConfigError, match="bin_feature_dim"):
        MagNetConfig(n_genes=3, spot_feature_dim=4, region_feature_dim=4)
    with pytest.raises(ConfigError, match="divisible"):
        MagNetConfig(
            n_genes=3, bin_feature_dim=4, spot_feature_dim=4, region_feature_dim=4, width=30
        )


def test_attention_depends_on_the_query_only_with_several_context_tokens() -> None:
    """On ContextAttention alone: one context token makes the softmax weight 1, so the
    attended context ignores the query (the published defect); five tokens do not."""
    from magnet_st.model.magnet import ContextAttention

    torch.manual_seed(0)
    attn = ContextAttention(32, 4, 0.0).eval()
    tiles = torch.randn(6, 32)
    q1, q2 = torch.randn(3, 32), torch.randn(3, 32)
    for c, depends in ((1, False), (5, True)):
        ctx = torch.arange(c).repeat(3, 1)
        offset = torch.randn(3, c, 2)
        a1, a2 = attn.attend(q1, tiles, ctx, offset), attn.attend(q2, tiles, ctx, offset)
        assert torch.allclose(a1, a2, atol=1e-6) != depends, c


def test_three_gat_layers_carry_a_change_three_hops_along_a_chain() -> None:
    from magnet_st.model.magnet import GATStack

    torch.manual_seed(0)
    gat = GATStack(16, 4, 3, 0.0).eval()
    n = 6
    i = torch.arange(n - 1)
    edges = torch.cat([torch.stack([i, i + 1]), torch.stack([i + 1, i])], dim=1)  # a chain
    x = torch.randn(n, 16)
    x2 = x.clone()
    x2[0] += 5.0
    with torch.no_grad():
        moved = (gat(x2, edges)[-1] - gat(x, edges)[-1]).abs().amax(dim=1)
    assert moved[3] > 1e-4  # three hops from node 0: reached through the three layers
    assert moved[4] < 1e-6 and moved[5] < 1e-6  # four and five hops: out of reach
    # without edges nothing moves past node 0 (the change travels by message passing)
    with torch.no_grad():
        alone = gat(x2, edges[:, :0])[-1] - gat(x, edges[:, :0])[-1]
    assert alone[1:].abs().max() < 1e-6


def test_batch_edges_join_spatial_neighbours() -> None:
    """The bin graph of a batch is the k-nearest-neighbour graph of the batch's bins."""
    from scipy.spatial.distance import cdist

    s = _slide(seed=3)
    bins = blocks(s, 2)[1]
    b = make_batch(s, bins, k=8, with_targets=False)
    pos = s.bin_pos[bins]
    d = cdist(pos, pos)
    np.fill_diagonal(d, np.inf)
    kth = np.sort(d, axis=1)[:, 7]  # each bin's 8th-nearest distance
    src, dst = b["bin_edges"].numpy()
    # every edge joins a bin to one of its 8 nearest (ties at the 8th distance allowed)
    assert len(src) > 0
    assert np.all(d[src, dst] <= np.maximum(kth[src], kth[dst]) + 1e-9)
    assert np.median(d[src, dst]) <= 8.0 * np.sqrt(2) + 1e-9  # on an 8 um grid: adjacent bins
    # and every bin has at least 8 neighbours
    assert np.all(np.bincount(np.concatenate([src, dst]), minlength=len(bins)) >= 8)


def test_paper_variant_differs_from_magnet_where_it_should() -> None:
    dims = {"n_genes": 7, "spot_feature_dim": 16, "region_feature_dim": 16, "bin_feature_dim": 16}
    paper = MagNetConfig(variant="paper", width=32, context_tokens=1, **dims)
    ours = MagNetConfig(variant="magnet", width=32, **dims)
    assert (paper.context_gate, paper.readout) == (False, "mean")
    assert (ours.context_gate, ours.readout) == (True, "bin")
    mp, mo = create_model(paper), create_model(ours)
    assert mp.spot_attn.gate is None and mo.spot_attn.gate is not None
    assert mo.spot_attn.gate.detach().item() == 0.0  # the context path opens from closed
    assert mp.bin_tf.pool == 9 and mo.bin_tf.pool == 3  # all tokens vs the bin's own layers
    # an explicit choice wins over the variant's preset
    assert MagNetConfig(variant="paper", context_gate=True, **dims).context_gate is True
    # a checkpoint's config dict rebuilds the same model
    assert create_model(paper.to_dict()).cfg == paper


def test_end_to_end_bin_encoder_with_a_pre_logits_head() -> None:
    """MobileNetV3's pooled output (1024-d, after its pre-logits conv head) is not timm's
    ``num_features`` (288): the projection's width comes from a forward pass."""
    torch.manual_seed(0)
    s = _slide()
    s.bin_x = None
    cfg = MagNetConfig(
        n_genes=7,
        spot_feature_dim=16,
        region_feature_dim=16,
        bin_encoder="mobilenetv3_small_050",
        bin_patch_px=32,
        width=32,
    )
    model = create_model(cfg.to_dict())
    enc = model.bin_encoder
    assert enc.backbone.training and next(enc.backbone.parameters()).requires_grad
    rng = np.random.default_rng(0)

    def patches(slide: SlideArrays, bins: np.ndarray, train: bool, key=(0, 0)) -> torch.Tensor:
        return torch.from_numpy(rng.integers(0, 256, (len(bins), 3, 32, 32), dtype=np.uint8))

    data = BlockDataset(
        [s], context_tokens=cfg.context_tokens, targets=_log1p, patch_reader=patches
    )
    batch = data[0]
    n = len(data.items[0][1])
    assert batch["bin_x"].shape == (n, 3, 32, 32)
    out = model(batch)
    assert out["bin"].shape == (n, 7) and torch.isfinite(out["bin"]).all()
    assert out["spot"].shape == (len(batch["spot_index"]), 7)
    # uint8 patches are normalised with the backbone's timm mean / std (ImageNet here)
    x = enc.normalise(batch["bin_x"])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (batch["bin_x"].float() / 255 - mean) / std)
    assert enc.proj[0].in_features == enc.backbone(x).shape[1] == 1024
    # already normalised float patches go through as they are
    assert enc(torch.randn(5, 3, 32, 32)).shape == (5, 32)


def test_bin_batches_are_compact_whole_tiles_of_about_the_target_size() -> None:
    from magnet_st.model.batching import bin_batches

    s = _slide(n_side=40)  # 1,600 bins in 4 x 4-bin spot tiles (16 bins each), 10 x 10 tiles
    for target, side in ((64, 2), (256, 4), (100_000, 80)):
        batches = bin_batches(s, target)
        joined = np.sort(np.concatenate(batches))
        np.testing.assert_array_equal(joined, np.arange(s.n_bins))  # a partition
        for b in batches:
            tiles = np.unique(s.bin_spot[b])
            assert np.sum(np.isin(s.bin_spot, tiles)) == len(b)  # whole spot tiles only
            assert len(b) <= max(target, 16) or len(batches) == 1
            # compact: within a square of side x side spot tiles (32 um each)
            assert np.ptp(s.bin_pos[b], axis=0).max() < side * 32.0
        # the steps per epoch follow the target, not the tile size
        assert len(batches) == int(np.ceil(10 / min(side, 10))) ** 2
    assert [len(b) for b in bin_batches(s, 256)].count(256) == 4  # full 4 x 4-tile squares


def test_rate_heads_start_at_the_mean_count_even_for_large_counts() -> None:
    from magnet_st.data.targets import TargetTransform
    from magnet_st.train.trainer import init_head_bias

    s = _slide()
    for lv in ("bin", "spot", "region"):  # region tiles then hold ~6,400 counts per gene
        setattr(s, f"counts_{lv}", getattr(s, f"counts_{lv}") * 100)
    cfg = MagNetConfig(
        n_genes=7, spot_feature_dim=16, region_feature_dim=16, bin_feature_dim=16, width=32,
        rate_heads=True,
    )  # fmt: skip
    model = create_model(cfg)
    init_head_bias(model, [s], {lv: TargetTransform() for lv in ("bin", "spot", "region")})
    for lv in ("bin", "spot", "region"):
        bias = model.rate_heads[lv][1].bias.detach()
        mean = np.asarray(getattr(s, f"counts_{lv}").mean(axis=0)).ravel()
        assert torch.isfinite(bias).all(), lv
        got = torch.nn.functional.softplus(bias.double()).numpy()
        np.testing.assert_allclose(got, mean, rtol=1e-4)
