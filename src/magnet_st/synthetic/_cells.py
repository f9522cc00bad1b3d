"""Space Ranger 4-like cell segmentation of a synthetic slide, from the nuclei it planted.

Space Ranger 4 segments nuclei on the H&E, draws them on the 2 um bin grid, expands each
nucleus into the bins around it (a bin goes to the nearest nucleus), and writes the cells
as polygons (the outline of each cell's 2 um bins, in full-resolution pixels) and as a
cell x gene matrix (the sum of each cell's 2 um bins). Here the nuclei are the planted
ones, so the truth is known:

* nucleus mask: a 2 um bin belongs to the nucleus whose ellipse holds the bin's centre (the
  nearest one by the ellipse's own scaled distance where ellipses overlap); every nucleus
  keeps at least the bin that holds its centre (if no other nucleus holds that bin);
* cell mask: every bin under tissue within ``expand_um`` of a nucleus bin goes to the
  nearest one (Euclidean distance between bin centres), as Space Ranger's expansion; each
  cell keeps only its largest 4-connected piece, its holes filled, so that its outline
  holds exactly its bins;
* polygons: the outline of each mask at level 0.5 (marching squares over the 2 um grid: it
  passes through the midpoints of the bins' shared edges, so a bin's centre lies inside its
  own cell's polygon and outside every other), one exterior ring, coordinates rounded to
  0.1 px as Space Ranger does;
* ids: ``cell_id`` = 1 + the nucleus's index in ``synthetic_nuclei.parquet``; matrix
  barcodes ``cellid_{id:09d}-1``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from scipy import ndimage

from magnet_st.io.nuclei import label_outlines, write_segmentation
from magnet_st.read.cells import cell_names
from magnet_st.synthetic._params import BARCODE_DTYPE, CELL_TYPES
from magnet_st.synthetic._scene import _Genes, _Scene
from magnet_st.synthetic._writers import _barcodes, _H5Matrix

#: how far a nucleus grows into a cell, um (on the 2 um grid)
EXPAND_UM = 4.0
#: nuclei are drawn in chunks of this many (bounds memory on full-size slides)
_CHUNK = 20_000


@dataclass
class CellMasks:
    """Labels on the capture area's 2 um grid (``(n2r, n2c)`` int32; 0: none, k: cell id k)."""

    nucleus: np.ndarray
    cell: np.ndarray


def _nucleus_mask(scene: _Scene) -> np.ndarray:
    n2r, n2c = scene.n2r, scene.n2c
    nu = scene.nuclei
    label = np.zeros((n2r, n2c), dtype=np.int32)
    best = np.full((n2r, n2c), np.inf, dtype=np.float32)
    half = int(np.ceil(float(nu.a.max()) / 2.0)) + 1 if len(nu) else 0
    off = np.arange(-half, half + 1)
    dr, dc = (g.ravel() for g in np.meshgrid(off, off, indexing="ij"))
    for k0 in range(0, len(nu), _CHUNK):
        k = np.arange(k0, min(len(nu), k0 + _CHUNK))
        r0 = np.floor((nu.y[k] - scene.oy) / 2.0).astype(np.int64)
        c0 = np.floor((nu.x[k] - scene.ox) / 2.0).astype(np.int64)
        r = r0[:, None] + dr[None, :]
        c = c0[:, None] + dc[None, :]
        u = scene.ox + 2.0 * c + 1.0 - nu.x[k][:, None]
        v = scene.oy + 2.0 * r + 1.0 - nu.y[k][:, None]
        cos, sin = np.cos(nu.theta[k])[:, None], np.sin(nu.theta[k])[:, None]
        p = (u * cos + v * sin) / nu.a[k][:, None]
        q = (-u * sin + v * cos) / nu.b[k][:, None]
        d = (p * p + q * q).astype(np.float32)
        own = (dr == 0) & (dc == 0)
        d[:, own] = np.minimum(d[:, own], 0.999)  # the bin holding the centre
        ok = (d < 1.0) & (r >= 0) & (r < n2r) & (c >= 0) & (c < n2c)
        rr, cc, dd = r[ok], c[ok], d[ok]
        ids = np.broadcast_to((k + 1)[:, None], r.shape)[ok].astype(np.int32)
        # nearest first: the last write of a bin wins, so write in decreasing distance
        order = np.argsort(-dd, kind="stable")
        rr, cc, dd, ids = rr[order], cc[order], dd[order], ids[order]
        better = dd < best[rr, cc]
        rr, cc, dd, ids = rr[better], cc[better], dd[better], ids[better]
        # a bin written twice keeps the last write (numpy's rule for repeated indices):
        # the nearest, as both arrays are written in the same order
        best[rr, cc] = dd
        label[rr, cc] = ids
    return label


