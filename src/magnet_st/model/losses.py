"""MagNet's training losses (weights from the published code).

    L = w_mse * MSE(bin) + w_pcc * (1 - PCC(bin))
      + w_ctx * [(1 - PCC(spot)) + (1 - PCC(region))]
      + w_cons * consistency
      + w_ctx_mse * [MSE(spot) + MSE(region)]
      + w_poisson * [Poisson NLL of the rate heads]     (consistency "aggregate" only)

``context_mse`` is not in the paper (0.75 by default, as the bin MSE; 0 with ``--variant
paper``): without it the coarse heads are trained by PCC terms only, so their scale is
free, and the paper's consistency term pulls each coarse prediction towards its bins'
truth (a bin holds ~1/49 of a spot tile's counts). Measured (docs/results.md): without it
MagNet's spot and region MSE was twice the mean profile's (synthetic HD: 2.79 vs 1.41 and
8.17 vs 2.28; her2st: 0.57 vs 0.42 and 1.71 vs 0.80); with it, 1.13 and 2.06, 0.31 and
0.41, and the coarse PCC-gene rose (her2st 0.325 to 0.358 and 0.541 to 0.595) while the
bin's stayed (her2st 0.208 both; synthetic 0.172 to 0.166, one fold spread).

PCC: per row (per unit or tile, across genes) as in the published code (``pcc_axis=
"unit"``, ``--variant paper``), or per gene across the units of the batch (``pcc_axis=
"gene"``, the training default), the axis of the field's PCC-gene metric, which
checkpoints and reports use; it raised bin PCC-gene from 0.236 to 0.274 on the demo's
synthetic slides (docs/results.md). The per-unit form is
dominated by the genes' different mean levels (a constant mean profile scores high on it).

Consistency (``"none"`` switches it off):

- ``"paper"`` (default, as the published code): each coarse prediction looked up per bin,
  against that bin's true expression (MSE). It trains only the coarse branches (the bin
  predictions get no gradient from it); since their layer outputs are fused into the bin
  prediction, it shapes the context the bins receive.
- ``"aggregate"``: the levels must agree on expected counts. The model has rate heads
  (softplus, expected counts per unit) at every level, trained with a Poisson term on the
  counts; each coarse tile's rate is compared with the sum of its bins' rates,
  ``(log1p(rate_tile) - log1p(sum rate_bins))^2`` over tiles whose bins are all in the
  batch. Expected counts add up exactly (E[sum X] = sum E[X] for any distribution), so a
  correct model scores 0. The earlier form, ``log1p(sum(expm1(bin log1p predictions)))``
  against the coarse log1p prediction, was biased: a head trained with MSE on log1p
  converges to E[log1p X], which by Jensen's inequality aggregates below the tile's truth
  (for 49 Poisson bins by 0.20 / 0.27 / 0.24 / 0.14 log1p units at rates 0.1 / 0.3 / 1 /
  3 per bin), so it pulled correct predictions away (tests/test_metrics_losses.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from magnet_st.registry import LOSS_WEIGHTS

CONSISTENCY_FORMS = ("aggregate", "paper", "none")
PCC_AXES = ("unit", "gene")


@dataclass
class LossWeights:
    """The weight of each loss term; defaults: :data:`magnet_st.registry.LOSS_WEIGHTS`."""

    mse: float = LOSS_WEIGHTS["mse"]
    pcc: float = LOSS_WEIGHTS["pcc"]
    context_pcc: float = LOSS_WEIGHTS["context_pcc"]
    consistency: float = LOSS_WEIGHTS["consistency"]
    context_mse: float = LOSS_WEIGHTS["context_mse"]  # ours, not the paper's
    poisson: float = LOSS_WEIGHTS["poisson"]


def pcc_rows(pred: torch.Tensor, true: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean Pearson r over rows (each row across its columns)."""
    if pred.shape[0] == 0:
        return pred.new_zeros(())
    p = pred - pred.mean(dim=1, keepdim=True)
    t = true - true.mean(dim=1, keepdim=True)
    r = (p * t).sum(dim=1) / (p.norm(dim=1) * t.norm(dim=1) + eps)
    return r.mean()


def pcc(pred: torch.Tensor, true: torch.Tensor, axis: str = "gene") -> torch.Tensor:
    """Mean Pearson r per unit across genes (``"unit"``) or per gene across units
    (``"gene"``; a gene constant in the batch contributes r = 0)."""
    if axis not in PCC_AXES:
        raise ValueError(f"pcc axis must be one of {PCC_AXES}, got {axis!r}")
    if axis == "gene":
        if pred.shape[0] < 2:
            return pred.new_zeros(())
        return pcc_rows(pred.T, true.T)
    return pcc_rows(pred, true)


