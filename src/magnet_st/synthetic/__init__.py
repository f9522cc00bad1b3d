"""Synthetic Visium HD slides, written in the exact Space Ranger layout.

Everything here is **synthetic**: a procedural H&E-like whole-slide image and Visium HD
count matrices (2, 8 and 16 um bins) planted from the same random scene, so that the
ground truth is known. Same seed -> byte-identical matrices and identical image pixels.

>>> from magnet_st.synthetic import write_synthetic_hd
>>> info = write_synthetic_hd("synth_run", width_um=500, height_um=500, seed=1)  # doctest: +SKIP

Scene
-----
* Geometry: the capture area is ``16 * floor(width_um / 16)`` by ``16 * floor(height_um / 16)``
  microns (a whole number of 16 um bins), placed ``margin_um`` from the top-left corner of
  the image; the image is the capture area plus that margin on every side. A point at
  ``(x, y)`` microns from the image's top-left corner lies at full-resolution pixel
  coordinates ``(x / mpp, y / mpp)`` (pixel ``j`` spans ``[j, j + 1)``).
* Fields live on a node grid of 4 um spacing that has nodes on every 8 um bin centre.
  Tissue: ``T = 1.0 - r + 0.2 n_250 + 0.04 n_25 - 1.5 max(0, -n_80 - 1.9)``, with ``r`` a
  superellipse radius (``(|u|^4 + |v|^4)^(1/4)``, ``u, v`` the offsets from the capture
  centre in half-widths) and ``n_L`` smooth unit-variance Gaussian noise of correlation
  length ``L`` um. The stored field is ``sd = T / |grad T|`` (about the signed distance to
  the tissue edge, um); a point is under tissue when the bilinear interpolation of ``sd``
  there is > 0 (this one rule drives the image's tissue mask, nuclei and ``in_tissue``).
* Domains: Voronoi cells of seeds on a jittered grid ``domain_spacing_um`` apart, on
  coordinates warped by 60 um of smooth noise. Types are dealt out in shuffled blocks of
  five, nearest seeds to the capture centre first (so even a small slide holds every
  type), cycling through ``[A, B, STR, LYM, ADI]``, ``[A, B, STR, LYM, A]``,
  ``[A, B, STR, LYM, ADI]``, ``[A, B, STR, LYM, B]`` (A, B = TUM_A, TUM_B). A ``LYM`` cell
  is a round lymphoid aggregate of radius ``U(0.35, 0.5) * spacing`` around its seed; the
  rest of that cell is stroma. The domain of a point is the label of its nearest node.
  Roughly: TUM_A 25%, TUM_B 25%, STR 30%, LYM 10%, ADI 10% of the tissue.
* Image: Beer-Lambert mix of haematoxylin and eosin optical densities: background stain
  per domain (``DOMAIN_STAIN``) with fibre and grain textures, plus anti-aliased
  elliptical nuclei; every pyramid level is rendered from the scene at its own scale.
* Nuclei are explicit objects: for each cell type a jittered lattice at its highest
  density, thinned to ``density[type, domain] / max density`` and kept under tissue
  (densities in ``NUCLEUS_DENSITY``, per 100 x 100 um). ``TUM_A`` and ``TUM_B`` look the
  same (same tumour nuclei, same stain) except for sparse ``CUE`` cells (big dark nuclei,
  one in every 70 x 70 um lattice cell of ``TUM_B``): a 28 um patch rarely holds one, a
  128 um region tile always does.

Expression model (per 8 um bin ``b`` of the capture area and gene ``g``)
---------------------------------------------------------------------
::

    tf_b     = fraction of the 16 2-um bins of b whose centre is under tissue
    n_{t,b}  = number of nuclei of cell type t whose centre lies in b
    d_b      = domain at the centre of b
    rho_b    = (K_75 * n_LYM)(b) / 1.5         (lymphocyte density smoothed over ~150 um: a
                Gaussian of sigma 75 um on the 8 um grid, zero outside the image, in units
                of 1.5 nuclei per bin)
    e_b      = exp(0.2 z_b - 0.02), z_b ~ N(0, 1)   (capture efficiency)

    lambda_{b,g} = 1[tf_b > 0] * e_b * ( sum_t n_{t,b} B_{t,g}
                                         + tf_b * (M_{d_b,g} + C_{d_b,g} + rho_b L_g) )
    y_{b,g} ~ Poisson(lambda_{b,g})

* cell-driven genes ``CELL_<T>_<k>`` (T in TUM, LYM, FIB, ADI, CUE):
  ``B_{T,g} = S_T w_g`` with ``S = CELL_UMI_PER_NUCLEUS`` (UMIs per nucleus);
* context-driven genes: ``CTX_DOMA_<k>``: ``C_{TUM_A,g} = 35 w_g``; ``CTX_DOMB_<k>``:
  ``C_{TUM_B,g} = 35 w_g`` (domain programmes that a 28 um patch cannot tell apart);
  ``CTX_LYMG_<k>``: ``L_g = 60 w_g`` (lymphocyte gradient over ~150 um);
* background genes ``BG_<k>``: ``M_{d,g} = 40 v_g exp(tau_g z_{g,d})``, ``tau_g = 0.5 U^2``
  with ``U ~ U(0, 1)``, ``z ~ N(0, 1)`` (mild dependence on the domain);
* ``w_g`` (within a programme) and ``v_g`` (over background genes) are log-normal
  (sigma 0.8 and 1.0) normalised to sum to 1; all other entries of B, C, M, L are 0.

Counts are drawn per 8 um bin (total ``~ Poisson(sum_g lambda)``, then each UMI's gene
with probability ``lambda_{b,g} / sum``, which is the same law). Each UMI then goes to one
of the 16 2-um bins ``s`` of its 8 um bin with probability proportional to
``in_tissue(s) * (0.5 + m_s)``, ``m_s`` the number of nucleus centres in ``s``; 16 um bins
are sums of 2 x 2 8 um bins. So 2 -> 8 -> 16 sums are exact, and bins with no 2 um bin
under tissue have no counts. A 2 um bin is under tissue when its centre is; an 8 or 16 um
bin when any of its 2 um bins is.

Expression planted per cell (``expression="cells"``; ``magnet synth --expression cells``):
the cell term ``sum_t n_{t,b} B_{t,g}`` leaves the 8 um rates; instead each cell ``k`` of
type ``T`` (below) makes ``Poisson(e S_T)`` UMIs of its programme spread evenly over its
own 2 um bins, across 8 um bin edges, and the tissue's UMIs go to the 2 um bins of their
8 um bin evenly. 8 and 16 um bins are the sums of their 2 um bins as before, so a bin
holds shares of the cells it cuts, and a cell's counts are its own UMIs plus the tissue's
under it: the layout in which cells, not bins, are the natural unit.

Cells (``cells=True``, the default): Space Ranger 4's ``outs/segmented_outputs/`` and
``outs/barcode_mappings.parquet`` from the planted nuclei: each nucleus drawn on the 2 um
grid, grown by 4 um into the bins under tissue nearest to it, outlined, and its cell's
counts the sum of its 2 um bins (:mod:`magnet_st.synthetic._cells`). Cell ``k`` grows from
row ``k - 1`` of ``synthetic_nuclei.parquet``.
"""

from __future__ import annotations

from magnet_st.synthetic._params import CELL_TYPES, DOMAIN_TYPES, SyntheticSlideInfo
from magnet_st.synthetic._public import write_synthetic_hd

__all__ = [
    "CELL_TYPES",
    "DOMAIN_TYPES",
    "SyntheticSlideInfo",
    "write_synthetic_hd",
]
