"""Slide-level cross-validation of MagNet (and its ablations) beside the mean-profile baseline.

Per fold: the test slide(s) are held out; one training slide is held out for validation
when there are at least two. **One protocol for every model** (:data:`PROTOCOLS`):

- ``"select"`` (default): every model, the mean profile and the ridge probe included, fits
  its parameters on the training slides and makes its choices on the validation slides
  (the networks' epoch, by early stopping; ridge's penalty); the gene panel and the
  target statistics come from the training slides.
- ``"refit"`` (``refit=True``, ``magnet cv --refit``): the same choices, then every model
  is fitted again on training + validation slides with them (networks for the number of
  epochs chosen, ridge with the chosen penalty, the mean profile over both); the panel
  and target statistics come from training + validation slides.

No model sees a slide the others do not. Each model then predicts the test slides from
their images alone; metrics (:mod:`magnet_st.model.metrics`) are computed at the bin, spot and
region levels. Folds and models already finished are skipped, so an interrupted run
resumes.

Outputs in ``OUT/``: ``folds.json`` (the split and seed), ``fold<i>/<model>/`` (model
file, training log, ``pred_<slide>_<level>.h5ad``, ``metrics.json``, ``gene_pcc.csv``),
``metrics.csv`` (one row per fold, model, level and test slide), ``summary.csv`` and
``summary.md`` (the protocol; mean +- std over folds; then PCC-gene per test slide), ``gene_pcc.csv``
(PCC of every gene, fold, model, level and test slide) and, given gene groups, ``groups.csv`` and ``groups.md`` (PCC-gene
per group of genes, mean +- std over folds).
"""

# Long module: the fold protocol in one place: cross_validate() with its per-fold runners (_baseline,
# _fit_baseline, _model, _fit_member, _trained) and _score, sharing the fold folder layout and the
# refit rule (fit_slides); the tables are already in evaluate/tables.py.

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from magnet_st.data.dataset import Dataset
from magnet_st.data.levels import LEVELS
from magnet_st.data.panel import training_panel
from magnet_st.data.targets import TargetTransform, log1p_moments
from magnet_st.errors import ConfigError, InputError
from magnet_st.evaluate.tables import (
    AGGREGATED,
    BASELINE,
    HEAD,
    PROTOCOLS,
    RIDGE,
    group_summary,
    markdown_groups,
    write_tables,
)
from magnet_st.model.inputs import model_inputs, model_reader
from magnet_st.model.metrics import BetweenGroupShare, StreamingEvaluation, chosen_epochs
from magnet_st.predict.modelfile import (
    aggregate_bins,
    coarse_sources,
    compose_coarse,
    load_model,
    predict_slide,
)
from magnet_st.train.config import MACHINE_KEYS, TrainConfig
from magnet_st.train.trainer import fit, is_main_process, target_mean
from magnet_st.util.atomic import atomic_path, write_text
from magnet_st.util.lock import locked

log = logging.getLogger(__name__)

GENE_PCC = "gene_pcc.csv"


