"""The model file and prediction with it.

:func:`save_model` writes everything prediction needs (configs, gene panel, target
statistics, feature-set description, the slides it was trained on, the weights) as tensors
and plain types; :func:`load_model` reads it back with ``torch.load(weights_only=True)``
(no arbitrary unpickling); :func:`predict_slide` predicts every bin and tile of one slide
in spatial batches. Used by ``magnet train``/``cv`` (saving, scoring) and ``magnet predict``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from magnet_st.data.dataset import Dataset
from magnet_st.data.targets import TargetTransform
from magnet_st.errors import InputError
from magnet_st.model.batching import BlockDataset, SlideArrays
from magnet_st.model.magnet import create_model

MODEL_FORMAT = "magnet-st model"


def save_model(
    path: Path,
    module: Any,
    *,
    genes: list[str],
    gene_names: list[str],
    ds: Dataset,
    features: str,
    training_slides: list[str] | None = None,
) -> None:
    """Everything prediction needs, as tensors and plain types (loads with weights_only).
    ``training_slides``: the slides that trained the model and chose its panel and target
    statistics (an evaluation on one of them is not held out)."""
    from magnet_st.features.store import resolve_feature_set
    from magnet_st.util.atomic import atomic_path

    hp = module.hparams
    payload = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "model_config": dict(hp["model_config"]),
        "train_config": dict(hp["train_config"]),
        "targets": dict(hp["targets"]),
        "genes": list(genes),
        "gene_names": list(gene_names),
        "dataset_config": dict(ds.config),
        "dataset_name": ds.path.name,
        "training_slides": list(training_slides or []),
        "training_images": [
            str(ds.slide_meta(s).get("image") or "") for s in (training_slides or [])
        ],
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


#: the model file's format version this release writes and reads
MODEL_FORMAT_VERSION = 1
#: keys a model file must hold, and their types
MODEL_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "model_config": dict,
    "train_config": dict,
    "targets": dict,
    "genes": list,
    "gene_names": list,
    "dataset_config": dict,
    "features": dict,
    "state_dict": dict,
}


def check_schema(path: Path, payload: dict) -> None:
    """Refuse, with one line naming what is wrong, a model file of another format version
    or one that lacks a key (or holds it with the wrong type)."""
    version = payload.get("format_version")
    if version != MODEL_FORMAT_VERSION:
        raise InputError(
            path,
            f"model file format version {version!r}; this release reads version "
            f"{MODEL_FORMAT_VERSION}",
        )
    for key, kind in MODEL_SCHEMA.items():
        if key not in payload:
            raise InputError(path, f"not a complete model file: it lacks {key!r}")
        if not isinstance(payload[key], kind):
            raise InputError(
                path,
                f"model file key {key!r} is a {type(payload[key]).__name__}, not a "
                f"{getattr(kind, '__name__', kind)}",
            )
    if len(payload["genes"]) != len(payload["gene_names"]):
        raise InputError(path, "model file lists a different number of genes and gene names")
    for key in ("bin", "spot", "region"):
        if key not in payload["targets"]:
            raise InputError(path, f"model file has no target transform of level {key!r}")


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The model (eval mode) and the rest of the model file."""
    from magnet_st.util import torchfile

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "model file not found")
    try:
        payload = torchfile.load(path, "it")
    except InputError as exc:
        raise InputError(path, f"not a magnet-st model file ({exc.problem})") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise InputError(path, "not a magnet-st model file")
    check_schema(path, payload)
    bad = [k for k, v in payload["state_dict"].items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise InputError(
            path, f"the model's weights are not finite ({len(bad)} tensors, e.g. {bad[0]})"
        )
    model = create_model(payload["model_config"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, payload


#: where a model's coarse predictions come from, per level: its own head, or the sum of
#: its bin predictions over the tile (:func:`aggregate_bins`)
COARSE_SOURCES = ("head", "bins")
COARSE_LEVELS = ("spot", "region")


def bins_add_up(payload: dict) -> bool:
    """Whether the model's bin predictions can be summed into a tile's: raw-count targets
    (counts per 10,000 of each unit do not add up to the tile's)."""
    return not TargetTransform.from_dict(payload["targets"]["bin"]).per_10k


def coarse_sources(payload: dict) -> dict[str, str]:
    """Per coarse level, where the model's predictions come from: the choice made on the
    validation slides when training (``payload["coarse_from"]``); else the sum of its bins
    where they add up (measured better than the heads on her2st in 9 of 10 level-folds,
    docs/results.md), else the head."""
    has_head = payload["train_config"]["variant"] != "no_context"
    chosen = dict(payload.get("coarse_from") or {})
    out = {}
    for lv in COARSE_LEVELS:
        default = "bins" if bins_add_up(payload) or not has_head else "head"
        out[lv] = chosen.get(lv, default)
    return out


def aggregate_bins(
    pred: np.ndarray, member: np.ndarray, n_tiles: int, chunk: int = 50_000
) -> np.ndarray:
    """``log1p`` of the summed ``expm1`` of log1p bin predictions over each tile (``member``:
    each bin's tile, ``-1`` for none): the tile's expression as its bins predict it.
    Streamed ``chunk`` bins at a time (float32, tiles x genes)."""
    import scipy.sparse as sp

    total = np.zeros((n_tiles, pred.shape[1]), dtype=np.float64)
    for i in range(0, len(pred), chunk):
        m = np.asarray(member[i : i + chunk])
        ok = m >= 0
        onehot = sp.csr_matrix(
            (np.ones(int(ok.sum())), (m[ok], np.flatnonzero(ok))), shape=(n_tiles, len(m))
        )
        total += onehot @ np.expm1(np.clip(pred[i : i + chunk].astype(np.float64), 0, 30))
    return np.log1p(total).astype(np.float32)


def coarse_scores(
    raw: dict[str, np.ndarray],
    truth: dict[str, np.ndarray],
    member: dict[str, np.ndarray],
    can_sum: bool = True,
) -> dict[str, dict[str, float]]:
    """Mean PCC-gene of each coarse level's candidate sources on one slide: ``"head"`` (the
    level's own prediction in ``raw``, where there is one) and ``"bins"`` (the sum of
    ``raw["bin"]`` over each tile, where bins add up). ``truth``: log1p counts per level;
    ``member``: each bin's tile per level."""
    from magnet_st.model.metrics import pcc_per_gene

    scores: dict[str, dict[str, float]] = {}
    for lv, true in truth.items():
        cand = {"head": raw[lv]} if lv in raw else {}
        if can_sum:
            cand["bins"] = aggregate_bins(raw["bin"], member[lv], len(true))
        scores[lv] = {src: float(np.nanmean(pcc_per_gene(true, p))) for src, p in cand.items()}
    return scores


def choose_coarse(per_slide: list[dict[str, dict[str, float]]]) -> tuple[dict, dict]:
    """The source of each coarse level with the higher mean score over the validation
    slides of :func:`coarse_scores` (ties: the head); returns ``(choice, mean scores)``."""
    mean: dict[str, dict[str, float]] = {}
    for scores in per_slide:
        for lv, sc in scores.items():
            for src, r in sc.items():
                mean.setdefault(lv, {}).setdefault(src, 0.0)
                mean[lv][src] += r / len(per_slide)
    chosen = {lv: max(sc, key=lambda k: (sc[k], k == "head")) for lv, sc in mean.items() if sc}
    return chosen, mean


def compose_coarse(
    raw: dict[str, np.ndarray], slide: SlideArrays, payload: dict, sources: dict | None = None
) -> dict[str, np.ndarray]:
    """The model's predictions from its raw outputs (bins and heads): each coarse level from
    its head or from the sum of the bins, as ``sources`` (default :func:`coarse_sources`)."""
    sources = coarse_sources(payload) if sources is None else sources
    out = {"bin": raw["bin"]}
    member = {"spot": slide.bin_spot, "region": slide.bin_region}
    n = {"spot": len(slide.spot_pos), "region": len(slide.region_pos)}
    can_sum = bins_add_up(payload)
    for lv in COARSE_LEVELS:
        if lv not in raw and not can_sum:  # no head, and bins that do not add up
            continue
        if lv not in raw or (sources.get(lv) == "bins" and can_sum):
            out[lv] = aggregate_bins(raw["bin"], member[lv], n[lv])
        else:
            out[lv] = raw[lv]
    return out


def predict_slide(
    model: torch.nn.Module,
    slide: SlideArrays,
    payload: dict,
    *,
    patch_reader: Any = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    raw: bool = False,
) -> dict[str, np.ndarray]:
    """Predictions on the log1p scale for every bin, spot tile and region tile of a slide:
    the bins from the model, each coarse level from its head or from the sum of its bins
    (:func:`coarse_sources`). ``raw``: the network's own outputs (bins, and the heads of a
    model with context), nothing summed.

    Tiles seen by several batches (as context) get the mean of their predictions. Memory:
    the outputs plus one batch (a block of region tiles).
    """
    out = _network_outputs(model, slide, payload, patch_reader, device, progress)
    headless = payload["train_config"]["variant"] == "no_context"
    if raw or (headless and not bins_add_up(payload)):  # nothing to compose
        return out
    return compose_coarse(out, slide, payload)


@torch.inference_mode()
def _network_outputs(
    model: torch.nn.Module,
    slide: SlideArrays,
    payload: dict,
    patch_reader: Any,
    device: str | torch.device,
    progress: bool,
) -> dict[str, np.ndarray]:
    """The network's predictions (log1p) for every unit of the levels it predicts."""
    from tqdm.auto import tqdm

    tcfg = payload["train_config"]
    targets = {lv: TargetTransform.from_dict(d) for lv, d in payload["targets"].items()}
    data = BlockDataset(
        [slide],
        block=tcfg["block"],
        batch_bins=tcfg.get("batch_bins"),  # model files before it: blocks
        k=tcfg["k"],
        context_tokens=tcfg["context_tokens"],
        with_context=tcfg["variant"] != "no_context",
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
        out = {lv: out[lv] for lv in sums if lv in out}  # the predictions, not the rate heads
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
