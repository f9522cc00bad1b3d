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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from magnet_st.data.dataset import Dataset
from magnet_st.data.targets import TargetTransform, log1p_moments
from magnet_st.errors import ConfigError, InputError
from magnet_st.model.batching import SlideArrays
from magnet_st.model.inputs import PatchReader, model_inputs, model_reader
from magnet_st.model.magnet import MagNetConfig
from magnet_st.predict.modelfile import save_model
from magnet_st.train.config import TrainConfig
from magnet_st.train.module import MagNetModule, SpatialDataModule, _steps
from magnet_st.util.atomic import write_text
from magnet_st.util.lock import locked

log = logging.getLogger(__name__)


# -- data ----------------------------------------------------------------------------------


# -- the LightningModule ---------------------------------------------------------------------


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
    from magnet_st.features.backbones import create_backbone
    from magnet_st.features.dense import DenseConfig
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


# Long: one training start to finish: role/resume/panel checks, inputs and module, callbacks and a
# Trainer (~35 lines of settings), fit, rank-0 save; the checkpoint callbacks are read after fit.
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
    from magnet_st.features.backbones import OFFLINE_IMAGENET

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
    :func:`magnet_st.features.backbones.load_backbone_weights`), the offline ImageNet weights for
    ``efficientnet_lite0_imagenet``, or none (random init). Their checksum goes into the
    model config (``model_config["bin_weights_checksum"]`` of the model file); rebuilding
    the model needs no file, since the trained state dict holds the weights."""
    from magnet_st.features.backbones import load_backbone_weights

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
