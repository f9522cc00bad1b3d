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

from magnet_st.batching import BlockDataset, SlideArrays
from magnet_st.dataset import Dataset
from magnet_st.errors import InputError
from magnet_st.model import create_model
from magnet_st.targets import TargetTransform

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
    patch_reader: Any = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Predictions on the log1p scale for every bin, spot tile and region tile of a slide.

    Tiles seen by several batches (as context) get the mean of their predictions. Memory:
    the outputs plus one batch (a block of region tiles).
    """
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
