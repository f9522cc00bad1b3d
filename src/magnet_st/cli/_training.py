"""``magnet train``, ``magnet cv`` and ``magnet benchmark``: models on a dataset's features."""

# Long module: train, cv and benchmark share the ~30 training options and the fold,
# baseline and ensemble options defined here; most of its lines are argparse help text.

from __future__ import annotations

import argparse
from pathlib import Path

from magnet_st import registry
from magnet_st.cli._common import (
    _devices,
    _Formatter,
    _fraction,
    _int_at_least,
    _nonnegative_float,
    _positive_float,
    _positive_int,
)
from magnet_st.errors import ConfigError, MagnetError

# -- train and cv ----------------------------------------------------------------------------
# names, defaults and presets come from the torch-free registry: '--help' needs no torch
_LOSS_DEFAULTS = registry.LOSS_WEIGHTS
_OPTION_DEFAULTS = registry.TRAIN_DEFAULTS
_VARIANT_HELP = "; ".join(f"{v.name}: {v.description}" for v in registry.VARIANTS.values())


def _preset_help(key: str) -> str:
    """The option's default, and each variant's preset where it differs."""
    differ = [
        f"--variant {n}: {registry.preset(n, key)}"
        for n in registry.VARIANTS
        if registry.preset(n, key) != _OPTION_DEFAULTS[key]
    ]
    return f"default: {_OPTION_DEFAULTS[key]}" + (f" ({'; '.join(differ)})" if differ else "")


