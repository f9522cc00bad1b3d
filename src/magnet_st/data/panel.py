"""The gene panel: which genes a model predicts, chosen on training slides only."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from magnet_st.errors import ConfigError

log = logging.getLogger(__name__)

METHODS = ("hvg", "mean", "list")


def usable_genes(
    gene_id_lists: Sequence[Sequence[str]], lists_all: Sequence[bool] | None = None
) -> list[str]:
    """Gene ids a panel may hold across slides, in order of first appearance.

    A slide whose counts list every gene of its reference (``lists_all`` true, Space
    Ranger) must list the gene: absent there means another reference. A slide that lists
    only the genes it detected (legacy ST) has zero counts of a gene it does not list. So:
    the genes of every listing-all slide, among the genes of any slide.
    """
    lists_all = [True] * len(gene_id_lists) if lists_all is None else list(lists_all)
    order = list(dict.fromkeys(g for ids in gene_id_lists for g in ids))
    for ids, full in zip(gene_id_lists, lists_all, strict=True):
        if full:
            have = set(ids)
            order = [g for g in order if g in have]
    return order


def _in_memory(X) -> bool:
    return sp.issparse(X) or isinstance(X, np.ndarray)


def read_rows(X, rows: np.ndarray | None = None, chunk: int = 50_000) -> sp.csr_matrix:
    """Rows of ``X`` (every row by default) as a CSR matrix. ``X`` may be an on-disk
    (backed) AnnData matrix: it is then read ``chunk`` rows at a time, so only the rows
    asked for are ever in memory."""
    if _in_memory(X):
        X = sp.csr_matrix(X)
        return X if rows is None else X[rows]
    parts = []
    for i in range(0, X.shape[0], chunk):
        block = sp.csr_matrix(X[i : min(i + chunk, X.shape[0])])
        if rows is not None:
            block = block[rows[(rows >= i) & (rows < i + chunk)] - i]
        parts.append(block)
    return sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, X.shape[1]))


def column_index(gene_ids: Sequence[str], genes: Sequence[str], *, fill_absent: bool) -> np.ndarray:
    """The column of each of ``genes`` among ``gene_ids``; -1 for a gene absent from them
    with ``fill_absent`` (a slide that lists only detected genes), else a :class:`KeyError`
    naming the absent genes."""
    col = {str(g): i for i, g in enumerate(gene_ids)}
    missing = [g for g in genes if str(g) not in col]
    if missing and not fill_absent:
        raise KeyError(missing)
    return np.array([col.get(str(g), -1) for g in genes], dtype=np.int64)


def select_columns(X: sp.spmatrix | np.ndarray, cols: np.ndarray) -> sp.csr_matrix:
    """Columns ``cols`` of an in-memory matrix, in order, as CSR; -1 gives a zero column."""
    X = sp.csr_matrix(X)
    present = np.flatnonzero(cols >= 0)
    if len(present) == len(cols):
        return X[:, cols]
    sub = X[:, cols[present]].tocoo()
    return sp.csr_matrix(
        (sub.data, (sub.row, present[sub.col])), shape=(X.shape[0], len(cols)), dtype=X.dtype
    )


def gene_columns(
    X,
    gene_ids: Sequence[str],
    genes: Sequence[str],
    *,
    fill_absent: bool = False,
    chunk: int = 50_000,
) -> sp.csr_matrix:
    """The columns of ``X`` (units x genes with ids ``gene_ids``) for ``genes``, in order.

    A gene absent from ``gene_ids`` is a column of zeros with ``fill_absent`` (a slide
    that lists only detected genes), else a :class:`KeyError` naming the absent genes.
    An on-disk (backed) ``X`` is read ``chunk`` rows at a time: only the selected columns
    are kept in memory.
    """
    cols = column_index(gene_ids, genes, fill_absent=fill_absent)
    if _in_memory(X):
        return select_columns(X, cols)
    n = X.shape[0]
    parts = [select_columns(X[i : min(i + chunk, n)], cols) for i in range(0, n, chunk)]
    return sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, len(genes)))


def select_panel(
    counts: Sequence[sp.csr_matrix],
    gene_ids: Sequence[Sequence[str]],
    *,
    method: str = "hvg",
    n_genes: int = 250,
    genes: Sequence[str] | None = None,
    candidates: set[str] | None = None,
    lists_all: Sequence[bool] | None = None,
    max_units_per_slide: int = 100_000,
    seed: int = 0,
) -> list[str]:
    """Choose ``n_genes`` gene ids from the training slides' raw counts.

    Args:
        counts: one units x genes raw-count matrix per training slide.
        gene_ids: the gene ids of each matrix's columns.
        method: ``"hvg"`` (scanpy's ``seurat_v3`` flavour on raw counts, with the slide as
            batch when there are several), ``"mean"`` (highest mean count), or ``"list"``
            (exactly ``genes``).
        genes: the user's list for ``method="list"``.
        candidates: if given, only these gene ids may be chosen (e.g. the genes that
            every slide of a dataset measures, training or not).
        lists_all: per training slide, whether its counts list every gene of its
            reference (default: all do); see :func:`usable_genes`.
        max_units_per_slide: units sampled per slide (seeded) to bound the cost on HD slides.

    Only genes of every training slide that lists all genes (:func:`usable_genes`; a
    slide listing detected genes only counts an absent gene as zero), and of
    ``candidates``, can be chosen.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown panel method {method!r}; choose one of {METHODS}")
    allowed = candidates
    lists_all = [True] * len(gene_ids) if lists_all is None else list(lists_all)
    candidates = [g for g in usable_genes(gene_ids, lists_all) if allowed is None or g in allowed]
    if method == "list":
        if not genes:
            raise ConfigError("panel method 'list' needs a list of genes")
        missing = [g for g in genes if g not in set(candidates)]
        if missing:
            raise ConfigError(
                f"{len(missing)} genes of the panel list are not in every slide: {missing[:10]}"
            )
        return list(dict.fromkeys(genes))
    rng = np.random.default_rng(seed)
    blocks = []
    for m, ids, full in zip(counts, gene_ids, lists_all, strict=True):
        rows = None  # a seeded sample of the units, read alone from an on-disk matrix
        if m.shape[0] > max_units_per_slide:
            rows = np.sort(rng.choice(m.shape[0], max_units_per_slide, replace=False))
        blocks.append(gene_columns(read_rows(m, rows), ids, candidates, fill_absent=not full))
    # the largest panel that would work, named in one message (seurat_v3 ranks only the
    # genes detected in the training slides)
    if method == "mean":
        most = len(candidates)
    else:
        most = int(np.count_nonzero(sum(np.asarray((b > 0).sum(axis=0)).ravel() for b in blocks)))
    if n_genes > most:
        detected = "" if method == "mean" else f", {most} of them detected"
        raise ConfigError(
            f"asked for {n_genes} genes but the training slides share {len(candidates)}"
            f"{detected}: ask for at most {most} (--n-genes {most})"
        )
    if method == "mean":
        total = sum(np.asarray(b.sum(axis=0)).ravel() for b in blocks)
        mean = total / sum(b.shape[0] for b in blocks)
        order = np.argsort(-mean, kind="stable")[:n_genes]
        return [candidates[i] for i in order]
    return _seurat_v3(blocks, candidates, n_genes)


