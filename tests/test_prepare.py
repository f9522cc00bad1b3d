"""prepare: membership, tile sums, the 16 um identity, panels, resume, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from magnet_st import read
from magnet_st.data.graph import knn_edges
from magnet_st.data.panel import select_panel
from magnet_st.errors import ConfigError, InputError
from magnet_st.prepare.build import dataset_is_complete, prepare
from magnet_st.prepare.config import PrepareConfig
from magnet_st.read.specs import SlideSpec


def _spec(run: Path, name: str = "syn", bin_size: int = 8) -> SlideSpec:
    return SlideSpec(name=name, path=str(run), image=str(run / "he_fullres.tif"), bin_size=bin_size)


def _level(ds: Path, slide: str, level: str) -> anndata.AnnData:
    return anndata.read_h5ad(ds / "slides" / slide / f"{level}.h5ad")


SMALL = {"n_genes": 50}


@pytest.fixture(scope="module")
def prepared(synthetic_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    ds = tmp_path_factory.mktemp("ds") / "dataset"
    prepare([_spec(synthetic_slide)], ds, PrepareConfig(**SMALL), progress=False)
    return ds


def test_every_unit_in_exactly_one_tile_that_contains_it(prepared: Path) -> None:
    m = json.loads((prepared / "manifest.json").read_text())
    assert m["config"]["preset"] == "hd"
    assert m["config"]["spot_size_um"] == 56.0 and m["config"]["region_size_um"] == 128.0
    b = _level(prepared, "syn", "bin")
    mpp = b.uns["magnet"]["microns_per_pixel"]
    for level, size_um in (("spot", 56.0), ("region", 128.0)):
        t = _level(prepared, "syn", level)
        idx = b.obs[level].to_numpy()
        assert idx.min() == 0 and idx.max() == t.n_obs - 1
        # every tile has members, and its member count matches
        np.testing.assert_array_equal(np.bincount(idx, minlength=t.n_obs), t.obs["n_units"])
        # the unit's centre lies inside its tile (axis-aligned synthetic grid)
        off_um = np.abs(b.obsm["spatial"] - t.obsm["spatial"][idx]) * mpp
        assert off_um.max() <= size_um / 2 + 1e-6
        # and no other tile's square contains it: tiles do not overlap
        rc = t.obs[["tile_row", "tile_col"]].to_numpy()
        assert len(np.unique(rc, axis=0)) == t.n_obs


def test_tile_counts_are_sums_of_members(prepared: Path) -> None:
    b = _level(prepared, "syn", "bin")
    for level in ("spot", "region"):
        t = _level(prepared, "syn", level)
        idx = b.obs[level].to_numpy()
        M = sp.csr_matrix((np.ones(b.n_obs), (idx, np.arange(b.n_obs))), shape=(t.n_obs, b.n_obs))
        assert abs(M @ b.X - t.X).sum() == 0
        assert t.X.dtype.kind == "i"
    # spot tiles nest in the region that holds their centre
    s = _level(prepared, "syn", "spot")
    r = _level(prepared, "syn", "region")
    own = s.obs["region"].to_numpy()
    assert (own >= 0).all() and (own < r.n_obs).all()


def test_graphs_are_sparse_knn(prepared: Path) -> None:
    for level in ("bin", "spot", "region"):
        ad = _level(prepared, "syn", level)
        conn = ad.obsp["spatial_connectivities"]
        assert sp.issparse(conn)
        k = min(8, ad.n_obs - 1)
        np.testing.assert_array_equal(np.diff(conn.indptr), k)
        assert conn.diagonal().sum() == 0


def test_16um_tiles_over_8um_bins_equal_space_ranger_16um(
    synthetic_slide: Path, tmp_path: Path
) -> None:
    cfg = PrepareConfig(
        working_mpp=1.0, bin_patch_px=28, spot_tile_px=16, region_tile_px=32, **SMALL
    )
    prepare([_spec(synthetic_slide)], tmp_path / "ds", cfg, progress=False)
    tiles = _level(tmp_path / "ds", "syn", "spot")
    s16 = read.visium_hd(synthetic_slide, 16)
    key = {tuple(rc): i for i, rc in enumerate(s16.array_coords)}
    rows = [key[(r, c)] for r, c in tiles.obs[["tile_row", "tile_col"]].to_numpy()]
    assert tiles.n_obs == s16.n_units
    assert abs(tiles.X - s16.counts[rows]).sum() == 0
    np.testing.assert_allclose(tiles.obsm["spatial"], s16.centers_px[rows], atol=1e-6)


@pytest.mark.parametrize("bin_um", [8, 16])
def test_interior_tiles_hold_equal_numbers_of_bins(
    synthetic_slide: Path, tmp_path: Path, bin_um: int
) -> None:
    """Tile edges are snapped to a whole number of bins: every tile away from the tissue
    edge holds the same bins, and its image crop is exactly its footprint."""
    prepare(
        [_spec(synthetic_slide, bin_size=bin_um)],
        tmp_path / "ds",
        PrepareConfig(**SMALL),
        progress=False,
    )
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    b = _level(tmp_path / "ds", "syn", "bin")
    for level in ("spot", "region"):
        size_um = m["config"][f"{level}_size_um"]
        per_side = size_um / bin_um
        assert per_side == int(per_side), (level, size_um)
        t = _level(tmp_path / "ds", "syn", level)
        assert t.uns["magnet"]["patch_um"] == size_um
        assert t.uns["magnet"]["patch_px"] * m["config"]["working_mpp"] == size_um
        rc = {tuple(x) for x in t.obs[["tile_row", "tile_col"]].to_numpy()}
        interior = [
            (r, c) in rc and all((r + i, c + j) in rc for i in (-1, 0, 1) for j in (-1, 0, 1))
            for r, c in t.obs[["tile_row", "tile_col"]].to_numpy()
        ]
        assert sum(interior) >= (4 if level == "spot" else 1), (level, sum(interior))
        n = t.obs["n_units"].to_numpy()[interior]
        assert (n == int(per_side) ** 2).all(), (level, sorted(set(n.tolist())))
        # every bin's tile is the one its array row and column fall in
        k = int(per_side)
        rows = b.obs["array_row"].to_numpy() // k
        cols = b.obs["array_col"].to_numpy() // k
        tiles = t.obs[["tile_row", "tile_col"]].to_numpy()[b.obs[level].to_numpy()]
        np.testing.assert_array_equal(tiles, np.column_stack([rows, cols]))
    # the rule and the sizes are recorded with the dataset
    tiles = m["tiles"]
    assert tiles["unit_um"] == bin_um and "multiple" in tiles["rule"]
    expect = {8: (56.0, 128.0), 16: (64.0, 128.0)}[bin_um]
    assert (tiles["spot_um"], tiles["region_um"]) == expect
    assert (tiles["requested_um"]["spot"], tiles["requested_um"]["region"]) == (56.0, 128.0)


def test_her2st_sections(her2st_root: Path, tmp_path: Path) -> None:
    specs = [s for s in read.specs_from_paths([her2st_root]) if s.name in ("C2", "C3")]
    res = prepare(specs, tmp_path / "ds", PrepareConfig(train_slides=["C2"]), progress=False)
    assert res.processed == ["C2", "C3"]
    m = json.loads((tmp_path / "ds/manifest.json").read_text())
    assert m["config"]["preset"] == "legacy_st"
    assert m["panel"]["train_slides"] == ["C2"]
    assert len(m["panel"]["gene_ids"]) == 250
    assert m["slides"]["C2"]["n"]["bin"] == 187
    b = _level(tmp_path / "ds", "C2", "bin")
    assert b.shape == (187, 15706)
    # the panel is seurat_v3 on C2 alone: a gene C3's table does not list is zero in C3
    c2 = read.her2st(her2st_root, "C2", with_image=False)
    c3 = read.her2st(her2st_root, "C3", with_image=False)
    expect = select_panel([c2.counts], [list(c2.gene_ids)], n_genes=250)
    assert m["panel"]["gene_ids"] == expect
    absent = set(expect) - set(c3.gene_ids)
    assert m["slides"]["C3"]["panel_genes_filled"] == len(absent) > 0
    assert res.filled == {"C2": 0, "C3": len(absent)}
    panel = pd.read_csv(tmp_path / "ds/panel.tsv", sep="\t")
    assert list(panel["gene_id"]) == expect


def test_panel_from_training_slides_only(synthetic_slide: Path, tmp_path: Path) -> None:
    from magnet_st.synthetic import write_synthetic_hd

    other = tmp_path / "other"
    write_synthetic_hd(other, width_um=300, height_um=300, seed=11, bin_sizes=(8,), progress=False)
    specs = [_spec(synthetic_slide, "a"), _spec(other, "b")]
    panels = {}
    for train in (["a"], ["b"]):
        ds = tmp_path / f"ds_{train[0]}"
        prepare(specs, ds, PrepareConfig(train_slides=train, **SMALL), progress=False)
        panels[train[0]] = json.loads((ds / "manifest.json").read_text())["panel"]["gene_ids"]
        s = read.visium_hd(synthetic_slide if train == ["a"] else other, 8)
        assert panels[train[0]] == select_panel([s.counts], [list(s.gene_ids)], n_genes=50)
    assert panels["a"] != panels["b"]


def test_noop_rerun_and_resume(
    synthetic_slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import magnet_st.prepare.build as prep
    from magnet_st.synthetic import write_synthetic_hd

    other = tmp_path / "other"
    write_synthetic_hd(other, width_um=300, height_um=300, seed=5, bin_sizes=(8,), progress=False)
    specs = [_spec(synthetic_slide, "a"), _spec(other, "b")]
    ds = tmp_path / "ds"
    real = prep.build_levels

    def crash_on_b(slide, cfg):
        if slide.name == "b":
            raise KeyboardInterrupt
        return real(slide, cfg)

    monkeypatch.setattr(prep, "build_levels", crash_on_b)
    with pytest.raises(KeyboardInterrupt):
        prepare(specs, ds, PrepareConfig(**SMALL), progress=False)
    assert not (ds / "manifest.json").exists()
    assert not dataset_is_complete(ds)
    assert not (ds / "slides/b").exists()
    assert not [p for p in (ds / "slides").iterdir() if p.name.startswith(".tmp")]
    a_mtime = (ds / "slides/a/bin.h5ad").stat().st_mtime_ns

    monkeypatch.setattr(prep, "build_levels", real)
    res = prepare(specs, ds, PrepareConfig(**SMALL), progress=False)
    assert res.processed == ["b"] and res.skipped == ["a"]  # resumed
    assert dataset_is_complete(ds)
    assert a_mtime == (ds / "slides/a/bin.h5ad").stat().st_mtime_ns
    stamp = {p: p.stat().st_mtime_ns for p in ds.rglob("*") if p.is_file()}
    res = prepare(specs, ds, PrepareConfig(**SMALL), progress=False)
    assert res.nothing_to_do
    assert stamp == {p: p.stat().st_mtime_ns for p in ds.rglob("*") if p.is_file()}

    # changing the panel settings rebuilds no slide, only the manifest
    res = prepare(specs, ds, PrepareConfig(n_genes=40), progress=False)
    assert res.processed == [] and res.skipped == ["a", "b"]
    assert len(json.loads((ds / "manifest.json").read_text())["panel"]["gene_ids"]) == 40

    # changing a tile size rebuilds every slide
    res = prepare(specs, ds, PrepareConfig(spot_tile_px=200, **SMALL), progress=False)
    assert res.processed == ["a", "b"]


def test_resume_skips_slides_of_an_interrupted_rerun(
    synthetic_slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import magnet_st.prepare.build as prep
    from magnet_st.synthetic import write_synthetic_hd

    other = tmp_path / "other"
    write_synthetic_hd(other, width_um=300, height_um=300, seed=5, bin_sizes=(8,), progress=False)
    ds = tmp_path / "ds"
    prepare(
        [_spec(synthetic_slide, "a"), _spec(other, "b")], ds, PrepareConfig(**SMALL), progress=False
    )
    # a later run adds "c" and is interrupted while writing it; the rerun redoes only "c"
    third = tmp_path / "third"
    write_synthetic_hd(third, width_um=300, height_um=300, seed=6, bin_sizes=(8,), progress=False)
    specs = [_spec(synthetic_slide, "a"), _spec(other, "b"), _spec(third, "c")]
    real = prep.build_levels
    monkeypatch.setattr(
        prep,
        "build_levels",
        lambda s, c: (_ for _ in ()).throw(RuntimeError("boom")) if s.name == "c" else real(s, c),
    )
    with pytest.raises(RuntimeError):
        prepare(specs, ds, PrepareConfig(**SMALL), progress=False)
    # nothing was written yet, so the previous dataset (a, b) is intact and still complete
    assert set(json.loads((ds / "manifest.json").read_text())["slides"]) == {"a", "b"}
    assert dataset_is_complete(ds) and not (ds / "slides/c").exists()
    monkeypatch.setattr(prep, "build_levels", real)
    res = prepare(specs, ds, PrepareConfig(**SMALL), progress=False)
    assert res.processed == ["c"] and res.skipped == ["a", "b"]


def test_add_slide_keeps_panel_and_checks_genes(synthetic_slide: Path, tmp_path: Path) -> None:
    from magnet_st.synthetic import write_synthetic_hd

    ds = tmp_path / "ds"
    prepare([_spec(synthetic_slide, "a")], ds, PrepareConfig(**SMALL), progress=False)
    panel = json.loads((ds / "manifest.json").read_text())["panel"]["gene_ids"]
    other = tmp_path / "other"
    write_synthetic_hd(other, width_um=300, height_um=300, seed=8, bin_sizes=(8,), progress=False)
    res = prepare([_spec(other, "b")], ds, add=True, progress=False)
    assert res.processed == ["b"]
    m = json.loads((ds / "manifest.json").read_text())
    assert m["panel"]["gene_ids"] == panel and m["panel"]["train_slides"] == ["a"]
    assert set(m["slides"]) == {"a", "b"}
    # a slide without some panel genes is refused, naming them, and nothing changes
    ad = read.visium_hd(other, 8).to_anndata()
    dropped = panel[:3]
    ad = ad[:, ~ad.var["gene_ids"].isin(dropped)].copy()
    ad.write_h5ad(tmp_path / "fewer.h5ad")
    spec = SlideSpec(
        name="c", path=str(tmp_path / "fewer.h5ad"), image=str(other / "he_fullres.tif")
    )
    before = (ds / "manifest.json").read_bytes()
    with pytest.raises(
        InputError, match=rf"lacks 3 genes of the dataset's panel: \['{dropped[0]}'"
    ):
        prepare([spec], ds, add=True, progress=False)
    assert (ds / "manifest.json").read_bytes() == before
    assert not (ds / "slides/c").exists()


def test_bad_configs(synthetic_slide: Path, tmp_path: Path) -> None:
    spec = [_spec(synthetic_slide, "a", bin_size=16)]
    with pytest.raises(ConfigError, match="spot tiles of 12 um are smaller than the 16 um units"):
        prepare(
            spec, tmp_path / "x", PrepareConfig(working_mpp=1.0, spot_tile_px=12), progress=False
        )
    with pytest.raises(ConfigError, match="region tiles .* smaller than spot tiles"):
        prepare(
            spec,
            tmp_path / "x",
            PrepareConfig(spot_tile_px=400, region_tile_px=300),
            progress=False,
        )
    with pytest.raises(ConfigError, match=r"not in every slide: \['NOPE1'"):
        prepare(
            spec,
            tmp_path / "x",
            PrepareConfig(panel="list", genes=["NOPE1", "NOPE2"]),
            progress=False,
        )
    with pytest.raises(ConfigError, match="unknown target transform"):
        PrepareConfig(target="sqrt").resolved("visium_hd")
    with pytest.raises(ConfigError, match=r"training slides \['zz'\] are not among the inputs"):
        prepare(spec, tmp_path / "x", PrepareConfig(train_slides=["zz"]), progress=False)
    with pytest.raises(ConfigError, match="asked for 100000 genes"):
        prepare(spec, tmp_path / "x", PrepareConfig(n_genes=100000), progress=False)
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_config_file_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text("working_mpp = 0.5\nspot_tile_px = 200\nk = 6\n")
    cfg = PrepareConfig.from_file(f, k=4, region_tile_px=None).resolved("visium_hd")
    assert (cfg.working_mpp, cfg.spot_tile_px, cfg.k, cfg.region_tile_px) == (0.5, 200, 4, 512)
    f.write_text("tile = 3\n")
    with pytest.raises(InputError, match=r"p.toml: unknown settings \['tile'\]"):
        PrepareConfig.from_file(f)
    for text, said in (
        ('n_genes = "ten"', "n_genes = 'ten' should be int, not str"),
        ("working_mpp = true", "working_mpp = True should be float | None, not bool"),
        ('genes = ["A", 3]', "genes = ['A', 3] should be list[str] | None"),
    ):
        f.write_text(text + "\n")
        with pytest.raises(InputError, match=re.escape(said)):
            PrepareConfig.from_file(f)
    f.write_text("working_mpp = 1\ngenes = []\n")  # an int where a float goes is fine
    assert PrepareConfig.from_file(f).working_mpp == 1


def test_tile_snapping_rule() -> None:
    from magnet_st.prepare.config import describe_tiles, snap_tile_px, tile_summary

    assert snap_tile_px(224, 0.25, 8) == 224  # 56 um = 7 bins
    assert snap_tile_px(224, 0.25, 16) == 256  # 56 um = 3.5 bins -> 64 um (halves up)
    assert snap_tile_px(200, 0.25, 16) == 192  # 50 um -> 48 um
    assert snap_tile_px(512, 0.25, 16) == 512
    assert snap_tile_px(12, 1.0, 16) == 12  # below one bin: left for build_levels to refuse
    with pytest.raises(ConfigError, match="not a whole number of pixels"):
        snap_tile_px(200, 0.3, 16)
    cfg = PrepareConfig()
    hd16 = cfg.resolved("visium_hd", 16)
    assert (hd16.spot_tile_px, hd16.region_tile_px, hd16.working_mpp) == (256, 512, 0.25)
    assert hd16.resolved("visium_hd", 16) == hd16  # a stored resolved config stays as it is
    assert cfg.resolved("visium", 55).spot_tile_px == 224  # round spots are not snapped
    line = describe_tiles(tile_summary(hd16, "visium_hd", 16, cfg.resolved("visium_hd")))
    assert line == (
        "spot tiles 64 um (4 x 4 bins of 16 um; 56 um asked, snapped to whole bins), "
        "region tiles 128 um (8 x 8 bins of 16 um)"
    )


def test_empty_tissue_is_an_error(synthetic_copy: Path, tmp_path: Path) -> None:
    path = synthetic_copy / "outs/binned_outputs/square_008um/spatial/tissue_positions.parquet"
    df = pd.read_parquet(path)
    df["in_tissue"] = 0
    df.to_parquet(path)
    with pytest.raises(InputError, match="no barcode of the matrix lies under tissue"):
        prepare([_spec(synthetic_copy)], tmp_path / "ds", progress=False)


def test_missing_image_is_an_error_and_leaves_no_folders(
    synthetic_copy: Path, tmp_path: Path
) -> None:
    (synthetic_copy / "he_fullres.tif").unlink()  # a synthetic run's image is found otherwise
    spec = SlideSpec(name="a", path=str(synthetic_copy), bin_size=8)
    with pytest.raises(InputError, match="no full-resolution image given"):
        prepare([spec], tmp_path / "new" / "ds", progress=False)
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no full-resolution image given"):
        prepare([spec], tmp_path / "empty", progress=False)
    assert list((tmp_path / "empty").iterdir()) == []


def test_patches_coarser_than_the_image_allows_are_refused(
    synthetic_slide: Path, tmp_path: Path
) -> None:
    """Space Ranger's lowres image (~1.17 um/px): 14 um bin patches would be 12 px."""
    png = synthetic_slide / "outs/binned_outputs/square_008um/spatial/tissue_lowres_image.png"
    spec = SlideSpec(name="a", path=str(synthetic_slide), image=str(png), bin_size=8)
    with pytest.raises(
        ConfigError, match=r"bin patches of 14 um cover only 12\.\d px .*--bin-patch-px"
    ):
        prepare([spec], tmp_path / "ds", PrepareConfig(bin_patch_px=56, **SMALL), progress=False)
    assert not (tmp_path / "ds").exists()
    prepare([spec], tmp_path / "ds", PrepareConfig(bin_patch_px=80, **SMALL), progress=False)
    assert dataset_is_complete(tmp_path / "ds")


