"""``magnet_st.pp``: preprocessing, in scanpy's shape (``import magnet_st as ms``).

- :func:`prepare`: Space Ranger runs, her2st sections, tables ... -> a prepared dataset
  (``magnet prepare``);
- :func:`features`: frozen encoder features of a prepared dataset (``magnet features``).

Each calls what its command calls and writes what it writes; see ``docs/api.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["features", "prepare"]


def prepare(
    inputs: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    image: str | Path | None = None,
    mpp: float | None = None,
    bin_size: int | None = None,
    cells: str | None = None,
    samples: str | Path | None = None,
    add: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **config: Any,
) -> Any:
    """Prepare slides for training and prediction; returns the
    :class:`~magnet_st.data.dataset.Dataset` written to ``out``.

    ``inputs``: one or more Space Ranger runs, her2st folders, tables or ``magnet synth``
    runs (as ``magnet prepare INPUTS``); ``samples``: a sample sheet (``--samples``).
    ``cells``: the units of Visium HD runs as cells: ``"spaceranger"`` (Space Ranger 4's) or
    a GeoJSON segmentation (``--cells`` / ``--segmentation``).
    ``config``: :class:`~magnet_st.prepare.config.PrepareConfig` fields (``preset``, ``n_genes``,
    ``panel``, ``genes``, ``target``, ``working_mpp``, ``seed`` ...), as the command's options.
    """
    from magnet_st import read
    from magnet_st.data.dataset import Dataset
    from magnet_st.errors import MagnetError
    from magnet_st.prepare.build import prepare as _prepare
    from magnet_st.prepare.config import PrepareConfig

    paths = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    specs = read.specs_from_sheet(samples) if samples is not None else []
    if paths:
        specs += read.specs_from_paths(paths, image=image, mpp=mpp, bin_size=bin_size, cells=cells)
    specs = read.specs.check_unique(specs)
    if not specs:
        raise MagnetError("no inputs: give input paths and/or samples=SHEET")
    _prepare(specs, out, PrepareConfig(**config), add=add, overwrite=overwrite, progress=progress)
    return Dataset(out)


def features(
    dataset: Any,
    encoder: str,
    *,
    mode: str = "dense",
    levels: Sequence[str] = ("bin", "spot", "region"),
    weights: str | Path | None = None,
    device: str = "auto",
    progress: bool = True,
    **options: Any,
) -> str:
    """Encode a prepared dataset's units with a frozen ``encoder`` (a timm name,
    ``hf-hub:ORG/MODEL`` or ``efficientnet_lite0_imagenet``); returns the feature set's key,
    which :func:`magnet_st.tl.train` and friends take as ``features``.

    ``mode``: ``"dense"`` (one pass per image tile, pooled over each unit's footprint) or
    ``"patches"`` (one pass per unit's patch). ``options``: the dense settings of
    :class:`~magnet_st.features.dense.DenseConfig` (``mpp``, ``tile_px``, ``margin_px``, ``strides``,
    ``windows_um``, ``window_mpp``) with ``mode="dense"``, and the other keyword arguments of
    :func:`magnet_st.features.extract.extract_features` (``batch_size``, ``input_px``,
    ``encoder_kwargs``, ``overwrite`` ...).
    """
    from magnet_st.errors import ConfigError
    from magnet_st.features.dense import DenseConfig
    from magnet_st.features.extract import extract_features

    if mode not in ("dense", "patches"):
        raise ConfigError(f"mode must be 'dense' or 'patches', got {mode!r}")
    names = set(DenseConfig.__dataclass_fields__)
    given = {k: options.pop(k) for k in list(options) if k in names}
    if mode == "patches" and given:
        raise ConfigError(f"{sorted(given)} only apply with mode='dense'")
    dense = DenseConfig(**given) if mode == "dense" else None
    res = extract_features(
        _path(dataset),
        encoder,
        levels=tuple(levels),
        weights=weights,
        device=device,
        progress=progress,
        dense=dense,
        **options,
    )
    return str(res["key"])


def _path(dataset: Any) -> Path:
    """A dataset given as a folder or a :class:`~magnet_st.data.dataset.Dataset`."""
    return Path(getattr(dataset, "path", dataset))
