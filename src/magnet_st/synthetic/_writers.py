"""Writers of Space Ranger's files, the pyramidal image, and the sampled counts."""

from __future__ import annotations

import gzip
import itertools
import json
import math
import shutil
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import tifffile
from PIL import Image
from tqdm.auto import tqdm

from magnet_st.synthetic._params import (
    BARCODE_DTYPE,
    JPEG_QUALITY,
    RENDER_THREADS,
    SOFTWARE_VERSION,
    TILE,
)
from magnet_st.synthetic._scene import (
    _Genes,
    _Scene,
)

# --------------------------------------------------------------------------- writers


def _barcodes(size: int, rows: np.ndarray, ncols: int) -> np.ndarray:
    pre = np.array([f"s_{size:03d}um_{r:05d}_".encode() for r in rows], dtype="S14")
    suf = np.array([f"{c:05d}-1".encode() for c in range(ncols)], dtype="S7")
    return np.strings.add(pre[:, None], suf[None, :]).ravel().astype(BARCODE_DTYPE)


_POS_SCHEMA = pa.schema(
    [
        ("barcode", pa.string()),
        ("in_tissue", pa.int32()),
        ("array_row", pa.int32()),
        ("array_col", pa.int32()),
        ("pxl_row_in_fullres", pa.float64()),
        ("pxl_col_in_fullres", pa.float64()),
    ]
)


class _H5Matrix:
    """A 10x HDF5 v3 feature-barcode matrix, appended barcode by barcode (CSC genes x bcs)."""

    def __init__(self, path: Path, genes: _Genes) -> None:
        self.path = path
        self.f = h5py.File(path, "w")
        f = self.f
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = np.int64(2)
        f.attrs["library_ids"] = np.array([b"synthetic"])
        f.attrs["original_gem_groups"] = np.array([1], dtype=np.int64)
        f.attrs["chemistry_description"] = "Visium HD v1 (synthetic, magnet-st)"
        f.attrs["software_version"] = SOFTWARE_VERSION
        m = f.create_group("matrix")
        kw: dict[str, Any] = {
            "maxshape": (None,),
            "compression": "gzip",
            "compression_opts": 2,
            "shuffle": True,
        }
        m.create_dataset("barcodes", shape=(0,), dtype=BARCODE_DTYPE, chunks=(1 << 14,), **kw)
        m.create_dataset("data", shape=(0,), dtype=np.int32, chunks=(1 << 18,), **kw)
        m.create_dataset("indices", shape=(0,), dtype=np.int64, chunks=(1 << 18,), **kw)
        m.create_dataset("indptr", data=np.zeros(1, dtype=np.int64), chunks=(1 << 16,), **kw)
        feat = m.create_group("features")
        n = len(genes.names)
        feat.create_dataset("id", data=np.array([s.encode() for s in genes.ids]))
        feat.create_dataset("name", data=np.array([s.encode() for s in genes.names]))
        feat.create_dataset("feature_type", data=np.array([b"Gene Expression"] * n))
        feat.create_dataset("genome", data=np.array([b"SYNTHETIC"] * n))
        feat.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        self.n_genes = n
        self.n_barcodes = 0
        self.nnz = 0

    @staticmethod
    def _append(ds: h5py.Dataset, arr: np.ndarray) -> None:
        n = ds.shape[0]
        ds.resize((n + arr.shape[0],))
        ds[n:] = arr

    def append(self, barcodes: np.ndarray, bins: np.ndarray, genes: np.ndarray, counts: np.ndarray):
        m = self.f["matrix"]
        nb = barcodes.shape[0]
        per = np.bincount(bins, minlength=nb)
        indptr = self.nnz + np.cumsum(per)
        self._append(m["barcodes"], barcodes)
        self._append(m["data"], counts.astype(np.int32))
        self._append(m["indices"], genes.astype(np.int64))
        self._append(m["indptr"], indptr.astype(np.int64))
        self.n_barcodes += nb
        self.nnz += int(counts.size)

    def close(self) -> None:
        self.f["matrix"].create_dataset(
            "shape", data=np.array([self.n_genes, self.n_barcodes], dtype=np.int32)
        )
        self.f.close()


