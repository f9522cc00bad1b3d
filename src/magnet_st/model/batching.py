"""Spatial batches: compact patches of tissue (about N bins in squares of whole spot tiles,
or all bins of a block of adjacent region tiles), with their context.

The published code drew 256 bins at random from a whole slide and built its "spatial"
graph among them, so graph neighbours were not spatial neighbours. Here a batch holds
every target unit of a block of ``block x block`` region tiles, the spot and region tiles
those units attend to (each unit's containing tile and its nearest tiles), and kNN graphs
built inside the batch from positions only. Nothing here reads expression except the
optional targets, so the same batches serve prediction on image-only slides.

Memory per batch is bounded by the block size, never by the slide size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.spatial import cKDTree

from magnet_st.data.graph import knn_edges


@dataclass
class SlideArrays:
    """What batching needs of one slide. Positions in microns; tile sizes in microns.

    ``bin_x`` / ``spot_x`` / ``region_x``: cached features (an array, or rows read from
    disk when indexed: ``ondisk.NpyRows``), or ``None`` for ``bin_x`` when bin patches are
    cut from the image by a ``patch_reader``. ``counts_*``: panel raw counts for targets
    (sparse, or on disk: anything whose ``[rows]`` is a sparse matrix), or ``None``.
    """

    name: str
    bin_pos: np.ndarray
    spot_pos: np.ndarray
    region_pos: np.ndarray
    bin_spot: np.ndarray
    bin_region: np.ndarray
    spot_size_um: float
    region_size_um: float
    region_rc: np.ndarray
    spot_n_units: np.ndarray
    region_n_units: np.ndarray
    bin_x: Any = None
    spot_x: Any = None
    region_x: Any = None
    counts_bin: Any = None  # CSR matrix, or rows read from disk (ondisk.PanelCounts)
    counts_spot: Any = None
    counts_region: Any = None
    bin_px: np.ndarray | None = None  # bin centres in full-resolution pixels, for patches
    _ctx: dict = field(default_factory=dict, repr=False)

    @property
    def n_bins(self) -> int:
        return len(self.bin_pos)

    def context(self, level: str, c: int) -> np.ndarray:
        """``(n_bins, c)`` indices of each bin's ``c`` nearest tiles; containing tile first."""
        key = (level, c)
        if key not in self._ctx:
            pos = self.spot_pos if level == "spot" else self.region_pos
            own = self.bin_spot if level == "spot" else self.bin_region
            k = min(c, len(pos))
            _, idx = cKDTree(pos).query(self.bin_pos, k=k)
            idx = np.asarray(idx).reshape(len(self.bin_pos), k)
            # the containing tile first, then the others in order of distance
            rest = np.where(idx == own[:, None], -1, idx)
            order = np.argsort(rest == -1, axis=1, kind="stable")
            rest = np.take_along_axis(rest, order, axis=1)[:, : k - 1]
            ctx = np.column_stack([own, rest])
            if k < c:  # fewer tiles than tokens: repeat the containing tile
                ctx = np.column_stack([ctx, np.repeat(own[:, None], c - k, axis=1)])
            ctx = np.where(ctx < 0, own[:, None], ctx)
            self._ctx[key] = ctx.astype(np.int64)
        return self._ctx[key]