def read_gene_groups(path: str | Path) -> dict[str, set[str]]:
    """Groups of genes, by gene id or name: a CSV/TSV with columns ``gene`` and ``group``
    (a gene may be in several rows), or a synthetic slide's ``synthetic_truth.json`` (its
    groups ``cell`` / ``context`` / ``background`` and its programmes, e.g. ``CTX_DOMA``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "gene-group file not found")
    groups: dict[str, set[str]] = {}
    if path.suffix == ".json":
        try:
            genes = json.loads(path.read_text())["genes"]
            for g in genes:
                for key in (g["group"], g["programme"]):
                    groups.setdefault(str(key), set()).update({str(g["id"]), str(g["name"])})
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(path, f"not a synthetic_truth.json with genes ({exc})") from None
        return groups
    from magnet_st.read.specs import table_sep

    try:
        table = pd.read_csv(path, sep=table_sep(path), dtype=str)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read the gene-group table ({exc})") from None
    missing = {"gene", "group"} - set(table.columns)
    if missing:
        raise InputError(path, f"missing columns {sorted(missing)}; need 'gene' and 'group'")
    for gene, group in zip(table["gene"], table["group"], strict=True):
        groups.setdefault(str(group), set()).add(str(gene))
    return groups


def planted_groups(ds: Dataset) -> dict[str, set[str]] | None:
    """The gene groups planted in synthetic slides (``magnet synth`` writes them to
    ``synthetic_truth.json`` in the run folder), when every slide of the dataset has one."""
    found = []
    for slide in ds.slides:
        path = Path(str(ds.slide_meta(slide).get("spec", {}).get("path", "")))
        hits = [p / "synthetic_truth.json" for p in (path, path.parent) if str(path)]
        hits = [h for h in hits if h.is_file()]
        if not hits:
            return None
        found.append(hits[0])
    return read_gene_groups(found[0]) if found else None


def make_folds(slides: list[str], scheme: str = "loso", k: int = 4, seed: int = 0) -> list[dict]:
    """Folds by slide: ``"loso"`` (leave one slide out) or ``"kfold"`` (``k`` groups).

    Each fold: ``test``, ``val`` (one training slide, seeded, when two or more remain)
    and ``train``.
    """
    if len(slides) < 2:
        raise ConfigError(f"cross-validation needs at least 2 slides, got {len(slides)}")
    rng = np.random.default_rng(seed)
    if scheme == "loso":
        groups = [[s] for s in slides]
    elif scheme == "kfold":
        if not 2 <= k <= len(slides):
            raise ConfigError(f"k must be between 2 and the number of slides ({len(slides)})")
        order = list(rng.permutation(slides))
        groups = [sorted(order[i::k]) for i in range(k)]
    else:
        raise ConfigError(f"unknown scheme {scheme!r}; choose 'loso' or 'kfold'")
    folds = []
    for test in groups:
        pool = [s for s in slides if s not in test]
        val = [pool[int(rng.integers(len(pool)))]] if len(pool) >= 2 else []
        folds.append({"test": test, "val": val, "train": [s for s in pool if s not in val]})
    return folds


def _pred_anndata(ds: Dataset, slide: str, level: str, pred: np.ndarray, genes, names):
    import anndata

    src = ds.level(slide, level)
    var = pd.DataFrame({"gene_ids": genes}, index=pd.Index(names, name="gene"))
    ad = anndata.AnnData(X=pred.astype(np.float32), obs=src.obs.copy(), var=var)
    ad.var_names_make_unique()
    ad.obsm["spatial"] = np.asarray(src.obsm["spatial"])
    ad.uns["spatial"] = dict(src.uns.get("spatial", {}))
    measured = ds.counts(slide, level, genes).astype(np.float32).tocsr()
    measured.data = np.log1p(measured.data)
    ad.layers["measured"] = measured  # log1p, beside the prediction, for 'magnet plot'
    # the targets' scale, as magnet predict records it: log1p(counts) or log1p(counts per 10,000)
    scale = TargetTransform(ds.target_kind).scale
    ad.uns["magnet"] = {"level": level, "slide": slide, "scale": scale}
    return ad


def top_variable(ds: Dataset, slides: list[str], genes: list[str], n: int = 50) -> np.ndarray:
    """Column indices of the ``n`` genes whose log1p bin values vary most in ``slides``."""
    # one slide at a time, in sparse chunks: no dense copy of every bin
    _, _, var = log1p_moments(ds.counts(s, "bin", genes) for s in slides)
    return np.argsort(-var, kind="stable")[:n]


# Long: check args and that a resumed run's folds.json matches, the non-rank-0 DDP path, then
# per fold every model in a fixed order (mean, ridge, variants, other baselines), then the tables.
@locked("out", "magnet cv")
def cross_validate(
    dataset: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    *,
    variants: list[str] | None = None,
    scheme: str = "loso",
    k: int = 4,
    seed: int = 0,
    slides: list[str] | None = None,
    gene_groups: dict[str, set[str]] | None = None,
    baselines: list[str] | None = None,
    baseline_settings: dict[str, Any] | None = None,
    ensemble: int = 1,
    only_folds: list[int] | None = None,
    refit: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Run the folds and write the tables; returns the per-fold metrics table.

    ``ensemble``: each MagNet variant is trained with that many seeds per fold (``cfg.seed``,
    ``cfg.seed + 1``, ...; one folder each, ``seed<N>``) and scored on the mean of their
    predictions (log1p scale). ``only_folds``: run just these fold indices (the tables cover
    them; a later call without it reuses them and runs the rest). ``refit``: the
    ``"refit"`` protocol (see the module docstring): after the choices on the validation
    slides every model is fitted again on training + validation slides.

    ``variants``: MagNet variants trained per fold (default ``[cfg.variant]``; ``[]`` for
    baselines only). ``gene_groups`` (see :func:`read_gene_groups`) adds PCC-gene per group
    of genes. ``baselines``: names from :data:`magnet_st.evaluate.baselines.BASELINE_NAMES`, fitted
    per fold on the feature set ``cfg.features`` beside the models; ``baseline_settings`` go
    to the neural baselines (:class:`magnet_st.evaluate.baselines.neural.BaselineConfig`: ``epochs``,
    ``max_batches`` ...). Two baselines always run: the mean profile and the ridge probe on
    the frozen features MagNet gets (:class:`magnet_st.evaluate.baselines.RidgeBaseline`, alpha
    chosen on the validation slides, like every model's choices; skipped, with a log line, when ``cfg.features``
    lacks a level of some slide), the first two rows of every table. Every model follows
    the fold protocol: parameters from the training slides, choices from the validation
    slides (and, with ``refit``, a final fit on both).
    """
    from magnet_st.evaluate.baselines import BASELINE_NAMES

    baselines = list(baselines or [])
    unknown = [b for b in baselines if b not in BASELINE_NAMES]
    if unknown:
        raise ConfigError(f"unknown baselines {unknown}; available: {list(BASELINE_NAMES)}")
    settings = {k: v for k, v in (baseline_settings or {}).items() if v is not None}
    ds = Dataset(dataset)
    out = Path(out)  # made once the arguments are checked: a refused run leaves no folder
    slides = list(slides or ds.slides)
    unknown_slides = sorted(set(slides) - set(ds.slides))
    if unknown_slides:
        raise ConfigError(f"{dataset}: no slides {unknown_slides}; slides: {ds.slides}")
    variants = [cfg.variant] if variants is None else list(variants)
    if int(ensemble) < 1:
        raise ConfigError(f"ensemble must be at least 1 seed, got {ensemble}")
    if gene_groups is None:  # synthetic slides carry their planted groups
        gene_groups = planted_groups(ds)
    # the ridge probe runs beside the mean profile unless the features lack a level
    if RIDGE in baselines or _ridge_ready(ds, cfg.features, slides):
        baselines = [RIDGE, *(b for b in baselines if b != RIDGE)]
    folds = make_folds(slides, scheme, k, seed)
    missing = sorted(set(only_folds or []) - set(range(len(folds))))
    if missing:
        raise ConfigError(
            f"no fold {missing}: this cross-validation has folds 0 to {len(folds) - 1}"
        )
    # (index, fold) of the folds this call runs
    selected = [(i, f) for i, f in enumerate(folds) if only_folds is None or i in only_folds]
    protocol = PROTOCOLS[1] if refit else PROTOCOLS[0]
    plan = {
        "protocol": protocol,
        "scheme": scheme,
        "k": k,
        "seed": seed,
        "folds": folds,
        "train_config": cfg.to_dict(),
        "ensemble": int(ensemble),
        "baseline_settings": settings,
    }
    folds_file = out / "folds.json"
    if folds_file.is_file():
        old = json.loads(folds_file.read_text())
        science = {k: v for k, v in old["train_config"].items() if k not in MACHINE_KEYS}
        same_ensemble = old.get("ensemble", 1) == int(ensemble)
        # the neural baselines' settings too: their finished folds would be reused silently
        same_baselines = old.get("baseline_settings", settings) == settings
        if old.get("protocol") != protocol:
            raise ConfigError(
                f"{out} holds a cross-validation of protocol "
                f"{old.get('protocol', 'before protocols (ridge on train + val)')!r}, not "
                f"{protocol!r}; use another output folder"
            )
        if (
            old["folds"] != folds
            or science != cfg.science_dict()
            or not (same_ensemble and same_baselines)
        ):
            raise ConfigError(
                f"{out} holds a cross-validation with other folds or settings; "
                "use another output folder"
            )
    if not is_main_process():
        # another DDP rank (Lightning runs the command again per rank): it only joins the
        # trainings, in the same order as rank 0; rank 0 predicts, scores and writes
        for i, fold in selected:
            chosen = training_panel(ds, fit_slides(fold, refit), seed)
            for variant in variants:
                folder = out / f"fold{i}" / variant
                if not (folder / "metrics.json").is_file():
                    for mcfg, mfolder in _members(replace(cfg, variant=variant), folder, ensemble):
                        _fit_member(ds, fold, chosen.genes, chosen.targets, mcfg, mfolder, refit)
        return pd.DataFrame()
    out.mkdir(parents=True, exist_ok=True)
    write_text(folds_file, json.dumps(plan, indent=1))
    rows: list[dict[str, Any]] = []
    gene_tables: list[pd.DataFrame] = []
    for i, fold in selected:
        fold_dir = out / f"fold{i}"
        pool = fit_slides(fold, refit)  # the slides every model's parameters come from
        chosen = training_panel(ds, pool, seed)
        genes, names, targets = chosen.genes, chosen.names, chosen.targets
        top = top_variable(ds, pool, genes)
        write_text(
            fold_dir / "panel.tsv",
            "gene_id\tgene_name\n"
            + "".join(f"{g}\t{n}\n" for g, n in zip(genes, names, strict=True)),
        )
        # the mean-profile baseline: each gene's mean over the training units
        rows += _run_cached(
            fold_dir / BASELINE,
            lambda d, f=fold, g=genes, n=names, tp=top: _baseline(ds, f, g, n, tp, d, refit),
        )
        for name in [b for b in baselines if b == RIDGE]:
            rows += _run_cached(
                fold_dir / name,
                lambda d, f=fold, g=genes, n=names, tp=top, b=name: _fit_baseline(
                    ds, f, g, n, tp, b, cfg.features, d, settings, refit
                ),
            )
        for variant in variants:
            vcfg = replace(cfg, variant=variant)
            rows += _run_cached(
                fold_dir / variant,
                lambda d, f=fold, g=genes, n=names, t=targets, tp=top, c=vcfg: _model(
                    ds, f, g, n, t, tp, c, d, progress, ensemble, refit
                ),
            )
        for name in [b for b in baselines if b != RIDGE]:
            rows += _run_cached(
                fold_dir / name,
                lambda d, f=fold, g=genes, n=names, tp=top, b=name: _fit_baseline(
                    ds, f, g, n, tp, b, cfg.features, d, settings, refit
                ),
            )
        for r in rows:
            r.setdefault("fold", i)
        for model in [BASELINE, *baselines, *variants]:
            g = pd.read_csv(fold_dir / model / GENE_PCC)
            g.insert(0, "fold", i)
            gene_tables.append(g)
    table = pd.DataFrame(rows)
    write_tables(table, out, protocol=protocol, scale=TargetTransform(ds.target_kind).scale)
    genes_table = pd.concat(gene_tables, ignore_index=True)
    with atomic_path(out / GENE_PCC) as tmp:
        genes_table.to_csv(tmp, index=False)
    if gene_groups:
        grouped = group_summary(genes_table, gene_groups)
        with atomic_path(out / "groups.csv") as tmp:
            grouped.to_csv(tmp, index=False)
        write_text(out / "groups.md", markdown_groups(grouped))
    return table


