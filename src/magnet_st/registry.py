"""registry: the models magnet-st knows by name, in one torch-free module.

As timm registers its models, every MagNet variant and every baseline is registered here
once, with a one-line description and (for variants) the presets it applies to options
the user leaves unset. The command line takes its choices, defaults and help from here
(so ``magnet --help`` needs no torch), :class:`magnet_st.train.config.TrainConfig` its variant
presets and default option values, :mod:`magnet_st.model.losses` its loss weights, and
:mod:`magnet_st.evaluate.baselines` its baseline names. Adding a variant or a baseline is one
``register_*`` call here plus its implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BASELINES",
    "LOSS_WEIGHTS",
    "MEAN_PROFILE",
    "TRAIN_DEFAULTS",
    "VARIANTS",
    "Baseline",
    "Variant",
    "register_baseline",
    "register_variant",
]


@dataclass(frozen=True)
class Variant:
    """A MagNet variant: its name, what it is, and the options it presets."""

    name: str
    description: str
    presets: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Baseline:
    """A baseline fitted per fold on frozen features: its name, what it is, and where its
    implementation lives (``module:attribute``, imported when it is used)."""

    name: str
    description: str
    target: str


VARIANTS: dict[str, Variant] = {}
BASELINES: dict[str, Baseline] = {}

#: the baseline every table starts from: each gene's mean over the training units
MEAN_PROFILE = "mean_profile"

#: TrainConfig's defaults for the options whose variants may preset them
TRAIN_DEFAULTS: dict[str, Any] = {
    "optimizer": "adamw",
    "epochs": 30,
    "consistency": "paper",
    "width": 256,
    "context_tokens": 5,
    "bin_encoder": "frozen",
    "pcc_axis": "gene",  # measured: +0.038 bin PCC-gene over "unit" (docs/results.md)
}

#: the loss terms' default weights (losses.LossWeights)
LOSS_WEIGHTS: dict[str, float] = {
    "mse": 0.75,
    "pcc": 0.10,
    "context_pcc": 0.05,
    "consistency": 0.05,
    "context_mse": 0.75,  # ours, not the paper's (0 with --variant paper)
    "poisson": 0.05,
}


def register_variant(name: str, description: str, **presets: Any) -> Variant:
    """Register a MagNet variant; ``presets``: TrainConfig options it sets when the user
    does not (``loss_weights`` merges weight by weight)."""
    if name in VARIANTS:
        raise ValueError(f"variant {name!r} is registered already")
    VARIANTS[name] = Variant(name, description, dict(presets))
    return VARIANTS[name]


def register_baseline(name: str, description: str, target: str) -> Baseline:
    """Register a baseline implemented by ``target`` (``module:attribute``)."""
    if name in BASELINES or name == MEAN_PROFILE:
        raise ValueError(f"baseline {name!r} is registered already")
    BASELINES[name] = Baseline(name, description, target)
    return BASELINES[name]


register_variant(
    "magnet",
    "the corrected model: gated context attention, the bin's own readout, context tokens "
    "of the nearest tiles",
)
register_variant(
    "paper",
    "the paper's choices: 1 context token, width 1024, SGD with polynomial decay, "
    "code-style consistency, the coarse heads trained by PCC only",
    optimizer="sgd",
    epochs=51,
    consistency="paper",
    width=1024,
    context_tokens=1,
    bin_encoder="resnet50",
    pcc_axis="unit",
    loss_weights={"context_mse": 0.0},
)
register_variant("no_context", "the bin branch alone (ablation)")

register_baseline(
    "ridge",
    "the unit's own + its spot and region tiles' features, near-constant dimensions "
    "dropped, PCA 256, penalty chosen on the validation slide (HEST protocol)",
    "magnet_st.evaluate.baselines.ridge:RidgeBaseline",
)
register_baseline("stnet", "ST-Net", "magnet_st.evaluate.baselines.paper:STNet")
register_baseline("histogene", "HisToGene", "magnet_st.evaluate.baselines.paper:HisToGene")
register_baseline("his2st", "Hist2ST", "magnet_st.evaluate.baselines.paper:His2ST")
register_baseline("bleep", "BLEEP", "magnet_st.evaluate.baselines.paper:BLEEP")
register_baseline("egn", "EGN", "magnet_st.evaluate.baselines.paper:EGN")


def split_models(models: list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """``magnet benchmark``'s ``--models``: (MagNet variants, baselines), in the order given
    (the mean profile always runs); an unknown name raises, listing the known ones."""
    from magnet_st.errors import MagnetError

    known = [MEAN_PROFILE, *BASELINES, *VARIANTS]
    unknown = [m for m in models if m not in known]
    if unknown:
        raise MagnetError(f"unknown models {unknown}; available: {known}")
    return [m for m in models if m in VARIANTS], [m for m in models if m in BASELINES]


def preset(variant: str, option: str) -> Any:
    """What ``variant`` uses for ``option`` when the user leaves it unset."""
    return VARIANTS[variant].presets.get(option, TRAIN_DEFAULTS.get(option))
