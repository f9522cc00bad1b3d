"""Open a dataset written by ``magnet prepare`` (see :mod:`magnet_st.prepare.build`)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from magnet_st.data.format import FORMAT, MANIFEST, slide_dir_is_complete, slide_lists_all
from magnet_st.data.levels import LEVELS
from magnet_st.data.ondisk import PanelCounts, n_rows, read_element, sparse_dataset
from magnet_st.data.targets import TargetTransform, per_10k_scale
from magnet_st.errors import InputError

if TYPE_CHECKING:
    import anndata
    import pandas as pd

    from magnet_st.data.shapes import Polygons
    from magnet_st.io.image import SlideImage


class Dataset:
    """A prepared multi-level dataset: slides, levels, gene panel and targets.

    >>> ds = Dataset("runs/her2st")
    >>> ds.slides                       # ['C2', 'C3', ...]
    >>> bins = ds.level("C2", "bin")    # AnnData: raw counts of all genes, obs spot/region
    >>> from magnet_st.data.panel import training_panel
    >>> chosen = training_panel(ds, ["C3", "C4"])   # genes + target statistics of these slides
    >>> y = ds.targets("C2", "bin", chosen.genes, chosen.targets["bin"])  # float32 units x genes

    Every read of counts or targets names its genes (and targets their fitted transform):
    there is no default panel, so no caller can fall back on the panel ``prepare`` chose on
    every slide, test slides included. That panel and its statistics are reachable only
    as :attr:`all_slide_panel` and :attr:`all_slide_target_transforms`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not self.path.is_dir():
            raise InputError(self.path, "dataset folder not found")
        if not manifest.is_file():
            raise InputError(
                self.path,
                "no manifest.json: not a dataset, or 'magnet prepare' did not finish; "
                "run it again to complete it",
            )
        try:
            self.manifest = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(manifest, f"unreadable manifest ({exc})") from exc
        if self.manifest.get("format") != FORMAT:
            raise InputError(manifest, "not a magnet-st dataset manifest")
        for name, meta in self.manifest["slides"].items():
            if not slide_dir_is_complete(self.path / meta["dir"]):
                raise InputError(self.path / meta["dir"], f"slide {name} is incomplete")
        self._levels: dict[tuple[str, str], anndata.AnnData] = {}
        self._files: dict[tuple[str, str], Any] = {}  # open h5py files, read-only
        self._var: dict[tuple[str, str], pd.DataFrame] = {}
        self._images: dict[str, SlideImage] = {}

    # -- description -------------------------------------------------------------------------
    @property
    def slides(self) -> list[str]:
        return list(self.manifest["slides"])

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def all_slide_panel(self) -> list[str]:
        """Gene ids of the panel ``prepare`` chose on the dataset's training slides (every
        slide by default, slides scored later included): for inspection and for a model
        trained on all of them; a cross-validation fold chooses its own
        (:func:`magnet_st.data.panel.training_panel`)."""
        return list(self.manifest["panel"]["gene_ids"])

    @property
    def all_slide_panel_names(self) -> list[str]:
        """Gene names of :attr:`all_slide_panel`."""
        return list(self.manifest["panel"]["gene_names"])

    @property
    def train_slides(self) -> list[str]:
        return list(self.manifest["panel"]["train_slides"])

    def slide_meta(self, slide: str) -> dict:
        try:
            return self.manifest["slides"][slide]
        except KeyError:
            raise InputError(self.path, f"no slide {slide!r}; slides: {self.slides}") from None

    def lists_all_genes(self, slide: str) -> bool:
        """Whether the slide's counts list every gene of its reference; if not (legacy
        ST), a gene it does not list has zero counts there (see :func:`slide_lists_all`)."""
        return slide_lists_all(self.slide_meta(slide))

    def patch_px(self, level: str) -> int:
        """Edge of the level's patches in pixels at the working resolution."""
        return int(self.config[f"{_LEVEL_KEY[level]}_px"])

    def patch_um(self, level: str) -> float:
        return float(self.config[f"{level}_size_um"])

    @property
    def working_mpp(self) -> float:
        return float(self.config["working_mpp"])

    @cached_property
    def all_slide_target_transforms(self) -> dict[str, TargetTransform]:
        """The target transforms ``prepare`` fitted on the slides of :attr:`all_slide_panel`,
        per level (a fold fits its own: :func:`magnet_st.data.panel.training_targets`)."""
        return {lv: TargetTransform.from_dict(d) for lv, d in self.manifest["targets"].items()}

    @property
    def target_kind(self) -> str:
        """The dataset's target scale (``log1p`` or ``log1p_cp10k``): a choice, not a fit."""
        return str(self.manifest["targets"]["bin"]["kind"])

    # -- data ---------------------------------------------------------------------------------
    def level(self, slide: str, level: str) -> anndata.AnnData:
        """The AnnData of one level of one slide (read once, then cached), backed: its
        count matrix stays on disk. Training does not open it: it reads single elements
        (:meth:`obs_column`, :meth:`positions_px`, :meth:`var`) and the rows of the counts
        each batch needs (:meth:`panel_counts`), so that its memory does not grow with the
        slide (the AnnData's obs index and stored graphs are ~190 MB on 550k bins)."""
        import anndata

        self._check_level(level)
        key = (slide, level)
        if key not in self._levels:
            self._levels[key] = anndata.read_h5ad(self._h5ad(slide, level), backed="r")
        return self._levels[key]

    @staticmethod
    def _check_level(level: str) -> None:
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")

    def _h5ad(self, slide: str, level: str) -> Path:
        self._check_level(level)
        return self.path / self.slide_meta(slide)["dir"] / f"{level}.h5ad"

    def _file(self, slide: str, level: str) -> Any:
        import h5py

        key = (slide, level)
        if key not in self._files:
            self._files[key] = h5py.File(self._h5ad(slide, level), "r")
        return self._files[key]

    def close(self) -> None:
        """Close the on-disk matrices of the levels read so far (before rewriting them)."""
        for ad in self._levels.values():
            if ad.isbacked:
                ad.file.close()
        for f in self._files.values():
            f.close()
        self._levels.clear()
        self._files.clear()
        self._var.clear()

    def n_obs(self, slide: str, level: str) -> int:
        """Number of units of one level of one slide."""
        return n_rows(self._file(slide, level))

    def var(self, slide: str, level: str = "bin") -> pd.DataFrame:
        """The level's genes (index: names; column ``gene_ids``), read alone and cached."""
        key = (slide, level)
        if key not in self._var:
            self._var[key] = read_element(self._file(slide, level), "var")
        return self._var[key]

    def gene_ids(self, slide: str, level: str = "bin") -> list[str]:
        return list(self.var(slide, level)["gene_ids"].astype(str))

    def obs_column(self, slide: str, level: str, column: str) -> np.ndarray:
        """One column of the level's ``obs``, read alone."""
        value = read_element(self._file(slide, level), f"obs/{column}")
        return np.asarray(value)

    def matrix(self, slide: str, level: str) -> Any:
        """The level's raw count matrix (all genes) on disk: rows read when sliced."""
        import h5py

        X = self._file(slide, level)["X"]
        return X if isinstance(X, h5py.Dataset) else sparse_dataset(X)

    def panel_counts(
        self, slide: str, level: str, genes: list[str], *, raw: bool = False
    ) -> PanelCounts:
        """Raw counts (units x genes) for ``genes`` (gene ids, required), on disk:
        indexing it with rows reads those rows. On a slide that lists only the genes it
        detected (legacy ST), a gene it does not list is a column of zeros; elsewhere it is
        an error. With ``log1p_cp10k`` targets, counts per 10,000 of the unit's total
        (``raw``: the counts as measured, whatever the targets)."""
        genes = _named_genes(genes)
        scale = None
        if TargetTransform(self.target_kind).per_10k and not raw:
            scale = per_10k_scale(self.obs_column(slide, level, "total_counts"))
        try:
            return PanelCounts(
                self._h5ad(slide, level),
                self.gene_ids(slide, level),
                genes,
                fill_absent=not self.lists_all_genes(slide),
                row_scale=scale,
            )
        except KeyError as exc:
            raise InputError(
                self.path / self.slide_meta(slide)["dir"],
                f"slide {slide} lacks genes {exc.args[0][:10]}",
            ) from None

    def counts(self, slide: str, level: str, genes: list[str]) -> sp.csr_matrix:
        """Counts (units x genes) for ``genes`` (required), in memory (read in row
        chunks: only the selected columns are ever held): raw, or per 10,000 with
        ``log1p_cp10k`` targets. See :meth:`panel_counts`."""
        counts = self.panel_counts(slide, level, genes)
        try:
            return counts.to_memory()
        finally:
            counts.close()

    def targets(
        self, slide: str, level: str, genes: list[str], transform: TargetTransform
    ) -> np.ndarray:
        """Regression targets (float32, units x genes) of ``genes`` under ``transform`` (fitted
        on a model's training slides, e.g. ``training_panel(...).targets[level]``)."""
        return transform.transform(self.counts(slide, level, genes))

    def gene_names(self, genes: list[str]) -> list[str]:
        """Gene names (symbols) of gene ids, as the first slide that lists them names them."""
        name: dict[str, str] = {}
        for slide in self.slides:
            if all(g in name for g in genes):
                break
            var = self.var(slide, "bin")
            ids, names = var["gene_ids"].astype(str), var.index.astype(str)
            for g, n in zip(ids, names, strict=True):
                name.setdefault(g, n)
        return [name.get(g, g) for g in genes]

    def positions_px(self, slide: str, level: str) -> np.ndarray:
        """Centres ``(x, y)`` in full-resolution pixels."""
        return np.asarray(read_element(self._file(slide, level), "obsm/spatial"), dtype=np.float64)

    def polygons(self, slide: str) -> Polygons | None:
        """The outlines of the slide's units when they are cells (full-resolution pixels),
        else ``None`` (square bins and round spots)."""
        f = self._file(slide, "bin")
        if "uns/polygons" not in f:
            return None
        from magnet_st.data.shapes import Polygons

        return Polygons(
            np.asarray(f["uns/polygons/xy"], dtype=np.float64),
            np.asarray(f["uns/polygons/offsets"], dtype=np.int64),
        )

    def positions_um(self, slide: str, level: str) -> np.ndarray:
        return self.positions_px(slide, level) * float(self.slide_meta(slide)["microns_per_pixel"])

    def membership(self, slide: str, level: str) -> np.ndarray:
        """For each unit, the index of its ``level`` tile (``"spot"`` or ``"region"``)."""
        return self.obs_column(slide, "bin", level)

    def image(self, slide: str) -> SlideImage:
        """The slide's full-resolution image, opened once."""
        from magnet_st.io.image import open_image

        if slide not in self._images:
            meta = self.slide_meta(slide)
            self._images[slide] = open_image(
                meta["image"], microns_per_pixel=meta["microns_per_pixel"]
            )
        return self._images[slide]

    def release_image(self, slide: str) -> None:
        """Close the slide's image and drop what it holds (a JPEG is decoded whole), so that
        a pass over many slides holds one image at a time; a later :meth:`image` reopens it."""
        img = self._images.pop(slide, None)
        if img is not None:
            img.close()

    def __repr__(self) -> str:
        return (
            f"Dataset({str(self.path)!r}, slides={self.slides}, "
            f"all-slide panel={len(self.all_slide_panel)} genes, "
            f"preset={self.config['preset']})"
        )


_LEVEL_KEY = {"bin": "bin_patch", "spot": "spot_tile", "region": "region_tile"}


def _named_genes(genes: list[str]) -> list[str]:
    """The gene ids a read names; ``None`` (the old default panel) is refused."""
    if genes is None or isinstance(genes, str):
        raise TypeError(
            "name the genes to read (a model's panel, e.g. training_panel(ds, slides).genes); "
            "the panel prepare chose on every slide is Dataset.all_slide_panel"
        )
    return list(genes)
