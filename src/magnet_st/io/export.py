"""A prediction as a SpatialData zarr store (``magnet predict --spatialdata``).

Written with zarr, anndata and pyarrow (no ``spatialdata`` needed), in the layout that
``spatialdata.read_zarr`` reads and :mod:`magnet_st.read.spatialdata` expects: spatialdata's
current formats (``_io/format.py``) on zarr v3: container 0.2 (root attributes
``spatialdata_attrs.version``), tables 0.2, shapes 0.3, raster 0.3 (OME-NGFF
``0.5-dev-spatialdata`` under ``"ome"``), with spatialdata-io's Visium HD names and
coordinate systems (``readers/visium_hd.py``), the slide's name as its ``dataset_id``:

- ``tables/square_008um`` (``square_016um`` for 16 um bins), ``tables/spot_tiles`` and
  ``tables/region_tiles``: the predictions of each level as ``bins.h5ad`` has them (X,
  var, obs, ``obsm["spatial"]``, layers, ``uns["magnet"]``; not ``uns["spatial"]``, whose
  images are image elements here), plus ``obs["location_id"]`` (0 .. n-1, the instance key)
  and the region key column (categorical: the shapes' name); ``uns["spatialdata_attrs"]``
  and the group's attributes as ``_io/io_table.py`` writes them. The region key is
  ``annotated_element``, not spatialdata-io's ``region``: the bins' and spot tiles' obs
  already use ``region`` for the region tile that holds them.
- ``shapes/<slide>_square_008um``, ``shapes/<slide>_spot_tiles``,
  ``shapes/<slide>_region_tiles``: ``shapes.parquet`` (GeoParquet, WKB polygons, the ids as
  the pandas index ``location_id``: ``_io/io_shapes.py`` with geopandas' ``to_parquet``),
  squares centred on ``obsm["spatial"]`` with the unit's edge in full-resolution pixels
  (bin or tile edge in microns / microns per pixel), vertices in the order of shapely's
  ``Point.buffer(r, cap_style=3)`` (spatialdata-io's ``bins_as_squares``). Their
  transformations (``_io/_utils.py``): identity to ``<slide>`` (full-resolution pixels), a
  scale by each image's scale factor to ``<slide>_downscaled_hires`` / ``_lowres``.
- ``images/<slide>_hires_image`` and ``images/<slide>_lowres_image``: the thumbnails of
  ``uns["spatial"]`` (one level, axes c, y, x, uint8), with identity to
  ``<slide>_downscaled_hires`` (``_lowres``) and the inverse scale to ``<slide>``, as
  spatialdata-io places Space Ranger's hires and lowres images. There is no
  ``<slide>_full_image``: the full-resolution image stays where it is.

Element names keep only the characters spatialdata allows (``_core/validation.py``
``check_valid_name``: letters, digits, ``_``, ``-``, ``.``); others become ``_``. The root
group also holds ``magnet_st`` attributes (spatialdata reads them as ``SpatialData.attrs``)
and consolidated metadata (``SpatialData.write``'s default). Without a ``*_full_image``,
:func:`magnet_st.read.spatialdata_zarr` places the bins on the largest image (hires).
"""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from magnet_st.util.atomic import atomic_path

INSTANCE_KEY = "location_id"
REGION_KEY = "annotated_element"
TILE_TABLES = {"spot": "spot_tiles", "region": "region_tiles"}
CELL_TABLE = "cell_segmentations"  # spatialdata-io's table (and shapes suffix) of HD cells
CONTAINER_VERSION, TABLES_VERSION, SHAPES_VERSION, RASTER_VERSION = "0.2", "0.2", "0.3", "0.3"
NGFF_VERSION = "0.5-dev-spatialdata"
_WKB_SQUARE = struct.pack("<BIII", 1, 3, 1, 5)  # little endian, polygon, 1 ring, 5 vertices
_SQUARE = np.array([[1, 1], [1, -1], [-1, -1], [-1, 1], [1, 1]], dtype=np.float64)


