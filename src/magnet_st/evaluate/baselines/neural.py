"""The MagNet paper's neural baselines, reimplemented on frozen image features.

Every model here reads the same cached features as the ridge baseline and MagNet's
context branches (``magnet features``), one network per level (bins, spot tiles, region
tiles), trained on a fold's training slides with AdamW, early-stopped on its validation
slide by PCC-gene, and predicts log1p expression of the fold's gene panel.

The common simplification, and why: the published models train their image encoders
(DenseNet-121, ViT, ResNet-50 ...) end to end on raw patches. On the CPU machines this
project is tested on, and for an honest comparison in which every model sees the same
image representation, they start here from the frozen features of one encoder; what is
compared is what each model builds on top of them (a head, a transformer over
neighbouring units, a graph, contrastive retrieval, exemplars). Each class says what else
was simplified.

Sequence and graph models (HisToGene, Hist2ST) see blocks of ``block x block``
neighbouring units rather than a whole slide: a whole Visium HD slide is 660k bins, too
long for one attention sequence.

One addition to every regression head (ST-Net, HisToGene, Hist2ST, EGN): its output bias
starts at the training units' mean log1p profile, so that each network starts near the
mean-profile baseline's prediction. The published models start from PyTorch's default
initialisation (outputs near zero); with the few steps per epoch of the spot and region
levels (a slide has tens to hundreds of tiles, whose log1p values are 4-8) they would
still be climbing to the log1p scale when early stopping on PCC-gene ends training, and
their MSE and MAE would measure that rather than the model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from magnet_st.data.dataset import Dataset
from magnet_st.data.graph import knn_edges
from magnet_st.data.levels import LEVELS
from magnet_st.errors import ConfigError, InputError
from magnet_st.model.metrics import chosen_epochs, pcc_per_gene

log = logging.getLogger(__name__)

FORMAT = "magnet-st-baseline"


@dataclass
class BaselineConfig:
    """Training settings shared by the neural baselines (defaults in parentheses)."""

    width: int = 256  #: hidden width
    epochs: int = 30  #: most epochs per level
    patience: int = 5  #: epochs without a better validation PCC-gene before stopping
    lr: float = 1e-3  #: AdamW learning rate
    weight_decay: float = 1e-4
    batch_size: int = 256  #: units per step (unit models)
    block: int = 16  #: sequence models: a block is block x block neighbouring units
    blocks_per_batch: int = 4
    exemplars: int = 8  #: EGN: exemplars per unit
    neighbours: int = 50  #: BLEEP: retrieved expression profiles averaged (paper: 50)
    bank: int = 20_000  #: most training units kept as the retrieval reference
    retrieval_dim: int = 64  #: EGN: PCA components of the features used to find exemplars
    seed: int = 0
    max_batches: int | None = None  #: at most this many steps per epoch (smoke runs)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("seed", "max_batches", "lr", "weight_decay"):
                continue
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"baseline setting {f.name} must be an integer >= 1, got {v!r}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ConfigError("baseline settings: lr must be > 0 and weight_decay >= 0")
        if self.width % 8:  # HisToGene / His2ST attend with 8 heads, EGN with 4
            raise ConfigError(f"baseline setting width must be a multiple of 8, got {self.width}")


# -- data ---------------------------------------------------------------------------------
class _LevelData:
    """One level of one slide: features (memory-mapped), grid positions, log1p targets."""

    def __init__(self, ds: Dataset, features: str, slide: str, level: str, genes: list[str] | None):
        from magnet_st.features.store import load_features

        self.slide = slide
        self.x = load_features(ds.path, features, slide, level, mmap=True)
        obs = ds.level(slide, level).obs
        cols = ["array_row", "array_col"] if level == "bin" else ["tile_row", "tile_col"]
        if not set(cols) <= set(obs.columns):
            raise InputError(ds.path, f"slide {slide} {level}: obs lacks {cols}")
        self.grid = obs[cols].to_numpy(np.int64)
        self.y = None if genes is None else ds.counts(slide, level, genes).astype(np.float32)
        self.n = len(self.grid)

    def features(self, idx: np.ndarray, norm: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        return ((np.asarray(self.x[idx], dtype=np.float32) - norm[0]) / norm[1]).astype(np.float32)

    def targets(self, idx: np.ndarray) -> np.ndarray:
        return np.log1p(self.y[idx].toarray())

    def blocks(self, size: int) -> list[np.ndarray]:
        """Indices of the units of each ``size x size`` block of the grid."""
        key = self.grid // size
        _, inv = np.unique(key, axis=0, return_inverse=True)
        order = np.argsort(inv.ravel(), kind="stable")
        cuts = np.flatnonzero(np.diff(inv.ravel()[order])) + 1
        return np.split(order, cuts)


def _feature_norm(data: list[_LevelData], chunk: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    dim = data[0].x.shape[1]
    s1, s2, n = np.zeros(dim), np.zeros(dim), 0
    for d in data:
        for a in range(0, d.n, chunk):
            x = np.asarray(d.x[a : a + chunk], dtype=np.float64)
            s1 += x.sum(0)
            s2 += (x * x).sum(0)
            n += len(x)
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
    std[std == 0] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def _target_mean(data: list[_LevelData]) -> np.ndarray:
    """Each gene's mean log1p expression over the units of ``data`` (the mean profile)."""
    total = sum(np.asarray(d.y.log1p().sum(0), np.float64).ravel() for d in data)
    return (total / max(sum(d.n for d in data), 1)).astype(np.float32)