def _seurat_v3(blocks: list[sp.csr_matrix], candidates: list[str], n_genes: int) -> list[str]:
    import anndata
    import pandas as pd
    import scanpy as sc

    X = sp.vstack(blocks).tocsr().astype(np.float32)
    obs = pd.DataFrame(
        {"slide": np.repeat([str(i) for i in range(len(blocks))], [b.shape[0] for b in blocks])}
    )
    obs.index = obs.index.astype(str)
    adata = anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(candidates)))
    # genes with no counts at all break the loess fit; they can never be variable (the
    # caller checked that n_genes of them are detected)
    detected = np.asarray((X > 0).sum(axis=0)).ravel() > 0
    adata = adata[:, detected].copy()
    sc.pp.highly_variable_genes(
        adata,
        flavor="seurat_v3",
        n_top_genes=n_genes,
        batch_key="slide" if len(blocks) > 1 else None,
    )
    var = adata.var
    if "highly_variable_rank" in var:
        var = var.sort_values("highly_variable_rank", kind="stable")
    chosen = var.index[var["highly_variable"].to_numpy()].tolist()
    log.info(
        "panel: %d highly variable genes (seurat_v3) of %d candidates", len(chosen), len(candidates)
    )
    return chosen[:n_genes]


@dataclass
class TrainingPanel:
    """What a training run learns from its training slides before it sees a batch: the
    genes to predict and the target statistics per level. Never from a scored slide."""

    genes: list[str]
    names: list[str]
    targets: dict[str, Any]  # level -> TargetTransform
    slides: list[str]  # the slides they were chosen on


def training_panel(ds: Any, slides: Sequence[str], seed: int = 0) -> TrainingPanel:
    """The dataset's panel rule (method, size, or the user's list) and target kind,
    applied to ``slides`` only (a model's training and validation slides), so that no
    slide scored later helped choose them. Candidates: genes every slide of the dataset
    measures, counting a gene a legacy ST slide does not list as measured zero
    (:func:`usable_genes`; gene presence only, no counts)."""
    slides = list(slides)
    cfg = ds.manifest["panel"]
    genes = select_panel(
        [ds.matrix(s, "bin") for s in slides],
        [ds.gene_ids(s) for s in slides],
        method=cfg["method"],
        n_genes=cfg["n_genes"],
        genes=cfg["gene_ids"] if cfg["method"] == "list" else None,
        candidates=set(
            usable_genes(
                [ds.gene_ids(s) for s in ds.slides], [ds.lists_all_genes(s) for s in ds.slides]
            )
        ),
        lists_all=[ds.lists_all_genes(s) for s in slides],
        seed=seed,
    )
    return TrainingPanel(genes, ds.gene_names(genes), training_targets(ds, slides, genes), slides)


def training_targets(ds: Any, slides: Sequence[str], genes: Sequence[str]) -> dict[str, Any]:
    """The dataset's target transform per level, fitted on ``slides`` for ``genes``."""
    from magnet_st.data.levels import LEVELS
    from magnet_st.data.targets import TargetTransform

    kind = ds.manifest["targets"]["bin"]["kind"]
    genes = list(genes)
    return {
        # streamed: one chunk of one slide's panel counts in memory at a time
        lv: TargetTransform(kind).fit(
            chunk for s in slides for chunk in ds.panel_counts(s, lv, genes).chunks()
        )
        for lv in LEVELS
    }