def element_name(name: str) -> str:
    """``name`` as a valid SpatialData element name (see the module)."""
    out = "".join(c if c.isalnum() or c in "_-." else "_" for c in str(name)).lstrip("_")
    return out if out.strip(".") else "slide"


def table_name(level: str, bin_um: float) -> str:
    """The table of a level: ``square_008um`` (spatialdata-io's name) or ``spot_tiles``."""
    return f"square_{round(bin_um):03d}um" if level == "bin" else TILE_TABLES.get(level, level)


def _cs(name: str, axes: str) -> dict[str, Any]:
    """A coordinate system as spatialdata's ``NgffCoordinateSystem.to_dict`` writes it."""
    space = [{"name": a, "type": "space", "unit": "unit"} for a in axes if a != "c"]
    return {"name": name, "axes": [{"name": "c", "type": "channel"}] * ("c" in axes) + space}


def _ngff(kind: str, axes: str, target: str, **values: Any) -> dict[str, Any]:
    """One NGFF transformation (``transformations/ngff/``): input named after its axes."""
    return {"type": kind, **values, "input": _cs(axes, axes), "output": _cs(target, axes)}


def _squares_wkb(xy: np.ndarray, half: float) -> Any:
    """ISO WKB squares (93 bytes each) centred on ``xy`` as a pyarrow binary array."""
    import pyarrow as pa

    n = len(xy)
    rows = np.empty((n, 93), np.uint8)
    rows[:, :13] = np.frombuffer(_WKB_SQUARE, np.uint8)
    ring = (xy[:, None, :] + half * _SQUARE[None]).astype("<f8").reshape(n, 10)
    rows[:, 13:] = ring.view(np.uint8)
    large = n * 93 >= 2**31
    offsets = np.arange(n + 1, dtype=np.int64 if large else np.int32) * 93
    kind = pa.large_binary() if large else pa.binary()
    return pa.Array.from_buffers(kind, n, [None, pa.py_buffer(offsets), pa.py_buffer(rows)])


def _polygons_wkb(xy: np.ndarray, offsets: np.ndarray) -> Any:
    """ISO WKB polygons (one closed ring each; ``xy[offsets[i]:offsets[i + 1]]`` the open
    ring of polygon ``i``) as a pyarrow binary array."""
    import pyarrow as pa

    k = np.diff(offsets).astype(np.int64)
    sizes = 13 + 16 * (k + 1)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    buf = np.empty(int(starts[-1]), np.uint8)
    for i in range(len(k)):
        ring = np.asarray(xy[offsets[i] : offsets[i + 1]], "<f8")
        ring = np.vstack([ring, ring[:1]])
        head = np.frombuffer(struct.pack("<BIII", 1, 3, 1, int(k[i]) + 1), np.uint8)
        buf[starts[i] : starts[i] + 13] = head
        buf[starts[i] + 13 : starts[i + 1]] = ring.reshape(-1).view(np.uint8)
    large = starts[-1] >= 2**31
    kind = pa.large_binary() if large else pa.binary()
    offs = starts.astype(np.int64 if large else np.int32)
    return pa.Array.from_buffers(kind, len(k), [None, pa.py_buffer(offs), pa.py_buffer(buf)])


