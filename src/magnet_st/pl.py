"""``magnet_st.pl``: figures, in scanpy's shape.

Each function returns a :class:`matplotlib.figure.Figure` (drawn off-screen, pyplot left
alone) except :func:`results`, which draws what ``magnet plot`` draws into a folder and
returns the files; :func:`save` writes a figure in several formats. See
:mod:`magnet_st.plot` for the details and ``docs/api.md`` for an example.

- :func:`gene_maps`: predicted (and measured) expression maps, each bin a square of its size;
- :func:`pcc_bars`: per-gene PCC; :func:`per_gene_pcc` the numbers behind it;
- :func:`training_curves`: losses and validation scores per epoch;
- :func:`cv_summary`: PCC per fold and model of a cross-validation;
- :func:`results`: every figure of predictions, cv folders and training folders.
"""

from __future__ import annotations

from magnet_st.plot import (
    cv_summary,
    gene_maps,
    pcc_bars,
    per_gene_pcc,
    save,
    training_curves,
)
from magnet_st.report import choose_genes
from magnet_st.report import plot_results as results

__all__ = [
    "choose_genes",
    "cv_summary",
    "gene_maps",
    "pcc_bars",
    "per_gene_pcc",
    "results",
    "save",
    "training_curves",
]
