"""Parts of a prepared level's ``.h5ad`` read straight from disk, without the AnnData.

Opening an AnnData (even backed) reads all of ``obs`` (with its string index), ``obsm``
and ``obsp``: on a 550k-bin slide that is ~190 MB a training run never uses. Training
reads only the elements it needs (:func:`read_element`) and the rows of the count matrix
each batch needs (:class:`PanelCounts`), so its memory does not grow with the slide.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from magnet_st.data.panel import column_index, select_columns

try:  # anndata >= 0.11
    from anndata.io import read_elem, sparse_dataset
except ImportError:  # pragma: no cover - anndata 0.10
    from anndata.experimental import read_elem, sparse_dataset


def read_element(group: Any, key: str) -> Any:
    """One element of an open ``.h5ad`` (``"obsm/spatial"``, ``"obs/spot"``, ``"var"``)."""
    return read_elem(group[key])


def n_rows(f: Any) -> int:
    """Number of units (rows of ``X``) of an open ``.h5ad``."""
    X = f["X"]
    return int(X.attrs["shape"][0]) if "shape" in X.attrs else int(X.shape[0])


def _rows(rows: np.ndarray | slice, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, wanted, back)`` for an index of ``n`` rows: the rows asked for (a slice
    expanded, negatives counted from the end), the sorted distinct rows to read, and where
    each asked row lies among them."""
    if isinstance(rows, slice):
        rows = np.arange(*rows.indices(n))
    rows = np.asarray(rows, dtype=np.int64).ravel()
    if len(rows) and (rows.min() < -n or rows.max() >= n):
        raise IndexError(f"row index out of range for {n} rows")
    rows = np.where(rows < 0, rows + n, rows)
    wanted, back = np.unique(rows, return_inverse=True)
    return rows, wanted, back.ravel()


class PanelCounts:
    """The raw counts of a gene panel for the units of one level of one slide, read from
    the level's ``.h5ad`` when asked for: ``counts[rows]`` (an integer array or a slice)
    is a CSR matrix (rows x panel genes) of those rows only.

    A gene the file does not list is a column of zeros (``fill_absent``: a slide that
    lists only detected genes; the caller checks presence first). ``row_scale``: each
    unit's rows are multiplied by it (library-size normalisation). The file is opened
    lazily in each process, so the object can go to DataLoader workers."""

    def __init__(
        self,
        path: str | Path,
        gene_ids: Sequence[str],
        genes: Sequence[str],
        *,
        fill_absent: bool = False,
        row_scale: np.ndarray | None = None,
    ):
        self.path = Path(path)
        self._cols = column_index(gene_ids, genes, fill_absent=fill_absent)
        self.row_scale = None if row_scale is None else np.asarray(row_scale, np.float64)
        self._file: Any = None
        self._matrix: Any = None
        self._pid = -1
        with self._open_file() as f:
            self.shape = (n_rows(f), len(self._cols))
        if self.row_scale is not None and len(self.row_scale) != self.shape[0]:
            raise ValueError(f"{len(self.row_scale)} row scales for {self.shape[0]} rows")

    def _open_file(self) -> Any:
        import h5py

        return h5py.File(self.path, "r")

    def _x(self) -> Any:
        import h5py

        if self._matrix is None or self._pid != os.getpid():
            self._file = self._open_file()
            X = self._file["X"]
            self._matrix = X if isinstance(X, h5py.Dataset) else sparse_dataset(X)
            self._pid = os.getpid()
        return self._matrix

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = self._matrix = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_file=None, _matrix=None, _pid=-1)
        return state

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: np.ndarray | slice) -> sp.csr_matrix:
        rows, wanted, back = _rows(rows, self.shape[0])
        if len(rows) == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        X = self._x()
        if len(wanted) == wanted[-1] - wanted[0] + 1:  # one run of rows: one read
            block = X[int(wanted[0]) : int(wanted[-1]) + 1]
        else:
            block = X[wanted]
        block = sp.csr_matrix(block)
        if not np.array_equal(wanted, rows):
            block = block[back]
        block = select_columns(block, self._cols)
        if self.row_scale is None:
            return block
        return sp.csr_matrix(sp.diags(self.row_scale[rows]) @ block, dtype=np.float32)

    def chunks(self, chunk: int = 50_000):
        """The panel counts of every row, ``chunk`` rows at a time."""
        for i in range(0, self.shape[0], chunk):
            yield self[i : min(i + chunk, self.shape[0])]

    def to_memory(self) -> sp.csr_matrix:
        parts = list(self.chunks())
        if not parts:
            return sp.csr_matrix(self.shape, dtype=np.float32)
        return sp.vstack(parts, format="csr")


class NpyRows:
    """The rows of a 2-d ``.npy`` file read when asked for: ``rows_file[rows]`` reads each
    run of consecutive rows with one ``pread``. Unlike a memory map, what was read does not
    stay mapped into the process, so a long training run's memory does not grow with the
    part of the file it has visited (a memory map's pages count towards the process's
    resident memory until the kernel reclaims them)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            fmt = np.lib.format
            version = fmt.read_magic(f)
            read_header = (
                fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if fortran or len(shape) != 2:
            raise ValueError(f"{self.path}: expected a C-ordered 2-d array, got shape {shape}")
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        self._row_bytes = self.shape[1] * self.dtype.itemsize
        self._fd = -1
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": -1, "_pid": -1}

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = -1

    def __len__(self) -> int:
        return self.shape[0]

    def _descriptor(self) -> int:
        if self._fd < 0 or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def _read(self, start: int, stop: int) -> np.ndarray:
        n = (stop - start) * self._row_bytes
        buf = os.pread(self._descriptor(), n, self.offset + start * self._row_bytes)
        if len(buf) != n:
            raise OSError(f"{self.path}: file ends before row {stop}")
        return np.frombuffer(buf, dtype=self.dtype).reshape(stop - start, self.shape[1])

    def __getitem__(self, rows: np.ndarray | slice) -> np.ndarray:
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.shape[0])
            if step == 1:
                return self._read(start, max(start, stop)).copy()
        rows, wanted, back = _rows(rows, self.shape[0])
        if len(rows) == 0:
            return np.empty((0, self.shape[1]), self.dtype)
        cuts = np.flatnonzero(np.diff(wanted) != 1) + 1
        parts = [self._read(int(run[0]), int(run[-1]) + 1) for run in np.split(wanted, cuts)]
        out = np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
        return out if np.array_equal(wanted, rows) else out[back]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)