# Long: argparse: one flat group of 29 training options (one add_argument and help text
# each), shared by train, cv and benchmark.
def _add_train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and training")
    g.add_argument(
        "--features",
        default="resnet50",
        help="feature set of the spot/region (and frozen bin) features: an encoder name or "
        "a key listed by 'magnet features'",
    )
    g.add_argument(
        "--variant",
        choices=list(registry.VARIANTS),
        default="magnet",
        help=_VARIANT_HELP,
    )
    g.add_argument(
        "--bin-encoder",
        default=None,
        help="'frozen': cached bin features of --features (needs 'magnet features --levels "
        "bin'); or a timm model name (e.g. resnet50, as in the paper) trained end to end on "
        "the bin patches (slow on CPU), or efficientnet_lite0_imagenet (ImageNet weights "
        "shipped offline); " + _preset_help("bin_encoder"),
    )
    g.add_argument(
        "--bin-weights",
        metavar="FILE",
        default=None,
        help="a state-dict file (.pth/.pt/.bin/.safetensors; timm or torchvision keys, read "
        "as 'magnet features --weights' reads its file) that the end-to-end --bin-encoder "
        "starts from, e.g. ImageNet weights; its checksum is recorded in the model file; "
        "'random' to train a timm encoder from random weights on purpose. Default: none, "
        "which a timm --bin-encoder refuses (it would start from random weights) and "
        "efficientnet_lite0_imagenet does not need (its ImageNet weights ship with it)",
    )
    g.add_argument(
        "--bin-input",
        choices=["patches", "dense"],
        default="patches",
        help="what an end-to-end --bin-encoder sees: 'patches' (one patch per bin, as the "
        "paper) or 'dense' (one pass over a crop per batch, its stride-16 map averaged over "
        "each bin's footprint, at the working resolution and margin of a dense --features "
        "set, whose windows it keeps frozen; else the preset's dense defaults). Default: "
        "patches",
    )
    g.add_argument(
        "--bin-lr-scale",
        type=_positive_float,
        default=1.0,
        help="learning rate of an end-to-end --bin-encoder as a multiple of the others' "
        "(e.g. 0.1 to fine-tune pretrained weights gently). Default: 1.0",
    )
    g.add_argument(
        "--width", type=_positive_int, default=None, help="model width; " + _preset_help("width")
    )
    g.add_argument(
        "--context-tokens",
        type=_positive_int,
        default=None,
        help="tiles each bin attends to per level: the containing tile and its nearest "
        "neighbours (1 reproduces the paper, where the attention is a projection); "
        + _preset_help("context_tokens"),
    )
    g.add_argument(
        "--k", type=_positive_int, default=8, help="neighbours in the in-batch kNN graphs"
    )
    g.add_argument(
        "--batch-bins",
        type=_positive_int,
        default=256,
        help="bins per training step: a compact patch of whole spot tiles in Z order, so "
        "the steps per epoch grow with the tissue, not with the tile size (paper: 256 bins "
        "per batch, drawn at random)",
    )
    g.add_argument(
        "--block",
        type=_positive_int,
        default=None,
        help="instead of --batch-bins: a batch holds every bin of a block of BLOCK x BLOCK "
        "region tiles; default: off",
    )
    g.add_argument(
        "--optimizer",
        choices=["adamw", "sgd"],
        default=None,
        help="the optimiser to train with; " + _preset_help("optimizer"),
    )
    g.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="base learning rate; default 1e-3 for adamw (cosine decay), 0.005 for sgd "
        "(momentum 0.9, polynomial decay, as the paper)",
    )
    g.add_argument(
        "--weight-decay",
        type=_nonnegative_float,
        default=None,
        help="weight decay of the optimiser (decoupled for adamw); default: 1e-4",
    )
    g.add_argument(
        "--dropout",
        type=_fraction,
        default=None,
        help="dropout in the attention, graph and transformer layers, in [0, 1); default: 0.1",
    )
    g.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="maximum epochs; " + _preset_help("epochs"),
    )
    g.add_argument("--patience", type=int, default=10, help="early-stopping patience, in epochs")
    g.add_argument(
        "--max-batches",
        type=_positive_int,
        default=None,
        help="at most this many batches per epoch (smoke runs, benchmarks); default: all",
    )
    g.add_argument(
        "--consistency",
        choices=["aggregate", "paper", "none"],
        default=None,
        help="consistency loss: each coarse prediction vs the truth of every bin it holds, "
        "as the published code (paper); expected-count heads at every level whose tile "
        "rates must equal the sum of their bins' rates, with a Poisson term (aggregate: "
        "unbiased, see magnet_st.model.losses); or none; " + _preset_help("consistency"),
    )
    g.add_argument(
        "--pcc-axis",
        choices=["unit", "gene"],
        default=None,
        help="the PCC loss terms: per unit across genes (unit, the published code) or per "
        "gene across the units of a batch (gene, the axis of the PCC-gene metric; +0.038 bin "
        "PCC-gene on the demo's slides); " + _preset_help("pcc_axis"),
    )
    g.add_argument(
        "--loss-weight",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set one loss weight (repeatable); names and defaults: "
        + ", ".join(f"{k}={v}" for k, v in _LOSS_DEFAULTS.items())
        + " (the paper's weights; context_mse, an MSE on the spot and region heads that keeps "
        "their scale, is ours: 0 with --variant paper)",
    )
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    g.add_argument(
        "--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu, mps"
    )
    g.add_argument(
        "--devices",
        type=_devices,
        default=1,
        help="devices per node (an integer >= 1, or 'auto'); more than one trains with DDP",
    )
    g.add_argument("--num-nodes", type=_positive_int, default=1, help="machines for multi-node DDP")
    g.add_argument(
        "--precision",
        default=None,
        help="Lightning precision, e.g. bf16-mixed on GPUs; default: 32-bit",
    )
    g.add_argument(
        "--nondeterministic",
        action="store_true",
        help="allow non-deterministic kernels (some CUDA backward kernels refuse "
        "deterministic mode); default: deterministic, so seeded CPU runs repeat exactly",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _train_config(args: argparse.Namespace):
    from magnet_st.train.config import TrainConfig

    kw = {
        "features": args.features,
        "bin_encoder": args.bin_encoder,
        "bin_weights": args.bin_weights,
        "bin_input": args.bin_input,
        "bin_lr_scale": args.bin_lr_scale,
        "width": args.width,
        "context_tokens": args.context_tokens,
        "k": args.k,
        "block": args.block,
        "batch_bins": None if args.block is not None else args.batch_bins,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "dropout": args.dropout,
        "epochs": args.epochs,
        "patience": args.patience,
        "max_batches": args.max_batches,
        "consistency": args.consistency,
        "pcc_axis": args.pcc_axis,
        "loss_weights": _loss_weights(args.loss_weight) or None,
        "seed": args.seed,
        "num_workers": args.workers,
        "accelerator": args.accelerator,
        "devices": args.devices,
        "num_nodes": args.num_nodes,
        "precision": args.precision,
        "deterministic": not args.nondeterministic,
    }
    given = {k: v for k, v in kw.items() if v is not None}  # unset: the variant's choice
    if args.block is not None:  # region-tile blocks instead of --batch-bins
        given["batch_bins"] = None
    return TrainConfig.for_variant(args.variant, **given)


def _loss_weights(items: list[str]) -> dict[str, float]:
    """The weights given (the others: the variant's, else the defaults)."""
    weights: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in _LOSS_DEFAULTS:
            raise ConfigError(
                f"--loss-weight {item!r}: expected NAME=VALUE with NAME one of "
                f"{list(_LOSS_DEFAULTS)}"
            )
        try:
            weights[name] = float(value)
        except ValueError:
            raise ConfigError(f"--loss-weight {item!r}: {value!r} is not a number") from None
        if weights[name] < 0 or weights[name] != weights[name]:
            raise ConfigError(f"--loss-weight {item!r}: weights must be >= 0")
    return weights


def cmd_train(args: argparse.Namespace) -> int:
    from magnet_st.errors import InputError

    # before anything heavy is imported or read: a typo here should not cost a dataset load
    if args.resume is not None and not Path(args.resume).is_file():
        what = "is not a file" if Path(args.resume).exists() else "not found"
        raise InputError(args.resume, f"checkpoint to resume from (--resume) {what}")
    from magnet_st.data.dataset import Dataset
    from magnet_st.tl import split_slides
    from magnet_st.train.trainer import fit

    ds = Dataset(args.dataset)
    cfg = _train_config(args)
    train, val = split_slides(ds.train_slides, args.train_slides, args.val_slides)
    unknown = sorted(set(train + val) - set(ds.slides))
    if unknown:
        raise MagnetError(f"{args.dataset}: no slides {unknown}; slides: {ds.slides}")
    res = fit(ds, train, val, cfg, args.out, resume=args.resume, progress=not args.quiet)
    score = "n/a" if res.best_score is None else f"{res.best_score:.4f}"
    print(
        f"trained on {train} (validation: {val or 'none'}) for {res.epochs_run} epochs of "
        f"{res.steps_per_epoch} steps in "
        f"{res.seconds:.0f} s; best validation PCC-gene {score}; model: {res.model_path}"
    )
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train MagNet on a prepared dataset",
        description="Train MagNet on the training slides of a prepared dataset whose "
        "features were extracted ('magnet features'). Batches are spatial (about "
        "--batch-bins bins in a square of whole spot tiles); the gene panel and target "
        "statistics are chosen on the training and validation slides alone; one slide is "
        "held out for early stopping and checkpoint choice (validation PCC-gene of the "
        "bins); an interrupted run resumes exactly with --resume OUT/checkpoints/last.ckpt. "
        "Writes OUT/model.pt (everything "
        "prediction needs; loads with torch.load(weights_only=True)), the losses per epoch "
        "in OUT/history.json ('magnet plot OUT' draws them), Lightning checkpoints in "
        "OUT/checkpoints/ and a CSV training log in OUT/logs/.",
        formatter_class=_Formatter,
    )
    p.add_argument("dataset", help="dataset folder written by 'magnet prepare'")
    p.add_argument("out", help="output folder")
    p.add_argument(
        "--train-slides",
        nargs="+",
        default=None,
        help="slides to train on; default: the dataset's training slides",
    )
    p.add_argument(
        "--val-slides",
        nargs="*",
        default=None,
        help="validation slides; default: the last training slide when there are three or "
        "more, else none (then the last epoch is kept)",
    )
    p.add_argument("--resume", default=None, help="Lightning checkpoint to resume from")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)


