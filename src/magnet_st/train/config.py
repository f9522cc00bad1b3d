"""config: the settings of a training run (:class:`TrainConfig`: a variant's presets from the
registry, the loss weights, the bin branch's input), and the error a diverged run raises."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from magnet_st import registry
from magnet_st.errors import ConfigError
from magnet_st.model.losses import CONSISTENCY_FORMS, PCC_AXES, LossWeights

log = logging.getLogger(__name__)


class TrainingDiverged(ConfigError):
    """A non-finite training loss: the settings (most often the learning rate) diverge."""


# Settings that only concern the machine: changing them does not invalidate a resume.
MACHINE_KEYS = ("num_workers", "accelerator", "devices", "num_nodes", "deterministic")


_D = registry.TRAIN_DEFAULTS


#: what an end-to-end bin encoder sees: one patch per bin, or crops whose dense maps are
#: pooled on each bin's footprint (:mod:`magnet_st.model.densebin`)
BIN_INPUTS = ("patches", "dense")


@dataclass
class TrainConfig:
    """Training settings (``magnet train --help`` documents each)."""

    features: str = "resnet50"
    variant: str = "magnet"
    bin_encoder: str = _D["bin_encoder"]
    bin_weights: str | None = None  # a state-dict file the bin encoder starts from
    bin_input: str = "patches"  # an end-to-end bin encoder's input: "patches" or "dense"
    bin_lr_scale: float = 1.0  # the end-to-end bin encoder's learning rate / the others'
    width: int = _D["width"]
    context_tokens: int = _D["context_tokens"]
    k: int = 8
    block: int = 2
    batch_bins: int | None = 256  # bins per step (None: blocks of block x block regions)
    optimizer: str = _D["optimizer"]
    lr: float | None = None
    weight_decay: float = 1e-4
    epochs: int = _D["epochs"]
    patience: int = 10
    consistency: str = _D["consistency"]
    pcc_axis: str = _D["pcc_axis"]
    loss_weights: dict[str, float] = field(default_factory=lambda: asdict(LossWeights()))
    dropout: float = 0.1
    seed: int = 0
    num_workers: int = 0
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    precision: str | None = None
    max_batches: int | None = None  # per epoch, for smoke runs and benchmarks; None = all
    deterministic: bool = True  # some CUDA backward kernels refuse it: --nondeterministic

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.consistency not in CONSISTENCY_FORMS:
            raise ConfigError(f"consistency must be one of {CONSISTENCY_FORMS}")
        if self.pcc_axis not in PCC_AXES:
            raise ConfigError(f"pcc_axis must be one of {PCC_AXES}")
        if self.epochs < 1 or self.block < 1:
            raise ConfigError("epochs and block must be at least 1")
        if self.bin_input not in BIN_INPUTS:
            raise ConfigError(f"bin_input must be one of {BIN_INPUTS}, got {self.bin_input!r}")
        if not (math.isfinite(self.bin_lr_scale) and self.bin_lr_scale > 0):
            raise ConfigError(f"bin_lr_scale must be positive, got {self.bin_lr_scale}")
        if self.batch_bins is not None and self.batch_bins < 1:
            raise ConfigError("batch_bins must be at least 1")
        unknown = set(self.loss_weights) - set(asdict(LossWeights()))
        if unknown:
            raise ConfigError(f"unknown loss weights {sorted(unknown)}")

    @property
    def base_lr(self) -> float:
        """Paper: SGD at 0.005 with polynomial decay; AdamW default 1e-3 with cosine decay."""
        return self.lr if self.lr is not None else (0.005 if self.optimizer == "sgd" else 1e-3)

    @classmethod
    def for_variant(cls, variant: str = "magnet", **given: Any) -> TrainConfig:
        """The variant's presets (:data:`magnet_st.registry.VARIANTS`), then the options ``given``:
        an option the user sets always wins over the variant's choice. Loss weights merge
        one by one: the defaults, the variant's, then the ones given."""
        known = registry.VARIANTS.get(variant)
        preset = dict(known.presets) if known is not None else {}
        weights = {
            **asdict(LossWeights()),
            **preset.pop("loss_weights", {}),
            **(given.pop("loss_weights", None) or {}),
        }
        return cls(**{"variant": variant, **preset, **given, "loss_weights": weights})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def science_dict(self) -> dict[str, Any]:
        """The settings that change the result: all but :data:`MACHINE_KEYS`."""
        return {k: v for k, v in asdict(self).items() if k not in MACHINE_KEYS}
