"""``magnet segment``: nuclei and cells from the H&E alone (the built-in detector)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from magnet_st.cli._common import _Formatter, _positive_float


def cmd_segment(args: argparse.Namespace) -> int:
    from magnet_st.io.image import open_image
    from magnet_st.io.nuclei import NucleusConfig, detect_cells, write_segmentation

    t0 = time.perf_counter()
    image = open_image(args.image, microns_per_pixel=args.mpp)
    mpp = image.microns_per_pixel
    if mpp is None:
        from magnet_st.errors import InputError

        raise InputError(args.image, "the image records no microns per pixel; give --mpp")
    region = tuple(v / mpp for v in args.roi) if args.roi else None  # full-resolution px
    cfg = NucleusConfig(expand_um=args.expand_um, threshold=args.threshold)
    nuclei, cells = detect_cells(image, region, cfg, progress=not args.quiet)
    out = Path(args.out)
    write_segmentation(out, {i + 1: ring for i, ring in enumerate(cells)})
    if args.nuclei:
        write_segmentation(args.nuclei, {i + 1: ring for i, ring in enumerate(nuclei)})
    print(f"{len(cells):,} cells -> {out} in {time.perf_counter() - t0:.0f} s")
    return 0


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="find nuclei and cells on an H&E image (for slides that were never segmented)",
        description="Find nuclei on the H&E and grow them into cells, as QuPath's cell "
        "detection does: colour deconvolution to haematoxylin, a threshold (Otsu's), a "
        "seeded watershed that splits touching nuclei, then each nucleus grown by "
        "--expand-um into the pixels nearest to it. Writes the cells as Space Ranger 4 "
        "writes its segmentation (GeoJSON polygons in full-resolution pixels, "
        "properties.cell_id), for 'magnet predict --segmentation' or 'magnet prepare "
        "--segmentation'. A segmentation from StarDist, Cellpose or QuPath can be used "
        "instead.",
        formatter_class=_Formatter,
    )
    p.add_argument("image", help="full-resolution H&E image (TIFF, SVS, ...)")
    p.add_argument("--out", required=True, help="cell outlines to write (GeoJSON)")
    p.add_argument(
        "--nuclei", default=None, help="also write the nucleus outlines here; default: none"
    )
    p.add_argument(
        "--mpp",
        type=_positive_float,
        default=None,
        help="microns per pixel of the image; default: what the file records",
    )
    p.add_argument(
        "--roi",
        nargs=4,
        type=float,
        default=None,
        metavar=("X0", "Y0", "X1", "Y1"),
        help="only this box, microns from the image's top-left corner; default: the whole image",
    )
    p.add_argument(
        "--expand-um",
        type=float,
        default=4.0,
        help="how far each nucleus grows into its cell, um (Space Ranger's synthetic "
        "stand-in uses 4)",
    )
    p.add_argument(
        "--threshold",
        type=_positive_float,
        default=None,
        help="haematoxylin optical density above which a pixel is nuclear; default: Otsu's "
        "threshold of each tile (at least 0.01)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_segment)
