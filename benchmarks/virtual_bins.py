"""Time of the virtual 8 um bin grid over a whole 6.5 mm Visium HD capture area.

    python benchmarks/virtual_bins.py [--repeats 5]

Builds a tissue mask that is tissue everywhere (4,096 px on its longer side) over a
6.5 mm x 6.5 mm image at 0.2738 um/px and times ``magnet_st.io.tissue.virtual_bins`` (812 x
812 = 659,344 bins). It prints figures; it asserts nothing and is not a test (the grid's
correctness is tests/test_tissue.py's).
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np

from magnet_st.io.tissue import TissueMask, virtual_bins

MPP = 0.2738


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="timed runs (default: 5)")
    args = p.parse_args(argv)
    width = int(6500 / MPP)
    scale = 4096 / width
    side = math.ceil(width * scale)
    mask = TissueMask(np.ones((side, side), bool), scale, MPP, 0.1, (width, width))
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        v = virtual_bins(mask, 8.0)
        times.append(time.perf_counter() - t0)
    print(f"machine: {platform.processor() or platform.machine()}")
    print(
        f"virtual_bins, 6.5 mm capture area, {len(v):,} bins: "
        f"median {np.median(times):.2f} s, min {min(times):.2f} s over {args.repeats} runs"
    )


if __name__ == "__main__":
    main()
