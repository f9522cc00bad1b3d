"""prepare: turn slides into MagNet's multi-level dataset, once.

Every target unit (an HD bin, a Visium spot or a legacy ST spot) is seen at three
levels (docs/design.md):

========  ==============================  ===========================================
level     image                           expression target
========  ==============================  ===========================================
bin       patch centred on the unit       the unit's own counts
spot      tile of a non-overlapping grid  sum of the units whose centre lies in it
region    tile of a coarser grid          sum of the units whose centre lies in it
========  ==============================  ===========================================

Membership is pure geometry: no expression is used to place anything. On Visium HD
the grids are laid on Space Ranger's bin grid (array rows and columns), so 16 um tiles
over 8 um bins reproduce Space Ranger's 16 um bins exactly; elsewhere the grids start
at the corner of the tissue's bounding box, in microns.

Tiles are a shared grid, not patches centred on each unit (docs/design.md). On Visium HD
a tile's edge is snapped to a whole number of bins (the nearest multiple of the bin size,
halves rounded up, keeping ``working_mpp``): the hd preset's 56 um spot tiles stay 56 um
(7 x 7 bins) over 8 um bins and become 64 um (4 x 4 bins) over 16 um bins; 128 um region
tiles are 16 x 16 or 8 x 8 bins. Every tile away from the tissue edge then holds the same
bins, and its image crop (``patch_um``) is exactly their footprint. Round Visium and
legacy ST spots are not snapped. The rule and the sizes are recorded under ``tiles`` in
``manifest.json`` and logged.

Output (``DATASET/``)::

    manifest.json                 written last: config, panel, targets, slides, versions, checksums
    panel.tsv                     gene_id, gene_name of the panel, in order
    slides/<name>/bin.h5ad        units: raw counts (all genes), obsm["spatial"] (px),
                  spot.h5ad       obs["spot"], obs["region"] membership, kNN graph in
                  region.h5ad     obsp["spatial_connectivities"] / ["spatial_distances"]
                  slide.json      what the slide was built from (for resume and no-op reruns)

A dataset without ``manifest.json`` is incomplete and is refused by later stages.
"""

# Long module: the dataset writer: prepare() (~220 lines), the panel/target/gene-name helpers that
# fill its manifest, and prepare_unmeasured(), which writes the same slide-record/manifest layout.

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from magnet_st.data.format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SLIDE_RECORD,
    slide_dir_is_complete,
    slide_lists_all,
)
from magnet_st.data.levels import LEVELS
from magnet_st.data.panel import gene_columns, select_panel, usable_genes
from magnet_st.data.slide import Slide
from magnet_st.data.targets import TargetTransform
from magnet_st.errors import ConfigError, InputError
from magnet_st.prepare.checksums import fingerprint, input_files, unchanged
from magnet_st.prepare.config import PrepareConfig, describe_tiles, tile_summary
from magnet_st.prepare.levels import build_levels
from magnet_st.read.specs import SlideSpec
from magnet_st.util.atomic import (
    atomic_path,
    check_free_space,
    check_out_folder,
    clean_stale,
    write_text,
)
from magnet_st.util.lock import locked
from magnet_st.util.provenance import package_versions

log = logging.getLogger(__name__)


# -- the dataset ---------------------------------------------------------------------------


@dataclass
class PrepareResult:
    path: Path
    processed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    panel: list[str] = field(default_factory=list)
    nothing_to_do: bool = False
    tiles: dict[str, Any] = field(default_factory=dict)
    """The tile sizes and rule, as in the manifest (see :func:`describe_tiles`)."""
    filled: dict[str, int] = field(default_factory=dict)
    """Per slide that lists only detected genes: panel genes it does not list (zeros)."""