def fit_slides(fold: dict, refit: bool = False) -> list[str]:
    """The slides a model's final parameters come from under the fold protocol: the training
    slides, or with ``refit`` training + validation slides."""
    return list(fold["train"]) + (list(fold["val"]) if refit else [])


def _ridge_ready(ds: Dataset, features: str, slides: list[str]) -> bool:
    """Whether the feature set ``features`` has every level of every slide, for the ridge
    probe; if not, a log line says what is missing."""
    from magnet_st.features.store import resolve_feature_set

    try:
        fs = resolve_feature_set(ds.path, features)
    except InputError as exc:
        log.info("ridge probe skipped: %s", exc)
        return False
    have = fs.get("slides") or {}
    missing = [
        f"{s}/{lv}"
        for s in slides
        for lv in LEVELS
        if not (have.get(s) or {}).get(lv, {}).get("complete")
    ]
    if missing:
        log.info(
            "ridge probe skipped: feature set %s lacks %s (it needs the bin, spot and region "
            "features of every slide)",
            fs.get("key", features),
            ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""),
        )
        return False
    return True


def _run_cached(folder: Path, run) -> list[dict]:
    done = folder / "metrics.json"
    if done.is_file() and (folder / GENE_PCC).is_file():
        log.info("%s: already done, skipped", folder)
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    rows = run(folder)
    write_text(done, json.dumps(rows, indent=1))
    return rows


