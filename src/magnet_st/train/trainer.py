"""train: fit MagNet on prepared slides with Lightning, and predict with it.

The LightningModule (:class:`MagNetModule`) holds the model, the losses and the
optimiser; :class:`SpatialDataModule` turns a prepared dataset and its cached features
into spatial batches (:mod:`magnet_st.model.batching`). :func:`fit` runs one training and
writes a model file that :func:`load_model` reads back without unpickling arbitrary
objects (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from magnet_st import registry
from magnet_st.data.dataset import Dataset
from magnet_st.data.targets import TargetTransform, log1p_moments
from magnet_st.errors import ConfigError, InputError
from magnet_st.model.batching import BlockDataset, SlideArrays
from magnet_st.model.inputs import PatchReader, model_inputs, model_reader
from magnet_st.model.losses import CONSISTENCY_FORMS, PCC_AXES, LossWeights, magnet_loss
from magnet_st.model.magnet import MagNetConfig, create_model
from magnet_st.model.metrics import GenePearson
from magnet_st.predict.modelfile import save_model
from magnet_st.util.atomic import write_text
from magnet_st.util.lock import locked

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


# -- data ----------------------------------------------------------------------------------


class EpochShuffle(torch.utils.data.Sampler[int]):
    """A new order of the batches each epoch, a function of (seed, epoch) only: a run
    resumed at epoch e sees the same order as one that never stopped. Yields ``(batch,
    epoch)`` pairs (:meth:`magnet_st.model.batching.BlockDataset.__getitem__`). The epoch comes from
    ``epoch()`` (the trainer's current epoch) when the order is drawn; Lightning's own
    ``set_epoch`` counts from 0 again after a resume, so it is not used."""

    def __init__(self, n: int, seed: int, epoch: Callable[[], int]):
        self.n, self.seed, self.epoch = n, seed, epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        # a generator: the order is drawn when the first batch is fetched, not when
        # Lightning creates the iterator (on a resume it does so before the epoch is set)
        epoch = int(self.epoch())
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        # (batch, epoch): the dataset seeds the batch's augmentation from both, in whichever
        # worker process it runs (a worker cannot ask the trainer for the epoch)
        yield from ((i, epoch) for i in order)


class SpatialDataModule(L.LightningDataModule):
    """Training and validation batches over prepared slides (see :mod:`magnet_st.model.batching`)."""

    def __init__(
        self,
        train: list[SlideArrays],
        val: list[SlideArrays],
        cfg: TrainConfig,
        targets: dict[str, TargetTransform],
        patch_reader: PatchReader | None = None,
    ):
        super().__init__()
        self.train_slides, self.val_slides = train, val
        self.cfg = cfg
        self.targets = targets
        self.patch_reader = patch_reader

    def _loader(self, slides: list[SlideArrays], train: bool) -> torch.utils.data.DataLoader:
        tt = self.targets
        data = BlockDataset(
            slides,
            block=self.cfg.block,
            batch_bins=self.cfg.batch_bins,
            k=self.cfg.k,
            context_tokens=self.cfg.context_tokens,
            with_context=self.cfg.variant != "no_context",
            targets=lambda lv, c: tt[lv].transform(c),
            patch_reader=self.patch_reader,
            train=train,
        )
        return torch.utils.data.DataLoader(
            data,
            batch_size=None,
            sampler=EpochShuffle(len(data), self.cfg.seed, self._epoch) if train else None,
            # the loader's own generator: creating an iterator draws no global random number,
            # so dropout's random stream is the same in a resumed run as in an uninterrupted one
            generator=torch.Generator().manual_seed(self.cfg.seed),
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def _epoch(self) -> int:
        return int(self.trainer.current_epoch) if self.trainer is not None else 0

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.train_slides, True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.val_slides, False)


def _rng_states() -> dict[str, Any]:
    import random

    states = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": [int(v) for v in random.getstate()[1]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    import random

    torch.set_rng_state(torch.as_tensor(states["torch"]).cpu())
    keys = torch.as_tensor(states["numpy"]).numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(states["numpy_pos"]), 0, 0.0))
    random.setstate((3, tuple(int(v) for v in states["python"]), None))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# -- the LightningModule ---------------------------------------------------------------------


class MagNetModule(L.LightningModule):
    """MagNet with its losses, optimiser and schedule. Hyperparameters are plain dicts."""

    def __init__(self, model_config: dict, train_config: dict, targets: dict[str, dict]):
        super().__init__()
        self.save_hyperparameters()
        self.model = create_model(model_config)
        self.cfg = TrainConfig(**train_config)
        self.weights = LossWeights(**self.cfg.loss_weights)
        self.targets = {lv: TargetTransform.from_dict(d) for lv, d in targets.items()}
        self._val: dict[int, GenePearson] = {}

    def _to_log1p(self) -> dict[str, Any]:
        fns = {}
        for lv, tt in self.targets.items():
            if tt.kind == "log1p_zscore":
                mean = torch.tensor(tt.mean, device=self.device)
                std = torch.tensor(tt.std, device=self.device)
                fns[lv] = lambda y, m=mean, s=std: y * s + m
            else:
                fns[lv] = lambda y: y
        return fns

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.model(batch)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the random streams (dropout, augmentation), so that a resumed run continues them
        checkpoint["rng_states"] = _rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:
            _set_rng_states(checkpoint["rng_states"])

    def _loss(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict:
        return magnet_loss(
            out, batch, self.weights, self.cfg.consistency, self._to_log1p(), self.cfg.pcc_axis
        )

    def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
        out = self.model(batch)
        parts = self._loss(out, batch)
        if not bool(torch.isfinite(parts["loss"]).all()):
            # diverged: stop with one line rather than train on NaN weights
            raise TrainingDiverged(
                f"training diverged: the loss is {float(parts['loss'])} at epoch "
                f"{self.current_epoch}, step {self.global_step} (learning rate "
                f"{self.cfg.base_lr:g}); lower --lr"
            )
        n = int(batch["bin_index"].numel())
        for key, value in parts.items():
            self.log(f"train/{key}", value, batch_size=n, on_step=False, on_epoch=True)
        return parts["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], _: int) -> None:
        out = self.model(batch)
        parts = self._loss(out, batch)
        n = int(batch["bin_index"].numel())
        self.log("val/loss", parts["loss"], batch_size=n, on_epoch=True, prog_bar=True)
        # PCC-gene from per-gene sums: no copy of the slide's predictions, and the sums of
        # all DDP ranks add up to the whole slide's (see on_validation_epoch_end)
        acc = self._val.setdefault(int(batch["slide"]), GenePearson(out["bin"].shape[1]))
        acc.update(batch["y_bin"].float().cpu().numpy(), out["bin"].float().cpu().numpy())

    def on_validation_epoch_end(self) -> None:
        n_slides = len(getattr(self.trainer.datamodule, "val_slides", []) or [])
        if not n_slides:
            self._val = {}
            return
        g = self.model.cfg.n_genes
        state = torch.zeros((n_slides, 7, g), dtype=torch.float64, device=self.device)
        for slide, acc in self._val.items():
            state[slide] = torch.from_numpy(acc.state)
        self._val = {}
        state = self.trainer.strategy.reduce(state, reduce_op="sum")  # identity on one device
        # PCC is unchanged by the per-gene affine map back to log1p (z-score targets)
        scores = [
            np.nanmean(r) if np.isfinite(r).any() else np.nan
            for r in (GenePearson.from_state(s.cpu().numpy()).compute() for s in state)
        ]
        score = float(np.nanmean(scores)) if np.isfinite(scores).any() else 0.0
        self.log("val/pcc_gene", score, prog_bar=True)

    def configure_optimizers(self) -> Any:
        lr = self.cfg.base_lr
        backbone = self.model.bin_encoder.backbone
        inner = {id(p) for p in backbone.parameters()} if backbone is not None else set()
        groups = [
            {"params": [p for p in self.parameters() if id(p) not in inner], "lr": lr},
            {
                "params": [p for p in self.parameters() if id(p) in inner],
                "lr": lr * self.cfg.bin_lr_scale,
            },
        ]
        groups = [g for g in groups if g["params"]]
        if self.cfg.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=self.cfg.weight_decay)
        else:
            opt = torch.optim.AdamW(groups, lr=lr, weight_decay=self.cfg.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if self.cfg.optimizer == "sgd":  # the paper's polynomial decay, power 0.9, per step
            lam = lambda it: max(0.0, 1 - it / total) ** 0.9  # noqa: E731
        else:
            lam = lambda it: 0.5 * (1 + math.cos(math.pi * min(it, total) / total))  # noqa: E731
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _steps(n: float) -> int:
    return int(n) if math.isfinite(n) else 0


def is_main_process() -> bool:
    """True outside DDP and in its rank-0 process. Lightning starts the other ranks by
    running the same command again with ``LOCAL_RANK`` (and ``NODE_RANK``) set."""
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


# -- fit, save, load, predict ----------------------------------------------------------------


def dense_bin_settings(ds: Dataset, cfg: TrainConfig) -> dict | None:
    """A dense end-to-end bin branch's settings (:func:`magnet_st.model.densebin.dense_settings`):
    the working resolution, margin and stride of the feature set when it is dense (its
    windows, frozen, follow each unit's own maps), else the dataset's preset defaults."""
    if cfg.bin_encoder == "frozen" or cfg.bin_input != "dense":
        return None
    from magnet_st.features.dense import DenseConfig
    from magnet_st.features.encoders import create_backbone
    from magnet_st.features.store import feature_set_meta
    from magnet_st.model.densebin import dense_settings

    dense = feature_set_meta(ds.path, cfg.features).get("encoder", {}).get("dense")
    backbone, _ = create_backbone(cfg.bin_encoder, load_weights=False)
    if dense:
        stride = int(dense["strides"][0])
        own = sum(int(w) for _, w in dense["blocks"]["bin"][: len(dense["strides"])])
        extra = sum(int(w) for _, w in dense["blocks"]["bin"]) - own
        return {
            **dense_settings(backbone, dense["mpp"], dense["margin_px"], stride, extra),
            "columns_from": own,
        }
    preset = DenseConfig().resolve(str(ds.config.get("preset", "hd")))
    return {**dense_settings(backbone, preset.mpp, preset.margin_px), "columns_from": 0}


def build_model_config(
    ds: Dataset, cfg: TrainConfig, n_genes: int, slide: str, bin_dense: dict | None = None
) -> MagNetConfig:
    from magnet_st.features.store import load_features

    dims = {}
    levels = ["spot", "region"] + (["bin"] if cfg.bin_encoder == "frozen" else [])
    for lv in levels:
        dims[lv] = int(load_features(ds.path, cfg.features, slide, lv, on_disk=True).shape[1])
    return MagNetConfig(
        bin_dense=bin_dense,
        n_genes=n_genes,
        spot_feature_dim=dims["spot"],
        region_feature_dim=dims["region"],
        variant=cfg.variant,
        bin_encoder=cfg.bin_encoder,
        bin_feature_dim=dims.get("bin", 0),
        bin_patch_px=ds.patch_px("bin"),
        width=cfg.width,
        heads=4 if cfg.width < 1024 else 8,
        context_tokens=cfg.context_tokens,
        dropout=cfg.dropout,
        rate_heads=cfg.consistency == "aggregate",
    )


@dataclass
class FitResult:
    model_path: Path
    best_score: float | None
    epochs_run: int
    seconds: float
    history: list[dict[str, float]]
    steps_per_epoch: int = 0


class _History(L.Callback):
    """The metrics of every epoch; kept in the checkpoints, so that a resumed run's
    history.json holds the epochs before the interruption too."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        row = {"epoch": int(trainer.current_epoch)}
        row.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        self.rows.append(row)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": json.dumps(self.rows)}  # a string: loads with weights_only=True

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = json.loads(state_dict["rows"])


@locked("out", "magnet train")
def fit(
    ds: Dataset,
    train_slides: list[str],
    val_slides: list[str],
    cfg: TrainConfig,
    out: str | Path,
    *,
    genes: list[str] | None = None,
    targets: dict[str, TargetTransform] | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    callbacks: list[L.Callback] | None = None,
) -> FitResult:
    """Train on ``train_slides``, choose the checkpoint on ``val_slides`` (PCC-gene of the
    bins; without validation slides, the last epoch), and write ``out/model.pt``."""
    import time

    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    t0 = time.perf_counter()
    if not log.isEnabledFor(logging.INFO):  # Lightning's own INFO chatter only with -v
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    both = sorted(set(train_slides) & set(val_slides))
    if both or len(set(train_slides)) < len(train_slides):
        twice = both or sorted({s for s in train_slides if list(train_slides).count(s) > 1})
        raise ConfigError(
            f"slides {twice} are given twice (training and validation, or twice for "
            "training): each slide has one role"
        )
    if resume is not None:  # one of our checkpoints, said before anything is written
        from magnet_st.util import torchfile

        state = torchfile.load(resume, "checkpoint to resume from")
        if not isinstance(state, dict) or not {"state_dict", "epoch"} <= set(state):
            raise InputError(resume, "not a training checkpoint (checkpoints/last.ckpt of a run)")
        del state
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if resume is None:  # a fresh run: checkpoints of an earlier (killed) one are not its own
        for stale in (out / "checkpoints").glob("*.ckpt"):
            stale.unlink()
    if genes is None:  # the panel and target statistics of the training slides alone
        from magnet_st.data.panel import training_panel

        chosen = training_panel(ds, list(train_slides), cfg.seed)
        genes, targets = chosen.genes, targets or chosen.targets
    elif targets is None:  # the given genes' statistics, from the training slides alone
        from magnet_st.data.panel import training_targets

        targets = training_targets(ds, list(train_slides), genes)
    if cfg.consistency == "aggregate" and any(t.per_10k for t in targets.values()):
        raise ConfigError(
            "consistency 'aggregate' needs raw counts (a tile's counts are the sum of its "
            "bins'); counts per 10,000 of each unit are not: use --consistency paper or none"
        )
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    bin_feats = cfg.bin_encoder == "frozen"
    if bin_feats and cfg.bin_weights is not None:
        raise ConfigError("bin_weights (--bin-weights) needs an end-to-end bin encoder")
    check_bin_start(cfg)
    dense = dense_bin_settings(ds, cfg)
    given = {"bin_encoder": cfg.bin_encoder, "bin_dense": dense}
    train = [model_inputs(ds, s, cfg.features, given, genes=genes) for s in train_slides]
    val = [model_inputs(ds, s, cfg.features, given, genes=genes) for s in val_slides]
    reader = model_reader(ds, train_slides + val_slides, given, cfg.seed)
    mcfg = build_model_config(ds, cfg, len(genes), train_slides[0], dense)
    module = MagNetModule(
        mcfg.to_dict(), cfg.to_dict(), {k: v.to_dict() for k, v in targets.items()}
    )
    if not bin_feats:
        init_bin_encoder(module, cfg)
    if resume is None:
        init_head_bias(module.model, train, targets)
    data = SpatialDataModule(train, val, cfg, targets, reader)
    history = _History()
    callbacks = [history, *(callbacks or [])]
    # last.ckpt after every epoch, to resume from (Lightning's save_last only follows the
    # monitored checkpoints, so after an epoch without improvement it would be stale)
    latest = ModelCheckpoint(
        dirpath=out / "checkpoints",
        filename="last",
        monitor=None,
        save_top_k=1,
        enable_version_counter=False,
    )
    callbacks.append(latest)
    ckpt = None
    if val:  # the checkpoint with the best validation PCC-gene is the model
        ckpt = ModelCheckpoint(
            dirpath=out / "checkpoints", monitor="val/pcc_gene", mode="max", filename="best-{epoch}"
        )
        callbacks += [ckpt, EarlyStopping("val/pcc_gene", mode="max", patience=cfg.patience)]
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        precision=cfg.precision,
        callbacks=callbacks,
        deterministic=cfg.deterministic,
        logger=L.pytorch.loggers.CSVLogger(out, name="logs", version=""),
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=(cfg.max_batches or 1.0) if val else 0,
        limit_train_batches=cfg.max_batches or 1.0,
        log_every_n_steps=1,
    )
    with warnings.catch_warnings():
        # a dense bin branch keeps its batch-norm layers in eval mode on purpose
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
        trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
    best_path = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else ""
    best_path = best_path or latest.best_model_path
    if trainer.global_rank == 0:
        state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
        save_model(
            out / "model.pt",
            module,
            genes=genes,
            gene_names=ds.gene_names(genes),
            ds=ds,
            features=cfg.features,
            training_slides=list(train_slides) + list(val_slides),
        )
        if val_slides:  # each coarse level from its head or from its bins, by validation
            record_coarse_choice(ds, out / "model.pt", list(val_slides), reader)
        write_text(out / "history.json", json.dumps(history.rows, indent=1))
    trainer.strategy.barrier()  # every rank leaves once model.pt is written
    score = ckpt.best_model_score if ckpt is not None else None
    return FitResult(
        model_path=out / "model.pt",
        best_score=None if score is None else float(score),
        epochs_run=int(trainer.current_epoch),
        seconds=time.perf_counter() - t0,
        history=history.rows,
        steps_per_epoch=_steps(trainer.num_training_batches),
    )


def record_coarse_choice(
    ds: Dataset,
    model_path: Path,
    val_slides: list[str],
    patch_reader: PatchReader | None = None,
    choice: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Choose, per coarse level, whether the model's predictions come from its head or from
    the sum of its bin predictions over the tile: the one with the higher PCC-gene on the
    validation slides (ties: the head); written into the model file (``coarse_from``, with
    the scores in ``coarse_choice``). ``choice``: a choice made before (by the run that
    chose a refitted model's epochs), recorded as it is. Returns the record."""
    from magnet_st.predict.modelfile import (
        COARSE_LEVELS,
        bins_add_up,
        choose_coarse,
        coarse_scores,
        load_model,
        predict_slide,
    )
    from magnet_st.util.atomic import atomic_path

    model, payload = load_model(model_path)
    if choice is None:
        genes = payload["genes"]
        per_slide = []
        for slide in val_slides:
            arrays = model_inputs(
                ds,
                slide,
                payload["features"]["key"],
                payload["model_config"],
                genes=genes,
                with_counts=False,
            )
            raw = predict_slide(model, arrays, payload, patch_reader=patch_reader, raw=True)
            truth = {
                lv: np.log1p(ds.counts(slide, lv, genes).toarray().astype(np.float64))
                for lv in COARSE_LEVELS
            }
            member = {lv: ds.membership(slide, lv) for lv in COARSE_LEVELS}
            per_slide.append(coarse_scores(raw, truth, member, bins_add_up(payload)))
        chosen, scores = choose_coarse(per_slide)
        choice = {"coarse_from": chosen, "scores": scores, "slides": list(val_slides)}
    payload["coarse_from"] = dict(choice["coarse_from"])
    payload["coarse_choice"] = {k: v for k, v in choice.items() if k != "coarse_from"}
    with atomic_path(Path(model_path)) as tmp:
        torch.save(payload, tmp)
    log.info(
        "coarse predictions from %s (validation PCC-gene %s)",
        choice["coarse_from"],
        choice.get("scores"),
    )
    return choice


#: ``--bin-weights random``: train a timm bin encoder from random weights, on purpose
RANDOM_BIN_WEIGHTS = "random"


def check_bin_start(cfg: TrainConfig) -> None:
    """An end-to-end timm bin encoder (``--variant paper``'s ResNet50 included) without
    ``--bin-weights`` would train from random weights: refused unless asked for by name."""
    from magnet_st.features.encoders import OFFLINE_IMAGENET

    if cfg.bin_encoder in ("frozen", OFFLINE_IMAGENET) or cfg.bin_weights is not None:
        return
    raise ConfigError(
        f"the end-to-end bin encoder {cfg.bin_encoder} has no starting weights and would "
        f"train from random ones: give --bin-weights FILE (e.g. ImageNet {cfg.bin_encoder} "
        f"weights), --bin-encoder {OFFLINE_IMAGENET} (ImageNet weights shipped offline), or "
        f"--bin-weights {RANDOM_BIN_WEIGHTS} to train from random weights on purpose"
    )


def init_bin_encoder(module: MagNetModule, cfg: TrainConfig) -> dict[str, Any]:
    """Load the weights the end-to-end bin encoder starts from into its backbone: the
    file ``cfg.bin_weights`` (read as ``magnet features --weights`` reads its file, by
    :func:`magnet_st.features.encoders.load_backbone_weights`), the offline ImageNet weights for
    ``efficientnet_lite0_imagenet``, or none (random init). Their checksum goes into the
    model config (``model_config["bin_weights_checksum"]`` of the model file); rebuilding
    the model needs no file, since the trained state dict holds the weights."""
    from magnet_st.features.encoders import load_backbone_weights

    backbone = module.model.bin_encoder.backbone
    weights = None if cfg.bin_weights == RANDOM_BIN_WEIGHTS else cfg.bin_weights
    info = load_backbone_weights(backbone, cfg.bin_encoder, weights)
    checksum = info["weights_checksum"]
    module.model.cfg.bin_weights_checksum = checksum
    module.hparams["model_config"]["bin_weights_checksum"] = checksum
    log.info("bin encoder %s starts from %s", cfg.bin_encoder, info["weights_path"] or checksum)
    return info


def target_mean(tt: TargetTransform, counts: list, chunk: int = 20_000) -> np.ndarray:
    """Mean target per gene over the rows of ``counts`` (in chunks: bounded memory); the
    transform is affine in log1p, so this is the transformed log1p mean."""
    _, mean, _ = log1p_moments(counts, chunk)
    return tt.from_log1p(mean).astype(np.float32)


def _row_chunks(counts: Any, chunk: int = 50_000):
    for i in range(0, counts.shape[0], chunk):
        yield counts[i : i + chunk]


def init_head_bias(
    model: torch.nn.Module, slides: list[SlideArrays], targets: dict[str, TargetTransform]
) -> None:
    """Start every head at the training mean of its level's targets (the mean profile), so
    training begins from the baseline instead of from zero."""
    heads = {"bin": "bin_head", "spot": "spot_head", "region": "region_head"}
    for lv, attr in heads.items():
        head = getattr(model, attr, None)
        counts = [getattr(s, f"counts_{lv}") for s in slides]
        if head is None or any(c is None for c in counts):
            continue
        with torch.no_grad():
            head[-1].bias.copy_(torch.from_numpy(target_mean(targets[lv], counts)))
        rates = getattr(model, "rate_heads", None)
        if rates is not None:  # expected counts start at the training mean count
            total = sum(
                np.asarray(part.sum(axis=0), np.float64).ravel()
                for c in counts
                for part in _row_chunks(c)
            )
            mean = np.maximum(total / max(sum(c.shape[0] for c in counts), 1), 1e-4)
            # softplus^-1(mean) = log(expm1(mean)), written so that it cannot overflow
            inverse = mean + np.log(-np.expm1(-mean))
            with torch.no_grad():
                rates[lv][1].bias.copy_(torch.from_numpy(inverse).float())
