"""SpatialData zarr stores, as spatialdata-io writes them for Visium HD and standard Visium.

Reading needs no extra package (zarr, anndata and pyarrow; the ``spatialdata`` extra is for
writing stores). The layout is that of spatialdata's on-disk formats (``_io/format.py``,
spatialdata 0.2 to 0.6): container 0.1 (zarr v2) and 0.2 (zarr v3), tables 0.1 / 0.2,
shapes 0.2 / 0.3 (GeoParquet; the ragged arrays of 0.1 are not read), points 0.1 / 0.2 and
raster 0.1 to 0.3 (OME-NGFF 0.4 / 0.5), with the element names of spatialdata-io 0.1 to 0.3
(``readers/visium_hd.py``, ``readers/visium.py``):

- ``tables/<name>`` (``_io/io_table.py``): an AnnData whose ``uns["spatialdata_attrs"]``
  (also the group's attributes) names the element it annotates (``region``), the obs column
  of each row's element (``region_key``) and of its shape id (``instance_key``). Visium HD:
  ``square_002um``, ``square_008um``, ``square_016um`` (``location_id``) annotate shapes
  ``<dataset_id>_square_XXXum``; Visium: ``table`` (``spot_id``) annotates ``<dataset_id>``.
- ``shapes/<name>/shapes.parquet`` (``_io/io_shapes.py``): WKB geometries, the shape ids as
  the pandas index; HD bins are squares (or circles with a ``radius`` column, written with
  ``bins_as_squares=False``), Visium spots circles. The group's ``coordinateTransformations``
  map the shapes to named coordinate systems (``_io/_utils.py``).
- ``points/<name>/points.parquet`` (``_io/io_points.py``): ``x`` and ``y`` columns.
- ``images/<name>`` (``_io/io_raster.py``): an OME-NGFF multiscale image (datasets ``0``,
  ``1``, ..., axes ``c, y, x``) with its transformations in
  ``multiscales[0]["coordinateTransformations"]``: ``<dataset_id>_full_image`` (identity to
  the bins' frame), ``<dataset_id>_hires_image`` and ``<dataset_id>_lowres_image``.

Transformations (``transformations/ngff/``): identity, scale, translation, affine, mapAxis
and sequence, with their input and output axes.

Positions: each row's shape centre (a polygon's: the mean of its exterior ring's vertices
without the closing one, exact for square bins), mapped to a coordinate system shared by
the shapes and the image (``global`` if shared), then into the image's pixels by the inverse
of the image's transformation. Microns per pixel: the caller's; else Visium HD: the bin edge
in microns over the squares' edge (or the circles' diameter) in image pixels; Visium: the
100 um spot pitch (the circles' diameter, Space Ranger's ``spot_diameter_fullres``, is that
of a 65 um spot, not of the 55 um spot). Cells (the ``cell_segmentations`` table of Space
Ranger 4's segmentation) keep their outlines; their microns per pixel come from a bin table
of the same store when there is one.
"""

# Long module: one reader of spatialdata-io's layout, with no dependency on spatialdata:
# WKB decoding of shapes and points, NGFF transformations, tables and images; the helpers
# serve only spatialdata_zarr.
from __future__ import annotations

import json
import logging
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from magnet_st.data.shapes import Polygons
from magnet_st.data.slide import Slide
from magnet_st.errors import InputError
from magnet_st.read.geometry import mpp_from_pitch
from magnet_st.read.matrix import GENE_EXPRESSION, as_integer_counts
from magnet_st.read.visium import VISIUM_SPOT_DIAMETER_UM, VISIUM_SPOT_PITCH_UM

log = logging.getLogger(__name__)

HD_NAME = re.compile(r"square_(\d{3})um$")
CELL_TABLE = "cell_segmentations"  # spatialdata-io's table of Space Ranger 4's cells
"""Visium HD bin tables (``square_008um``) and shapes (``<dataset_id>_square_008um``)."""

_GROUP_FILES = ("zarr.json", ".zgroup", ".zattrs")


def is_spatialdata_store(path: str | Path) -> bool:
    """Whether ``path`` is a zarr store (``.zarr`` or with zarr metadata) with ``tables/``."""
    p = Path(path)
    zarr_like = p.suffix == ".zarr" or any((p / n).is_file() for n in _GROUP_FILES[:2])
    return p.is_dir() and zarr_like and (p / "tables").is_dir()