def _score(
    ds: Dataset,
    preds: dict[str, dict[str, np.ndarray]],
    genes,
    names,
    top,
    model,
    folder: Path,
    seconds=None,
    chunk: int = 50_000,
    heads: dict[str, dict[str, np.ndarray]] | None = None,
):
    """Metrics rows per test slide and level; the PCC of every gene to ``gene_pcc.csv``.
    Scored ``chunk`` units at a time: no dense copy of a whole slide's counts.

    Beside each coarse level a model predicts (or not), the same tiles are scored on the
    aggregate of its bin predictions, ``log1p(sum of expm1(bin predictions))`` over each
    tile's bins, as model ``"<model> (aggregated bins)"``: a coarse head below its own
    aggregated bins is a defect the tables show. (With raw-count targets only: counts per
    10,000 of each unit do not add up to the tile's.) ``heads``: a network's own coarse
    heads' predictions, scored as ``"<model> (head)"`` (what the model predicts at a level
    may be its head or its summed bins: :func:`magnet_st.predict.modelfile.coarse_sources`)."""
    rows, per_gene = [], []

    def add(name: str, slide: str, lv: str, pred: np.ndarray) -> None:
        counts = ds.counts(slide, lv, genes)
        stream = StreamingEvaluation(len(genes))
        shares = None
        if lv == "bin":  # collapse diagnostic: variance between the bins' spot tiles
            tile = ds.membership(slide, "spot")
            n_tiles = int(tile.max()) + 1 if len(tile) else 0
            shares = {k: BetweenGroupShare(n_tiles, len(genes)) for k in ("pred", "true")}
        for i in range(0, counts.shape[0], chunk):  # bounded memory on HD slides
            true = np.log1p(counts[i : i + chunk].toarray().astype(np.float64))
            stream.update(true, pred[i : i + chunk])
            if shares is not None:
                shares["pred"].update(pred[i : i + chunk], tile[i : i + chunk])
                shares["true"].update(true, tile[i : i + chunk])
        m = stream.result(top_genes=top)
        if shares is not None:
            m["between_tile_share"] = shares["pred"].compute()
            m["between_tile_share_true"] = shares["true"].compute()
        per_gene.append(
            pd.DataFrame(
                {
                    "model": name,
                    "level": lv,
                    "test_slide": slide,
                    "gene_id": genes,
                    "gene_name": names,
                    "pcc": stream.genes.compute(),
                }
            )
        )
        rows.append(
            {
                "model": name,
                "level": lv,
                "test_slide": slide,
                **m,
                **({"train_seconds": seconds} if seconds is not None else {}),
            }
        )

    sums = not TargetTransform(ds.target_kind).per_10k
    for slide, by_level in preds.items():
        for lv, pred in by_level.items():
            add(model, slide, lv, pred)
        if sums and "bin" in by_level:  # every coarse level, with a head or without
            for lv in (lv for lv in LEVELS if lv != "bin"):
                n_tiles = ds.level(slide, lv).n_obs
                agg = aggregate_bins(by_level["bin"], ds.membership(slide, lv), n_tiles, chunk)
                add(model + AGGREGATED, slide, lv, agg)
        for lv, pred in (heads or {}).get(slide, {}).items():
            add(model + HEAD, slide, lv, pred)
    with atomic_path(folder / GENE_PCC) as tmp:
        pd.concat(per_gene, ignore_index=True).to_csv(tmp, index=False)
    return rows