def test_knn_edges_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 100, (300, 2))
    edges, dist = knn_edges(pts, k=5)
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    expect = np.sort(np.argsort(d, axis=1)[:, :5], axis=1)
    got = np.sort(edges[0].reshape(300, 5), axis=1)
    np.testing.assert_array_equal(got, expect)
    np.testing.assert_array_equal(edges[1], np.repeat(np.arange(300), 5))
    np.testing.assert_allclose(np.sort(dist.reshape(300, 5), axis=1), np.sort(d, axis=1)[:, :5])
    e, _ = knn_edges(pts[:3], k=8)  # fewer points than k
    assert e.shape == (2, 6)


# -- inputs as users have them (issue 15) ------------------------------------------------------


def _legacy_pair(root: Path) -> tuple[SlideSpec, SlideSpec, list[str]]:
    """Sections A (genes g0..g11, g0 the most expressed) and B, whose table omits g0."""
    from legacy_files import array_grid, write_section

    genes = [f"g{i}" for i in range(12)]
    means = np.linspace(1, 3, len(genes))
    means[0] = 20.0
    write_section(root, "A1", genes, array_grid(6, 6), means=means, seed=1)
    write_section(root, "B1", genes[1:], array_grid(6, 6), means=means[1:], seed=2)
    specs = {s.name: s for s in read.specs_from_paths([root])}
    return specs["A1"], specs["B1"], genes