def aggregate_bins(bin_log1p: torch.Tensor, member_of: torch.Tensor, n_tiles: int) -> torch.Tensor:
    """``log1p`` of the summed ``expm1`` of bin predictions per tile (log1p scale in and out)."""
    counts = torch.expm1(bin_log1p.clamp(max=20.0)).clamp(min=0.0)
    total = counts.new_zeros((n_tiles, counts.shape[1]))
    total.index_add_(0, member_of, counts)
    return torch.log1p(total)


def sum_rates(bin_rate: torch.Tensor, member_of: torch.Tensor, n_tiles: int) -> torch.Tensor:
    """Expected counts per tile: the sum of its bins' expected counts."""
    total = bin_rate.new_zeros((n_tiles, bin_rate.shape[1]))
    return total.index_add(0, member_of, bin_rate)


def rate_consistency(
    tile_rate: torch.Tensor, bin_rate: torch.Tensor, member_of: torch.Tensor, done: torch.Tensor
) -> torch.Tensor:
    """Mean squared log1p gap between each complete tile's rate and its bins' summed rates."""
    if not bool(done.any()):
        return tile_rate.new_zeros(())
    summed = sum_rates(bin_rate, member_of, tile_rate.shape[0])
    return F.mse_loss(torch.log1p(tile_rate[done]), torch.log1p(summed[done]))


def _counts(y_log1p: torch.Tensor) -> torch.Tensor:
    """Integer counts back from log1p targets."""
    return torch.expm1(y_log1p.float()).round().clamp(min=0.0)


def magnet_loss(
    out: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    weights: LossWeights,
    consistency: str = "paper",
    to_log1p: dict[str, callable] | None = None,
    pcc_axis: str = "gene",
) -> dict[str, torch.Tensor]:
    """The total loss and its parts.

    ``out``: ``bin``, ``spot``, ``region`` predictions (target scale), and with the
    ``"aggregate"`` consistency ``rate_bin``, ``rate_spot``, ``rate_region`` (expected
    counts, > 0). ``batch``: ``y_bin``, ``y_spot``, ``y_region`` targets; ``bin_spot``,
    ``bin_region`` (each bin's tile index within the batch); ``spot_complete``,
    ``region_complete`` (bool: every member in the batch). ``to_log1p`` maps each level's
    target scale to log1p (identity by default). ``pcc_axis``: see :func:`pcc`.
    """
    if consistency not in CONSISTENCY_FORMS:
        raise ValueError(f"consistency must be one of {CONSISTENCY_FORMS}")
    ident = {lv: (lambda x: x) for lv in ("bin", "spot", "region")}
    to_log1p = to_log1p or ident
    parts: dict[str, torch.Tensor] = {}
    parts["mse"] = F.mse_loss(out["bin"], batch["y_bin"])
    parts["pcc"] = 1 - pcc(out["bin"], batch["y_bin"], pcc_axis)
    total = weights.mse * parts["mse"] + weights.pcc * parts["pcc"]
    for lv in ("spot", "region"):
        if lv in out:
            parts[f"pcc_{lv}"] = 1 - pcc(out[lv], batch[f"y_{lv}"], pcc_axis)
            total = total + weights.context_pcc * parts[f"pcc_{lv}"]
            if weights.context_mse:
                parts[f"mse_{lv}"] = F.mse_loss(out[lv], batch[f"y_{lv}"])
                total = total + weights.context_mse * parts[f"mse_{lv}"]
    coarse = [lv for lv in ("spot", "region") if lv in out]
    if consistency == "aggregate" and coarse:
        missing = [f"rate_{lv}" for lv in ("bin", *coarse) if f"rate_{lv}" not in out]
        if missing:
            raise ValueError(f"the 'aggregate' consistency needs the model's rate heads {missing}")
        pois = out["rate_bin"].new_zeros(())
        for lv in ("bin", *coarse):
            counts = _counts(to_log1p[lv](batch[f"y_{lv}"]))
            pois = pois + F.poisson_nll_loss(out[f"rate_{lv}"], counts, log_input=False)
        parts["poisson"] = pois
        total = total + weights.poisson * pois
    if consistency != "none" and coarse:
        cons = out["bin"].new_zeros(())
        for lv in coarse:
            member = batch[f"bin_{lv}"]
            if consistency == "paper":
                cons = cons + F.mse_loss(out[lv][member], batch["y_bin"])
            else:
                cons = cons + rate_consistency(
                    out[f"rate_{lv}"], out["rate_bin"], member, batch[f"{lv}_complete"]
                )
        parts["consistency"] = cons
        total = total + weights.consistency * cons
    parts["loss"] = total
    return parts