def blocks(slide: SlideArrays, block: int, offset: tuple[int, int] = (0, 0)) -> list[np.ndarray]:
    """Bin indices of each block of ``block x block`` region tiles (non-empty blocks only)."""
    rc = slide.region_rc[slide.bin_region] + np.asarray(offset)
    key = (rc // block) @ np.array([1 << 20, 1])
    order = np.argsort(key, kind="stable")
    _, starts = np.unique(key[order], return_index=True)
    return [np.sort(b) for b in np.split(order, starts[1:])]


def bin_batches(slide: SlideArrays, target: int) -> list[np.ndarray]:
    """Spatially compact batches of about ``target`` bins, whatever the slide or tile
    size: square cells of ``side x side`` spot tiles, ``side`` chosen so that a cell of
    full tiles holds about ``target`` bins (a spot tile is never split). Several batches per
    region tile when tiles are large, several region tiles per batch when they are small;
    cells at the tissue's edge hold fewer bins."""
    if target < 1:
        raise ValueError(f"target bins per batch must be at least 1, got {target}")
    cell = np.floor(slide.spot_pos / slide.spot_size_um).astype(np.int64)
    per_tile = np.bincount(slide.bin_spot, minlength=len(cell))
    full = max(int(per_tile.max(initial=1)), 1)
    side = max(1, int(round(np.sqrt(target / full))))
    key = (cell // side) @ np.array([1 << 20, 1])
    bin_key = key[slide.bin_spot]
    order = np.argsort(bin_key, kind="stable")
    _, starts = np.unique(bin_key[order], return_index=True)
    return [np.sort(b) for b in np.split(order, starts[1:]) if len(b)]


def _local(global_idx: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    return np.searchsorted(global_idx, wanted)


def make_batch(
    slide: SlideArrays,
    bins: np.ndarray,
    *,
    k: int = 8,
    context_tokens: int = 5,
    with_context: bool = True,
    with_targets: bool = True,
    targets=None,
) -> dict[str, torch.Tensor]:
    """Tensors of one batch for the bins ``bins`` (global indices, sorted).

    ``targets``: callable ``(level, counts) -> float32 array`` (the target transform).
    """
    out: dict[str, torch.Tensor] = {"bin_index": torch.from_numpy(bins.astype(np.int64))}
    out["bin_edges"] = torch.from_numpy(knn_edges(slide.bin_pos[bins], k)[0])
    if slide.bin_x is not None:
        out["bin_x"] = torch.from_numpy(np.asarray(slide.bin_x[bins], dtype=np.float32))
    with_targets = with_targets and targets is not None
    if with_targets and slide.counts_bin is not None:
        out["y_bin"] = torch.from_numpy(targets("bin", slide.counts_bin[bins]))
    if not with_context:
        return out
    for level, size in (("spot", slide.spot_size_um), ("region", slide.region_size_um)):
        ctx = slide.context(level, context_tokens)[bins]
        own = (slide.bin_spot if level == "spot" else slide.bin_region)[bins]
        tiles = np.unique(ctx)
        pos = slide.spot_pos if level == "spot" else slide.region_pos
        feats = slide.spot_x if level == "spot" else slide.region_x
        out[f"{level}_index"] = torch.from_numpy(tiles.astype(np.int64))
        out[f"{level}_x"] = torch.from_numpy(np.asarray(feats[tiles], dtype=np.float32))
        out[f"{level}_edges"] = torch.from_numpy(knn_edges(pos[tiles], k)[0])
        out[f"bin_{level}"] = torch.from_numpy(_local(tiles, own))
        out[f"bin_{level}_ctx"] = torch.from_numpy(_local(tiles, ctx))
        offset = (pos[ctx] - slide.bin_pos[bins][:, None, :]) / size
        out[f"bin_{level}_offset"] = torch.from_numpy(offset.astype(np.float32))
        n_all = slide.spot_n_units if level == "spot" else slide.region_n_units
        in_batch = np.bincount(_local(tiles, own), minlength=len(tiles))
        out[f"{level}_complete"] = torch.from_numpy(in_batch == n_all[tiles])
        counts = slide.counts_spot if level == "spot" else slide.counts_region
        if with_targets and counts is not None:
            out[f"y_{level}"] = torch.from_numpy(targets(level, counts[tiles]))
    return out


class BlockDataset(torch.utils.data.Dataset):
    """One item per block of region tiles over one or more slides (for a DataLoader with
    ``batch_size=None``). ``patch_reader(slide, bins, train, key=(epoch, batch))`` supplies bin patches (or a
    dense branch's crops and weights, a dict) when the bin encoder is trained end to end."""

    def __init__(
        self,
        slides: list[SlideArrays],
        *,
        block: int = 2,
        k: int = 8,
        context_tokens: int = 5,
        with_context: bool = True,
        with_targets: bool = True,
        targets=None,
        patch_reader=None,
        train: bool = False,
        batch_bins: int | None = None,
    ):
        self.slides = slides
        self.kw = {
            "k": k,
            "context_tokens": context_tokens,
            "with_context": with_context,
            "with_targets": with_targets,
            "targets": targets,
        }
        self.patch_reader = patch_reader
        self.train = train
        # batch_bins: about that many bins per batch (bin_batches); else blocks of
        # block x block region tiles
        self.items = [
            (i, b)
            for i, s in enumerate(slides)
            for b in (bin_batches(s, batch_bins) if batch_bins else blocks(s, block))
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        """Batch ``i``; ``(i, epoch)`` (as :class:`magnet_st.train.module.EpochShuffle` yields
        them) also seeds the batch's augmentation from the epoch, so that it is a function of
        (seed, epoch, batch) only: the same whatever the workers or an interruption."""
        i, epoch = (int(i[0]), int(i[1])) if isinstance(i, tuple) else (int(i), 0)
        s, bins = self.items[i]
        slide = self.slides[s]
        batch = make_batch(slide, bins, **self.kw)
        if self.patch_reader is not None:
            got = self.patch_reader(slide, bins, self.train, key=(epoch, i))
            # patches (a tensor), or a dense branch's crops and weights (a dict)
            batch.update(got if isinstance(got, dict) else {"bin_x": got})
        batch["slide"] = torch.tensor(s)
        return batch
