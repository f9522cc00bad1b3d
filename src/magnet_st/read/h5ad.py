"""AnnData files (``.h5ad``) with unit positions in ``obsm["spatial"]``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from magnet_st.data.slide import Slide
from magnet_st.errors import InputError
from magnet_st.read.matrix import as_integer_counts


# Long: one checked read: file, positions, counts source (layer, raw.X or X), scalefactors,
# unit size, each with its own error message, all feeding one 20-line Slide(...).
def h5ad(
    path: str | Path,
    image: str | Path | None = None,
    *,
    microns_per_pixel: float | None = None,
    unit_size_um: float | None = None,
    counts_layer: str | None = None,
    name: str | None = None,
) -> Slide:
    """Read an AnnData file whose ``obsm["spatial"]`` holds unit centres in full-resolution pixels.

    Keys used:

    - counts: ``layers[counts_layer]`` if given, else ``layers["counts"]``, else ``raw.X``
      (genes from ``raw.var``), else ``X``; non-negative integers;
    - genes: ``var["gene_ids"]`` (else the var names) as ids, the var names as symbols;
    - positions: ``obsm["spatial"]`` (x, y in full-resolution pixels); optional
      ``obs["array_row"]``, ``obs["array_col"]``;
    - ``uns["spatial"][<library>]`` (one library): ``scalefactors["microns_per_pixel"]``
      and ``scalefactors["bin_size_um"]`` (the unit size: bin edge or spot diameter),
      used when ``microns_per_pixel`` / ``unit_size_um`` are not given; and
      ``metadata["lists_all_genes"]`` (default true; false when the counts list only
      the genes the section detected, as legacy ST tables do, or when
      ``metadata["technology"]`` is ``"legacy_st"``).
    """
    import anndata

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "AnnData file not found")
    try:
        adata = anndata.read_h5ad(path)
    except Exception as exc:  # h5py / anndata raise many types for bad files
        raise InputError(path, f"cannot read as an AnnData .h5ad file ({exc})") from exc
    if "spatial" not in adata.obsm:
        raise InputError(path, 'no obsm["spatial"] with unit positions')
    spatial = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if spatial.ndim != 2 or spatial.shape[1] < 2:
        raise InputError(path, f'obsm["spatial"] has shape {spatial.shape}, expected (n, 2)')

    if counts_layer is not None:
        if counts_layer not in adata.layers:
            raise InputError(path, f"no layer {counts_layer!r}; layers: {list(adata.layers)}")
        X, where, var = adata.layers[counts_layer], f"layers[{counts_layer!r}]", adata.var
    elif "counts" in adata.layers:
        X, where, var = adata.layers["counts"], 'layers["counts"]', adata.var
    elif adata.raw is not None:
        X, where, var = adata.raw.X, "raw.X", adata.raw.var
    else:
        X, where, var = adata.X, "X", adata.var
    if X is None:
        raise InputError(path, "the AnnData has no expression matrix")
    try:
        counts = as_integer_counts(X, path)
    except InputError as exc:
        raise InputError(path, f"{where}: {exc.problem}") from exc

    sf: dict = {}
    meta: dict = {}
    libraries = adata.uns.get("spatial", {})
    if isinstance(libraries, dict) and len(libraries) == 1:
        library = next(iter(libraries.values()))
        sf = dict(library.get("scalefactors", {}))
        meta = dict(library.get("metadata", {}))
    if microns_per_pixel is None:
        microns_per_pixel = sf.get("microns_per_pixel")
        if microns_per_pixel is None:
            raise InputError(
                path,
                'no microns per pixel: pass it (--mpp) or store it in uns["spatial"][lib]'
                '["scalefactors"]["microns_per_pixel"]',
            )
        mpp_source = f"{path} (uns['spatial'] scalefactors)"
    else:
        mpp_source = "given by the user"
    if unit_size_um is None:
        unit_size_um = sf.get("bin_size_um")
        if unit_size_um is None:
            raise InputError(
                path,
                "unit size unknown: pass it (--unit-size UM, or the sample sheet's "
                "unit_size_um column: bin edge or spot diameter in microns) or store it in "
                'uns["spatial"][lib]["scalefactors"]["bin_size_um"]',
            )
    if not (np.isfinite(float(unit_size_um)) and float(unit_size_um) > 0):
        raise InputError(path, f"the unit size must be a positive number, got {unit_size_um!r}")
    lists_all = meta.get("lists_all_genes")
    if lists_all is None:
        lists_all = str(meta.get("technology", "")) != "legacy_st"
    gene_ids = (
        var["gene_ids"].astype(str).to_numpy(dtype=object)
        if "gene_ids" in var
        else var.index.astype(str).to_numpy(dtype=object)
    )
    array_coords = (
        adata.obs[["array_row", "array_col"]].to_numpy(np.int64)
        if {"array_row", "array_col"} <= set(adata.obs.columns)
        else None
    )
    slide = Slide(
        name=name or path.stem,
        counts=counts,
        gene_ids=gene_ids,
        gene_names=var.index.astype(str).to_numpy(dtype=object),
        unit_ids=adata.obs_names.astype(str).to_numpy(dtype=object),
        centers_px=spatial[:, :2],
        array_coords=array_coords,
        unit_size_um=float(unit_size_um),
        microns_per_pixel=float(microns_per_pixel),
        technology="anndata",
        lists_all_genes=bool(lists_all),
        image_path=None if image is None else Path(image),
        sources={
            "counts": f"{path} {where}",
            "positions": f'{path} obsm["spatial"]',
            "microns_per_pixel": mpp_source,
            **({"image": str(image)} if image is not None else {}),
        },
    )
    slide.check_image_bounds()
    return slide
