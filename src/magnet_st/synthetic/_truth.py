"""The ground truth written beside a slide: nuclei, per-bin variables, formulas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from magnet_st.synthetic._expression import _BinGrids
from magnet_st.synthetic._params import (
    CELL_DESCRIPTIONS,
    CELL_TYPES,
    CELL_UMI_PER_NUCLEUS,
    DOMAIN_DESCRIPTIONS,
    DOMAIN_TYPES,
    FORMAT_VERSION,
    GENERATOR,
    NUCLEUS_DENSITY,
)
from magnet_st.synthetic._scene import (
    FEATURE_NAMES,
    N_FEATURES,
    _describe,
    _Genes,
    _Scene,
)
from magnet_st.synthetic._writers import _barcodes

# --------------------------------------------------------------------------- truth


def _write_nuclei(scene: _Scene, path: Path) -> None:
    nu = scene.nuclei
    table = pa.table(
        {
            "x_um": nu.x,
            "y_um": nu.y,
            "x_px": nu.x / scene.mpp,
            "y_px": nu.y / scene.mpp,
            "semi_major_um": nu.a,
            "semi_minor_um": nu.b,
            "angle_rad": nu.theta,
            "cell_type": pa.DictionaryArray.from_arrays(
                pa.array(nu.ctype.astype(np.int32)), pa.array(list(CELL_TYPES))
            ),
            "domain": pa.DictionaryArray.from_arrays(
                pa.array(nu.domain.astype(np.int32)), pa.array(list(DOMAIN_TYPES))
            ),
        }
    )
    pq.write_table(table, path, compression="zstd")


def _write_bin_truth(scene: _Scene, grids: _BinGrids, path: Path) -> None:
    n8r, n8c = scene.n8r, scene.n8c
    rows = np.arange(n8r)
    cols: dict[str, Any] = {
        "barcode": pa.array(_barcodes(8, rows, n8c)).cast(pa.string()),
        "array_row": np.repeat(rows, n8c).astype(np.int32),
        "array_col": np.tile(np.arange(n8c), n8r).astype(np.int32),
        "in_tissue": (grids.tf.ravel() > 0).astype(np.int32),
        "tissue_fraction": grids.tf.ravel(),
        "domain": pa.DictionaryArray.from_arrays(
            pa.array(grids.domain.ravel().astype(np.int32)), pa.array(list(DOMAIN_TYPES))
        ),
    }
    for t, name in enumerate(CELL_TYPES):
        cols[f"n_{name}"] = grids.counts[t].ravel()
    cols["lymph_context"] = grids.rho.ravel()
    cols["efficiency"] = grids.eff.ravel()
    pq.write_table(pa.table(cols), path, compression="zstd")


FORMULAS = {
    "rate": (
        "lambda[b,g] = 1[tf_b > 0] * e_b * (sum_t n[t,b] * B[t,g] "
        "+ tf_b * (M[d_b,g] + C[d_b,g] + rho_b * L[g])); y[b,g] ~ Poisson(lambda[b,g])"
    ),
    "tf_b": "fraction of the 16 2-um bins of 8 um bin b whose centre is under tissue",
    "n[t,b]": "number of nuclei of cell type t whose centre lies in 8 um bin b",
    "d_b": "domain type at the centre of bin b",
    "rho_b": (
        "gaussian_filter(n_LYM on the 8 um grid extended over the image, sigma=75/8 bins "
        "(75 um), mode='constant', truncate=4) / 1.5"
    ),
    "e_b": "exp(0.2 z_b - 0.02), z_b ~ N(0, 1)",
    "B[T,g]": "S_T * w_g for g in CELL_<T> (S_T = cell_types[T].umi_per_nucleus), else 0",
    "C[d,g]": "35 * w_g for g in CTX_DOMA and d = TUM_A, or g in CTX_DOMB and d = TUM_B, else 0",
    "L[g]": "60 * w_g for g in CTX_LYMG, else 0",
    "M[d,g]": (
        "40 * v_g * exp(tau_g * z[g,d]) for background genes, tau_g = 0.5 * U(0, 1)^2, "
        "z ~ N(0, 1); else 0"
    ),
    "w_g, v_g": "log-normal (sigma 0.8 within a programme, 1.0 over background) summing to 1",
    "2um split": (
        "each UMI of bin b goes to 2-um bin s of b with probability proportional to "
        "in_tissue(s) * (0.5 + number of nucleus centres in s)"
    ),
    "16um": "sum of the 2 x 2 8-um bins",
    "in_tissue": "2 um: centre under tissue; 8 and 16 um: any 2 um bin under tissue",
}

#: the formulas that differ when the cell-driven UMIs are planted per cell
FORMULAS_CELLS = {
    **FORMULAS,
    "rate": (
        "lambda[b,g] = 1[tf_b > 0] * e_b * tf_b * (M[d_b,g] + C[d_b,g] + rho_b * L[g]) for the "
        "tissue's UMIs of 8 um bin b; each cell k of type T adds Poisson(e_s * S_T / area_k) "
        "UMIs to each of its 2 um bins s, their genes drawn with probabilities w_g of CELL_<T>"
    ),
    "2um split": "the tissue's UMIs of bin b go to the 2 um bins of b under tissue evenly",
    "cells": "the 2 um bins of each cell: its nucleus drawn on the 2 um grid, grown by 4 um",
    "8um": "sum of the 4 x 4 2-um bins",
}


def _truth(
    scene: _Scene,
    genes: _Genes,
    params: dict[str, Any],
    grids: _BinGrids,
    n_tissue: dict[int, int],
    n_total: dict[int, int],
) -> dict[str, Any]:
    counts = {name: int((scene.nuclei.ctype == t).sum()) for t, name in enumerate(CELL_TYPES)}
    dom_frac = {
        name: float(((grids.domain == d) & (grids.tf > 0)).sum() / max(1, (grids.tf > 0).sum()))
        for d, name in enumerate(DOMAIN_TYPES)
    }
    gene_table = []
    for i, name in enumerate(genes.names):
        nz = {
            FEATURE_NAMES[f]: round(float(genes.weights[f, i]), 6)
            for f in range(N_FEATURES)
            if genes.weights[f, i] != 0
        }
        gene_table.append(
            {
                "id": genes.ids[i],
                "name": name,
                "group": genes.group[i],
                "programme": genes.program[i],
                "tau": round(float(genes.tau[i]), 6),
                "coefficients": nz,
            }
        )
    return {
        "synthetic": True,
        "generator": GENERATOR,
        "format_version": FORMAT_VERSION,
        "seed": scene.seed,
        "parameters": params,
        "geometry": _describe(scene),
        "domain_types": [
            {"id": d, "name": n, "description": DOMAIN_DESCRIPTIONS[n], "fraction_in_tissue": f}
            for d, (n, f) in enumerate(dom_frac.items())
        ],
        "cell_types": [
            {
                "id": t,
                "name": n,
                "description": CELL_DESCRIPTIONS[n],
                "n_nuclei": counts[n],
                "density_per_100x100um": dict(
                    zip(DOMAIN_TYPES, NUCLEUS_DENSITY[t].round(3).tolist(), strict=True)
                ),
                "umi_per_nucleus": CELL_UMI_PER_NUCLEUS[n],
            }
            for t, n in enumerate(CELL_TYPES)
        ],
        "gene_groups": genes.groups,
        "gene_programs": genes.programs,
        "context_programmes": {
            "CTX_DOMA": "domain TUM_A (locally identical to TUM_B)",
            "CTX_DOMB": "domain TUM_B, recognisable only from its sparse CUE cells (~1/70x70 um)",
            "CTX_LYMG": "lymphocyte density smoothed over ~150 um (Gaussian, sigma 75 um)",
        },
        "formulas": FORMULAS_CELLS if params.get("expression") == "cells" else FORMULAS,
        "features": FEATURE_NAMES,
        "genes": gene_table,
        "n_bins_in_tissue": {str(k): v for k, v in n_tissue.items()},
        "n_bins_total": {str(k): v for k, v in n_total.items()},
        "files": {
            "synthetic_nuclei.parquet": "one row per nucleus: x_um, y_um (from the image's "
            "top-left corner), x_px, y_px (full-resolution pixels), axes, angle, type, domain",
            "synthetic_bins_008um.parquet": "per 8 um bin: tissue fraction, domain, nuclei "
            "per type, lymph_context (rho), efficiency",
        },
    }


def _synthetic_md(truth: dict[str, Any]) -> str:
    p = truth["parameters"]
    geo = truth["geometry"]
    lines = [
        "# SYNTHETIC Visium HD slide",
        "",
        "**This is synthetic data** made by magnet-st (`magnet_st.synthetic.write_synthetic_hd`).",
        "No part of it comes from a real sample. The H&E-like image and the counts are planted",
        "from one random scene, so the ground truth is known (`synthetic_truth.json`,",
        "`synthetic_nuclei.parquet`, `synthetic_bins_008um.parquet`).",
        "",
        f"- seed: {truth['seed']}",
        f"- parameters: `{json.dumps(p)}`",
        f"- capture area: {geo['capture_area_um'][0]:g} x {geo['capture_area_um'][1]:g} um at "
        f"{geo['capture_origin_um'][0]:g} um from the image's top-left corner",
        f"- image: {geo['image_size_px'][0]} x {geo['image_size_px'][1]} px at "
        f"{p['microns_per_pixel']} um/px (`he_fullres.tif`, pyramidal JPEG BigTIFF)",
        "",
        "## Scene",
        "",
        "Domains (Voronoi cells of jittered seeds, warped):",
        "",
    ]
    for d in truth["domain_types"]:
        lines.append(
            f"- `{d['name']}` ({d['fraction_in_tissue']:.0%} of tissue bins): {d['description']}"
        )
    lines += ["", "Cell types (explicit nuclei):", ""]
    for c in truth["cell_types"]:
        lines.append(f"- `{c['name']}` ({c['n_nuclei']} nuclei): {c['description']}")
    lines += [
        "",
        "## Expression model (per 8 um bin b and gene g)",
        "",
        "```",
    ]
    lines += [f"{k}: {v}" for k, v in truth["formulas"].items()]
    lines += [
        "```",
        "",
        "## Genes",
        "",
        "- `CELL_<T>_<k>`: cell-driven, proportional to the nuclei of type T in the bin "
        "(visible in a ~28 um patch).",
        "- `CTX_DOMA_<k>`, `CTX_DOMB_<k>`: domain programmes of TUM_A / TUM_B, which look the "
        "same locally; only the sparse CUE cells (seen in a 128 um region) tell them apart.",
        "- `CTX_LYMG_<k>`: lymphocyte density smoothed over ~150 um.",
        "- `BG_<k>`: background, log-normal baseline with mild dependence on the domain.",
        "",
        "Gene ids are `SYNTH000001`...; `synthetic_truth.json` lists every gene's group and "
        "coefficients.",
        "",
    ]
    for prog, names in truth["gene_programs"].items():
        lines.append(f"- {prog}: {len(names)} genes")
    lines.append("")
    return "\n".join(lines)