class _MtxWriter:
    """``filtered_feature_bc_matrix/`` (MatrixMarket body spooled to a temporary gzip member)."""

    def __init__(self, folder: Path, genes: _Genes) -> None:
        folder.mkdir(parents=True)
        self.folder = folder
        with gzip.open(folder / "features.tsv.gz", "wt", compresslevel=6) as fh:
            for gid, name in zip(genes.ids, genes.names, strict=True):
                fh.write(f"{gid}\t{name}\tGene Expression\n")
        self.n_genes = len(genes.names)
        self.bc = gzip.open(folder / "barcodes.tsv.gz", "wb", compresslevel=6)  # noqa: SIM115
        self.body_path = folder / ".matrix.body.gz"
        self.body = open(self.body_path, "wb")  # noqa: SIM115
        self.z = zlib.compressobj(4, zlib.DEFLATED, 31)
        self.n_barcodes = 0
        self.nnz = 0
        self.opts = pacsv.WriteOptions(include_header=False, delimiter=" ", quoting_style="none")

    def append(self, barcodes: np.ndarray, bins: np.ndarray, genes: np.ndarray, counts: np.ndarray):
        self.bc.write(b"\n".join(barcodes.tolist()) + b"\n" if barcodes.size else b"")
        if counts.size:
            table = pa.table(
                {
                    "g": genes.astype(np.int64) + 1,
                    "b": bins.astype(np.int64) + (self.n_barcodes + 1),
                    "c": counts.astype(np.int64),
                }
            )
            sink = pa.BufferOutputStream()
            pacsv.write_csv(table, sink, write_options=self.opts)
            self.body.write(self.z.compress(sink.getvalue().to_pybytes()))
        self.n_barcodes += barcodes.shape[0]
        self.nnz += int(counts.size)

    def close(self) -> None:
        self.bc.close()
        self.body.write(self.z.flush())
        self.body.close()
        meta = json.dumps({"software_version": SOFTWARE_VERSION, "format_version": 2})
        header = (
            "%%MatrixMarket matrix coordinate integer general\n"
            f"%metadata_json: {meta}\n"
            f"{self.n_genes} {self.n_barcodes} {self.nnz}\n"
        )
        # A gzip file may hold several members: header member + spooled body member.
        with open(self.folder / "matrix.mtx.gz", "wb") as out:
            out.write(gzip.compress(header.encode(), compresslevel=6, mtime=0))
            with open(self.body_path, "rb") as body:
                shutil.copyfileobj(body, out, 1 << 22)
        self.body_path.unlink()


class _LevelWriter:
    """All matrix and position outputs of one bin size."""

    def __init__(
        self,
        size: int,
        folder: Path,
        genes: _Genes,
        *,
        write_mtx: bool,
        write_raw: bool,
    ) -> None:
        self.size = size
        self.folder = folder
        (folder / "spatial").mkdir(parents=True)
        self.filtered = _H5Matrix(folder / "filtered_feature_bc_matrix.h5", genes)
        self.raw = _H5Matrix(folder / "raw_feature_bc_matrix.h5", genes) if write_raw else None
        self.mtx = _MtxWriter(folder / "filtered_feature_bc_matrix", genes) if write_mtx else None
        self.pos = pq.ParquetWriter(
            folder / "spatial" / "tissue_positions.parquet", _POS_SCHEMA, compression="snappy"
        )
        self.n_total = 0
        self.n_tissue = 0

    def add_band(
        self,
        scene: _Scene,
        rows: np.ndarray,
        in_tissue: np.ndarray,
        bins: np.ndarray,
        genes: np.ndarray,
        counts: np.ndarray,
    ) -> None:
        """One band of whole bin rows; entries sorted by (bin, gene), bins row-major."""
        ncols = in_tissue.shape[1]
        s = self.size
        bcs = _barcodes(s, rows, ncols)
        it = in_tissue.ravel()
        rr = np.repeat(rows, ncols).astype(np.int32)
        cc = np.tile(np.arange(ncols, dtype=np.int32), rows.size)
        self.pos.write_table(
            pa.table(
                {
                    "barcode": pa.array(bcs).cast(pa.string()),
                    "in_tissue": it.astype(np.int32),
                    "array_row": rr,
                    "array_col": cc,
                    "pxl_row_in_fullres": (scene.oy + (rr + 0.5) * s) / scene.mpp,
                    "pxl_col_in_fullres": (scene.ox + (cc + 0.5) * s) / scene.mpp,
                },
                schema=_POS_SCHEMA,
            )
        )
        if self.raw is not None:
            self.raw.append(bcs, bins, genes, counts)
        keep = it[bins]
        new_index = np.cumsum(it) - 1
        fb = new_index[bins[keep]]
        fbcs = bcs[it]
        self.filtered.append(fbcs, fb, genes[keep], counts[keep])
        if self.mtx is not None:
            self.mtx.append(fbcs, fb, genes[keep], counts[keep])
        self.n_total += bcs.size
        self.n_tissue += int(it.sum())

    def close(self) -> None:
        self.pos.close()
        self.filtered.close()
        if self.raw is not None:
            self.raw.close()
        if self.mtx is not None:
            self.mtx.close()