def test_legacy_section_without_a_panel_gene_is_added_with_zeros(tmp_path: Path) -> None:
    from magnet_st.data.dataset import Dataset

    a, b, _ = _legacy_pair(tmp_path / "st")
    ds = tmp_path / "ds"
    prepare([a], ds, PrepareConfig(panel="mean", n_genes=4), progress=False)
    panel = json.loads((ds / "manifest.json").read_text())["panel"]["gene_ids"]
    assert panel[0] == "g0"
    res = prepare([b], ds, add=True, progress=False)
    assert res.processed == ["B1"] and res.filled == {"A1": 0, "B1": 1}
    d = Dataset(ds)
    assert d.slide_meta("B1")["panel_genes_filled"] == 1
    for level in ("bin", "spot", "region"):
        y = d.counts("B1", level, d.all_slide_panel)
        assert y.shape[1] == 4 and y[:, 0].nnz == 0 and y[:, 1:].sum() > 0
    # a slide that lists its whole reference (Space Ranger style) lacking g0 is refused
    slide = read.her2st(tmp_path / "st", "B1")
    slide.lists_all_genes = True
    slide.to_anndata().write_h5ad(tmp_path / "b_sr.h5ad")
    spec = SlideSpec(name="C", path=str(tmp_path / "b_sr.h5ad"), image=str(slide.image_path))
    with pytest.raises(InputError, match=r"slide C lacks 1 genes of the dataset's panel: \['g0'\]"):
        prepare([spec], ds, add=True, progress=False)


