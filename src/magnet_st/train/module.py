"""module: MagNet as a Lightning module (:class:`MagNetModule`: the losses, validation by PCC-
gene, the optimiser), its data (:class:`SpatialDataModule`: spatially ordered batches,
reshuffled each epoch) and the RNG state a resumed run restores."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch

from magnet_st.data.targets import TargetTransform
from magnet_st.model.batching import BlockDataset, SlideArrays
from magnet_st.model.inputs import PatchReader
from magnet_st.model.losses import LossWeights, magnet_loss
from magnet_st.model.magnet import create_model
from magnet_st.model.metrics import GenePearson
from magnet_st.train.config import TrainConfig, TrainingDiverged

log = logging.getLogger(__name__)


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
