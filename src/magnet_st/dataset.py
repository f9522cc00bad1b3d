"""Open a dataset written by ``magnet prepare`` (see :mod:`magnet_st.prepare`)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from magnet_st.errors import InputError
from magnet_st.panel import gene_columns
from magnet_st.prepare import FORMAT, LEVELS, MANIFEST, slide_dir_is_complete, slide_lists_all
from magnet_st.targets import TargetTransform

if TYPE_CHECKING:
    import anndata

    from magnet_st.image import SlideImage


class Dataset:
    """A prepared multi-level dataset: slides, levels, gene panel and targets.

    >>> ds = Dataset("runs/her2st")
    >>> ds.slides                       # ['C2', 'C3', ...]
    >>> bins = ds.level("C2", "bin")    # AnnData: raw counts of all genes, obs spot/region
    >>> y = ds.targets("C2", "bin")     # float32 (n_units, n_panel) on the target scale
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
        self._images: dict[str, SlideImage] = {}

    # -- description -------------------------------------------------------------------------
    @property
    def slides(self) -> list[str]:
        return list(self.manifest["slides"])

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def panel(self) -> list[str]:
        """Gene ids of the panel, in order."""
        return list(self.manifest["panel"]["gene_ids"])

    @property
    def panel_names(self) -> list[str]:
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
    def target_transforms(self) -> dict[str, TargetTransform]:
        return {lv: TargetTransform.from_dict(d) for lv, d in self.manifest["targets"].items()}

    # -- data ---------------------------------------------------------------------------------
    def level(self, slide: str, level: str) -> anndata.AnnData:
        """The AnnData of one level of one slide (read once, then cached), backed: its
        count matrix stays on disk (:meth:`counts` reads the columns it needs in row chunks),
        so a run holds the panel's counts, not every gene of every level of every slide."""
        import anndata

        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
        key = (slide, level)
        if key not in self._levels:
            path = self.path / self.slide_meta(slide)["dir"] / f"{level}.h5ad"
            self._levels[key] = anndata.read_h5ad(path, backed="r")
        return self._levels[key]

    def close(self) -> None:
        """Close the on-disk matrices of the levels read so far (before rewriting them)."""
        for ad in self._levels.values():
            if ad.isbacked:
                ad.file.close()
        self._levels.clear()

    def counts(self, slide: str, level: str, genes: list[str] | None = None) -> sp.csr_matrix:
        """Raw counts (units x genes) for ``genes`` (gene ids; default: the panel).

        On a slide that lists only the genes it detected (legacy ST), a gene it does not
        list is a column of zeros; elsewhere it is an error."""
        ad = self.level(slide, level)
        genes = self.panel if genes is None else genes
        ids = ad.var["gene_ids"].astype(str)
        try:
            return gene_columns(ad.X, ids, genes, fill_absent=not self.lists_all_genes(slide))
        except KeyError as exc:
            raise InputError(
                self.path / self.slide_meta(slide)["dir"],
                f"slide {slide} lacks genes {exc.args[0][:10]}",
            ) from None

    def targets(self, slide: str, level: str, genes: list[str] | None = None) -> np.ndarray:
        """Regression targets on the dataset's target scale (float32, units x genes)."""
        return self.target_transforms[level].transform(self.counts(slide, level, genes))

    def gene_names(self, genes: list[str]) -> list[str]:
        """Gene names (symbols) of gene ids, as the first slide that lists them names them."""
        name: dict[str, str] = {}
        for slide in self.slides:
            if all(g in name for g in genes):
                break
            ad = self.level(slide, "bin")
            ids, names = ad.var["gene_ids"].astype(str), ad.var_names.astype(str)
            for g, n in zip(ids, names, strict=True):
                name.setdefault(g, n)
        return [name.get(g, g) for g in genes]

    def positions_px(self, slide: str, level: str) -> np.ndarray:
        """Centres ``(x, y)`` in full-resolution pixels."""
        return np.asarray(self.level(slide, level).obsm["spatial"], dtype=np.float64)

    def positions_um(self, slide: str, level: str) -> np.ndarray:
        return self.positions_px(slide, level) * float(self.slide_meta(slide)["microns_per_pixel"])

    def membership(self, slide: str, level: str) -> np.ndarray:
        """For each unit, the index of its ``level`` tile (``"spot"`` or ``"region"``)."""
        return self.level(slide, "bin").obs[level].to_numpy()

    def image(self, slide: str) -> SlideImage:
        """The slide's full-resolution image, opened once."""
        from magnet_st.image import open_image

        if slide not in self._images:
            meta = self.slide_meta(slide)
            self._images[slide] = open_image(
                meta["image"], microns_per_pixel=meta["microns_per_pixel"]
            )
        return self._images[slide]

    def __repr__(self) -> str:
        return (
            f"Dataset({str(self.path)!r}, slides={self.slides}, panel={len(self.panel)} genes, "
            f"preset={self.config['preset']})"
        )


_LEVEL_KEY = {"bin": "bin_patch", "spot": "spot_tile", "region": "region_tile"}