def test_panel_across_legacy_sections_counts_unlisted_genes_as_zero(tmp_path: Path) -> None:
    from magnet_st.data.dataset import Dataset
    from magnet_st.data.panel import training_panel

    a, b, _ = _legacy_pair(tmp_path / "st")
    ds = tmp_path / "ds"
    res = prepare([a, b], ds, PrepareConfig(panel="mean", n_genes=4), progress=False)
    assert res.panel[0] == "g0" and res.filled == {"A1": 0, "B1": 1}
    d = Dataset(ds)
    assert d.counts("B1", "bin", d.all_slide_panel)[:, 0].nnz == 0
    assert d.gene_names(["g0"]) == ["g0"]
    chosen = training_panel(d, ["B1", "A1"])  # B1 first: g0 comes from A1 alone
    assert chosen.genes[0] == "g0"


def test_anndata_preset_follows_the_unit_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from magnet_st.cli import main

    a, _, _ = _legacy_pair(tmp_path / "st")
    slide = a.load()
    ad = slide.to_anndata()
    del ad.uns["spatial"]["A1"]["scalefactors"]["bin_size_um"]
    ad.write_h5ad(tmp_path / "a.h5ad")
    base = [
        str(tmp_path / "a.h5ad"),
        "--image",
        str(slide.image_path),
        "--panel",
        "mean",
        "--n-genes",
        "4",
    ]
    assert main(["prepare", str(tmp_path / "x"), *base, "--quiet"]) == 2
    assert "--unit-size UM" in capsys.readouterr().err
    for unit, preset, spot_um in ((100, "legacy_st", 400), (55, "visium", 224)):
        out = tmp_path / f"ds{unit}"
        assert main(["prepare", str(out), *base, "--unit-size", str(unit), "--quiet"]) == 0
        m = json.loads((out / "manifest.json").read_text())
        assert m["config"]["preset"] == preset and m["config"]["spot_size_um"] == spot_um
        assert m["slides"]["a"]["unit_size_um"] == unit
    capsys.readouterr()
    # tiles smaller than the units: the message names the options that fix it
    hd = ["--unit-size", "100", "--preset", "hd", "--bin-patch-px", "200", "--quiet"]
    assert main(["prepare", str(tmp_path / "y"), *base, *hd]) == 2
    err = capsys.readouterr().err
    assert "spot tiles of 56 um are smaller than the 100 um units" in err
    assert "--spot-tile-px" in err and "--unit-size UM" in err


