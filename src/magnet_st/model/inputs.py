"""inputs: what batching and the model need of one slide of a prepared dataset.

:func:`slide_arrays` gathers a slide's geometry, cached features (read on demand) and
counts into a :class:`~magnet_st.model.batching.SlideArrays`; :class:`PatchReader` cuts bin
patches for an end-to-end bin encoder, :func:`model_reader` picks the reader a model needs
(patches, dense crops, or none). Training, cross-validation and prediction all call them;
nothing here loads Lightning, so prediction runs without the training stack.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from magnet_st.data.dataset import Dataset
from magnet_st.model.batching import SlideArrays

__all__ = [
    "Columns",
    "PatchReader",
    "model_inputs",
    "model_reader",
    "slide_arrays",
]


def slide_arrays(
    ds: Dataset,
    slide: str,
    features: str,
    *,
    genes: list[str] | None = None,
    bin_features: bool = True,
    with_counts: bool = True,
    bin_columns_from: int = 0,
) -> SlideArrays:
    """Everything batching needs of one slide of a prepared dataset. ``bin_columns_from``:
    only the bin features' columns from there on (a dense end-to-end bin branch takes the
    frozen windows that follow the unit's own maps)."""
    from magnet_st.features.store import load_features

    bin_x = None
    if bin_features:
        bin_x = load_features(ds.path, features, slide, "bin", on_disk=True)
        if bin_columns_from:
            bin_x = Columns(bin_x, bin_columns_from)

    return SlideArrays(
        name=slide,
        bin_pos=ds.positions_um(slide, "bin"),
        spot_pos=ds.positions_um(slide, "spot"),
        region_pos=ds.positions_um(slide, "region"),
        bin_spot=ds.membership(slide, "spot"),
        bin_region=ds.membership(slide, "region"),
        spot_size_um=ds.patch_um("spot"),
        region_size_um=ds.patch_um("region"),
        region_rc=np.column_stack(
            [ds.obs_column(slide, "region", c) for c in ("tile_row", "tile_col")]
        ),
        spot_n_units=ds.obs_column(slide, "spot", "n_units"),
        region_n_units=ds.obs_column(slide, "region", "n_units"),
        # on disk: batches read their rows, the slide's features are never held
        bin_x=bin_x,
        spot_x=load_features(ds.path, features, slide, "spot", on_disk=True),
        region_x=load_features(ds.path, features, slide, "region", on_disk=True),
        # on disk: each batch reads its own rows
        counts_bin=ds.panel_counts(slide, "bin", genes) if with_counts else None,
        counts_spot=ds.panel_counts(slide, "spot", genes) if with_counts else None,
        counts_region=ds.panel_counts(slide, "region", genes) if with_counts else None,
        bin_px=ds.positions_px(slide, "bin"),
    )


def model_inputs(
    ds: Dataset,
    slide: str,
    features: str,
    model_config: dict,
    *,
    genes: list[str] | None = None,
    with_counts: bool = True,
) -> SlideArrays:
    """:func:`slide_arrays` with the cached bin features a model takes (its
    ``model_config``): all of them for frozen bin features, none for bin patches, the
    frozen windows of a dense end-to-end branch."""
    dense = model_config.get("bin_dense")
    if dense is not None and dense.get("extra"):
        kw = {"bin_features": True, "bin_columns_from": int(dense["columns_from"])}
    else:
        kw = {"bin_features": model_config["bin_encoder"] == "frozen"}
    return slide_arrays(ds, slide, features, genes=genes, with_counts=with_counts, **kw)


def model_reader(ds: Dataset, slides: list[str], model_config: dict, seed: int = 0) -> Any:
    """What supplies the bin inputs of a model (its ``model_config``) beside the cached
    features: ``None`` for frozen features, a :class:`magnet_st.model.densebin.DenseTileReader`
    for a dense end-to-end branch, else a :class:`PatchReader`."""
    if model_config["bin_encoder"] == "frozen":
        return None
    dense = model_config.get("bin_dense")
    if dense is not None:
        from magnet_st.model.densebin import DenseTileReader

        return DenseTileReader.from_dataset(ds, slides, dense, seed)
    images = {s: ds.image(s) for s in slides}
    return PatchReader(images, ds.patch_um("bin"), ds.patch_px("bin"), seed)


class Columns:
    """The columns ``start:`` of a row-indexed array (``Columns(a, k)[rows]`` is
    ``a[rows][:, k:]``), read row by row as the array itself is."""

    def __init__(self, rows: Any, start: int):
        self.rows, self.start = rows, int(start)
        self.shape = (int(rows.shape[0]), int(rows.shape[1]) - self.start)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: Any) -> np.ndarray:
        return np.asarray(self.rows[idx])[:, self.start :]


class PatchReader:
    """Cuts bin patches from a slide image for an end-to-end bin encoder, the way the
    feature cache cuts its tiles (:class:`magnet_st.features.patches.TileCutter`: a box of whole
    native pixels, resampled in torch to ``patch_px``, antialiased); flips and 90-degree
    rotations when training. Returns uint8 ``(n, 3, patch_px, patch_px)``, which the bin
    encoder normalises with its backbone's mean / std (:class:`magnet_st.model.magnet.BinEncoder`).
    Picklable for DataLoader workers."""

    def __init__(
        self,
        images: dict[str, Any],
        patch_um: float,
        patch_px: int,
        seed: int = 0,
        interpolation: str = "bicubic",
    ):
        from magnet_st.features.encoders import Preprocess

        self.images = images
        self.patch_um = patch_um
        self.patch_px = patch_px
        self.seed = seed
        # resampling only (Preprocess.resize): the model normalises
        self.resampler = Preprocess((patch_px, patch_px), (0.0,) * 3, (1.0,) * 3, interpolation)

    def cutter(self, slide: str) -> Any:
        """The :class:`~magnet_st.features.patches.TileCutter` of ``slide``'s bin patches."""
        from magnet_st.features.patches import TileCutter

        mpp = self.images[slide].microns_per_pixel
        return TileCutter.plan(self.patch_um, mpp, self.patch_px)

    def __call__(
        self,
        slide: SlideArrays,
        bins: np.ndarray,
        train: bool,
        key: tuple[int, int] = (0, 0),
    ) -> torch.Tensor:
        """The patches of ``bins``; when training, flipped and rotated by a generator seeded
        from (seed, ``key``) = (seed, epoch, batch index) only: no state that a worker or
        an interrupted run would not share."""
        tiles = self.cutter(slide.name).cut(self.images[slide.name], slide.bin_px[bins])
        x = self.resampler.resize(torch.from_numpy(tiles))  # grey levels, (n, 3, P, P)
        x = x.round_().clamp_(0, 255).to(torch.uint8).contiguous()
        if train:
            words = np.random.SeedSequence([self.seed, *map(int, key)]).generate_state(2)
            g = torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))
            flip = torch.rand(len(x), generator=g) < 0.5
            x[flip] = x[flip].flip(-1)
            rot = torch.randint(0, 4, (len(x),), generator=g)
            for r in (1, 2, 3):
                sel = rot == r
                x[sel] = torch.rot90(x[sel], r, dims=(-2, -1))
        return x