def _write_shapes(
    root: Any,
    name: str,
    xy: np.ndarray,
    edge_px: float,
    transforms: list,
    polygons: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    group = root["shapes"].create_group(name)
    ids = np.arange(len(xy), dtype=np.int64)
    # the pandas metadata geopandas writes: geometry as bytes, the index as a column
    sample = pd.DataFrame({"geometry": [b""]}, index=pd.Index(ids[:1], name=INSTANCE_KEY))
    meta = dict(pa.Schema.from_pandas(sample, preserve_index=True).metadata or {})
    if polygons is None:  # squares of the unit's edge
        lo, hi = xy.min(axis=0) - edge_px / 2, xy.max(axis=0) + edge_px / 2
        geometry = _squares_wkb(xy, edge_px / 2)
    else:  # cells: their outlines
        lo, hi = polygons[0].min(axis=0), polygons[0].max(axis=0)
        geometry = _polygons_wkb(*polygons)
    column = {"encoding": "WKB", "crs": None, "geometry_types": ["Polygon"]}
    column["bbox"] = [float(v) for v in (*lo, *hi)]
    geo = {"version": "1.0.0", "primary_column": "geometry", "columns": {"geometry": column}}
    table = pa.table({"geometry": geometry, INSTANCE_KEY: ids})
    table = table.replace_schema_metadata({**meta, b"geo": json.dumps(geo).encode()})
    pq.write_table(table, Path(root.store.root) / group.path / "shapes.parquet")
    group.attrs.update(
        {
            "encoding-type": "ngff:shapes",
            "axes": ["x", "y"],
            "coordinateTransformations": transforms,
            "spatialdata_attrs": {"version": SHAPES_VERSION},
        }
    )


def _write_table(root: Any, name: str, ad: Any, region: str) -> None:
    import anndata

    for key in (INSTANCE_KEY, REGION_KEY):
        if key in ad.obs:
            raise ValueError(f"level table {name!r}: obs already has a column {key!r}")
    obs = ad.obs.copy()
    obs[REGION_KEY] = pd.Categorical.from_codes(np.zeros(ad.n_obs, np.int8), [region])
    obs[INSTANCE_KEY] = np.arange(ad.n_obs, dtype=np.int64)
    attrs = {"region": region, "region_key": REGION_KEY, "instance_key": INSTANCE_KEY}
    uns = {k: v for k, v in ad.uns.items() if k != "spatial"}
    table = anndata.AnnData(
        X=ad.X,
        obs=obs,
        var=ad.var,
        obsm=dict(ad.obsm),
        layers=dict(ad.layers),
        uns={**uns, "spatialdata_attrs": attrs},
    )
    anndata.io.write_elem(root["tables"], name, table)
    root["tables"][name].attrs.update(
        {"spatialdata-encoding-type": "ngff:regions_table", **attrs, "version": TABLES_VERSION}
    )


def _write_image(root: Any, name: str, rgb: np.ndarray, transforms: list) -> None:
    group = root["images"].create_group(name)
    data = np.ascontiguousarray(np.moveaxis(np.asarray(rgb, dtype=np.uint8), -1, 0))
    chunks = (data.shape[0], min(data.shape[1], 1024), min(data.shape[2], 1024))
    arr = group.create_array(
        "0", shape=data.shape, dtype=np.uint8, chunks=chunks, dimension_names=("c", "y", "x")
    )
    arr[:] = data
    axes = [{"name": "c", "type": "channel"}] + [{"name": a, "type": "space"} for a in "yx"]
    level0 = {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0] * 3}]}
    ms = {"axes": axes, "datasets": [level0], "name": "/", "coordinateTransformations": transforms}
    omero = {"channels": [{"label": c} for c in range(data.shape[0])]}
    group.attrs.update(
        {
            "ome": {"version": NGFF_VERSION, "multiscales": [ms], "omero": omero},
            "spatialdata_attrs": {"version": RASTER_VERSION},
        }
    )


def _uns_images(levels: Mapping[str, Any], slide: str) -> dict[str, tuple[np.ndarray, float]]:
    for ad in levels.values():
        lib = (ad.uns.get("spatial") or {}).get(slide) or {}
        sf, imgs = lib.get("scalefactors") or {}, lib.get("images") or {}
        found = {
            k: (imgs[k], float(sf[f"tissue_{k}_scalef"]))
            for k in ("hires", "lowres")
            if k in imgs and f"tissue_{k}_scalef" in sf
        }
        if found:
            return found
    return {}


