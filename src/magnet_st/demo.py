"""The built-in demo: every stage of the pipeline on small synthetic Visium HD slides.

Steps: write synthetic slides (Space Ranger layout) -> ``prepare`` -> ``features`` ->
leave-one-slide-out cross-validation of MagNet and its no-context ablation beside the
mean-profile baseline -> a final model on all slides -> prediction on one more slide from
its image alone (tissue detection, virtual 8 um grid) -> figures -> a Markdown report.
Sized to finish on a 2-core CPU within 10 minutes: the offline ImageNet EfficientNet-Lite0
encodes every tile at 112 px; the report sets MagNet beside the mean profile and a ridge
probe on the same features, per planted gene group.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from magnet_st.util.atomic import write_text

log = logging.getLogger(__name__)

DEMO_ENCODER = "efficientnet_lite0_imagenet"  # offline ImageNet weights (the offline-encoder extra)
DEMO_INPUT_PX = 112  # every tile encoded at 112 px: 4x cheaper than 224 on a CPU


# Long: the demo's seven timed steps in order (~5-15 lines each, sharing times/step()), then the
# ~65-line Markdown report text filled from their outputs (res, pred, times, paths).
def run_demo(
    out: str | Path,
    *,
    size_mm: float = 0.5,
    n_slides: int = 3,
    encoder: str = DEMO_ENCODER,
    input_px: int | None = DEMO_INPUT_PX,
    mode: str = "dense",
    epochs: int = 8,
    progress: bool = True,
) -> Path:
    """Run the demo into ``out``; returns the report's path. Finished steps are reused.

    ``mode``: ``"dense"`` (the default, measured best: one encoder pass per image tile at
    0.25 um/px, each unit its footprint's mean of the stride-16 map) or ``"patches"`` (one
    pass per unit's patch, at ``input_px``)."""
    if mode not in ("dense", "patches"):
        raise ValueError(f"mode must be dense or patches, got {mode!r}")
    from magnet_st.data.dataset import Dataset
    from magnet_st.evaluate.cv import cross_validate
    from magnet_st.features.extract import extract_features
    from magnet_st.predict.image import predict
    from magnet_st.prepare.build import prepare
    from magnet_st.prepare.config import PrepareConfig
    from magnet_st.read.specs import SlideSpec
    from magnet_st.report import plot_results
    from magnet_st.synthetic import write_synthetic_hd
    from magnet_st.train.config import TrainConfig
    from magnet_st.train.trainer import fit

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (os.cpu_count() or 1) <= 4:
        # few cores: more torch threads than cores slows CPU inference down many times over
        torch.set_num_threads(1)
    times: dict[str, float] = {}

    def step(name: str, t: float) -> None:
        times[name] = time.perf_counter() - t
        print(f"[demo] {name}: {times[name]:.0f} s", flush=True)

    t = time.perf_counter()
    specs = []
    new_seed = 1000  # the unseen slide, predicted from its image alone
    for i in [*range(n_slides), new_seed]:
        run = out / "slides" / f"synthetic_{i}"
        if not (run / "outs").is_dir():
            print(f"[demo] writing synthetic Visium HD slide {run}", flush=True)
            write_synthetic_hd(
                run,
                width_um=size_mm * 1000,
                height_um=size_mm * 1000,
                seed=i,
                write_mtx=False,
                write_raw=False,
                progress=progress,
            )
        if i == new_seed:
            continue
        specs.append(
            SlideSpec(
                name=f"synthetic_{i}", path=str(run), image=str(run / "he_fullres.tif"), bin_size=8
            )
        )
    step("synthetic slides", t)

    t = time.perf_counter()
    ds = out / "dataset"
    prepare(specs, ds, PrepareConfig(n_genes=100), progress=progress)
    step("prepare", t)

    t = time.perf_counter()
    from magnet_st.features.dense import DenseConfig

    dense = DenseConfig() if mode == "dense" else None
    res = extract_features(
        ds,
        encoder,
        levels=("bin", "spot", "region"),
        device="auto",
        batch_size=64,
        num_workers=0,
        progress=progress,
        input_px=None if dense else input_px,
        dense=dense,
    )
    if dense is not None:
        d = res["encoder"]["dense"]
        how = (
            f"dense: one pass per {d['tile_px']} px tile at {d['mpp']:g} um/px, each unit the "
            "mean of the stride-16 map over its footprint"
        )
    else:
        how = f"one pass per unit's patch at {input_px or 'the encoder default'} px"
    step("features", t)

    t = time.perf_counter()
    cfg = TrainConfig(features=res["key"], width=64, epochs=epochs, patience=epochs)
    cross_validate(ds, out / "cv", cfg, variants=["magnet", "no_context"], progress=progress)
    step("cross-validation", t)

    t = time.perf_counter()
    model_path = out / "model" / "model.pt"
    if not model_path.exists():
        slides = Dataset(ds).slides
        fit(Dataset(ds), slides[:-1], slides[-1:], cfg, out / "model", progress=progress)
    step("final model", t)

    t = time.perf_counter()
    new_run = out / "slides" / f"synthetic_{new_seed}"
    pred = predict(model_path, out / "predict", image=new_run / "he_fullres.tif", progress=progress)
    step("image-only prediction", t)

    t = time.perf_counter()
    figures = out / "figures"
    plot_results([out / "cv", out / "model", pred.files["bin"]], figures, formats=("png",))
    step("figures", t)

    total = time.perf_counter() - t0
    summary = (out / "cv" / "summary.md").read_text()
    truth = json.loads((new_run / "synthetic_truth.json").read_text())
    sr_bins = truth["n_bins_in_tissue"]["8"]
    listing = sorted(p.name for p in figures.glob("*.png"))
    report = "\n".join(
        [
            "# magnet-st demo report",
            "",
            f"{n_slides} synthetic Visium HD slides of {size_mm:g} mm (8 um bins), prepared with "
            f"the default HD sizes (28 / 56 / 128 um); frozen features from `{encoder}` "
            f"(ImageNet weights, offline; {how}); MagNet "
            f"(width 64, {epochs} epochs) and its no-context ablation, leave-one-slide-out, "
            "beside the mean profile and a ridge probe on the same frozen features. Metrics "
            "on the log1p scale; PCC-gene is per gene across units, PCC-unit per unit across "
            "genes (the MagNet paper's PCC). MagNet matters only where it beats the ridge "
            "probe: read the PCC-gene columns, and the gene groups below (cell genes follow "
            "the nuclei inside each bin; context genes follow the tissue over hundreds of "
            "microns).",
            "",
            summary,
            "## PCC-gene by planted gene group",
            "",
            (out / "cv" / "groups.md").read_text()
            if (out / "cv" / "groups.md").is_file()
            else "(no groups)",
            "",
            "## An unseen slide, from its image alone",
            "",
            f"`magnet predict` on `{new_run.name}` (never seen in training) from "
            f"`he_fullres.tif` alone: tissue detection (`{pred.out / 'tissue_mask.png'}`), a "
            f"virtual 8 um grid of {pred.n['bin']:,} bins over the tissue (Space Ranger "
            f"counts {sr_bins:,} bins under tissue on this slide), "
            f"{pred.n['spot']:,} spot and {pred.n['region']:,} region tiles; predictions "
            f"in `{pred.files['bin']}` (open with `scanpy.read_h5ad`, draw with "
            "`scanpy.pl.spatial`).",
            "",
            "## Figures",
            "",
            f"In `{figures}`: cross-validation summaries (`cv_*`), training curves "
            "(`training_*`), per-gene PCC (`gene_pcc_*`), maps predicted beside measured for "
            "the first fold's test slide (`*_synthetic_0_maps.png`) and maps of the image-only "
            "prediction (`bins_maps.png`).",
            "",
            *[f"- `{name}`" for name in listing],
            "",
            "## Time",
            "",
            "| step | seconds |",
            "|---|---|",
            *[f"| {k} | {v:.0f} |" for k, v in times.items()],
            f"| total | {total:.0f} |",
            "",
            "## Where things are",
            "",
            f"- slides: `{out / 'slides'}` (Space Ranger layout; `SYNTHETIC.md` explains each)",
            f"- dataset: `{ds}` (per slide `bin.h5ad`, `spot.h5ad`, `region.h5ad`)",
            f"- features: `{res['path']}`",
            f"- cross-validation: `{out / 'cv'}` (`summary.md`, `metrics.csv`, per-fold models "
            "and predictions as `.h5ad`)",
            f"- final model (all slides): `{model_path}`",
            f"- image-only prediction: `{pred.out}` (`bins.h5ad`, `spot_tiles.h5ad`, "
            "`region_tiles.h5ad`, `tissue_mask.png`, `prediction.json`)",
            f"- figures: `{figures}`",
            "",
        ]
    )
    path = out / "report.md"
    write_text(path, report)
    return path