def _clean(label: np.ndarray) -> np.ndarray:
    """Each label keeps its largest 4-connected piece, holes filled with its own id where
    no other label is."""
    out = np.zeros_like(label)
    for i, sl in enumerate(ndimage.find_objects(label), start=1):
        if sl is None:
            continue
        m = label[sl] == i
        pieces, n = ndimage.label(m)
        if n > 1:
            sizes = np.bincount(pieces.ravel())[1:]
            m = pieces == 1 + int(np.argmax(sizes))
        m = ndimage.binary_fill_holes(m) & ((label[sl] == 0) | (label[sl] == i))
        out[sl][m] = i
    return out


def cell_masks(scene: _Scene, expand_um: float = EXPAND_UM) -> CellMasks:
    """The nucleus and cell labels of the capture area's 2 um bins (see the module doc)."""
    from skimage.segmentation import expand_labels

    nucleus = _nucleus_mask(scene)
    tissue = scene.tissue_2um()
    nucleus[~tissue] = 0
    nucleus = _clean(nucleus)
    cell = expand_labels(nucleus, distance=expand_um / 2.0)  # in 2 um bins
    cell[~tissue] = 0
    cell = _clean(cell)
    nucleus[cell != nucleus] = 0  # a nucleus bin its cell lost (to keep one piece)
    return CellMasks(nucleus=nucleus, cell=cell)


def outlines(label: np.ndarray, scene: _Scene) -> dict[int, np.ndarray]:
    """``{id: (k, 2) [x, y]}`` full-resolution pixels: each label's outline on the capture
    area's 2 um grid (:func:`magnet_st.io.nuclei.label_outlines`)."""
    return label_outlines(label, 2.0 / scene.mpp, (scene.ox / scene.mpp, scene.oy / scene.mpp))