class _Bank:
    """Training units kept as a retrieval reference (a bounded random sample)."""

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        ids: np.ndarray,
        dim: int,
        basis: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        self.x = x.astype(np.float32)  # normalised features
        self.y = y.astype(np.float32)  # log1p expression
        self.ids = ids.astype(np.int64)  # slide * 2**40 + row: to skip a unit's own entry
        if basis is None:  # fitted here; a loaded bank brings the basis it was fitted with
            center = self.x.mean(0)
            _, _, vt = np.linalg.svd(self.x - center, full_matrices=False)
            basis = center, vt[: min(dim, len(vt))].T
        self.center = np.asarray(basis[0], np.float32)
        self.components = np.asarray(basis[1], np.float32)
        self.reduced = self._reduce(self.x)

    def _reduce(self, x: np.ndarray) -> np.ndarray:
        r = (x - self.center) @ self.components
        return r / (np.linalg.norm(r, axis=1, keepdims=True) + 1e-8)

    def nearest(self, x: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
        """Indices of the ``k`` bank units most similar (cosine, PCA space) to each row."""
        sim = self._reduce(x) @ self.reduced.T
        if exclude is not None:
            sim[exclude[:, None] == self.ids[None, :]] = -np.inf
        k = min(k, sim.shape[1])
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        return np.take_along_axis(top, np.argsort(-np.take_along_axis(sim, top, 1), 1), 1)

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {
            "x": torch.from_numpy(self.x),
            "y": torch.from_numpy(self.y),
            "ids": torch.from_numpy(self.ids),
            "center": torch.from_numpy(self.center),
            "components": torch.from_numpy(self.components),
        }

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor], dim: int) -> _Bank:
        # the saved PCA basis, not a new SVD: another LAPACK or thread count could rotate a
        # near-degenerate basis and change which exemplars a unit retrieves
        basis = (d["center"].numpy(), d["components"].numpy()) if "center" in d else None
        return cls(d["x"].numpy(), d["y"].numpy(), d["ids"].numpy(), dim, basis)


