"""paper: the MagNet paper's five neural baselines (ST-Net, HisToGene, Hist2ST, BLEEP, EGN)
on frozen features: their networks and how each is fed. The training loop they share is
:class:`magnet_st.evaluate.baselines.neural.NeuralBaseline`; the module docstring there
says what each simplifies."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from magnet_st.evaluate.baselines.neural import NeuralBaseline, _LevelData

log = logging.getLogger(__name__)


# -- networks -----------------------------------------------------------------------------
class _ProjectionHead(nn.Module):
    """BLEEP's projection head: linear, GELU, linear, dropout, residual, layer norm."""

    def __init__(self, dim: int, out: int, dropout: float = 0.1):
        super().__init__()
        self.project = nn.Linear(dim, out)
        self.fc = nn.Linear(out, out)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.project(x)
        return self.norm(p + self.drop(self.fc(F.gelu(p))))


class _STNetNet(nn.Module):
    def __init__(self, dim: int, genes: int, width: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, width), nn.ReLU(), nn.Dropout(0.1), nn.Linear(width, genes)
        )

    @property
    def out(self) -> nn.Linear:
        return self.mlp[-1]

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.mlp(b["x"])


class _HisToGeneNet(nn.Module):
    def __init__(self, dim: int, genes: int, width: int, block: int, depth: int = 4):
        super().__init__()
        self.embed = nn.Linear(dim, width)
        self.row = nn.Embedding(block, width)
        self.col = nn.Embedding(block, width)
        layer = nn.TransformerEncoderLayer(
            width, 8, 2 * width, dropout=0.1, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, genes))

    @property
    def out(self) -> nn.Linear:
        return self.head[-1]

    def tokens(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.embed(b["x"]) + self.row(b["pos"][..., 0]) + self.col(b["pos"][..., 1])
        return self.encoder(h, src_key_padding_mask=~b["mask"])

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.tokens(b))


class _Hist2STNet(_HisToGeneNet):
    def __init__(self, dim: int, genes: int, width: int, block: int):
        super().__init__(dim, genes, width, block, depth=2)
        from torch_geometric.nn import SAGEConv

        self.graph = nn.ModuleList([SAGEConv(width, width), SAGEConv(width, width)])
        self.head = nn.Sequential(nn.LayerNorm(2 * width), nn.Linear(2 * width, genes))

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.tokens(b)
        flat = h[b["mask"]]
        g = flat
        for conv in self.graph:
            g = F.relu(conv(g, b["edges"]))
        out = h.new_zeros((*h.shape[:2], 2 * h.shape[-1]))
        out[b["mask"]] = torch.cat([flat, g], dim=1)
        return self.head(out)


class _BLEEPNet(nn.Module):
    def __init__(self, dim: int, genes: int, width: int):
        super().__init__()
        self.image = _ProjectionHead(dim, width)
        self.expression = _ProjectionHead(genes, width)

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.image(b["x"])


class _EGNNet(nn.Module):
    def __init__(self, dim: int, genes: int, width: int, depth: int = 2):
        super().__init__()
        self.query = nn.Linear(dim, width)
        self.ex_image = nn.Linear(dim, width)
        self.ex_expression = nn.Linear(genes, width)
        self.attn = nn.ModuleList(
            [nn.MultiheadAttention(width, 4, dropout=0.1, batch_first=True) for _ in range(depth)]
        )
        self.ff = nn.ModuleList(
            [
                nn.Sequential(
                    nn.LayerNorm(width),
                    nn.Linear(width, 2 * width),
                    nn.GELU(),
                    nn.Linear(2 * width, width),
                )
                for _ in range(depth)
            ]
        )
        self.norm = nn.ModuleList([nn.LayerNorm(width) for _ in range(depth)])
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, genes))

    @property
    def out(self) -> nn.Linear:
        return self.head[-1]

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        q = self.query(b["x"])[:, None]
        kv = self.ex_image(b["ex_x"]) + self.ex_expression(b["ex_y"])
        for attn, ff, norm in zip(self.attn, self.ff, self.norm, strict=True):
            q = q + attn(norm(q), kv, kv, need_weights=False)[0]
            q = q + ff(q)
        return self.head(q[:, 0])


class STNet(NeuralBaseline):
    """ST-Net (He et al., Nature Biomedical Engineering 2020): an ImageNet DenseNet-121,
    fine-tuned, whose last layer regresses the expression of each spot from its patch.

    Here: the frozen features (module docstring: why), a hidden layer (ReLU, dropout)
    standing in for the top of the network that ST-Net fine-tunes and that frozen features
    cannot adapt, and a linear output; MSE on log1p. One patch in, one profile out: no
    neighbours, no context.
    """

    name = "stnet"

    def build(self, dim: int, genes: int) -> nn.Module:
        return _STNetNet(dim, genes, self.cfg.width)


class HisToGene(NeuralBaseline):
    """HisToGene (Pang et al., bioRxiv 2021): a vision transformer over all the spots of a
    slide, each token a linearly embedded patch plus learned embeddings of its x and y
    positions; MSE on the expression.

    Here: tokens are the frozen features of the units of one ``block x block`` block (the
    position embeddings index the unit's place in its block: a whole HD slide is too long a
    sequence), 4 pre-norm layers of 8 heads rather than 8 of 16, width ``width`` rather than
    1024 (the tokens are already an encoder's features, not raw pixels, and the default
    must train on a CPU). No super-resolution or test-time augmentation (neither changes the
    per-unit prediction scored here).
    """

    name = "histogene"
    sequence = True

    def build(self, dim: int, genes: int) -> nn.Module:
        return _HisToGeneNet(dim, genes, self.cfg.width, self.cfg.block)


