"""The in-memory slide that every reader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from magnet_st.errors import InputError

if TYPE_CHECKING:
    import anndata

    from magnet_st.data.shapes import Polygons
    from magnet_st.io.image import SlideImage


#: the largest image a slide can have, mm (long, short side): a 75 x 25 mm glass slide, with
#: a margin for scanners that image past its edge
MAX_IMAGE_MM = (80.0, 30.0)


@dataclass
class Slide:
    """One section: counts per unit (bin or spot), where the units lie, and its image.

    Positions follow scanpy's convention: ``(x, y)`` = (column, row) of the
    full-resolution image, in pixels; ``centers_um`` gives the same in microns.

    Attributes:
        name: a short name for the section (e.g. ``"C2"``).
        counts: raw counts, sparse CSR, units x genes, integer dtype.
        gene_ids: one id per gene (Ensembl id where the input has one).
        gene_names: one symbol per gene.
        unit_ids: one id per unit (10x barcode, or ``"XxY"`` for legacy ST).
        centers_px: ``(n_units, 2)`` float64, unit centres ``(x, y)`` in full-resolution pixels.
        unit_size_um: edge of a square bin, or diameter of a spot, in microns.
        microns_per_pixel: of the full-resolution image.
        technology: ``"visium_hd"``, ``"visium"``, ``"legacy_st"`` or ``"anndata"``.
        image_path: the full-resolution image, or ``None`` when none was given.
        array_coords: ``(n_units, 2)`` int ``(array_row, array_col)``, or ``None``.
        sources: what was read from where (``"counts"``, ``"positions"``, ...).
        lists_all_genes: whether the counts list every gene of the reference, detected or
            not (Space Ranger), so that a gene absent from them is not in the reference;
            ``False`` where the format lists only the genes the section detected (legacy
            ST tables), so that an absent gene has zero counts in every unit.
        polygons: each unit's outline (cells), in full-resolution pixels, or ``None``
            (square bins and round spots are drawn from ``unit_size_um``).
    """

    name: str
    counts: sp.csr_matrix
    gene_ids: np.ndarray
    gene_names: np.ndarray
    unit_ids: np.ndarray
    centers_px: np.ndarray
    unit_size_um: float
    microns_per_pixel: float
    technology: str
    image_path: Path | None = None
    array_coords: np.ndarray | None = None
    sources: dict[str, str] = field(default_factory=dict)
    lists_all_genes: bool = True
    polygons: Polygons | None = None
    _image: SlideImage | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        n, g = self.counts.shape
        where = self.sources.get("counts", self.name)
        if len(self.unit_ids) != n:
            raise InputError(where, f"{n} count rows but {len(self.unit_ids)} unit ids")
        if len(self.gene_ids) != g or len(self.gene_names) != g:
            raise InputError(where, f"{g} genes in the matrix but {len(self.gene_ids)} gene ids")
        if self.centers_px.shape != (n, 2):
            raise InputError(
                self.sources.get("positions", where),
                f"positions have shape {self.centers_px.shape}, expected ({n}, 2)",
            )
        if not np.all(np.isfinite(self.centers_px)):
            raise InputError(self.sources.get("positions", where), "positions contain NaN or inf")
        if not (np.isfinite(self.microns_per_pixel) and self.microns_per_pixel > 0):
            raise InputError(
                self.sources.get("microns_per_pixel", where),
                f"microns per pixel must be a positive number, got {self.microns_per_pixel!r}",
            )
        if n == 0:
            raise InputError(where, "no units under tissue (empty matrix)")
        if g == 0:
            raise InputError(where, "the matrix has no genes")
        if self.polygons is not None and len(self.polygons) != n:
            raise InputError(
                self.sources.get("polygons", where),
                f"{len(self.polygons)} outlines for {n} units",
            )
        if len(set(self.unit_ids.tolist())) != n:
            raise InputError(where, "unit ids (barcodes) are not unique")

    # -- derived ---------------------------------------------------------------
    @property
    def n_units(self) -> int:
        return int(self.counts.shape[0])

    @property
    def n_genes(self) -> int:
        return int(self.counts.shape[1])

    @property
    def centers_um(self) -> np.ndarray:
        """Unit centres ``(x, y)`` in microns from the image origin."""
        return self.centers_px * self.microns_per_pixel

    @property
    def image(self) -> SlideImage | None:
        """The full-resolution image, opened on first use (``None`` without an image)."""
        if self._image is None and self.image_path is not None:
            from magnet_st.io.image import open_image

            self._image = open_image(self.image_path, microns_per_pixel=self.microns_per_pixel)
        return self._image

    def check_image_bounds(self) -> None:
        """Raise :class:`InputError` if unit centres fall outside the image."""
        img = self.image
        if img is None:
            return
        w, h = img.size
        x, y = self.centers_px[:, 0], self.centers_px[:, 1]
        bad = (x < 0) | (y < 0) | (x >= w) | (y >= h)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InputError(
                self.image_path,
                f"image is {w} x {h} px but {int(bad.sum())} of {self.n_units} unit centres lie "
                f"outside it (e.g. {self.unit_ids[i]} at x={x[i]:.1f}, y={y[i]:.1f} px); "
                "is this the full-resolution image the positions refer to?",
            )

    def check_counts(self) -> None:
        """Raise :class:`InputError` if every unit has zero counts: nothing to learn from or
        compare with (scanpy's panel selection crashed in native code on such a slide)."""
        if not np.asarray(self.counts.sum()).item():
            raise InputError(
                self.sources.get("counts", self.name),
                f"slide {self.name}: all {self.n_units:,} units have zero counts",
            )

    def check_scale(self, col_step_um: float | None = None) -> None:
        """Raise :class:`InputError` when the microns per pixel cannot be right: units one
        array column apart are not ``col_step_um`` apart (within 25 %; the step comes from a
        least-squares fit of the pixel positions on the array coordinates, skipped where the
        positions do not follow the array), or the image is larger than a glass slide
        (:data:`MAX_IMAGE_MM`). Both say which figures disagree."""
        mpp = float(self.microns_per_pixel)
        source = self.sources.get("microns_per_pixel", "?")
        rc = self.array_coords
        if col_step_um is not None and rc is not None and self.n_units >= 3:
            pts, rc = self.centers_px, np.asarray(rc, dtype=np.float64)
            if len(pts) > 20_000:  # a seeded sample: the fit needs no more
                pick = np.random.default_rng(0).choice(len(pts), 20_000, replace=False)
                pts, rc = pts[pick], rc[pick]
            a = np.column_stack([np.ones(len(rc)), rc])
            coef, _, rank, _ = np.linalg.lstsq(a, pts, rcond=None)
            step_px = float(np.hypot(*coef[2]))
            rms = float(np.sqrt(np.mean(np.sum((pts - a @ coef) ** 2, axis=1))))
            found = step_px * mpp
            follows = rank == 3 and step_px > 0 and rms < 0.5 * step_px
            if follows and not 0.75 <= found / col_step_um <= 1 / 0.75:
                raise InputError(
                    self.image_path or self.sources.get("positions", self.name),
                    f"units one array column apart are {found:.3g} um apart at {mpp:.4g} "
                    f"um/px, but {self.technology} columns are {col_step_um:g} um apart: "
                    f"the microns per pixel ({source}) are wrong by "
                    f"{found / col_step_um:.2g}x (--mpp is that of the full-resolution "
                    "image, also when Space Ranger's hires image is given)",
                )
        img = self.image
        if img is not None:
            w, h = (float(v) * mpp / 1000 for v in img.size)
            if max(w, h) > MAX_IMAGE_MM[0] or min(w, h) > MAX_IMAGE_MM[1]:
                raise InputError(
                    self.image_path,
                    f"image is {w:.1f} x {h:.1f} mm at {mpp:.4g} um/px ({source}), larger "
                    f"than a {MAX_IMAGE_MM[1]:g} x {MAX_IMAGE_MM[0]:g} mm glass slide: the "
                    "microns per pixel are wrong",
                )

    def summary(self) -> dict[str, Any]:
        """Numbers worth printing: units, genes, sizes and counts-per-unit quantiles."""
        per_unit = np.asarray(self.counts.sum(axis=1)).ravel()
        q = np.quantile(per_unit, [0.0, 0.25, 0.5, 0.75, 1.0])
        out: dict[str, Any] = {
            "name": self.name,
            "technology": self.technology,
            "units_under_tissue": self.n_units,
            "genes": self.n_genes,
            "unit_size_um": self.unit_size_um,
            "microns_per_pixel": round(float(self.microns_per_pixel), 6),
            "counts_per_unit": {
                k: float(v) for k, v in zip(["min", "q25", "median", "q75", "max"], q, strict=True)
            },
            "total_counts": int(per_unit.sum()),
            "image": str(self.image_path) if self.image_path else None,
        }
        if self.image is not None:
            w, h = self.image.size
            out["image_size_px"] = [int(w), int(h)]
            out["image_size_um"] = [
                round(w * self.microns_per_pixel, 1),
                round(h * self.microns_per_pixel, 1),
            ]
        if self.polygons is not None:
            area = self.polygons.areas() * self.microns_per_pixel**2
            out["median_area_um2"] = round(float(np.median(area)), 1)
        out["sources"] = dict(self.sources)
        return out

    def to_anndata(self) -> anndata.AnnData:
        """An AnnData that scanpy understands.

        ``X`` holds the raw integer counts, ``obsm["spatial"]`` the unit centres in
        full-resolution pixels, and ``uns["spatial"][name]["scalefactors"]`` the
        microns per pixel and unit size, so :func:`magnet_st.read.h5ad` reads it back.
        Cells keep their outlines in ``uns["polygons"]`` (``xy`` and ``offsets``, as
        :class:`magnet_st.data.shapes.Polygons`).
        """
        import anndata
        import pandas as pd

        obs = pd.DataFrame(index=pd.Index(self.unit_ids.astype(str), name="barcode"))
        if self.array_coords is not None:
            obs["array_row"] = self.array_coords[:, 0]
            obs["array_col"] = self.array_coords[:, 1]
        var = pd.DataFrame(
            {"gene_ids": self.gene_ids.astype(str)},
            index=pd.Index(self.gene_names.astype(str), name="gene"),
        )
        adata = anndata.AnnData(X=self.counts.copy(), obs=obs, var=var)
        adata.var_names_make_unique()
        adata.obsm["spatial"] = self.centers_px.astype(np.float64)
        if self.polygons is not None:  # outlines, flat: unit i is xy[offsets[i]:offsets[i + 1]]
            adata.uns["polygons"] = {
                "xy": self.polygons.xy.astype(np.float64),
                "offsets": self.polygons.offsets.astype(np.int64),
            }
        adata.uns["spatial"] = {
            self.name: {
                "images": {},
                "scalefactors": {
                    "microns_per_pixel": float(self.microns_per_pixel),
                    "spot_diameter_fullres": float(self.unit_size_um / self.microns_per_pixel),
                    "bin_size_um": float(self.unit_size_um),
                    "tissue_hires_scalef": 1.0,
                    "tissue_lowres_scalef": 1.0,
                },
                "metadata": {
                    "technology": self.technology,
                    "lists_all_genes": bool(self.lists_all_genes),
                    "image_path": str(self.image_path) if self.image_path else "",
                },
            }
        }
        return adata