class CellPlanting:
    """Expression planted per cell (``write_synthetic_hd(expression="cells")``): cell ``k``
    (grown from nucleus ``k - 1``, of type ``T``) makes the UMIs of its type's programme,
    ``Poisson(e S_T)`` in all (``S_T`` UMIs per nucleus, ``e`` the capture efficiency where
    they land), spread evenly over its own 2 um bins, whichever 8 um bins those lie in.
    Drawn per 2 um bin (``Poisson(e_s S_T / area_k)``, the same law), so each band of bins
    is drawn on its own."""

    def __init__(self, label: np.ndarray, cell_type: np.ndarray, weights: np.ndarray) -> None:
        self.label = label
        n = int(label.max())
        self.area = np.bincount(label.ravel(), minlength=n + 1)
        self.cell_type = np.zeros(n + 1, dtype=np.int64)
        self.cell_type[1:] = cell_type[:n]
        b = np.asarray(weights[: len(CELL_TYPES)], dtype=np.float64)  # B[T, g] = S_T w_g
        self.total = b.sum(axis=1)
        self.p = b / np.where(self.total > 0, self.total, 1.0)[:, None]

    def umis(
        self, r2a: int, r2b: int, eff: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The cells' UMIs in 2 um rows ``r2a:r2b``: (row - ``r2a``, column, gene) each;
        ``eff``: the capture efficiency of each 2 um bin of those rows."""
        lab = self.label[r2a:r2b]
        flat = np.flatnonzero(lab)
        k = lab.ravel()[flat]
        t = self.cell_type[k]
        n = rng.poisson(eff.ravel()[flat] * self.total[t] / self.area[k])
        where, t = np.repeat(flat, n), np.repeat(t, n)
        gene = np.zeros(where.size, dtype=np.int64)
        for ti in np.unique(t):
            sel = t == ti
            gene[sel] = rng.choice(self.p.shape[1], size=int(sel.sum()), p=self.p[ti])
        return where // lab.shape[1], where % lab.shape[1], gene


class CellCounts:
    """UMIs summed per cell: ``label`` maps each 2 um bin of the capture area (row, col) to
    its cell id (0: none)."""

    def __init__(self, label: np.ndarray, n_genes: int) -> None:
        self.label = label
        self.n_genes = n_genes
        self.n_cells = int(label.max())
        self.total = sp.csr_matrix((self.n_cells + 1, n_genes), dtype=np.int64)

    def add(self, cell: np.ndarray, gene: np.ndarray) -> None:
        keep = cell > 0
        ones = np.ones(int(keep.sum()), dtype=np.int64)
        shape = self.total.shape
        self.total = self.total + sp.csr_matrix((ones, (cell[keep], gene[keep])), shape=shape)

    def matrix(self) -> sp.csr_matrix:
        """Cells x genes, row k - 1 = cell id k."""
        self.total.sum_duplicates()
        return self.total[1:].tocsr()


def _write_matrix(path: Path, genes: _Genes, m: sp.csr_matrix, ids: np.ndarray) -> None:
    h5 = _H5Matrix(path, genes)
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    bcs = np.array([b.encode() for b in cell_names(ids)], dtype=BARCODE_DTYPE)
    h5.append(bcs, rows, m.indices, m.data)
    h5.close()


def _write_mappings(scene: _Scene, masks: CellMasks, path: Path) -> None:
    """``barcode_mappings.parquet``: one row per 2 um bin of the capture area with its 8 and
    16 um bins, its cell (null where none) and whether it lies in the cell's nucleus."""
    n2r, n2c = masks.cell.shape
    ids = np.arange(int(masks.cell.max()) + 1)
    names = np.empty(len(ids), dtype=object)
    names[1:] = cell_names(ids[1:])
    names[0] = None
    cols = np.arange(n2c)
    with pq.ParquetWriter(path, _MAPPINGS_SCHEMA, compression="zstd") as writer:
        for r0 in range(0, n2r, 512):
            rows = np.arange(r0, min(n2r, r0 + 512))
            cell = masks.cell[rows].ravel()
            table = {
                "square_002um": _barcodes(2, rows, n2c),
                "square_008um": _barcodes(8, rows // 4, n2c)[_sub(rows, cols, 4, n2c)],
                "square_016um": _barcodes(16, rows // 8, n2c)[_sub(rows, cols, 8, n2c)],
                "cell_id": names[cell],
                "in_nucleus": masks.nucleus[rows].ravel() > 0,
                "in_cell": cell > 0,
            }
            table = {
                k: (pa.array(v).cast(pa.string()) if v.dtype.kind == "S" else pa.array(v))
                for k, v in table.items()
            }
            writer.write_table(pa.table(table, schema=_MAPPINGS_SCHEMA))


def _sub(rows: np.ndarray, cols: np.ndarray, f: int, n2c: int) -> np.ndarray:
    """Index, into ``_barcodes(size, rows // f, n2c)`` (rows x n2c), of each 2 um bin's
    coarser bin: row i of ``rows`` -> row i, column c -> column c // f."""
    return (np.arange(len(rows))[:, None] * n2c + (cols // f)[None, :]).ravel()


_MAPPINGS_SCHEMA = pa.schema(
    [
        ("square_002um", pa.string()),
        ("square_008um", pa.string()),
        ("square_016um", pa.string()),
        ("cell_id", pa.string()),
        ("in_nucleus", pa.bool_()),
        ("in_cell", pa.bool_()),
    ]
)


def write_segmented_outputs(
    scene: _Scene,
    masks: CellMasks,
    counts: sp.csr_matrix,
    genes: _Genes,
    outs: Path,
    spatial: Path,
    *,
    write_raw: bool,
) -> dict[str, float]:
    """Space Ranger 4's ``outs/segmented_outputs/`` and ``outs/barcode_mappings.parquet``.

    ``counts``: cells x genes, row k - 1 = cell id k (every id of ``masks.cell``);
    ``spatial``: a bin size's ``spatial/`` folder, whose scale factors and images are
    copied (Space Ranger writes no positions table there). The filtered matrix holds the
    cells with at least one UMI. Returns numbers for the truth file.
    """
    seg = outs / "segmented_outputs"
    (seg / "spatial").mkdir(parents=True)
    for name in ("scalefactors_json.json", "tissue_hires_image.png", "tissue_lowres_image.png"):
        shutil.copyfile(spatial / name, seg / "spatial" / name)
    cell_rings = outlines(masks.cell, scene)
    write_segmentation(seg / "cell_segmentations.geojson", cell_rings)
    write_segmentation(seg / "nucleus_segmentations.geojson", outlines(masks.nucleus, scene))
    ids = np.array(sorted(cell_rings), dtype=np.int64)
    per_cell = np.asarray(counts.sum(axis=1)).ravel()
    kept = ids[per_cell[ids - 1] > 0]
    _write_matrix(seg / "filtered_feature_cell_matrix.h5", genes, counts[kept - 1], kept)
    if write_raw:
        _write_matrix(seg / "raw_feature_cell_matrix.h5", genes, counts[ids - 1], ids)
    _write_mappings(scene, masks, outs / "barcode_mappings.parquet")
    area = np.bincount(masks.cell.ravel())[1:] * 4.0
    return {
        "expand_um": EXPAND_UM,
        "cells": int(len(ids)),
        "cells_with_counts": int(len(kept)),
        "median_cell_area_um2": float(np.median(area[area > 0])) if len(ids) else 0.0,
        "median_counts_per_cell": float(np.median(per_cell[kept - 1])) if len(kept) else 0.0,
    }