def _names(root: Path, kind: str) -> list[str]:
    base = root / kind
    if not base.is_dir():
        return []
    return sorted(d.name for d in base.iterdir() if any((d / n).is_file() for n in _GROUP_FILES))


def _attrs(group: Path) -> dict[str, Any]:
    import zarr

    try:
        return dict(zarr.open_group(str(group), mode="r").attrs.asdict())
    except Exception as exc:  # zarr raises many types for missing or corrupt metadata
        raise InputError(group, f"cannot open as a zarr group ({exc})") from exc


# -- coordinate transformations ---------------------------------------------------------


def _axis_names(cs: Any) -> tuple[str, ...]:
    axes = cs.get("axes", []) if isinstance(cs, dict) else []
    return tuple(str(a.get("name") if isinstance(a, dict) else a) for a in axes)


def _matrix(t: Any, axes: tuple[str, ...], where: Path) -> np.ndarray:
    """The 3 x 3 matrix acting on ``(x, y, 1)`` of one NGFF transformation dictionary."""
    kind = t.get("type") if isinstance(t, dict) else None
    ins = _axis_names(t.get("input")) or axes if kind else axes
    outs = _axis_names(t.get("output")) or ins if kind else ins
    m = np.eye(3)
    try:
        if kind == "identity":
            return m
        if kind in ("scale", "translation"):
            v = dict(zip(ins, map(float, t[kind]), strict=True))
            if kind == "scale":
                m[0, 0], m[1, 1] = v.get("x", 1.0), v.get("y", 1.0)
            else:
                m[0, 2], m[1, 2] = v.get("x", 0.0), v.get("y", 0.0)
            return m
        if kind == "affine":  # rows: output axes; columns: input axes, then the translation
            a = np.asarray(t["affine"], dtype=np.float64)
            rows = [outs.index(ax) for ax in "xy"]
            other = [j for j, ax in enumerate(ins) if ax not in "xy"]
            if other and np.any(a[np.ix_(rows, other)]):
                raise ValueError("x and y depend on other axes")
            m[:2] = a[np.ix_(rows, [ins.index("x"), ins.index("y"), len(ins)])]
            return m
        if kind == "mapAxis":  # output axis -> the input axis it takes
            mapping = t["mapAxis"]
            m[:2, :2] = [[float(mapping.get(o, o) == i) for i in "xy"] for o in "xy"]
            return m
        if kind == "sequence":
            for sub in t["transformations"]:
                m = _matrix(sub, ins, where) @ m
                ins = _axis_names(sub.get("output")) or ins
            return m
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise InputError(where, f"malformed {kind} transformation ({exc})") from exc
    raise InputError(
        where,
        f"unsupported coordinate transformation {kind!r} (read: identity, scale, translation, "
        "affine, mapAxis, sequence)",
    )


def _transforms(listed: Any, axes: tuple[str, ...], where: Path) -> dict[str, np.ndarray]:
    """Coordinate system name -> matrix, for an element's ``coordinateTransformations``."""
    out: dict[str, np.ndarray] = {}
    for t in listed or []:
        target = t.get("output") if isinstance(t, dict) else None
        name = target.get("name") if isinstance(target, dict) else target
        out[str(name or "global")] = _matrix(t, axes, where)
    return out or {"global": np.eye(3)}


# -- geometries ----------------------------------------------------------------------------


