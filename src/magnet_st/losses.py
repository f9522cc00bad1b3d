"""MagNet's training losses (weights from the published code; docs/MAGNET.md).

    L = w_mse * MSE(bin) + w_pcc * (1 - PCC(bin))
      + w_ctx * [(1 - PCC(spot)) + (1 - PCC(region))]
      + w_cons * consistency
      + w_ctx_mse * [MSE(spot) + MSE(region)]

The last term is not in the paper (``context_mse`` 0 by default, as the paper): without
it the coarse heads are trained by PCC terms only, so their scale is free and their
spot/region MSE can be worse than the mean profile's. Set it when the spot and region
predictions are used on their own (docs/results.md measures it).

PCC here is per row (per unit or tile, across genes), averaged, as in the code.
Consistency, two forms (``"none"`` switches it off):

- ``"aggregate"``: each coarse prediction against the aggregate of the bin predictions
  inside the same tile (``log1p(sum(expm1(bin)))`` on the log1p scale), over tiles whose
  members are all in the batch, as ``1 - PCC`` per tile across genes. Ties the levels
  without using labels twice. PCC, not MSE: the coarse heads are trained by PCC alone, so
  their scale is free, and an MSE against it pulled the bin predictions off their own
  targets (measured in docs/results.md).
- ``"paper"`` (default): as the published code, each coarse prediction looked up per
  bin, against that bin's true expression (MSE). It trains only the coarse branches (the
  bin predictions get no gradient from it); since their layer outputs are fused into the
  bin prediction, it shapes the context the bins receive. Chosen by measurement: on
  synthetic HD slides it matched no consistency and beat ``"aggregate"``
  (docs/results.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CONSISTENCY_FORMS = ("aggregate", "paper", "none")


@dataclass
class LossWeights:
    mse: float = 0.75
    pcc: float = 0.10
    context_pcc: float = 0.05
    consistency: float = 0.05
    context_mse: float = 0.0


def pcc_rows(pred: torch.Tensor, true: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean Pearson r over rows (each row across its columns)."""
    if pred.shape[0] == 0:
        return pred.new_zeros(())
    p = pred - pred.mean(dim=1, keepdim=True)
    t = true - true.mean(dim=1, keepdim=True)
    r = (p * t).sum(dim=1) / (p.norm(dim=1) * t.norm(dim=1) + eps)
    return r.mean()


def aggregate_bins(bin_log1p: torch.Tensor, member_of: torch.Tensor, n_tiles: int) -> torch.Tensor:
    """``log1p`` of the summed ``expm1`` of bin predictions per tile (log1p scale in and out)."""
    counts = torch.expm1(bin_log1p.clamp(max=20.0)).clamp(min=0.0)
    total = counts.new_zeros((n_tiles, counts.shape[1]))
    total.index_add_(0, member_of, counts)
    return torch.log1p(total)


def magnet_loss(
    out: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    weights: LossWeights,
    consistency: str = "paper",
    to_log1p: dict[str, callable] | None = None,
) -> dict[str, torch.Tensor]:
    """The total loss and its parts.

    ``out``: ``bin``, ``spot``, ``region`` predictions (target scale). ``batch``: ``y_bin``,
    ``y_spot``, ``y_region`` targets; ``bin_spot``, ``bin_region`` (each bin's tile index
    within the batch); ``spot_complete``, ``region_complete`` (bool: every member in the
    batch). ``to_log1p`` maps each level's target scale to log1p (identity by default).
    """
    if consistency not in CONSISTENCY_FORMS:
        raise ValueError(f"consistency must be one of {CONSISTENCY_FORMS}")
    ident = {lv: (lambda x: x) for lv in ("bin", "spot", "region")}
    to_log1p = to_log1p or ident
    parts: dict[str, torch.Tensor] = {}
    parts["mse"] = F.mse_loss(out["bin"], batch["y_bin"])
    parts["pcc"] = 1 - pcc_rows(out["bin"], batch["y_bin"])
    total = weights.mse * parts["mse"] + weights.pcc * parts["pcc"]
    for lv in ("spot", "region"):
        if lv in out:
            parts[f"pcc_{lv}"] = 1 - pcc_rows(out[lv], batch[f"y_{lv}"])
            total = total + weights.context_pcc * parts[f"pcc_{lv}"]
            if weights.context_mse:
                parts[f"mse_{lv}"] = F.mse_loss(out[lv], batch[f"y_{lv}"])
                total = total + weights.context_mse * parts[f"mse_{lv}"]
    if consistency != "none" and ("spot" in out or "region" in out):
        cons = out["bin"].new_zeros(())
        for lv in ("spot", "region"):
            if lv not in out:
                continue
            member = batch[f"bin_{lv}"]
            if consistency == "paper":
                cons = cons + F.mse_loss(out[lv][member], batch["y_bin"])
            else:
                agg = aggregate_bins(to_log1p["bin"](out["bin"]), member, out[lv].shape[0])
                done = batch[f"{lv}_complete"]
                if done.any():
                    cons = cons + 1 - pcc_rows(to_log1p[lv](out[lv])[done], agg[done])
        parts["consistency"] = cons
        total = total + weights.consistency * cons
    parts["loss"] = total
    return parts
