"""``magnet info DATASET``: what a prepared dataset holds, as a dict and as text."""

from __future__ import annotations

from pathlib import Path


def dataset_summary(path: Path) -> dict:
    """What a prepared dataset holds: its settings, slides (units per level), panel,
    targets and feature sets (key, width, mode and dense settings, slides done)."""
    from magnet_st.data.dataset import Dataset
    from magnet_st.data.levels import LEVELS
    from magnet_st.features.store import list_feature_sets

    ds = Dataset(path)
    panel = ds.manifest["panel"]
    sets = []
    for fs in list_feature_sets(path):
        dense = fs.get("encoder", {}).get("dense") or {}
        done = [
            s for s, lv in fs.get("slides", {}).items() if all(v["complete"] for v in lv.values())
        ]
        sets.append(
            {
                "key": fs["key"],
                "feature_dim": fs.get("feature_dim"),
                "mode": "dense" if dense else "patches",
                "dense": {k: v for k, v in dense.items() if k != "maps"},
                "levels": [lv for lv in LEVELS if lv in fs.get("levels", {})],
                # the units' row: each map over the unit, then over each window
                "bin_dim": sum(w for _, w in dense.get("blocks", {}).get("bin", []))
                or fs.get("feature_dim"),
                "slides_complete": done,
            }
        )
    return {
        "dataset": str(path),
        "preset": ds.config.get("preset"),
        "units": {
            n: {k: ds.slide_meta(n)[k] for k in ("technology", "unit_size_um", "n")}
            for n in ds.slides
        },
        "tiles_um": {lv: ds.patch_um(lv) for lv in ("spot", "region")},
        "panel": {k: panel[k] for k in ("method", "n_genes", "train_slides")},
        "target": ds.target_kind,
        "feature_sets": sets,
    }


def format_dataset(d: dict) -> str:
    lines = [
        f"{d['dataset']}  (prepared dataset, preset {d['preset']})",
        f"  panel                {d['panel']['n_genes']} genes ({d['panel']['method']}, chosen "
        f"on {', '.join(d['panel']['train_slides'])}); targets {d['target']}",
        f"  tiles                spot {d['tiles_um']['spot']:g} um, region "
        f"{d['tiles_um']['region']:g} um",
    ]
    for name, u in d["units"].items():
        n = ", ".join(f"{lv} {k:,}" for lv, k in u["n"].items())
        lines.append(f"  slide {name:<14} {u['technology']} {u['unit_size_um']:g} um: {n}")
    if not d["feature_sets"]:
        lines.append("  feature sets         none yet (magnet features)")
    for fs in d["feature_sets"]:
        dense = fs["dense"]
        how = fs["mode"]
        if dense:
            win = " ".join(f"{w:g}" for w in dense.get("windows_um") or [])
            strides = " ".join(str(v) for v in dense["strides"])
            how += f" at {dense['mpp']:g} um/px, stride {strides}"
            how += f", windows {win} um" if win else ", no windows"
            if win and dense.get("window_mpp"):
                how += f" from {dense['window_mpp']:g} um/px"
        dims = f"{fs['feature_dim']}-d"
        if fs["bin_dim"] != fs["feature_dim"]:
            dims += f" ({fs['bin_dim']}-d at the units, with their windows)"
        lines.append(f"  features {fs['key']}")
        lines.append(
            f"                       {how}; {dims}; levels "
            f"{' '.join(fs['levels'])}; {len(fs['slides_complete'])} of "
            f"{len(d['units'])} slides complete"
        )
    return "\n".join(lines)