def _wkb_header(b: np.ndarray, where: Path) -> tuple[str, int, int, int]:
    """Byte order, geometry (1 point, 3 polygon), dimensions and header bytes of a WKB."""
    order = "<" if int(b[0]) == 1 else ">"
    (code,) = struct.unpack(order + "I", bytes(b[1:5]))
    if code & 0x20000000:
        raise InputError(where, "EWKB geometries with an SRID are not read")
    dims = 2 + bool(code & 0x80000000) + bool(code & 0x40000000)  # EWKB Z, M flags
    code &= 0x0FFFFFFF
    dims += {1: 1, 2: 1, 3: 2}.get(code // 1000, 0)  # ISO Z, M, ZM
    if code % 1000 not in (1, 3):
        raise InputError(where, f"WKB geometry type {code}: only points and polygons are read")
    return order, code % 1000, dims, 5 if code % 1000 == 1 else 13


def _centres(
    column: Any, where: Path, rings: list | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Centres ``(n, 2)`` of WKB points or polygons, and the polygons' first edge lengths;
    with ``rings`` (a list of ``n`` slots), each polygon's exterior ring (without its
    closing vertex) is put in its slot.

    Geometries of one byte length and header (all bins) are decoded together with numpy.
    """
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    large = pa.types.is_large_binary(arr.type)
    if not (pa.types.is_binary(arr.type) or large):
        raise InputError(where, f"geometry encoded as {arr.type}; only WKB (the default) is read")
    if arr.null_count:
        raise InputError(where, f"{arr.null_count} shapes have no geometry")
    off = np.frombuffer(arr.buffers()[1], np.int64 if large else np.int32)
    off = off[arr.offset : arr.offset + len(arr) + 1].astype(np.int64)
    data = np.frombuffer(arr.buffers()[2], np.uint8)
    size = np.diff(off)
    centres, edges, kinds = np.zeros((len(arr), 2)), np.zeros(len(arr)), set()
    for length in np.unique(size):
        idx = np.flatnonzero(size == length)
        if len(idx) == len(arr):  # one layout (bins): a view, no copy
            rows = data[off[0] : off[-1]].reshape(len(arr), int(length))
        else:
            rows = data[off[idx, None] + np.arange(length)]
        head = _wkb_header(rows[0], where)[3]
        same = np.all(rows[:, :head] == rows[0, :head])
        heads, group = (
            (rows[:1, :head], np.zeros(len(rows), int))
            if same
            else np.unique(rows[:, :head], axis=0, return_inverse=True)
        )
        for g, h in enumerate(heads):
            order, kind, dims, head = _wkb_header(h, where)
            n = 1 if kind == 1 else struct.unpack(order + "I", bytes(h[9:13]))[0]
            part = rows if same else rows[group.ravel() == g]
            xy = np.ascontiguousarray(part[:, head : head + 8 * n * dims]).view(order + "f8")
            ring = xy.reshape(len(part), n, dims)[:, :, :2].astype(np.float64)
            at = idx if same else idx[group.ravel() == g]
            if kind == 1:
                centres[at] = ring[:, 0]
            elif n < 3:
                raise InputError(where, "a polygon has fewer than 3 vertices")
            else:  # the exterior ring without its closing vertex
                centres[at] = ring[:, :-1].mean(axis=1)
                edges[at] = np.linalg.norm(ring[:, 1] - ring[:, 0], axis=-1)
                if rings is not None:
                    for a, r in zip(at, ring, strict=True):
                        rings[a] = r[:-1]
            kinds.add(kind)
    if len(kinds) > 1:
        raise InputError(where, "the shapes mix points and polygons")
    return centres, (edges if kinds == {3} else None)


def _index(table: Any) -> np.ndarray:
    """The pandas index of a parquet table (a column, or a RangeIndex kept as metadata)."""
    meta = table.schema.pandas_metadata or {}
    first = (meta.get("index_columns") or [None])[0]
    if isinstance(first, str):
        return np.asarray(table.column(first).to_numpy(zero_copy_only=False))
    if isinstance(first, dict) and first.get("kind") == "range":
        return np.arange(first["start"], first["stop"], first["step"])
    return np.arange(table.num_rows)


def _read_element(
    root: Path, region: str, instance_key: str, keep_rings: bool = False
) -> dict[str, Any]:
    """Ids, centres, sizes and transformations of the shapes or points element ``region``
    (and, with ``keep_rings``, its polygons' rings)."""
    import pyarrow.parquet as pq

    kind = next((k for k in ("shapes", "points") if (root / k / region).is_dir()), None)
    if kind is None:
        raise InputError(
            root,
            f"the table annotates {region!r}, but the store has no shapes or points of that "
            f"name (shapes: {_names(root, 'shapes')}, points: {_names(root, 'points')})",
        )
    group = root / kind / region
    attrs = _attrs(group)
    axes = tuple(str(a) for a in attrs.get("axes") or ("x", "y"))
    file = group / f"{kind}.parquet"
    if not file.exists():
        raise InputError(group, f"no {file.name} (shapes of format 0.1 are not read)")
    try:
        table = pq.read_table(file)
    except Exception as exc:  # pyarrow raises many types for corrupt files
        raise InputError(file, f"cannot read ({exc})") from exc
    out: dict[str, Any] = {"kind": kind, "file": file, "size": None, "what": ""}
    if kind == "points":
        if not {"x", "y"} <= set(table.column_names):
            raise InputError(file, f"no x and y columns; found {table.column_names}")
        out["centres"] = np.column_stack([table.column(c).to_numpy() for c in "xy"])
        has_key = instance_key in table.column_names
        out["ids"] = table.column(instance_key).to_numpy() if has_key else _index(table)
    else:
        geo = json.loads((table.schema.metadata or {}).get(b"geo", b"{}"))
        column = geo.get("primary_column", "geometry")
        if column not in table.column_names:
            raise InputError(file, f"no geometry column {column!r}")
        rings: list | None = [None] * table.num_rows if keep_rings else None
        out["centres"], edges = _centres(table.column(column), file, rings)
        out["rings"] = rings
        out["ids"] = _index(table)
        if "radius" in table.column_names:
            out["size"], out["what"] = 2 * table.column("radius").to_numpy(), "circle diameter"
        elif edges is not None:
            out["size"], out["what"] = edges, "square edge"
    out["transforms"] = _transforms(attrs.get("coordinateTransformations"), axes, group)
    return out


# -- tables and images ---------------------------------------------------------------------


def _choose_table(root: Path, table: str | int | None) -> str:
    names = _names(root, "tables")
    if not names:
        raise InputError(root / "tables", "no table in the SpatialData store")
    if table is not None:
        key = f"square_{table:03d}um" if isinstance(table, int) else str(table)
        if key not in names:
            raise InputError(root, f"no table {key!r}; tables: {names}")
        return key
    if len(names) == 1:
        return names[0]
    hd = {int(m.group(1)): n for n in names if (m := HD_NAME.search(n))}
    if hd:
        return hd.get(8) or hd[min(hd)]
    raise InputError(root, f"{len(names)} tables; choose one: {names}")


def _images(root: Path) -> dict[str, dict[str, Any]]:
    """Image elements: their folder, transformations and level-0 pixel count."""
    import zarr

    from magnet_st.io.image import ngff_multiscale

    out = {}
    for name in _names(root, "images"):
        group = root / "images" / name
        ms = ngff_multiscale(_attrs(group))
        if ms is None or not ms.get("datasets"):
            log.warning("%s: not an OME-NGFF multiscale image; skipped", group)
            continue
        axes = _axis_names(ms) or ("c", "y", "x")
        level0 = zarr.open_array(str(group / str(ms["datasets"][0]["path"])), mode="r")
        tf = _transforms(ms.get("coordinateTransformations"), axes, group)
        out[name] = {"path": group, "transforms": tf, "pixels": int(np.prod(level0.shape))}
    return out


def _choose_image(root: Path, images: dict[str, dict[str, Any]], image: str | Path | None) -> str:
    if not images:
        raise InputError(root, "no image element (images/ is empty or missing)")
    if image is not None:
        p = Path(image)
        if str(image) in images:
            return str(image)
        if p.name in images and (not p.exists() or p.resolve() == images[p.name]["path"].resolve()):
            return p.name
        raise InputError(root, f"no image element {str(image)!r}; images: {sorted(images)}")
    full = [n for n in images if n.endswith("_full_image")]
    if len(full) == 1:
        return full[0]
    best = max(full or images, key=lambda n: images[n]["pixels"])
    log.warning("%s: no single *_full_image; using the largest image, %r", root, best)
    return best


def _to_image(
    root: Path, el: dict[str, Any], region: str, iname: str, img: dict[str, Any]
) -> tuple[np.ndarray, str]:
    """The matrix from the element's coordinates to the image's pixels, and the system used."""
    itf = img["transforms"]
    common = [cs for cs in el["transforms"] if cs in itf]
    if not common:
        raise InputError(
            root,
            f"{el['kind']} {region!r} (coordinate systems {list(el['transforms'])}) and image "
            f"{iname!r} ({list(itf)}) share no coordinate system",
        )
    cs = "global" if "global" in common else common[0]
    if abs(np.linalg.det(itf[cs])) < 1e-12:
        raise InputError(img["path"], f"its transformation to {cs!r} is singular")
    return np.linalg.inv(itf[cs]) @ el["transforms"][cs], cs


# -- the reader ----------------------------------------------------------------------------


# Long: the glue over the store helpers (_choose_table, _read_element, _to_image): table,
# regions, per-region centres in image pixels, mpp, unit size, counts; ~15 shared locals.
def spatialdata_zarr(
    path: str | Path,
    table: str | int | None = None,
    image: str | Path | None = None,
    *,
    microns_per_pixel: float | None = None,
    unit_size_um: float | None = None,
    name: str | None = None,
) -> Slide:
    """Read one table of a SpatialData zarr store (as written by spatialdata-io) as a slide.

    Args:
        path: the store (``*.zarr``, zarr v2 or v3).
        table: the table's name, or a Visium HD bin size (``8`` for ``square_008um``);
            default: the only table, else the 8 um bins (else the finest bins).
        image: the name of an image element (or its folder ``path/images/<name>``);
            default: the one named ``*_full_image``, else the largest (with a warning).
        microns_per_pixel: of that image; default: from the bins' size (see the module).
        unit_size_um: bin edge or spot diameter; default: the bin size of a
            ``square_XXXum`` table, 55 um for Visium circles.
        name: the slide's name; default: the store's name without ``.zarr``.
    """
    import anndata

    root = Path(path)
    if not is_spatialdata_store(root):
        raise InputError(root, "not a SpatialData zarr store (a .zarr folder with tables/)")
    tname = _choose_table(root, table)
    tdir = root / "tables" / tname
    try:
        adata = anndata.read_zarr(str(tdir))
    except Exception as exc:  # anndata / zarr raise many types for corrupt groups
        raise InputError(tdir, f"cannot read the table as AnnData ({exc})") from exc
    sd = dict(adata.uns.get("spatialdata_attrs") or _attrs(tdir))
    region, region_key, instance_key = (sd.get(k) for k in ("region", "region_key", "instance_key"))
    regions = [region] if isinstance(region, str) else [] if region is None else list(region)
    regions = [str(r) for r in regions]
    if not regions or instance_key not in adata.obs:
        raise InputError(
            tdir, f"no annotated region or no obs column instance_key (spatialdata_attrs: {sd})"
        )
    if "in_tissue" in adata.obs and not (adata.obs["in_tissue"] == 1).all():
        adata = adata[(adata.obs["in_tissue"] == 1).to_numpy()].copy()
        log.info("%s: keeping the %d units under tissue", tdir, adata.n_obs)
    images = _images(root)
    iname = _choose_image(root, images, image)
    centres = np.full((adata.n_obs, 2), np.nan)
    sizes, kinds, notes = [], set(), []
    # Space Ranger 4's cells, as spatialdata-io names them: keep their outlines
    cells = tname == CELL_TABLE or regions[0].endswith(f"_{CELL_TABLE}")
    rings: list = [None] * adata.n_obs
    for reg in regions:
        rows = np.arange(adata.n_obs)
        if len(regions) > 1 and region_key in adata.obs:
            rows = np.flatnonzero(adata.obs[region_key].astype(str).to_numpy() == reg)
        el = _read_element(root, reg, str(instance_key), keep_rings=cells)
        m, cs = _to_image(root, el, reg, iname, images[iname])
        ids, wanted = pd.Index(el["ids"]), adata.obs[instance_key].to_numpy()[rows]
        if ids.dtype.kind != pd.Index(wanted).dtype.kind:
            ids, wanted = ids.astype(str), np.asarray(wanted).astype(str)
        if not ids.is_unique:
            raise InputError(el["file"], f"{el['kind']} ids ({instance_key}) are not unique")
        at = ids.get_indexer(wanted)
        if (at < 0).any():
            raise InputError(
                el["file"],
                f"{int((at < 0).sum())} of {len(at)} rows of table {tname!r} have an "
                f"{instance_key} absent from {el['kind']} {reg!r} (e.g. {wanted[at < 0][:3]})",
            )
        centres[rows] = el["centres"][at] @ m[:2, :2].T + m[:2, 2]
        if cells:
            if any(el["rings"][a] is None for a in at):
                raise InputError(el["file"], "cells must be polygons (their outlines)")
            for r, a in zip(rows, at, strict=True):
                rings[r] = el["rings"][a] @ m[:2, :2].T + m[:2, 2]
        if el["size"] is not None:
            sizes.append(el["size"][at] * np.sqrt(abs(np.linalg.det(m[:2, :2]))))
        kinds.add(el["what"] or el["kind"])
        notes.append(f"{el['file']} ({el['kind']} {reg!r} via {cs!r} to image {iname!r})")
    hd = HD_NAME.search(tname) or HD_NAME.search(regions[0])
    bin_um = float(hd.group(1)) if hd else None
    visium = bin_um is None and kinds == {"circle diameter"}
    where = notes[0].split(" ")[0]
    polygons = Polygons.from_rings(rings) if cells else None
    if polygons is not None:
        centres = polygons.centroids()
    if microns_per_pixel is not None:
        mpp, mpp_source = float(microns_per_pixel), "given by the user"
    elif cells and (bins := [n for n in _names(root, "tables") if HD_NAME.search(n)]):
        coarse = max(bins, key=lambda n: int(HD_NAME.search(n).group(1)))  # fewest rows
        mpp = spatialdata_zarr(root, coarse, image).microns_per_pixel
        mpp_source = f"the {coarse} bins of the same store"
    elif bin_um is not None and sizes:
        mpp = bin_um / float(np.median(np.concatenate(sizes)))
        mpp_source = f"{bin_um:g} um bin / {'|'.join(sorted(kinds))} in image pixels ({where})"
    elif bin_um is not None or visium:
        pitch = bin_um or VISIUM_SPOT_PITCH_UM
        mpp = mpp_from_pitch(centres, pitch, where)
        mpp_source = f"{pitch:g} um centre-to-centre pitch of the units ({where})"
    else:
        raise InputError(root, "microns per pixel unknown for this table: pass it (--mpp)")
    if unit_size_um is None and polygons is not None:  # a disc of the median cell's area
        unit_size_um = polygons.median_diameter() * mpp
    if unit_size_um is None:
        unit_size_um = bin_um or (VISIUM_SPOT_DIAMETER_UM if visium else None)
    if not (unit_size_um and unit_size_um > 0):
        raise InputError(root, "unit size unknown: pass it (--unit-size: bin or spot size, um)")
    layer = "layers['counts']" if "counts" in adata.layers else "X"
    X, var, obs = adata.layers.get("counts", adata.X), adata.var, adata.obs
    if "feature_types" in var and (var["feature_types"] == GENE_EXPRESSION).any():
        keep = (var["feature_types"] == GENE_EXPRESSION).to_numpy()
        X, var = X[:, keep], var[keep]
    grid = {"array_row", "array_col"} <= set(obs.columns)
    slide = Slide(
        name=name or (root.stem if root.suffix == ".zarr" else root.name),
        counts=as_integer_counts(X, tdir),
        gene_ids=np.asarray(var.get("gene_ids", var.index).astype(str), dtype=object),
        gene_names=np.asarray(var.index.astype(str), dtype=object),
        unit_ids=np.asarray(adata.obs_names.astype(str), dtype=object),
        centers_px=centres,
        array_coords=obs[["array_row", "array_col"]].to_numpy(np.int64) if grid else None,
        unit_size_um=float(unit_size_um),
        microns_per_pixel=mpp,
        technology="visium_hd_cells"
        if cells
        else "visium_hd"
        if bin_um is not None
        else "visium"
        if visium
        else "anndata",
        polygons=polygons,
        image_path=images[iname]["path"],
        sources={
            "counts": f"{tdir} (table {tname!r}, {layer})",
            "positions": "; ".join(notes),
            "microns_per_pixel": mpp_source,
            "image": f"{images[iname]['path']} (image element {iname!r})",
        },
    )
    slide.check_image_bounds()
    return slide