def _baseline(ds, fold, genes, names, top, folder: Path, refit: bool = False) -> list[dict]:
    pool = fit_slides(fold, refit)  # nothing to choose: the mean over the fitting slides
    log1p = TargetTransform("log1p")
    mean = {lv: target_mean(log1p, [ds.counts(s, lv, genes) for s in pool]) for lv in LEVELS}
    # the fitted model: a mean per level
    with atomic_path(folder / "profile.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, genes=np.array(genes), slides=np.array(pool), **mean)
    preds = {
        slide: {lv: np.tile(mean[lv], (ds.level(slide, lv).n_obs, 1)) for lv in LEVELS}
        for slide in fold["test"]
    }
    return _score(ds, preds, genes, names, top, BASELINE, folder)


def _fit_baseline(
    ds,
    fold,
    genes,
    names,
    top,
    name: str,
    features: str,
    folder: Path,
    settings: dict,
    refit: bool = False,
):
    import time

    from magnet_st.evaluate.baselines import create_baseline

    t0 = time.perf_counter()
    model = create_baseline(name, features, **({} if name == "ridge" else settings))
    model.fit(ds, fold["train"], genes, val=fold["val"], refit=refit)
    seconds = time.perf_counter() - t0
    model.save(folder / model.filename)
    if hasattr(model, "report"):  # ridge: the alpha chosen per level and the CV scores
        write_text(folder / model.report_filename, json.dumps(model.report(), indent=1))
    if getattr(model, "history", None):  # neural baselines: each level's epochs
        write_text(folder / "history.json", json.dumps(model.history, indent=1))
    if getattr(model, "chosen_epochs", None):  # refitted: the epochs of each level's refit
        write_text(folder / "chosen_epochs.json", json.dumps(model.chosen_epochs, indent=1))
    heads = None
    if any("coarse_from" in p for p in getattr(model, "params", {}).values()):
        # ridge chose its coarse sources: its own per-level models are scored beside what
        # it predicts (as MagNet's heads), from one prediction per slide
        raw = {slide: model.predict(ds, slide, raw=True) for slide in fold["test"]}
        preds = {slide: model.compose(ds, slide, r) for slide, r in raw.items()}
        heads = {s: {lv: p for lv, p in r.items() if lv != "bin"} for s, r in raw.items()}
    else:
        preds = {slide: model.predict(ds, slide) for slide in fold["test"]}
    for slide, by_level in preds.items():
        for lv, pred in by_level.items():
            ad = _pred_anndata(ds, slide, lv, pred, genes, names)
            with atomic_path(folder / f"pred_{slide}_{lv}.h5ad") as tmp:
                ad.write_h5ad(tmp)
    return _score(ds, preds, genes, names, top, name, folder, seconds, heads=heads)


def _train_fold(ds, train, val, genes, targets, cfg: TrainConfig, folder: Path, progress=False):
    last = folder / "checkpoints" / "last.ckpt"  # an interrupted fold goes on from there
    if last.is_file():
        log.info("%s: resuming from %s", folder, last)
    return fit(
        ds,
        list(train),
        list(val),
        cfg,
        folder,
        genes=genes,
        targets=targets,
        progress=progress,
        resume=last if last.is_file() else None,
    )


def _trained(ds, train, val, genes, targets, cfg, folder: Path, progress) -> tuple[Path, float]:
    """A training of the fold, or the one already finished in ``folder`` (its model file and
    history are written last; ``fit_seconds.txt`` keeps its time). A model trained with
    validation slides carries its coarse-level choice (recorded now if it lacks one)."""
    model, done = folder / "model.pt", folder / "fit_seconds.txt"
    if model.is_file() and (folder / "history.json").is_file() and done.is_file():
        seconds = float(done.read_text())
        payload = torch_payload(model) if val and is_main_process() else {"coarse_from": None}
        if "coarse_from" not in payload:
            from magnet_st.train.trainer import record_coarse_choice

            reader = model_reader(ds, list(val), payload["model_config"])
            record_coarse_choice(ds, model, list(val), reader)
        return model, seconds
    res = _train_fold(ds, train, val, genes, targets, cfg, folder, progress)
    write_text(done, f"{res.seconds:.3f}")
    return res.model_path, res.seconds


def torch_payload(path: Path) -> dict:
    from magnet_st.util import torchfile

    return torchfile.load(path, "model file")


def _fit_member(
    ds, fold, genes, targets, cfg: TrainConfig, folder: Path, refit: bool, progress=False
) -> tuple[Path, float]:
    """One MagNet training of a fold under the protocol: on the training slides, early-
    stopped on the validation slides (which also choose each coarse level's source); with
    ``refit``, that run goes to ``folder/choice`` and the model is trained again on training
    + validation slides for the epochs it chose, keeping its coarse choice. Returns the
    model file and the fitting seconds (both runs)."""
    if not (refit and fold["val"]):
        return _trained(ds, fold["train"], fold["val"], genes, targets, cfg, folder, progress)
    choice = folder / "choice"
    first, seconds = _trained(ds, fold["train"], fold["val"], genes, targets, cfg, choice, progress)
    history = json.loads((choice / "history.json").read_text())
    epochs = chosen_epochs(history) or cfg.epochs
    write_text(choice / "chosen_epochs.txt", f"{epochs}\n")
    pool = fit_slides(fold, refit=True)
    final, more = _trained(
        ds, pool, [], genes, targets, replace(cfg, epochs=epochs), folder, progress
    )
    made = torch_payload(first)
    # rank 0 alone rewrites a model file (under DDP every rank runs this)
    if is_main_process() and torch_payload(final).get("coarse_from") != made.get("coarse_from"):
        from magnet_st.train.trainer import record_coarse_choice

        kept = {"coarse_from": made["coarse_from"], **made.get("coarse_choice", {})}
        record_coarse_choice(ds, final, [], choice=kept)
    return final, seconds + more


def _members(cfg: TrainConfig, folder: Path, ensemble: int) -> list[tuple[TrainConfig, Path]]:
    """The trainings of one variant in one fold: one, or one per seed of an ensemble."""
    if ensemble == 1:
        return [(cfg, folder)]
    seeds = [cfg.seed + i for i in range(ensemble)]
    return [(replace(cfg, seed=s), folder / f"seed{s}") for s in seeds]


def _model(
    ds,
    fold,
    genes,
    names,
    targets,
    top,
    cfg: TrainConfig,
    folder: Path,
    progress: bool,
    ensemble: int = 1,
    refit: bool = False,
):
    members = _members(cfg, folder, ensemble)
    sums: dict[str, dict[str, np.ndarray]] = {}
    layout: dict[str, Any] = {}
    first: dict | None = None  # the first member's model file: its coarse choice is used
    seconds = 0.0
    for mcfg, mfolder in members:
        model_path, fit_s = _fit_member(ds, fold, genes, targets, mcfg, mfolder, refit, progress)
        seconds += fit_s
        model, payload = load_model(model_path)
        first = first or payload
        for slide in fold["test"]:
            mc = payload["model_config"]
            arrays = model_inputs(ds, slide, cfg.features, mc, genes=genes, with_counts=False)
            reader = model_reader(ds, [slide], mc)
            pred = predict_slide(model, arrays, payload, patch_reader=reader, raw=True)
            acc = sums.setdefault(slide, {})
            for lv, p in pred.items():
                acc[lv] = acc[lv] + p if lv in acc else p
            layout[slide] = arrays
    raw = {s: {lv: p / len(members) for lv, p in by.items()} for s, by in sums.items()}
    # what the model predicts: each coarse level from its head or its bins' sum, as chosen
    # on the validation slides (the first member's choice for an ensemble)
    sources = coarse_sources(first)
    preds = {s: compose_coarse(r, layout[s], first, sources) for s, r in raw.items()}
    # the coarse heads' own scores, in every fold (the same as the model's where it uses them)
    heads = {s: {lv: r[lv] for lv in r if lv != "bin"} for s, r in raw.items()}
    for slide, by_level in preds.items():
        for lv, pred in by_level.items():
            ad = _pred_anndata(ds, slide, lv, pred, genes, names)
            with atomic_path(folder / f"pred_{slide}_{lv}.h5ad") as tmp:
                ad.write_h5ad(tmp)
    return _score(ds, preds, genes, names, top, cfg.variant, folder, seconds, heads=heads)