def cmd_cv(args: argparse.Namespace) -> int:
    from magnet_st.evaluate.cv import cross_validate, read_gene_groups

    cfg = _train_config(args)
    groups = read_gene_groups(args.gene_groups) if args.gene_groups else None
    variants = args.variants if args.variants is not None else [cfg.variant]
    if getattr(args, "models", None) is not None:  # magnet benchmark
        variants, args.baselines = registry.split_models(args.models)
    cross_validate(
        args.dataset,
        args.out,
        cfg,
        variants=variants,
        scheme=args.scheme,
        k=args.folds,
        seed=args.split_seed,
        slides=args.slides,
        gene_groups=groups,
        baselines=args.baselines,
        baseline_settings={
            "epochs": args.baseline_epochs,
            "max_batches": cfg.max_batches,
            "seed": cfg.seed,  # --seed seeds the neural baselines too
        },
        ensemble=args.ensemble,
        only_folds=args.only_folds,
        refit=args.refit,
        progress=not args.quiet,
    )
    from magnet_st.train.trainer import is_main_process

    if not is_main_process():  # another DDP rank: rank 0 writes and prints the tables
        return 0
    if getattr(args, "models", None) is not None:
        from magnet_st.report import plot_results

        plot_results([args.out], Path(args.out) / "figures", formats=("png", "pdf"))
    print((Path(args.out) / "summary.md").read_text())
    if (Path(args.out) / "groups.md").is_file():  # given, or planted in synthetic slides
        print((Path(args.out) / "groups.md").read_text())
    print(f"tables: {Path(args.out) / 'summary.md'}, summary.csv, metrics.csv, gene_pcc.csv")
    return 0