# -- the baselines ------------------------------------------------------------------------
class NeuralBaseline:
    """Shared training, prediction and checkpoint code; subclasses name a network."""

    name = ""
    sequence = False  # batches are blocks of neighbouring units
    uses_bank = False  # keeps training units as a retrieval reference
    filename = "model.pt"

    def __init__(self, features: str, config: BaselineConfig | None = None, **settings: Any):
        self.features = features
        self.cfg = config or BaselineConfig(**settings)
        self.genes: list[str] = []
        self.nets: dict[str, nn.Module] = {}
        self.norms: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.banks: dict[str, _Bank] = {}
        self.history: dict[str, list[dict[str, float]]] = {}
        self.chosen_epochs: dict[str, int] = {}  # per level, when refitted

    # what a subclass provides
    def build(self, dim: int, genes: int) -> nn.Module:
        raise NotImplementedError

    def loss(self, net: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        pred = net(b)
        if self.sequence:
            return F.mse_loss(pred[b["mask"]], b["y"][b["mask"]])
        return F.mse_loss(pred, b["y"])

    def predict_batch(self, net: nn.Module, b: dict[str, torch.Tensor], level: str) -> torch.Tensor:
        pred = net(b)
        return pred[b["mask"]] if self.sequence else pred

    def extend_batch(self, b: dict[str, torch.Tensor], level: str, ids: np.ndarray | None) -> None:
        """Add what the network needs beyond features (``ids``: the units' bank ids in
        training, so that a unit never retrieves itself; None otherwise)."""

    # batches
    def _batches(
        self,
        data: list[_LevelData],
        level: str,
        rng: np.random.Generator | None,
        with_targets: bool,
        training: bool = False,
    ) -> Iterator[tuple[dict[str, torch.Tensor], int, np.ndarray]]:
        """``(batch, slide index, unit rows)``; shuffled when ``rng`` is given."""
        norm = self.norms[level]
        groups: list[tuple[int, list[np.ndarray]]] = []
        for i, d in enumerate(data):
            if self.sequence:
                blocks = d.blocks(self.cfg.block)
                if rng is not None:
                    blocks = [blocks[j] for j in rng.permutation(len(blocks))]
                step = self.cfg.blocks_per_batch
                groups += [(i, blocks[a : a + step]) for a in range(0, len(blocks), step)]
            else:
                rows = rng.permutation(d.n) if rng is not None else np.arange(d.n)
                step = self.cfg.batch_size
                groups += [(i, [rows[a : a + step]]) for a in range(0, d.n, step)]
        if rng is not None:
            groups = [groups[j] for j in rng.permutation(len(groups))]
        for i, parts in groups:
            d = data[i]
            rows = np.concatenate(parts)
            if self.sequence:
                yield self._sequence_batch(d, parts, norm, with_targets), i, rows
                continue
            b = {"x": torch.from_numpy(d.features(rows, norm))}
            if with_targets:
                b["y"] = torch.from_numpy(d.targets(rows))
            self.extend_batch(b, level, i * 2**40 + rows if training else None)
            yield b, i, rows

    def _sequence_batch(self, d: _LevelData, parts, norm, with_targets: bool):
        size = self.cfg.block
        length = max(len(p) for p in parts)
        n = len(parts)
        x = np.zeros((n, length, d.x.shape[1]), np.float32)
        pos = np.zeros((n, length, 2), np.int64)
        mask = np.zeros((n, length), bool)
        y = np.zeros((n, length, 0 if d.y is None else d.y.shape[1]), np.float32)
        edges, offset = [], 0
        for j, p in enumerate(parts):
            m = len(p)
            x[j, :m] = d.features(p, norm)
            pos[j, :m] = d.grid[p] % size
            mask[j, :m] = True
            if with_targets:
                y[j, :m] = d.targets(p)
            e, _ = knn_edges(d.grid[p].astype(np.float64), k=4)
            edges.append(e + offset)
            offset += m
        b = {
            "x": torch.from_numpy(x),
            "pos": torch.from_numpy(pos),
            "mask": torch.from_numpy(mask),
            "edges": torch.from_numpy(np.concatenate(edges, axis=1)),
        }
        if with_targets:
            b["y"] = torch.from_numpy(y)
        return b

    # fitting
    def fit(
        self,
        ds: Dataset,
        slides: list[str],
        genes: list[str],
        val: list[str] | None = None,
        refit: bool = False,
    ) -> NeuralBaseline:
        """Train one network per level on ``slides``, early-stopped on ``val`` (PCC-gene);
        with ``refit``, trained again from the start on ``slides`` + ``val`` for the number
        of epochs early stopping chose (:attr:`chosen_epochs`; :attr:`history` keeps the
        curves of the choosing run)."""
        if not slides:
            raise ConfigError(f"{self.name}: no training slides")
        self.genes = list(genes)
        for lv in LEVELS:
            train = [_LevelData(ds, self.features, s, lv, genes) for s in slides]
            held = [_LevelData(ds, self.features, s, lv, genes) for s in (val or [])]
            if sum(d.n for d in train) == 0:
                raise InputError(ds.path, f"{self.name}: no {lv} units in the training slides")
            self._fit_level(lv, train, held)
            if refit and held:
                n = chosen_epochs(self.history[lv]) or self.cfg.epochs
                self.chosen_epochs[lv] = n
                self._fit_level(lv, train + held, [], epochs=n)
        return self

    def _fit_level(
        self,
        level: str,
        train: list[_LevelData],
        val: list[_LevelData],
        epochs: int | None = None,
    ) -> None:
        """Train ``level``'s network; given ``epochs`` (a refit), exactly that many, the
        last state kept and the choosing run's history left in place."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        self.norms[level] = _feature_norm(train)
        if self.uses_bank:
            self.banks[level] = self._make_bank(train, level, rng)
        net = self.build(train[0].x.shape[1], len(self.genes))
        out = getattr(net, "out", None)  # regression heads (not BLEEP's retrieval)
        if out is not None:  # start from the mean profile: see the module docstring
            with torch.no_grad():
                out.bias.copy_(torch.from_numpy(_target_mean(train)))
        self.nets[level] = net
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        best, best_state, bad, history = -np.inf, None, 0, []
        for epoch in range(cfg.epochs if epochs is None else epochs):
            t0 = time.perf_counter()
            net.train()
            total, steps = 0.0, 0
            for b, _, _ in self._batches(train, level, rng, with_targets=True, training=True):
                loss = self.loss(net, b)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach())
                steps += 1
                if cfg.max_batches and steps >= cfg.max_batches:
                    break
            rec = {"epoch": epoch, "train/loss": total / max(steps, 1)}
            if val:
                score = float(
                    np.mean(
                        [
                            np.nanmean(
                                pcc_per_gene(d.targets(np.arange(d.n)), self._predict(d, level))
                            )
                            for d in val
                        ]
                    )
                )
                rec["val/pcc_gene"] = score
            else:
                score = -rec["train/loss"]
            rec["seconds"] = time.perf_counter() - t0
            history.append(rec)
            log.info("%s %s epoch %d: %s", self.name, level, epoch, rec)
            if epochs is not None:  # a refit: the last epoch is the model
                best_state = None
                continue
            if score > best:
                best, bad = score, 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                bad += 1
                if bad >= cfg.patience:
                    break
        if best_state is not None:
            net.load_state_dict(best_state)
        net.eval()
        if epochs is None:
            self.history[level] = history

    def _make_bank(self, train: list[_LevelData], level: str, rng: np.random.Generator) -> _Bank:
        sizes = np.array([d.n for d in train])
        total = int(sizes.sum())
        pick = np.sort(rng.choice(total, size=min(total, self.cfg.bank), replace=False))
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        xs, ys, ids = [], [], []
        for i, d in enumerate(train):
            rows = pick[(pick >= offsets[i]) & (pick < offsets[i + 1])] - offsets[i]
            xs.append(d.features(rows, self.norms[level]))
            ys.append(d.targets(rows))
            ids.append(i * 2**40 + rows)
        return _Bank(
            np.concatenate(xs), np.concatenate(ys), np.concatenate(ids), self.cfg.retrieval_dim
        )

    # prediction
    @torch.no_grad()
    def _predict(self, d: _LevelData, level: str) -> np.ndarray:
        net = self.nets[level]
        was = net.training
        net.eval()
        out = np.zeros((d.n, len(self.genes)), np.float32)
        for b, _, rows in self._batches([d], level, None, with_targets=False):
            out[rows] = self.predict_batch(net, b, level).numpy()
        net.train(was)
        return np.maximum(out, 0.0)  # log1p is never negative

    def predict(self, ds: Dataset, slide: str) -> dict[str, np.ndarray]:
        """log1p predictions per level for every unit of ``slide`` (counts are not read)."""
        if not self.nets:
            raise ConfigError(f"{self.name}: predict before fit")
        return {
            lv: self._predict(_LevelData(ds, self.features, slide, lv, None), lv)
            for lv in self.nets
        }

    # checkpoints
    def save(self, path: str | Path) -> None:
        """Weights, settings, gene panel and retrieval bank; loads with ``weights_only``."""
        from magnet_st.util.atomic import atomic_path

        payload = {
            "format": FORMAT,
            "name": self.name,
            "features": self.features,
            "config": asdict(self.cfg),
            "genes": list(self.genes),
            "levels": {
                lv: {
                    "state": net.state_dict(),
                    "mean": torch.from_numpy(self.norms[lv][0]),
                    "std": torch.from_numpy(self.norms[lv][1]),
                    "bank": self.banks[lv].to_dict() if lv in self.banks else {},
                }
                for lv, net in self.nets.items()
            },
        }
        with atomic_path(Path(path)) as tmp:
            torch.save(payload, tmp)

    @classmethod
    def load(cls, path: str | Path) -> NeuralBaseline:
        # the subclasses live in .paper, which imports this module
        from magnet_st.evaluate.baselines.paper import NEURAL_BASELINES
        from magnet_st.util import torchfile

        payload = torchfile.load(path, "baseline checkpoint")
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise InputError(path, "not a magnet-st baseline checkpoint")
        kind = NEURAL_BASELINES.get(payload["name"])
        if kind is None or (cls is not NeuralBaseline and kind is not cls):
            raise InputError(path, f"holds baseline {payload['name']!r}, not {cls.name!r}")
        model = kind(payload["features"], BaselineConfig(**payload["config"]))
        model.genes = list(payload["genes"])
        for lv, p in payload["levels"].items():
            net = model.build(p["mean"].numel(), len(model.genes))
            net.load_state_dict(p["state"])
            net.eval()
            model.nets[lv] = net
            model.norms[lv] = (p["mean"].numpy(), p["std"].numpy())
            if p["bank"]:
                model.banks[lv] = _Bank.from_dict(p["bank"], model.cfg.retrieval_dim)
        return model
