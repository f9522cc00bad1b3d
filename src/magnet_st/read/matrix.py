"""Count matrices in 10x Genomics formats: the HDF5 file (v3 and legacy v2) and the MTX folder."""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from magnet_st.errors import InputError

GENE_EXPRESSION = "Gene Expression"


@dataclass
class CountMatrix:
    """Raw counts, barcodes x genes (CSR, integer), with the file they came from."""

    counts: sp.csr_matrix
    barcodes: np.ndarray
    gene_ids: np.ndarray
    gene_names: np.ndarray
    source: Path


def as_integer_counts(matrix: sp.spmatrix | np.ndarray, source: str | Path) -> sp.csr_matrix:
    """Return ``matrix`` as CSR with an integer dtype, or raise if it holds non-counts."""
    m = sp.csr_matrix(matrix)
    if m.shape[0] == 0 or m.shape[1] == 0:
        raise InputError(source, f"the count matrix is empty ({m.shape[0]} x {m.shape[1]})")
    data = m.data
    if data.size:
        if not np.all(np.isfinite(data)):
            raise InputError(source, "the count matrix contains NaN or infinite values")
        if np.any(data < 0):
            raise InputError(source, "the count matrix contains negative values")
        if data.dtype.kind == "f" and np.any(data != np.round(data)):
            raise InputError(
                source,
                "the count matrix holds non-integer values; raw UMI counts are needed "
                "(normalised or log-transformed data cannot be used as training targets)",
            )
    top = int(data.max()) if data.size else 0
    dtype = np.int32 if top < np.iinfo(np.int32).max else np.int64
    m = sp.csr_matrix((data.astype(dtype), m.indices, m.indptr), shape=m.shape)
    m.sum_duplicates()
    m.eliminate_zeros()
    return m


def _decode(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "SO":
        return np.array(
            [v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object
        )
    return values.astype(str).astype(object)


def read_10x_h5(path: str | Path, feature_type: str = GENE_EXPRESSION) -> CountMatrix:
    """Read a Cell Ranger / Space Ranger HDF5 matrix (``filtered_feature_bc_matrix.h5``).

    Only features of ``feature_type`` are kept (other modalities such as antibody
    capture are dropped). Both the v3 layout (``matrix/features``) and the older
    v2 layout (one group per genome) are understood.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "count matrix file not found")
    try:
        with h5py.File(path, "r") as f:
            if "matrix" in f:
                g = f["matrix"]
                needed = ["data", "indices", "indptr", "shape", "barcodes", "features"]
                missing = [k for k in needed if k not in g]
                if missing:
                    raise InputError(path, f"not a 10x HDF5 matrix: 'matrix' lacks {missing}")
                feats = g["features"]
                gene_ids = _decode(feats["id"][:])
                gene_names = _decode(feats["name"][:])
                types = (
                    _decode(feats["feature_type"][:])
                    if "feature_type" in feats
                    else np.full(len(gene_ids), feature_type, dtype=object)
                )
            else:
                groups = [k for k in f if isinstance(f[k], h5py.Group)]
                if len(groups) != 1 or "genes" not in f[groups[0]]:
                    raise InputError(path, "not a 10x HDF5 matrix (no 'matrix' group)")
                g = f[groups[0]]
                gene_ids = _decode(g["genes"][:])
                gene_names = _decode(g["gene_names"][:])
                types = np.full(len(gene_ids), feature_type, dtype=object)
            n_genes, n_barcodes = (int(v) for v in g["shape"][:])
            data = g["data"][:]
            indices = g["indices"][:].astype(np.int64)
            indptr = g["indptr"][:].astype(np.int64)
            barcodes = _decode(g["barcodes"][:])
    except InputError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(path, f"cannot read as a 10x HDF5 matrix ({exc})") from exc
    if len(barcodes) != n_barcodes or len(gene_ids) != n_genes or len(indptr) != n_barcodes + 1:
        raise InputError(path, "inconsistent 10x HDF5 matrix: shape does not match its arrays")
    # Stored as CSC of genes x barcodes, which is CSR of barcodes x genes.
    counts = sp.csr_matrix((data, indices, indptr), shape=(n_barcodes, n_genes))
    keep = np.asarray(types == feature_type)
    if not keep.any():
        raise InputError(path, f"no features of type {feature_type!r}")
    if not keep.all():
        counts = counts[:, np.flatnonzero(keep)]
    return CountMatrix(
        counts=as_integer_counts(counts, path),
        barcodes=barcodes,
        gene_ids=gene_ids[keep],
        gene_names=gene_names[keep],
        source=path,
    )


def _open_maybe_gzip(path: Path) -> io.BufferedIOBase:
    """Open a file that may or may not really be gzip-compressed, whatever its name says."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")  # noqa: SIM115


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise InputError(folder / f"{stem}.gz", "file not found in the MTX matrix folder")


def _read_tsv(path: Path) -> pd.DataFrame:
    try:
        with _open_maybe_gzip(path) as fh:
            return pd.read_csv(fh, sep="\t", header=None, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise InputError(path, f"cannot read as a tab-separated file ({exc})") from exc


def read_10x_mtx(folder: str | Path, feature_type: str = GENE_EXPRESSION) -> CountMatrix:
    """Read a 10x MTX folder (``matrix.mtx.gz``, ``features.tsv.gz``, ``barcodes.tsv.gz``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "MTX matrix folder not found")
    mtx_path = _find(folder, "matrix.mtx")
    try:
        feat_path = _find(folder, "features.tsv")
    except InputError:
        feat_path = _find(folder, "genes.tsv")
    bc_path = _find(folder, "barcodes.tsv")
    try:
        with _open_maybe_gzip(mtx_path) as fh:
            m = scipy.io.mmread(fh)
    except (OSError, ValueError) as exc:
        raise InputError(mtx_path, f"cannot read as a MatrixMarket file ({exc})") from exc
    feats = _read_tsv(feat_path)
    bcs = _read_tsv(bc_path)
    if feats.shape[1] < 2 and feats.shape[0]:
        raise InputError(feat_path, "expected at least 2 columns (gene id, gene name)")
    n_genes, n_barcodes = m.shape
    if len(feats) != n_genes:
        raise InputError(feat_path, f"{len(feats)} features but the matrix has {n_genes} rows")
    if len(bcs) != n_barcodes:
        raise InputError(bc_path, f"{len(bcs)} barcodes but the matrix has {n_barcodes} columns")
    types = (
        feats[2].to_numpy(dtype=object)
        if feats.shape[1] > 2
        else np.full(n_genes, feature_type, dtype=object)
    )
    keep = types == feature_type
    if not keep.any():
        raise InputError(feat_path, f"no features of type {feature_type!r}")
    counts = sp.csr_matrix(m).T.tocsr()[:, np.flatnonzero(keep)]
    return CountMatrix(
        counts=as_integer_counts(counts, mtx_path),
        barcodes=bcs[0].to_numpy(dtype=object),
        gene_ids=feats[0].to_numpy(dtype=object)[keep],
        gene_names=feats[1].to_numpy(dtype=object)[keep],
        source=mtx_path,
    )
