"""Constants of the figures, and writing a figure to files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from magnet_st.util.atomic import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure


MeasuredScale = Literal["auto", "log1p", "counts"]

#: Name of the cross-validation baseline model (``magnet_st.evaluate.cv.BASELINE``), drawn first.
BASELINE = "mean_profile"

METRIC_LABELS = {
    "pcc_gene": "PCC-gene (Pearson r per gene, mean)",
    "pcc_gene_top": "PCC-gene, top-50 variable genes",
    "pcc_unit": "PCC-unit (Pearson r per bin, mean)",
    "mse": "MSE (log1p scale)",
    "mae": "MAE (log1p scale)",
}

METRIC_NAMES = {
    "pcc_gene": "PCC-gene",
    "pcc_gene_top": "PCC-gene top-50",
    "pcc_unit": "PCC-unit",
    "mse": "MSE",
    "mae": "MAE",
}

_SCALE_LABELS = {"log1p": "log1p(counts)", "counts": "counts"}


# -- figures and files ----------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    """A constrained-layout figure on its own Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(
    fig: Figure,
    path: str | Path,
    formats: Sequence[str] = ("png", "pdf"),
    dpi: int = 150,
) -> list[Path]:
    """Write ``fig`` once per format next to ``path`` and return the files written.

    ``path`` may carry a suffix: one that names an image format (``maps.png``) is replaced
    by each of ``formats``; any other (``slide.v2``) is kept and the format appended
    (``slide.v2.png``). Each file is written under a temporary name in the same folder and
    renamed into place, so a reader never sees half a figure.
    """
    if isinstance(formats, str):
        formats = (formats,)
    if not formats:
        raise ValueError("formats is empty: name at least one, e.g. ('png',)")
    supported = fig.canvas.get_supported_filetypes()
    fmts = [f.lower().lstrip(".") for f in formats]
    unknown = [f for f in fmts if f not in supported]
    if unknown:
        raise ValueError(f"unsupported formats {unknown}; choose from {sorted(supported)}")
    path = Path(path)
    if path.suffix.lower().lstrip(".") in supported:
        path = path.with_suffix("")
    written = []
    for fmt in dict.fromkeys(fmts):
        dest = path.with_name(f"{path.name}.{fmt}")
        # no creation date: the same figure gives the same PDF
        meta = {"CreationDate": None} if fmt == "pdf" else None
        with atomic_path(dest) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, metadata=meta)
        written.append(dest)
    return written
