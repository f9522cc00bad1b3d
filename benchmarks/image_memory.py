"""Memory of many whole-decoded images held open at once, as end-to-end training holds them.

Opens every image given (JPEG / PNG are decoded whole on first read), then cuts 224 px
patches from them in a shuffled order, slide after slide, as the batches of an end-to-end
epoch do, and prints the process's memory from ``/proc/self/status``: anonymous memory
(``RssAnon``: the process's own), file-backed resident pages (``RssFile``: the kernel may
drop them when memory is short) and the peak resident set (``VmHWM``), with the time of
the first read of each image and the patch rate afterwards. ``--in-memory`` keeps decoded
images in anonymous memory (the behaviour before ``SPILL_BYTES``) for the comparison.

    python benchmarks/image_memory.py IMAGE [IMAGE ...] [--in-memory]

It prints figures; it asserts nothing and is not a test. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import magnet_st.io.image.base as image_base
from magnet_st.io.image import open_image


def status_mb() -> dict[str, float]:
    """RssAnon, RssFile and VmHWM of this process, in MB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("images", type=Path, nargs="+", help="JPEG / PNG / TIFF images")
    ap.add_argument(
        "--in-memory", action="store_true", help="keep decoded images in anonymous memory"
    )
    ap.add_argument("--patches", type=int, default=2000, help="patches cut after the first reads")
    ap.add_argument("--seed", type=int, default=0, help="seed of the patch order")
    args = ap.parse_args(argv)
    if args.in_memory:
        image_base.SPILL_BYTES = 1 << 62
    print(f"start: {status_mb()}")
    images = [open_image(p, microns_per_pixel=1.0) for p in args.images]
    for img in images:
        t = time.perf_counter()
        img.read_patch(img.size[0] / 2, img.size[1] / 2, 224, 1.0)
        w, h = img.size
        print(
            f"{img.path.name}: {w} x {h} px ({w * h * 3 / 1e6:.0f} MB decoded), "
            f"first read {time.perf_counter() - t:.2f} s; {status_mb()}"
        )
    rng = np.random.default_rng(args.seed)
    which = rng.integers(0, len(images), args.patches)
    t = time.perf_counter()
    for i in which:
        img = images[i]
        x, y = rng.uniform(112, img.size[0] - 112), rng.uniform(112, img.size[1] - 112)
        img.read_patch(float(x), float(y), 224, 1.0)
    dt = time.perf_counter() - t
    mode = "in memory" if args.in_memory else "file map"
    print(f"{mode}: {args.patches / dt:.0f} patches/s over {len(images)} images; {status_mb()}")


if __name__ == "__main__":
    main()