def _read_slide_record(folder: Path) -> dict | None:
    try:
        rec = json.loads((folder / SLIDE_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec if slide_dir_is_complete(folder) else None


def _read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return m if m.get("format") == FORMAT else None


def _config_key(cfg: PrepareConfig) -> dict:
    """Settings that change the per-slide files (the panel and targets do not)."""
    d = cfg.to_dict()
    return {
        k: d[k]
        for k in ("preset", "working_mpp", "bin_patch_px", "spot_tile_px", "region_tile_px", "k")
    }


def _written_bytes(levels: dict[str, Any]) -> list[int]:
    """About what writing each of ``levels`` as .h5ad takes: the count matrix (value +
    index per stored count), obs and obsm, plus the file's own overhead."""
    sizes = []
    for ad in levels.values():
        x = ad.X
        nnz = int(x.nnz) if hasattr(x, "nnz") else int(np.prod(x.shape))
        sizes.append(nnz * 12 + ad.n_obs * (64 + 8 * max(1, len(ad.obs.columns))) + 65536)
    return sizes


# Long: one resumable run over shared state (old manifest, old_slides, slides_meta, result):
# check args, plan fresh slides, build and write each (_build_slide; checking it resolves to the
# first slide's tile sizes via resolved/first), then panel and targets with rollback of this run's slides on
# error, then the manifest.
@locked("out", "magnet prepare")
def prepare(
    specs: list[SlideSpec],
    out: str | Path,
    config: PrepareConfig | None = None,
    *,
    add: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> PrepareResult:
    """Build (or update) a multi-level dataset at ``out`` from the slides of ``specs``.

    Args:
        specs: the slides (see :mod:`magnet_st.read.specs`).
        out: the dataset folder.
        config: sizes, graph, panel and target settings; ``None`` = defaults.
        add: keep the dataset's slides, config and panel and add ``specs`` to it; the new
            slides must hold every panel gene.
        overwrite: rebuild every slide even when its inputs are unchanged.

    Slides whose inputs and settings are unchanged are not rebuilt; a rerun on unchanged
    inputs writes nothing. The manifest is removed while work is in progress and written
    last, so an interrupted run never leaves a dataset that looks complete.
    """
    check_out_folder(out)
    out = Path(out)
    old = _read_manifest(out)
    if add:
        if old is None:
            raise InputError(out, "--add needs an existing, complete dataset")
        config = PrepareConfig(**{k: v for k, v in old["config"].items() if not k.endswith("_um")})
        names_old = set(old["slides"])
        clash = [s.name for s in specs if s.name in names_old]
        if clash:
            raise InputError(out, f"slides {clash} are already in the dataset")
        specs = [SlideSpec(**old["slides"][n]["spec"]) for n in old["slides"]] + specs
    config = config or PrepareConfig()
    if not specs:
        raise ConfigError("no slides to prepare")
    train = config.train_slides or [s.name for s in specs if not add or s.name in old["slides"]]
    unknown = sorted(set(train) - {s.name for s in specs})
    if unknown:
        raise ConfigError(f"training slides {unknown} are not among the inputs")

    # Which slides need (re)building? A slide is fresh when its spec, input files and
    # per-slide settings are those recorded in the manifest.
    old_slides = dict((old or {}).get("slides", {}))
    for spec in specs:  # slides finished by an interrupted run are recorded in their folder
        if spec.name not in old_slides:
            rec = _read_slide_record(out / "slides" / spec.name)
            if rec is not None:
                old_slides[spec.name] = rec

    def fresh(spec: SlideSpec) -> bool:
        rec = old_slides.get(spec.name)
        return (
            not overwrite
            and rec is not None
            and rec["spec"] == spec.to_dict()
            and slide_dir_is_complete(out / rec["dir"])
            and rec["config"]
            == _config_key(config.resolved(rec["technology"], rec.get("unit_size_um")))
            and unchanged(rec["files"])
        )

    plan = [(spec, fresh(spec)) for spec in specs]
    if (
        old is not None
        and all(f for _, f in plan)
        and set(old["slides"]) == {s.name for s in specs}
        and old["config"] == _resolved_dict(config, old_slides, train)
    ):
        log.info("%s: inputs and settings unchanged; nothing to do", out)
        return PrepareResult(
            out,
            skipped=[s.name for s in specs],
            nothing_to_do=True,
            tiles=old.get("tiles", {}),
        )

    # Folders are made when the first slide is written, so that a run stopped by bad
    # input leaves no empty folders behind.
    clean_stale(out)
    clean_stale(out / "slides")

    result = PrepareResult(out)
    slides_meta: dict[str, dict] = {}
    resolved: PrepareConfig | None = None
    first: tuple[str, str, float] = ("", "", 0.0)  # slide, technology, unit size of `resolved`
    bar = tqdm(plan, desc="prepare", unit="slide", disable=not progress)
    for spec, is_fresh in bar:
        if is_fresh:
            rec = old_slides[spec.name]
            technology, unit_um = rec["technology"], float(rec["unit_size_um"])
            cfg = config.resolved(technology, unit_um)
            slides_meta[spec.name] = rec
            result.skipped.append(spec.name)
        else:
            record, cfg = _build_slide(spec, config, out, old_slides, old if add else None, bar)
            technology, unit_um = record["technology"], float(record["unit_size_um"])
            slides_meta[spec.name] = record
            result.processed.append(spec.name)
        if resolved is None:
            resolved, first = cfg, (spec.name, technology, unit_um)
        elif _config_key(cfg) != _config_key(resolved):
            raise ConfigError(
                f"slide {spec.name} ({technology}, {unit_um:g} um units) needs preset "
                f"{cfg.preset} with spot / region tiles of {cfg.size_um('spot'):g} / "
                f"{cfg.size_um('region'):g} um, but slide {first[0]} ({first[1]}, "
                f"{first[2]:g} um units) has {resolved.preset} with "
                f"{resolved.size_um('spot'):g} / {resolved.size_um('region'):g} um; prepare "
                "different technologies separately, or give tile sizes that are whole "
                "multiples of every bin size"
            )
    assert resolved is not None
    resolved.train_slides = train
    if add and old is not None and "tiles" in old:
        tiles = old["tiles"]
    else:
        requested = config.resolved(first[1], first[2], snap=False)
        tiles = tile_summary(resolved, first[1], first[2], requested)
    result.tiles = tiles
    explicit = {"spot": config.spot_tile_px, "region": config.region_tile_px}
    changed = [
        lv
        for lv in ("spot", "region")
        if not add and explicit[lv] is not None and tiles[f"{lv}_um"] != tiles["requested_um"][lv]
    ]  # a size the user gave that was snapped: say so louder than the preset's
    (log.warning if changed else log.info)("%s: %s", out, describe_tiles(tiles))

    # Remove slides that are no longer part of the dataset.
    keep = {s.name for s in specs}
    for d in (out / "slides").iterdir():
        if d.is_dir() and d.name not in keep:
            shutil.rmtree(d)

    try:
        panel_ids, targets = _panel_and_targets(out, slides_meta, resolved, old if add else None)
    except (ConfigError, InputError):
        # a failed prepare records nothing: the slides this run wrote would otherwise be
        # taken as done ("unchanged") by the next run
        for name in result.processed:
            shutil.rmtree(out / "slides" / name, ignore_errors=True)
        raise
    result.panel = panel_ids
    result.filled = _check_panel(out, slides_meta, panel_ids)
    for name, n_filled in result.filled.items():
        slides_meta[name] = {**slides_meta[name], "panel_genes_filled": n_filled}
    gene_names = _gene_names(out, [slides_meta[n] for n in train + sorted(keep)], panel_ids)
    write_text(
        out / "panel.tsv",
        "gene_id\tgene_name\n"
        + "".join(f"{g}\t{n}\n" for g, n in zip(panel_ids, gene_names, strict=True)),
    )
    _write_manifest(
        out, resolved.to_dict(), resolved.panel, train, panel_ids, gene_names, targets, tiles,
        slides_meta,
    )  # fmt: skip
    log.info(
        "%s: %d slides built, %d unchanged; panel of %d genes",
        out,
        len(result.processed),
        len(result.skipped),
        len(panel_ids),
    )
    return result


def _build_slide(
    spec: SlideSpec,
    config: PrepareConfig,
    out: Path,
    old_slides: dict[str, dict],
    add_to: dict | None,
    bar: Any,
) -> tuple[dict, PrepareConfig]:
    """Read one slide, build its levels and write its folder (atomically, with its record);
    ``add_to``: the manifest of the dataset it joins (its panel genes must be measured)."""
    bar.set_postfix_str(f"{spec.name}: read")
    slide = spec.load()
    slide.check_counts()  # an all-zero slide has nothing to learn from
    if slide.image_path is None:
        raise InputError(
            spec.path,
            f"slide {spec.name}: no full-resolution image given (--image or the "
            "sample sheet's image column); the image is needed to cut patches",
        )
    technology, unit_um = slide.technology, float(slide.unit_size_um)
    cfg = config.resolved(technology, unit_um)
    if add_to is not None and slide.lists_all_genes:  # else absent panel genes are zeros
        _check_genes(spec, set(slide.gene_ids.astype(str)), add_to["panel"]["gene_ids"])
    bar.set_postfix_str(f"{spec.name}: tiles and graphs")
    levels = build_levels(slide, cfg)
    bar.set_postfix_str(f"{spec.name}: write")
    rel = f"slides/{spec.name}"
    record = {
        "spec": spec.to_dict(),
        "dir": rel,
        "config": _config_key(cfg),
        "files": fingerprint(input_files(slide), old_slides.get(spec.name, {}).get("files")),
        "technology": slide.technology,
        "unit_size_um": float(slide.unit_size_um),
        "microns_per_pixel": float(slide.microns_per_pixel),
        "image": str(Path(slide.image_path).resolve()),
        "n_genes_measured": int(slide.n_genes),
        "lists_all_genes": bool(slide.lists_all_genes),
        "n": {name: int(ad.n_obs) for name, ad in levels.items()},
    }
    (out / MANIFEST).unlink(missing_ok=True)  # incomplete until the new one is written
    sizes = _written_bytes(levels)  # h5py may segfault when a write fails half-way
    check_free_space(out, sum(sizes), largest_file=max(sizes))
    with atomic_path(out / rel) as tmp:
        tmp.mkdir()
        for name, ad in levels.items():
            ad.write_h5ad(tmp / f"{name}.h5ad")
        (tmp / SLIDE_RECORD).write_text(json.dumps(record, indent=1))
    return record, cfg


def _write_manifest(
    out: Path,
    config: dict,
    method: str,
    train: list[str],
    gene_ids: list[str],
    gene_names: list[str],
    targets: dict,
    tiles: dict,
    slides: dict,
) -> None:
    """The dataset's manifest (written last: a dataset without it is incomplete)."""
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "packages": package_versions(),
        "config": config,
        "panel": {
            "method": method,
            "n_genes": len(gene_ids),
            "train_slides": train,
            "gene_ids": gene_ids,
            "gene_names": gene_names,
        },
        "targets": targets,
        "tiles": tiles,
        "levels": list(LEVELS),
        "slides": slides,
    }
    write_text(out / MANIFEST, json.dumps(manifest, indent=1))


def _resolved_dict(config: PrepareConfig, slides: dict[str, dict], train: list[str]) -> dict:
    """``config`` resolved for the technology of recorded ``slides``, as stored in a manifest."""
    if not slides:
        return {}
    rec = next(iter(slides.values()))
    try:
        cfg = config.resolved(rec["technology"], rec.get("unit_size_um"))
    except ConfigError:
        return {}
    cfg.train_slides = train
    return cfg.to_dict()


def _read_level(out: Path, meta: dict, level: str):
    import anndata

    return anndata.read_h5ad(out / meta["dir"] / f"{level}.h5ad")


def _panel_and_targets(
    out: Path, slides: dict[str, dict], cfg: PrepareConfig, old: dict | None
) -> tuple[list[str], dict]:
    train = cfg.train_slides or list(slides)
    if old is not None:
        return list(old["panel"]["gene_ids"]), old["targets"]
    bins = {name: _read_level(out, slides[name], "bin") for name in train}
    # Candidates are the genes every slide of the dataset measures. Legacy ST tables omit
    # the genes a section did not detect: there an absent gene is zero, so it counts as
    # measured; a Space Ranger matrix lists its whole reference, so absent = not measured.
    metas = list(slides.values())
    candidates = set(
        usable_genes([sorted(_slide_gene_ids(out, m)) for m in metas], map(slide_lists_all, metas))
    )
    panel = select_panel(
        [bins[n].X for n in train],
        [list(bins[n].var["gene_ids"].astype(str)) for n in train],
        method=cfg.panel,
        n_genes=cfg.n_genes,
        genes=cfg.genes,
        candidates=candidates,
        lists_all=[slide_lists_all(slides[n]) for n in train],
        seed=cfg.seed,
    )
    targets = {}
    for level in LEVELS:
        tt = TargetTransform(cfg.target)
        if tt.needs_fit:
            ads = bins if level == "bin" else {n: _read_level(out, slides[n], level) for n in train}
            tt.fit(
                [
                    panel_counts(ads[n], panel, fill_absent=not slide_lists_all(slides[n]))
                    for n in train
                ]
            )
        targets[level] = tt.to_dict()
    return panel, targets


def panel_counts(adata, panel: list[str], *, fill_absent: bool = False) -> sp.csr_matrix:
    """The columns of ``adata.X`` for the panel's gene ids, in panel order; a gene absent
    from ``adata`` is zeros with ``fill_absent``, else a :class:`KeyError`."""
    ids = list(adata.var["gene_ids"].astype(str))
    return gene_columns(adata.X, ids, panel, fill_absent=fill_absent)


def _check_genes(spec: SlideSpec | dict, have: set[str], panel: list[str]) -> None:
    missing = [g for g in panel if g not in have]
    if missing:
        spec = spec if isinstance(spec, dict) else spec.to_dict()
        raise InputError(
            spec["path"],
            f"slide {spec['name']} lacks {len(missing)} genes of the dataset's panel: "
            f"{missing[:20]}{' ...' if len(missing) > 20 else ''}",
        )


def _slide_gene_ids(out: Path, meta: dict) -> set[str]:
    import h5py

    with h5py.File(out / meta["dir"] / "bin.h5ad", "r") as f:
        ids = f["var"]["gene_ids"]
        if isinstance(ids, h5py.Group):  # stored as categorical
            ids = ids["categories"]
        return {v.decode() if isinstance(v, bytes) else str(v) for v in ids[:]}


def _check_panel(out: Path, slides: dict[str, dict], panel: list[str]) -> dict[str, int]:
    """Refuse a slide that lists its whole reference but lacks panel genes; for slides that
    list only detected genes, the number of panel genes they do not list (zeros there)."""
    filled = {}
    for name, meta in slides.items():
        have = _slide_gene_ids(out, meta)
        if slide_lists_all(meta):
            _check_genes(meta["spec"], have, panel)
            continue
        filled[name] = sum(g not in have for g in panel)
        if filled[name]:
            log.info(
                "slide %s: %d panel genes not listed in its counts, filled with zeros",
                name,
                filled[name],
            )
    return filled


def _gene_names(out: Path, metas: list[dict], panel: list[str]) -> list[str]:
    """Panel gene names as the first of ``metas`` that lists each gene names it."""
    name: dict[str, str] = {}
    for meta in metas:
        if all(g in name for g in panel):
            break
        ad = _read_level(out, meta, "bin")
        for g, n in zip(ad.var["gene_ids"].astype(str), ad.var_names.astype(str), strict=True):
            name.setdefault(g, n)
    return [name.get(g, g) for g in panel]


def prepare_unmeasured(
    slide: Slide,
    out: str | Path,
    config: dict[str, Any],
    panel: list[str],
    gene_names: list[str],
    targets: dict[str, dict],
    *,
    fingerprint_extra: str = "",
) -> Path:
    """A one-slide dataset for prediction: ``slide``'s units and tiles laid out as
    :func:`prepare` does, with the panel and target statistics of a trained model
    (``config`` is the training dataset's resolved config). Counts may be zeros (an
    image-only slide). A rerun with the same units, image and settings writes nothing.
    """
    out = Path(out)
    cfg = PrepareConfig(**{k: v for k, v in config.items() if not k.endswith("_um")})
    cfg = cfg.resolved(slide.technology, slide.unit_size_um) if cfg.preset == "auto" else cfg
    h = hashlib.sha256(np.ascontiguousarray(slide.centers_px, np.float64).tobytes())
    h.update(json.dumps([_config_key(cfg), panel, fingerprint_extra]).encode())
    key = h.hexdigest()[:32]
    rel = f"slides/{slide.name}"
    rec = _read_slide_record(out / rel)
    manifest = _read_manifest(out)
    if rec is not None and rec.get("units_sha256") == key and manifest is not None:
        log.info("%s: units and settings unchanged; reusing it", out)
        return out
    levels = build_levels(slide, cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    (out / "slides").mkdir(exist_ok=True)
    clean_stale(out / "slides")
    record = {
        "spec": {"name": slide.name, "path": str(slide.image_path)},
        "dir": rel,
        "config": _config_key(cfg),
        "files": {},
        "units_sha256": key,
        "technology": slide.technology,
        "unit_size_um": float(slide.unit_size_um),
        "microns_per_pixel": float(slide.microns_per_pixel),
        "image": str(Path(slide.image_path).resolve()) if slide.image_path else "",
        "n_genes_measured": int(slide.n_genes),
        "n": {name: int(ad.n_obs) for name, ad in levels.items()},
    }
    if (out / rel).exists():
        shutil.rmtree(out / rel)
    with atomic_path(out / rel) as tmp:
        tmp.mkdir()
        for name, ad in levels.items():
            ad.write_h5ad(tmp / f"{name}.h5ad")
        (tmp / SLIDE_RECORD).write_text(json.dumps(record, indent=1))
    cfg.train_slides = []
    tiles = tile_summary(cfg, slide.technology, slide.unit_size_um, cfg)
    _write_manifest(
        out, cfg.to_dict(), "list", [], list(panel), list(gene_names), targets, tiles,
        {slide.name: record},
    )  # fmt: skip
    return out


def dataset_is_complete(path: str | Path) -> bool:
    path = Path(path)
    m = _read_manifest(path)
    return m is not None and all(
        slide_dir_is_complete(path / s["dir"]) for s in m["slides"].values()
    )


__all__ = ["LEVELS", "PrepareResult", "dataset_is_complete", "prepare", "prepare_unmeasured"]