def _add_cv(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cv",
        help="slide-level cross-validation with metrics tables",
        description="Cross-validate by slide: leave-one-slide-out or k-fold, seeded. Per "
        "fold the panel is chosen and targets fitted on the training slides only; every "
        "model (mean profile and ridge included) fits on the training slides and makes its "
        "choices on the validation slide (see --refit); each "
        "model predicts the held-out slides from their images, and is scored "
        "at the bin, spot and region levels (MSE, MAE, PCC-gene, PCC-gene on the 50 most "
        "variable training genes, PCC-unit) beside the mean-profile baseline. Finished "
        "folds are skipped on a rerun.",
        formatter_class=_Formatter,
    )
    p.add_argument("dataset", help="dataset folder written by 'magnet prepare'")
    p.add_argument("out", help="output folder")
    _add_fold_options(p)
    p.add_argument(
        "--variants",
        nargs="*",
        choices=list(registry.VARIANTS),
        default=None,
        help="MagNet variants to compare (each trained per fold); default: --variant; "
        "given with no names: baselines only",
    )
    p.add_argument(
        "--baselines",
        nargs="+",
        choices=list(_BASELINES),
        default=[],
        help="baselines fitted per fold on the --features feature set, beside the mean "
        "profile and the ridge probe (which always run, ridge when the feature set has bin, "
        "spot and region features): " + _BASELINE_HELP,
    )
    _add_baseline_options(p)
    _add_slides_option(p)
    p.add_argument(
        "--gene-groups",
        default=None,
        metavar="FILE",
        help="CSV/TSV with columns gene (id or name) and group, or a synthetic slide's "
        "synthetic_truth.json: adds PCC-gene per group (groups.csv, groups.md); default: none",
    )
    _add_ensemble_option(p)
    _add_train_options(p)
    p.set_defaults(func=cmd_cv)


def _add_fold_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheme", choices=["loso", "kfold"], default="loso", help="fold scheme")
    p.add_argument("--folds", type=_int_at_least(2), default=4, help="k for --scheme kfold")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the fold split")
    p.add_argument(
        "--only-folds",
        nargs="+",
        type=_int_at_least(0),
        default=None,
        metavar="I",
        help="run only these folds (0-based, in the order of folds.json), e.g. one per "
        "machine; the tables cover the folds run; a later call without it reuses them and "
        "runs the rest; default: every fold",
    )
    p.add_argument(
        "--refit",
        action="store_true",
        help="the refit protocol: every model makes its choices on the validation slides "
        "(epochs by early stopping, ridge's penalty), then is fitted again on training + "
        "validation slides with them (panel and target statistics from both too); "
        "default: off (every model fitted on the training slides only, choices on the "
        "validation slides); summary.md names the protocol",
    )


def _add_ensemble_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ensemble",
        type=_int_at_least(1),
        default=1,
        metavar="N",
        help="train each MagNet variant with N seeds per fold (--seed, --seed + 1, ...; "
        "folders seed<S>) and score the mean of their predictions (default: 1)",
    )


# baselines.BASELINE_NAMES, spelled out so that '--help' needs no torch (a test checks)
_BASELINES = tuple(registry.BASELINES)
_BASELINE_HELP = (
    ", ".join(f"{b.name} ({b.description})" for b in registry.BASELINES.values())
    + "; all on the frozen features, one model per level (see the magnet_st.evaluate.baselines "
    "docstrings)"
)


def _add_slides_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--slides",
        nargs="+",
        default=None,
        metavar="SLIDE",
        help="the slides the cross-validation uses (folds, training and testing); default: "
        "every slide of the dataset",
    )


def _add_baseline_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--baseline-epochs",
        type=_positive_int,
        default=30,
        help="most epochs of each neural baseline per level (early-stopped on the fold's "
        "validation slide, patience 5)",
    )


def _add_benchmark(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "benchmark",
        help="compare MagNet with the baselines on the same folds, in the paper's table shape",
        description="Train and score every model of --models on every fold of a slide-level "
        "cross-validation (the same splits, gene panel, targets and metrics for all; "
        "resumable model by model and fold by fold). Writes summary.md / summary.csv (rows: "
        "models; columns: MSE, MAE, PCC-unit, PCC-gene, PCC-gene top-50; mean +- std over "
        "folds; one block per level; then PCC-gene per test slide, the best in bold), "
        "metrics.csv, gene_pcc.csv and figures/ (per-model "
        "PCC-gene and PCC-unit per fold). Baselines: " + _BASELINE_HELP,
        formatter_class=_Formatter,
    )
    p.add_argument("dataset", help="dataset folder written by 'magnet prepare'")
    p.add_argument("out", help="output folder")
    p.add_argument(
        "--models",
        nargs="+",
        default=["mean_profile", *_BASELINES, "magnet", "no_context"],
        help="models to compare: mean_profile (always run), "
        + ", ".join(_BASELINES)
        + ", and the MagNet variants magnet, paper, no_context",
    )
    _add_baseline_options(p)
    _add_fold_options(p)
    p.add_argument(
        "--gene-groups",
        default=None,
        metavar="FILE",
        help="gene groups for PCC-gene per group, as in 'magnet cv'; default: none",
    )
    _add_slides_option(p)
    _add_ensemble_option(p)
    _add_train_options(p)
    p.set_defaults(func=cmd_cv, variants=None, baselines=[])
