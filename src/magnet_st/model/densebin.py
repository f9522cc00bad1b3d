"""densebin: the bin branch trained end to end on dense maps.

The paper trains its bin CNN end to end on one patch per bin, which at Visium HD feeds the
same pixels through the network many times (neighbouring bins' patches overlap). Here the
bin branch is the dense path of :mod:`magnet_st.features.dense` made trainable: per batch, the
encoder's trunk runs once over an image crop that holds the batch's units (bins of a
compact batch share one crop; units far apart, as legacy ST spots 200 um apart, get one
crop each, whichever feeds fewer pixels), and each unit's feature is the mean of the map
over its exact footprint, computed as a fixed sparse weight matrix times the map, so that
the gradient reaches the encoder. The weights are the area shares of the frozen path
(squares exactly, discs by 8 x 8 sub-samples per cell), so at the start of training the
features are the frozen dense ones up to the crop's context.

- :func:`dense_settings`: what the model and the reader share (working resolution, margin,
  the map's ``feature_info`` index, stride, width and measured cell offset, and the width
  of frozen window columns appended to each unit).
- :class:`DenseTileReader`: crops, their training flips and rotations (the footprints move
  with the pixels), and the weights; picklable for DataLoader workers.
- :func:`pool_maps`: the weighted means, in torch.

The model (:class:`magnet_st.model.magnet.BinEncoder`) keeps the trunk's batch-norm statistics
frozen: a batch is one or a few crops, too few for batch statistics.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from magnet_st.data.shapes import Polygons
from magnet_st.errors import ConfigError
from magnet_st.features.dense import (
    POLYGON,
    SQUARE,
    Footprints,
    MapSpec,
    disc_cover,
    map_specs,
    polygon_cover,
)

__all__ = ["DenseTileReader", "dense_settings", "footprint_weights", "pool_maps"]


def dense_settings(
    backbone: Any, mpp: float, margin_px: int, stride: int = 16, extra: int = 0
) -> dict[str, Any]:
    """The settings of a dense end-to-end bin branch on ``backbone`` (a timm model): its
    stride-``stride`` map, whose cell offset is measured in eval mode (batch statistics
    would spread every cell's support over the whole input)."""
    if margin_px % stride or margin_px < stride:
        raise ConfigError(
            f"a dense end-to-end bin branch needs a margin of whole stride-{stride} cells, "
            f"at least one; got {margin_px} px"
        )
    was = backbone.training
    backbone.eval()
    try:
        spec = map_specs(backbone, [stride])[0]
    finally:
        backbone.train(was)
    return {
        "mpp": float(mpp),
        "margin_px": int(margin_px),
        "index": spec.index,
        "stride": spec.stride,
        "channels": spec.channels,
        "offset": spec.offset,
        "extra": int(extra),
    }


def _spec(dense: dict[str, Any]) -> MapSpec:
    return MapSpec(dense["index"], dense["stride"], dense["channels"], dense["offset"])


def footprint_weights(
    fp: Footprints, spec: MapSpec, h: int, w: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each unit's share of every map cell it covers, for a map of ``h x w`` cells whose
    pixel frame is ``fp``'s: ``(unit, cell, weight)`` triplets (cell = row * w + col), the
    weights of a unit summing to 1. Squares: the exact overlap areas (as the frozen path's
    summed-area tables); discs: the share of each cell's 8 x 8 sub-samples inside.
    Footprints outside the map raise (a crop always holds its units)."""
    boxes = fp.boxes(spec)  # y0, y1, x0, x1 in cell-edge coordinates
    if len(boxes) and (
        boxes[:, 0].min() < 0
        or boxes[:, 2].min() < 0
        or boxes[:, 1].max() > h
        or boxes[:, 3].max() > w
    ):
        raise ValueError("a footprint reaches outside its crop's map")
    rows, cols, vals = [], [], []
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        r = np.arange(math.floor(y0), min(h, math.ceil(y1)))
        c = np.arange(math.floor(x0), min(w, math.ceil(x1)))
        if fp.shape == SQUARE:
            oy = np.minimum(y1, r + 1) - np.maximum(y0, r)
            ox = np.minimum(x1, c + 1) - np.maximum(x0, c)
            wgt = oy[:, None] * ox[None, :]
        elif fp.shape == POLYGON:
            wgt = polygon_cover(r, c, fp.ring_cells(spec, i))
        else:
            wgt = disc_cover(r, c, (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0) / 2)
        total = wgt.sum()
        if total <= 0:
            raise ValueError("a footprint covers no map cell")
        keep = wgt > 0
        rr, cc = np.nonzero(keep)
        rows.append(np.full(len(rr), i, np.int64))
        cols.append(r[rr] * w + c[cc])
        vals.append(wgt[keep] / total)
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)


def pool_maps(maps: Any, idx: Any, val: Any, n: int) -> Any:
    """``(n, C)`` means of maps ``(T, C, h, w)`` with the weights of
    :meth:`DenseTileReader.__call__` (``idx`` ``(2, nnz)`` unit and crop-major cell,
    ``val`` ``(nnz,)``); differentiable in ``maps``."""
    import torch

    t, c, h, w = maps.shape
    flat = maps.permute(0, 2, 3, 1).reshape(t * h * w, c)
    weights = torch.sparse_coo_tensor(
        idx, val.to(flat.dtype), (n, t * h * w), check_invariants=False
    )
    return torch.sparse.mm(weights, flat)


def _turn(xy: np.ndarray, size: float, flip: bool, rot: int) -> np.ndarray:
    """Where continuous points ``(x, y)`` of a ``size``-px square go when it is flipped
    left-right (first) and then turned by ``torch.rot90(k=rot, dims=(-2, -1))``."""
    x, y = xy[:, 0].copy(), xy[:, 1].copy()
    if flip:
        x = size - x
    for _ in range(rot):  # rot90 counterclockwise: new[i, j] = old[j, size - 1 - i]
        x, y = y, size - x
    return np.stack([x, y], 1)


def _plan(fp: Footprints, margin: int, stride: int) -> tuple[np.ndarray, int, np.ndarray]:
    """Square crops (``(T, 2)`` x0, y0 in working px on the stride grid) of one edge, and
    each unit's crop: one crop around all units when that feeds fewer pixels than a crop
    per unit."""
    c, half = fp.centres, fp.half
    lo = np.floor((c - half[:, None] - margin) / stride) * stride
    hi = c + half[:, None] + margin
    one = int(math.ceil(float((hi.max(0) - lo.min(0)).max()) / stride) * stride)
    each = int(math.ceil(float((hi - lo).max()) / stride) * stride)
    if one * one <= len(c) * each * each:
        return lo.min(0)[None].astype(np.int64), one, np.zeros(len(c), np.int64)
    return lo.astype(np.int64), each, np.arange(len(c), dtype=np.int64)


class DenseTileReader:
    """Crops and footprint weights of a batch's units for a dense end-to-end bin branch.

    ``images``: slide name -> opened image (``read_region``); ``footprints``: slide name ->
    the bin level's :class:`~magnet_st.features.dense.Footprints` in working pixels at
    ``dense["mpp"]``; ``native_mpp``: slide name -> the image's microns per pixel.
    """

    def __init__(
        self,
        images: dict[str, Any],
        footprints: dict[str, Footprints],
        native_mpp: dict[str, float],
        dense: dict[str, Any],
        seed: int = 0,
    ):
        self.images = images
        self.footprints = footprints
        self.native_mpp = native_mpp
        self.dense = dict(dense)
        self.seed = seed

    @classmethod
    def from_dataset(cls, ds: Any, slides: list[str], dense: dict[str, Any], seed: int = 0):
        from magnet_st.features.dense import footprints

        mpp = float(dense["mpp"])
        return cls(
            {s: ds.image(s) for s in slides},
            {s: footprints(ds, s, "bin", mpp) for s in slides},
            {s: float(ds.slide_meta(s)["microns_per_pixel"]) for s in slides},
            dense,
            seed,
        )

    def __call__(
        self, slide: Any, bins: np.ndarray, train: bool, key: tuple[int, int] = (0, 0)
    ) -> dict[str, Any]:
        """``bin_tiles`` uint8 ``(T, 3, E, E)``, ``bin_w_idx`` ``(2, nnz)``, ``bin_w_val``
        ``(nnz,)`` for the units ``bins`` of ``slide``; when training each crop is flipped
        and turned by a generator seeded from (seed, ``key``) only."""
        import torch

        name = slide.name
        full = self.footprints[name]
        fp = full.take(bins)
        spec = _spec(self.dense)
        s, m = spec.stride, int(self.dense["margin_px"])
        origins, edge, crop_of = _plan(fp, m, s)
        scale = float(self.dense["mpp"]) / self.native_mpp[name]
        image = self.images[name]
        if train:
            words = np.random.SeedSequence([self.seed, *map(int, key)]).generate_state(2)
            rng = np.random.default_rng([int(words[0]), int(words[1])])
            flips = rng.random(len(origins)) < 0.5
            rots = rng.integers(0, 4, len(origins))
        else:
            flips = np.zeros(len(origins), bool)
            rots = np.zeros(len(origins), np.int64)
        cells = edge // s
        tiles, rows, cols, vals = [], [], [], []
        for t, (x0, y0) in enumerate(origins):
            rgb = image.read_region(
                x0 * scale, y0 * scale, edge * scale, edge * scale, (edge, edge)
            )
            x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
            if flips[t]:
                x = x.flip(-1)
            if rots[t]:
                x = torch.rot90(x, int(rots[t]), dims=(-2, -1))
            tiles.append(x.contiguous())
            units = np.nonzero(crop_of == t)[0]
            here = fp.take(units)
            corner = np.array([x0, y0], np.float64)
            local = _turn(here.centres - corner, edge, bool(flips[t]), int(rots[t]))
            polys = here.polygons
            if polys is not None:  # outlines turn with the crop
                xy = _turn(polys.xy - corner, edge, bool(flips[t]), int(rots[t]))
                polys = Polygons(xy, polys.offsets)
            r, c, v = footprint_weights(
                Footprints(local, here.half, here.shape, polys), spec, cells, cells
            )
            rows.append(units[r])
            cols.append(c + t * cells * cells)
            vals.append(v)
        idx = np.stack([np.concatenate(rows), np.concatenate(cols)])
        return {
            "bin_tiles": torch.stack(tiles),
            "bin_w_idx": torch.from_numpy(idx),
            "bin_w_val": torch.from_numpy(np.concatenate(vals).astype(np.float32)),
        }