# --------------------------------------------------------------------------- image


def _pyramid_shapes(height: int, width: int) -> list[tuple[int, int]]:
    shapes = [(height, width)]
    while max(shapes[-1]) >= 1024:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def _render_bands(
    scene: _Scene, h: int, w: int, px_um: float, rows: int = TILE
) -> Iterator[np.ndarray]:
    """Render an ``h x w`` image at ``px_um`` in bands of ``rows`` rows (the last one may run
    past ``h``), two bands at a time in threads (numpy releases the GIL)."""
    starts = iter(range(0, h, rows))
    with ThreadPoolExecutor(max_workers=RENDER_THREADS) as pool:
        pending: deque[Future[np.ndarray]] = deque()
        for r0 in itertools.islice(starts, RENDER_THREADS):
            pending.append(pool.submit(scene.render, r0, 0, rows, w, px_um))
        while pending:
            band = pending.popleft().result()
            r0 = next(starts, None)
            if r0 is not None:
                pending.append(pool.submit(scene.render, r0, 0, rows, w, px_um))
            yield band


def _write_tiff(scene: _Scene, path: Path, progress: bool) -> list[tuple[int, int]]:
    shapes = _pyramid_shapes(scene.height_px, scene.width_px)
    total = sum(math.ceil(h / TILE) * math.ceil(w / TILE) for h, w in shapes)
    bar = tqdm(total=total, desc="synthetic H&E", unit="tile", disable=not progress)

    def tiles(level: int, h: int, w: int) -> Iterator[np.ndarray]:
        ntx = math.ceil(w / TILE)
        for band in _render_bands(scene, h, ntx * TILE, scene.mpp * 2**level):
            for j in range(ntx):
                yield band[:, j * TILE : (j + 1) * TILE]
                bar.update(1)

    try:
        with tifffile.TiffWriter(path, bigtiff=True) as tif:
            for level, (h, w) in enumerate(shapes):
                res = 1e4 / (scene.mpp * 2**level)  # pixels per centimetre
                kwargs: dict[str, Any] = {
                    "shape": (h, w, 3),
                    "dtype": np.uint8,
                    "tile": (TILE, TILE),
                    "photometric": "rgb",
                    "compression": "jpeg",
                    "compressionargs": {"level": JPEG_QUALITY},
                    "resolution": (res, res),
                    "resolutionunit": tifffile.RESUNIT.CENTIMETER,
                    "maxworkers": 2,
                }
                if level == 0:
                    kwargs["subifds"] = len(shapes) - 1
                    kwargs["description"] = (
                        f"SYNTHETIC H&E-like image made by magnet-st (seed {scene.seed}); "
                        f"mpp={scene.mpp}"
                    )
                    kwargs["metadata"] = None
                else:
                    kwargs["subfiletype"] = 1
                tif.write(tiles(level, h, w), **kwargs)
    finally:
        bar.close()
    return shapes


def _render_whole(scene: _Scene, scalef: float) -> np.ndarray:
    h = max(1, int(round(scene.height_px * scalef)))
    w = max(1, int(round(scene.width_px * scalef)))
    out = np.empty((h, w, 3), dtype=np.uint8)
    for i, band in enumerate(_render_bands(scene, h, w, scene.mpp / scalef)):
        r0 = i * TILE
        out[r0 : r0 + TILE] = band[: min(TILE, h - r0)]
    return out


def _write_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, format="PNG", compress_level=3)
