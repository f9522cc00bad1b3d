"""train: fit MagNet on prepared slides with Lightning, and predict with it.

The LightningModule (:class:`MagNetModule`) holds the model, the losses and the
optimiser; :class:`SpatialDataModule` turns a prepared dataset and its cached features
into spatial batches (:mod:`magnet_st.batching`). :func:`fit` runs one training and
writes a model file that :func:`load_model` reads back without unpickling arbitrary
objects (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from magnet_st.atomic import write_text
from magnet_st.batching import BlockDataset, SlideArrays
from magnet_st.dataset import Dataset
from magnet_st.errors import ConfigError, InputError
from magnet_st.losses import CONSISTENCY_FORMS, LossWeights, magnet_loss
from magnet_st.metrics import evaluate
from magnet_st.model import MagNetConfig, create_model
from magnet_st.targets import TargetTransform

log = logging.getLogger(__name__)

MODEL_FORMAT = "magnet-st model"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class TrainConfig:
    """Training settings (``magnet train --help`` documents each)."""

    features: str = "resnet50"
    variant: str = "magnet"
    bin_encoder: str = "frozen"
    width: int = 256
    context_tokens: int = 5
    k: int = 8
    block: int = 2
    optimizer: str = "adamw"
    lr: float | None = None
    weight_decay: float = 1e-4
    epochs: int = 30
    patience: int = 10
    consistency: str = "paper"
    loss_weights: dict[str, float] = field(default_factory=lambda: asdict(LossWeights()))
    dropout: float = 0.1
    seed: int = 0
    num_workers: int = 0
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    precision: str | None = None
    max_batches: int | None = None  # per epoch, for smoke runs and benchmarks; None = all

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.consistency not in CONSISTENCY_FORMS:
            raise ConfigError(f"consistency must be one of {CONSISTENCY_FORMS}")
        if self.epochs < 1 or self.block < 1:
            raise ConfigError("epochs and block must be at least 1")
        unknown = set(self.loss_weights) - set(asdict(LossWeights()))
        if unknown:
            raise ConfigError(f"unknown loss weights {sorted(unknown)}")

    @property
    def base_lr(self) -> float:
        """Paper: SGD at 0.005 with polynomial decay; AdamW default 1e-3 with cosine decay."""
        return self.lr if self.lr is not None else (0.005 if self.optimizer == "sgd" else 1e-3)

    @classmethod
    def paper(cls, **kw: Any) -> TrainConfig:
        base = {
            "variant": "paper",
            "optimizer": "sgd",
            "epochs": 51,
            "consistency": "paper",
            "width": 1024,
            "context_tokens": 1,
        }
        base.update(kw)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- data ----------------------------------------------------------------------------------


def slide_arrays(
    ds: Dataset,
    slide: str,
    features: str,
    *,
    genes: list[str] | None = None,
    bin_features: bool = True,
    with_counts: bool = True,
) -> SlideArrays:
    """Everything batching needs of one slide of a prepared dataset."""
    from magnet_st.features import load_features

    spot = ds.level(slide, "spot")
    region = ds.level(slide, "region")
    return SlideArrays(
        name=slide,
        bin_pos=ds.positions_um(slide, "bin"),
        spot_pos=ds.positions_um(slide, "spot"),
        region_pos=ds.positions_um(slide, "region"),
        bin_spot=ds.membership(slide, "spot"),
        bin_region=ds.membership(slide, "region"),
        spot_size_um=ds.patch_um("spot"),
        region_size_um=ds.patch_um("region"),
        region_rc=region.obs[["tile_row", "tile_col"]].to_numpy(),
        spot_n_units=spot.obs["n_units"].to_numpy(),
        region_n_units=region.obs["n_units"].to_numpy(),
        # memory-mapped: batches read their rows, the slide's features stay on disk
        bin_x=load_features(ds.path, features, slide, "bin", mmap=True) if bin_features else None,
        spot_x=load_features(ds.path, features, slide, "spot", mmap=True),
        region_x=load_features(ds.path, features, slide, "region", mmap=True),
        counts_bin=ds.counts(slide, "bin", genes) if with_counts else None,
        counts_spot=ds.counts(slide, "spot", genes) if with_counts else None,
        counts_region=ds.counts(slide, "region", genes) if with_counts else None,
        bin_px=ds.positions_px(slide, "bin"),
    )


class PatchReader:
    """Cuts bin patches from a slide image for an end-to-end bin encoder; flips and
    90-degree rotations when training. Picklable for DataLoader workers."""

    def __init__(self, images: dict[str, Any], patch_um: float, patch_px: int, seed: int = 0):
        self.images = images
        self.patch_um = patch_um
        self.patch_px = patch_px
        self.seed = seed
        self.calls = 0

    def __call__(self, slide: SlideArrays, bins: np.ndarray, train: bool) -> torch.Tensor:
        img = self.images[slide.name]
        box = self.patch_um / img.microns_per_pixel
        out = np.empty((len(bins), self.patch_px, self.patch_px, 3), np.uint8)
        for j, (cx, cy) in enumerate(slide.bin_px[bins]):
            out[j] = img.read_region(cx - box / 2, cy - box / 2, box, box, (self.patch_px,) * 2)
        x = torch.from_numpy(out).permute(0, 3, 1, 2).float().div_(255)
        if train:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(bins[0]) + self.calls)
            self.calls += 1
            flip = torch.rand(len(x), generator=g) < 0.5
            x[flip] = x[flip].flip(-1)
            rot = torch.randint(0, 4, (len(x),), generator=g)
            for r in (1, 2, 3):
                sel = rot == r
                x[sel] = torch.rot90(x[sel], r, dims=(-2, -1))
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (x - mean) / std


class SpatialDataModule(L.LightningDataModule):
    """Training and validation batches over prepared slides (see :mod:`magnet_st.batching`)."""

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
            k=self.cfg.k,
            context_tokens=self.cfg.context_tokens,
            with_context=self.cfg.variant != "no_context",
            targets=lambda lv, c: tt[lv].transform(c),
            patch_reader=self.patch_reader,
            train=train,
        )
        g = torch.Generator().manual_seed(self.cfg.seed)
        return torch.utils.data.DataLoader(
            data,
            batch_size=None,
            shuffle=train,
            generator=g if train else None,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.train_slides, True)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.val_slides, False)


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
        self._val: dict[int, dict[str, list]] = {}

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

    def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
        out = self.model(batch)
        parts = magnet_loss(out, batch, self.weights, self.cfg.consistency, self._to_log1p())
        n = int(batch["bin_index"].numel())
        for key, value in parts.items():
            self.log(f"train/{key}", value, batch_size=n, on_step=False, on_epoch=True)
        return parts["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], _: int) -> None:
        out = self.model(batch)
        parts = magnet_loss(out, batch, self.weights, self.cfg.consistency, self._to_log1p())
        n = int(batch["bin_index"].numel())
        self.log("val/loss", parts["loss"], batch_size=n, on_epoch=True, prog_bar=True)
        acc = self._val.setdefault(int(batch["slide"]), {"pred": [], "true": []})
        acc["pred"].append(out["bin"].float().cpu().numpy())
        acc["true"].append(batch["y_bin"].float().cpu().numpy())

    def on_validation_epoch_end(self) -> None:
        scores = []
        for acc in self._val.values():
            tt = self.targets["bin"]
            pred = tt.inverse(np.concatenate(acc["pred"]))
            true = tt.inverse(np.concatenate(acc["true"]))
            scores.append(evaluate(true, pred)["pcc_gene"])
        self._val = {}
        if scores:
            score = float(np.nanmean(scores)) if np.isfinite(scores).any() else 0.0
            self.log("val/pcc_gene", score, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> Any:
        lr = self.cfg.base_lr
        if self.cfg.optimizer == "sgd":
            opt = torch.optim.SGD(
                self.parameters(), lr=lr, momentum=0.9, weight_decay=self.cfg.weight_decay
            )
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=self.cfg.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if self.cfg.optimizer == "sgd":  # the paper's polynomial decay, power 0.9, per step
            lam = lambda it: max(0.0, 1 - it / total) ** 0.9  # noqa: E731
        else:
            lam = lambda it: 0.5 * (1 + math.cos(math.pi * min(it, total) / total))  # noqa: E731
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lam)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# -- fit, save, load, predict ----------------------------------------------------------------


def build_model_config(ds: Dataset, cfg: TrainConfig, n_genes: int, slide: str) -> MagNetConfig:
    from magnet_st.features import load_features

    dims = {}
    levels = ["spot", "region"] + (["bin"] if cfg.bin_encoder == "frozen" else [])
    for lv in levels:
        dims[lv] = int(load_features(ds.path, cfg.features, slide, lv).shape[1])
    return MagNetConfig(
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
        context_gate=cfg.variant != "paper",
        readout="mean" if cfg.variant == "paper" else "bin",
    )


@dataclass
class FitResult:
    model_path: Path
    best_score: float | None
    epochs_run: int
    seconds: float
    history: list[dict[str, float]]


class _History(L.Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        row = {"epoch": int(trainer.current_epoch)}
        row.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        self.rows.append(row)


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
) -> FitResult:
    """Train on ``train_slides``, choose the checkpoint on ``val_slides`` (PCC-gene of the
    bins; without validation slides, the last epoch), and write ``out/model.pt``."""
    import time

    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    t0 = time.perf_counter()
    if not log.isEnabledFor(logging.INFO):  # Lightning's own INFO chatter only with -v
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    genes = genes or ds.panel
    targets = targets or ds.target_transforms
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    bin_feats = cfg.bin_encoder == "frozen"
    train = [
        slide_arrays(ds, s, cfg.features, genes=genes, bin_features=bin_feats) for s in train_slides
    ]
    val = [
        slide_arrays(ds, s, cfg.features, genes=genes, bin_features=bin_feats) for s in val_slides
    ]
    reader = None
    if not bin_feats:
        images = {s: ds.image(s) for s in train_slides + val_slides}
        reader = PatchReader(images, ds.patch_um("bin"), ds.patch_px("bin"), cfg.seed)
    mcfg = build_model_config(ds, cfg, len(genes), train_slides[0])
    module = MagNetModule(
        mcfg.to_dict(), cfg.to_dict(), {k: v.to_dict() for k, v in targets.items()}
    )
    if resume is None:
        init_head_bias(module.model, train, targets)
    data = SpatialDataModule(train, val, cfg, targets, reader)
    history = _History()
    callbacks: list[L.Callback] = [history]
    ckpt = None
    if val:
        ckpt = ModelCheckpoint(
            dirpath=out / "checkpoints",
            monitor="val/pcc_gene",
            mode="max",
            save_last=True,
            filename="best-{epoch}",
        )
        callbacks += [ckpt, EarlyStopping("val/pcc_gene", mode="max", patience=cfg.patience)]
    else:
        ckpt = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True)
        callbacks.append(ckpt)
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        precision=cfg.precision,
        callbacks=callbacks,
        deterministic=True,
        logger=L.pytorch.loggers.CSVLogger(out, name="logs", version=""),
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=(cfg.max_batches or 1.0) if val else 0,
        limit_train_batches=cfg.max_batches or 1.0,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None)
    best_path = ckpt.best_model_path if val and ckpt.best_model_path else ckpt.last_model_path
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
        )
        write_text(out / "history.json", json.dumps(history.rows, indent=1))
    score = ckpt.best_model_score
    return FitResult(
        model_path=out / "model.pt",
        best_score=None if score is None else float(score),
        epochs_run=int(trainer.current_epoch),
        seconds=time.perf_counter() - t0,
        history=history.rows,
    )


def target_mean(tt: TargetTransform, counts: list, chunk: int = 20_000) -> np.ndarray:
    """Mean target per gene over the rows of ``counts`` (in chunks: bounded memory)."""
    total, n = 0.0, 0
    for c in counts:
        for i in range(0, c.shape[0], chunk):
            y = tt.transform(c[i : i + chunk])
            total = total + y.sum(axis=0, dtype=np.float64)
            n += y.shape[0]
    return (total / max(n, 1)).astype(np.float32)


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


def save_model(
    path: Path,
    module: MagNetModule,
    *,
    genes: list[str],
    gene_names: list[str],
    ds: Dataset,
    features: str,
) -> None:
    """Everything prediction needs, as tensors and plain types (loads with weights_only)."""
    from magnet_st.atomic import atomic_path
    from magnet_st.features import resolve_feature_set

    hp = module.hparams
    payload = {
        "format": MODEL_FORMAT,
        "format_version": 1,
        "model_config": dict(hp["model_config"]),
        "train_config": dict(hp["train_config"]),
        "targets": dict(hp["targets"]),
        "genes": list(genes),
        "gene_names": list(gene_names),
        "dataset_config": dict(ds.config),
        "units": _units(ds),
        "features": json.loads(json.dumps(resolve_feature_set(ds.path, features), default=str)),
        "state_dict": {k: v.detach().cpu() for k, v in module.model.state_dict().items()},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _units(ds: Dataset) -> dict[str, Any]:
    """The target units the model was trained on (size, technology) and the scans' mpp."""
    metas = [ds.slide_meta(s) for s in ds.slides]
    return {
        "unit_size_um": float(metas[0]["unit_size_um"]),
        "technology": str(metas[0]["technology"]),
        "microns_per_pixel": sorted({float(m["microns_per_pixel"]) for m in metas}),
    }


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The model (eval mode) and the rest of the model file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "model file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign files
        raise InputError(path, f"not a magnet-st model file ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise InputError(path, "not a magnet-st model file")
    model = create_model(payload["model_config"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, payload


@torch.inference_mode()
def predict_slide(
    model: torch.nn.Module,
    slide: SlideArrays,
    payload: dict,
    *,
    patch_reader: PatchReader | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Predictions on the log1p scale for every bin, spot tile and region tile of a slide.

    Tiles seen by several batches (as context) get the mean of their predictions. Memory:
    the outputs plus one batch (a block of region tiles).
    """
    from tqdm.auto import tqdm

    tcfg = TrainConfig(**payload["train_config"])
    targets = {lv: TargetTransform.from_dict(d) for lv, d in payload["targets"].items()}
    data = BlockDataset(
        [slide],
        block=tcfg.block,
        k=tcfg.k,
        context_tokens=tcfg.context_tokens,
        with_context=tcfg.variant != "no_context",
        with_targets=False,
        patch_reader=patch_reader,
    )
    model = model.to(device).eval()
    g = len(payload["genes"])
    sums = {
        "bin": np.zeros((slide.n_bins, g), np.float32),
        "spot": np.zeros((len(slide.spot_pos), g), np.float32),
        "region": np.zeros((len(slide.region_pos), g), np.float32),
    }
    counts = {k: np.zeros(len(v), np.float32) for k, v in sums.items()}
    for i in tqdm(
        range(len(data)), desc=f"predict {slide.name}", unit="block", disable=not progress
    ):
        batch = {k: v.to(device) for k, v in data[i].items()}
        out = model(batch)
        for lv, pred in out.items():
            idx = batch[f"{lv}_index"].cpu().numpy()
            np.add.at(sums[lv], idx, pred.float().cpu().numpy())
            np.add.at(counts[lv], idx, 1)
    result = {}
    for lv in out:
        seen = counts[lv] > 0
        mean = sums[lv]  # in place: no second copy of the largest array
        mean[seen] /= counts[lv][seen, None]
        # log1p of a count is never negative
        result[lv] = np.maximum(targets[lv].inverse(mean), 0).astype(np.float32, copy=False)
    return result
