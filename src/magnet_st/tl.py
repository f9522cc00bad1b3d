"""``magnet_st.tl``: training, evaluation and prediction, in scanpy's shape.

- :func:`train`: MagNet on a prepared dataset (``magnet train``);
- :func:`cv`: slide-level cross-validation beside the mean profile and ridge (``magnet cv``);
- :func:`benchmark`: MagNet variants and baselines in one table, with figures
  (``magnet benchmark``);
- :func:`predict`: expression of a slide from its image (``magnet predict``).

Training options are :class:`~magnet_st.train.config.TrainConfig` fields given as keywords
(``epochs=20, width=128, bin_encoder="efficientnet_lite0_imagenet"`` ...); options not
given take the variant's presets, as on the command line. ``features`` left ``None`` is the
dataset's only feature set. See ``docs/api.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from magnet_st import registry

__all__ = ["benchmark", "cv", "predict", "train", "train_config"]

#: the baselines ``cv`` / ``benchmark`` fit beside the mean profile (the registry's)
BASELINES = tuple(registry.BASELINES)


def train_config(dataset: Any, variant: str = "magnet", **options: Any) -> Any:
    """The :class:`~magnet_st.train.config.TrainConfig` of ``variant`` with ``options`` (``None``
    values ignored, as unset command-line options), ``features`` resolved on ``dataset``."""
    from magnet_st.train.config import TrainConfig

    given = {k: v for k, v in options.items() if v is not None}
    given["features"] = _features(dataset, given.get("features"))
    return TrainConfig.for_variant(variant, **given)


def split_slides(
    slides: Sequence[str], train: Sequence[str] | None, val: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """``magnet train``'s default split: the training slides given (else ``slides`` less
    the validation ones); without validation slides, the last training slide when there
    are three or more, else none."""
    train_s = list(train) if train else [s for s in slides if s not in (val or [])]
    if val is None:
        val_s = [train_s[-1]] if len(train_s) >= 3 else []
        train_s = [s for s in train_s if s not in val_s]
    else:
        val_s = list(val)
    return train_s, val_s


def train(
    dataset: Any,
    out: str | Path,
    *,
    variant: str = "magnet",
    train_slides: Sequence[str] | None = None,
    val_slides: Sequence[str] | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    **options: Any,
) -> Any:
    """Train MagNet; returns the :class:`~magnet_st.train.trainer.FitResult` (``model_path``: the
    model file, ``history``: the losses per epoch). Writes what ``magnet train`` writes."""
    from magnet_st.data.dataset import Dataset
    from magnet_st.errors import MagnetError
    from magnet_st.train.trainer import fit

    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    cfg = train_config(ds, variant, **options)
    tr, val = split_slides(ds.train_slides, train_slides, val_slides)
    unknown = sorted(set(tr + val) - set(ds.slides))
    if unknown:
        raise MagnetError(f"{ds.path}: no slides {unknown}; slides: {ds.slides}")
    return fit(ds, tr, val, cfg, out, resume=resume, progress=progress)


def cv(
    dataset: Any,
    out: str | Path,
    *,
    variants: Sequence[str] = ("magnet",),
    baselines: Sequence[str] = (),
    scheme: str = "loso",
    folds: int = 4,
    split_seed: int = 0,
    slides: Sequence[str] | None = None,
    gene_groups: str | Path | dict | None = None,
    baseline_epochs: int = 30,
    ensemble: int = 1,
    only_folds: Sequence[int] | None = None,
    refit: bool = False,
    progress: bool = True,
    **options: Any,
) -> Any:
    """Cross-validate by slide; returns the per-fold metrics table (a DataFrame) and
    writes ``summary.md`` / ``summary.csv`` / ``metrics.csv`` / ``gene_pcc.csv`` in ``out``.

    The mean profile and the ridge probe always run beside ``variants`` (MagNet variants:
    ``magnet``, ``paper``, ``no_context``) and ``baselines`` (:data:`BASELINES`).
    ``gene_groups``: a CSV/TSV of gene and group, a synthetic slide's
    ``synthetic_truth.json``, or a dict of group -> genes."""
    from magnet_st.errors import ConfigError
    from magnet_st.evaluate.cv import cross_validate, read_gene_groups

    variant = variants[0] if variants else "magnet"
    cfg = train_config(dataset, variant, **options)
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise ConfigError(f"unknown baselines {bad}; available: {list(BASELINES)}")
    groups = gene_groups
    if isinstance(gene_groups, (str, Path)):
        groups = read_gene_groups(gene_groups)
    return cross_validate(
        _path(dataset),
        out,
        cfg,
        variants=list(variants),
        scheme=scheme,
        k=folds,
        seed=split_seed,
        slides=list(slides) if slides else None,
        gene_groups=groups,
        baselines=list(baselines),
        baseline_settings={
            "epochs": baseline_epochs,
            "max_batches": cfg.max_batches,
            "seed": cfg.seed,
        },
        ensemble=ensemble,
        only_folds=list(only_folds) if only_folds is not None else None,
        refit=refit,
        progress=progress,
    )


def benchmark(
    dataset: Any,
    out: str | Path,
    *,
    models: Sequence[str] = ("mean_profile", "ridge", "magnet"),
    figures: bool = True,
    **kwargs: Any,
) -> Any:
    """:func:`cv` over ``models`` (MagNet variants, :data:`BASELINES` and ``mean_profile``,
    which always runs), with the figures of ``magnet benchmark`` in ``out/figures``;
    returns the per-fold metrics table."""
    variants, baselines = registry.split_models(list(models))
    table = cv(dataset, out, variants=variants, baselines=baselines, **kwargs)
    if figures:
        from magnet_st.report import plot_results

        plot_results([out], Path(out) / "figures", formats=("png", "pdf"))
    return table


def predict(
    model: str | Path,
    out: str | Path,
    *,
    image: str | Path | None = None,
    spaceranger: str | Path | None = None,
    roi_um: tuple[float, float, float, float] | None = None,
    progress: bool = True,
    **options: Any,
) -> Any:
    """Predict a slide's expression from its image with a model file; returns the bins
    as AnnData (``X`` on the model's log1p scale, ``obsm["spatial"]``, ``uns["spatial"]``;
    with ``spaceranger`` the measured counts in ``layers["measured"]``) and writes what
    ``magnet predict`` writes. ``options``: the other keyword arguments of
    :func:`magnet_st.predict.image.predict` (``mpp``, ``name``, ``device``, ``max_bins``,
    ``spatialdata`` ...)."""
    import anndata as ad

    from magnet_st.predict.image import predict as _predict

    res = _predict(
        model, out, image=image, spaceranger=spaceranger, roi_um=roi_um, progress=progress,
        **options,
    )  # fmt: skip
    return ad.read_h5ad(res.files["bin"])


def _path(dataset: Any) -> Path:
    return Path(getattr(dataset, "path", dataset))


def _features(dataset: Any, given: str | None) -> str:
    """``given``, else the dataset's only feature set (an error naming them when there are
    several or none)."""
    from magnet_st.errors import InputError
    from magnet_st.features.store import list_feature_sets

    if given is not None:
        return given
    sets = [s["key"] for s in list_feature_sets(_path(dataset))]
    if len(sets) == 1:
        return sets[0]
    what = f"several feature sets ({', '.join(sets)})" if sets else "no feature sets"
    hint = "pass features=KEY" if sets else "make one with ms.pp.features"
    raise InputError(_path(dataset) / "features", f"{what}; {hint}")