def write_spatialdata(
    out_path: str | Path,
    levels: Mapping[str, Any],
    slide: str,
    bin_um: float,
    mpp: float,
    images: Mapping[str, tuple[np.ndarray, float]] | None = None,
    *,
    tile_um: Mapping[str, float] | None = None,
) -> Path:
    """Write per-level predictions as one SpatialData zarr store (layout: see the module).

    Args:
        out_path: the store to write (``prediction.zarr``); replaced atomically: written
            under a temporary name and renamed, nothing is left behind on an error.
        levels: level (``bin``, ``spot``, ``region``, ``cell``) -> AnnData with
            ``obsm["spatial"]`` (unit centres in full-resolution pixels); a level whose
            ``uns["polygons"]`` holds outlines is written as cells (``cell_segmentations``:
            a model's cells, or a model of bins pooled into cells).
        slide: the slide's name (``dataset_id`` of the element names and coordinate systems;
            the key of ``uns["spatial"]``).
        bin_um: the bins' edge in microns (names the table ``square_XXXum``).
        mpp: microns per full-resolution pixel.
        images: ``"hires"`` / ``"lowres"`` -> (RGB ``(h, w, 3)`` uint8, its pixels per
            full-resolution pixel); default: those of ``uns["spatial"][slide]``.
        tile_um: edge in microns of each tile level's squares; default: the level's
            ``uns["spatial"][slide]["scalefactors"]["bin_size_um"]``.

    Returns:
        ``out_path``.
    """
    import zarr

    if not levels:
        raise ValueError("no level to write")
    if not (np.isfinite(mpp) and mpp > 0 and bin_um > 0):
        raise ValueError(f"microns per pixel ({mpp!r}) and bin size ({bin_um!r}) must be > 0")
    ds = element_name(slide)
    images = _uns_images(levels, slide) if images is None else dict(images)
    edges, centres = {}, {}
    for lv, ad in levels.items():
        um = bin_um if lv == "bin" else (tile_um or {}).get(lv)
        if um is None:
            sf = ((ad.uns.get("spatial") or {}).get(slide) or {}).get("scalefactors") or {}
            um = sf.get("bin_size_um")
        if um is None:
            raise ValueError(f"level {lv!r}: tile edge unknown (pass tile_um)")
        xy = np.asarray(ad.obsm["spatial"], dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2 or not len(xy) or not np.isfinite(xy).all():
            raise ValueError(f"level {lv!r}: obsm['spatial'] must be finite (n > 0, 2) positions")
        edges[lv], centres[lv] = float(um) / mpp, xy
    shape_t = [_ngff("identity", "xy", ds)]
    image_t = {}
    for kind, (_rgb, scale) in images.items():
        cs = f"{ds}_downscaled_{kind}"
        shape_t.append(_ngff("scale", "xy", cs, scale=[scale, scale]))
        inverse = _ngff("scale", "cyx", ds, scale=[1.0, 1 / scale, 1 / scale])
        image_t[kind] = [_ngff("identity", "cyx", cs), inverse]
    out_path = Path(out_path)
    with warnings.catch_warnings(), atomic_path(out_path) as tmp:
        warnings.filterwarnings("ignore", message="zarr v3 autosharding")
        warnings.filterwarnings("ignore", message=".*(not recognized as a component|Consol)")
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        for kind in ("tables", "shapes", "images"):
            root.create_group(kind)
        root.attrs["spatialdata_attrs"] = {"version": CONTAINER_VERSION}
        root.attrs["magnet_st"] = {
            "slide": slide,
            "bin_size_um": float(bin_um),
            "microns_per_pixel": float(mpp),
            "tables": {
                lv: CELL_TABLE if "polygons" in ad.uns else table_name(lv, bin_um)
                for lv, ad in levels.items()
            },
        }
        for lv, ad in levels.items():
            name = table_name(lv, bin_um)
            polys = ad.uns.get("polygons")
            if polys is not None:  # cells: spatialdata-io's names for Space Ranger 4's cells
                name = CELL_TABLE
                polys = (np.asarray(polys["xy"], np.float64), np.asarray(polys["offsets"]))
            _write_shapes(root, f"{ds}_{name}", centres[lv], edges[lv], shape_t, polys)
            _write_table(root, name, ad, f"{ds}_{name}")
        for kind, (rgb, _) in images.items():
            _write_image(root, f"{ds}_{kind}_image", rgb, image_t[kind])
        zarr.consolidate_metadata(str(tmp))
    return out_path