class His2ST(NeuralBaseline):
    """Hist2ST (Zeng et al., Briefings in Bioinformatics 2022; "His2ST" in the MagNet
    paper): a ConvMixer per patch, a transformer across the spots of a slide, and a graph
    network (GraphSAGE) over the spots' spatial neighbour graph; a ZINB likelihood and
    self-distillation in training.

    Here: the frozen features replace the ConvMixer (module docstring: why); a 2-layer
    transformer over each block (a whole HD slide is too long a sequence) with position
    embeddings; two GraphSAGE layers on the 4-nearest-neighbour graph of the block's units;
    transformer and graph outputs concatenated into a linear head (a plain jumping-knowledge
    readout; Hist2ST's runs an LSTM over its graph layers' outputs). Depths are smaller
    than the paper's (8 attention, 4 graph layers), for the same CPU budget as HisToGene.
    The loss is Hist2ST's main term, MSE, here on log1p; its optional ZINB term on the raw
    counts and the self-distillation over augmented copies of the patches are left out
    (every model here is scored on log1p, and frozen features have no augmented copies).
    """

    name = "his2st"
    sequence = True

    def build(self, dim: int, genes: int) -> nn.Module:
        return _Hist2STNet(dim, genes, self.cfg.width, self.cfg.block)


class BLEEP(NeuralBaseline):
    """BLEEP (Xie et al., NeurIPS 2023): contrastive image-expression pretraining. An image
    encoder and an expression encoder project into a joint space, trained with a CLIP-style
    loss whose targets are softened by the within-modality similarities; a test patch's
    expression is the average of the ``neighbours`` training profiles whose expression
    embeddings are closest to its image embedding.

    Here: the image branch is BLEEP's projection head on the frozen features (BLEEP trains a
    ResNet-50; module docstring: why); the expression branch, the loss (temperature 1) and
    the retrieval (cosine similarity, the mean of the top ``neighbours`` profiles) are
    BLEEP's. The reference is a random sample of at most ``bank`` units of the training
    slides only (validation and test slides never enter it), to bound memory and the
    similarity matrix on HD slides; BLEEP uses every training spot.
    """

    name = "bleep"
    uses_bank = True
    temperature = 1.0

    def build(self, dim: int, genes: int) -> nn.Module:
        return _BLEEPNet(dim, genes, self.cfg.width)

    def loss(self, net: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        img, expr = net.image(b["x"]), net.expression(b["y"])
        logits = expr @ img.T / self.temperature
        soft = ((img @ img.T + expr @ expr.T) / 2) / self.temperature
        targets = F.softmax(soft, dim=-1)
        expr_loss = -(targets * F.log_softmax(logits, dim=-1)).sum(1)
        img_loss = -(targets.T * F.log_softmax(logits.T, dim=-1)).sum(1)
        return (expr_loss + img_loss).mean() / 2

    @torch.no_grad()
    def _predict(self, d: _LevelData, level: str) -> np.ndarray:
        net = self.nets[level]
        was = net.training
        net.eval()
        # BLEEP matches L2-normalised embeddings (cosine similarity)
        self._reference = F.normalize(net.expression(torch.from_numpy(self.banks[level].y)), dim=1)
        net.train(was)
        return super()._predict(d, level)

    def predict_batch(self, net: nn.Module, b: dict[str, torch.Tensor], level: str) -> torch.Tensor:
        bank = self.banks[level]
        sim = F.normalize(net.image(b["x"]), dim=1) @ self._reference.T
        top = sim.topk(min(self.cfg.neighbours, len(bank.y)), dim=1).indices
        return torch.from_numpy(bank.y)[top].mean(1)


class EGN(NeuralBaseline):
    """EGN (Yang et al., WACV 2023): exemplar-guided prediction. For each patch, the most
    similar training patches (the exemplars) are retrieved in an unsupervised image
    representation; a ViT backbone with exemplar-bridging blocks lets the patch attend to the
    exemplars' features and expression, and a head predicts its expression.

    Here: exemplars are the ``exemplars`` nearest units of a random sample of at most
    ``bank`` training units (training slides only) by cosine similarity of the frozen
    features' first ``retrieval_dim`` PCA components, never the unit itself during training
    (EGN retrieves with a StyleGAN encoder trained on the slides' patches: training a GAN is
    out of this project's budget, and PCA of the same frozen features is an unsupervised
    representation at hand). The patch's frozen feature is one query token (EGN: a ViT over
    the patch's pixels, replaced as every encoder here) attending, over 2 pre-norm layers,
    to exemplar tokens that sum a projection of each exemplar's features and of its log1p
    expression (EGN's exemplar-bridging blocks, reduced to cross-attention); MSE on log1p.
    """

    name = "egn"
    uses_bank = True

    def extend_batch(self, b: dict[str, torch.Tensor], level: str, ids: np.ndarray | None) -> None:
        bank = self.banks[level]
        ex = bank.nearest(b["x"].numpy(), self.cfg.exemplars, exclude=ids)
        b["ex_x"] = torch.from_numpy(bank.x[ex])
        b["ex_y"] = torch.from_numpy(bank.y[ex])

    def build(self, dim: int, genes: int) -> nn.Module:
        return _EGNNet(dim, genes, self.cfg.width)


NEURAL_BASELINES: dict[str, type[NeuralBaseline]] = {
    m.name: m for m in (STNet, HisToGene, His2ST, BLEEP, EGN)
}