def test_cp10k_targets_are_scanpys_normalize_total_then_log1p(
    synthetic_slide: Path, tmp_path: Path
) -> None:
    """Library-size-normalised targets: counts per 10,000 of each unit's total over every
    gene (not only the panel's), then log1p, at every level, as scanpy computes them."""
    import scanpy as sc

    from magnet_st.data.dataset import Dataset

    ds_path = tmp_path / "cp10k"
    prepare([_spec(synthetic_slide)], ds_path, PrepareConfig(n_genes=50, target="log1p_cp10k"))
    ds = Dataset(ds_path)
    assert ds.all_slide_target_transforms["bin"].scale == "log1p(counts per 10,000)"
    for level in ("bin", "spot"):
        full = _level(ds_path, "syn", level)
        full.X = full.X.astype(np.float64)
        sc.pp.normalize_total(full, target_sum=1e4)
        sc.pp.log1p(full)
        col = {g: i for i, g in enumerate(full.var["gene_ids"].astype(str))}
        ref = full.X[:, [col[g] for g in ds.all_slide_panel]].toarray()
        genes, tt = ds.all_slide_panel, ds.all_slide_target_transforms[level]
        np.testing.assert_allclose(ds.targets("syn", level, genes, tt), ref, rtol=1e-5, atol=1e-5)
        # a batch reads the same rows from disk
        rows = np.array([5, 1, 3])
        got = np.log1p(ds.panel_counts("syn", level, genes)[rows].toarray())
        np.testing.assert_allclose(got, ref[rows], rtol=1e-5, atol=1e-5)
    # a cross-validation's prediction files say which scale they are on, as predict's do
    from magnet_st.evaluate.cv import _pred_anndata

    pred = _pred_anndata(ds, "syn", "spot", ref, list(genes), list(genes))  # the last level
    assert pred.uns["magnet"]["scale"] == "log1p(counts per 10,000)"
    np.testing.assert_allclose(pred.layers["measured"].toarray(), ref, rtol=1e-5, atol=1e-5)


def test_a_failed_panel_records_nothing_and_names_the_panel_that_would_work(
    synthetic_slide: Path, tmp_path: Path
) -> None:
    """A panel larger than the slides allow fails with the largest size that works and the
    option to ask for it; the slide written before the panel is not left behind, so the
    next run prepares it (instead of calling it 'unchanged')."""
    import re

    out = tmp_path / "ds"
    with pytest.raises(ConfigError, match=r"ask for at most \d+ \(--n-genes \d+\)") as err:
        prepare([_spec(synthetic_slide)], out, PrepareConfig(n_genes=100_000), progress=False)
    most = int(re.search(r"--n-genes (\d+)", str(err.value)).group(1))
    assert "detected" in str(err.value)  # seurat_v3 ranks detected genes only
    assert not (out / "slides" / "syn").exists() and not (out / "manifest.json").exists()
    res = prepare([_spec(synthetic_slide)], out, PrepareConfig(n_genes=most), progress=False)
    assert res.processed == ["syn"] and res.skipped == [] and len(res.panel) == most
