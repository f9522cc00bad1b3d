"""Throughput of magnet_st.io.image region reads: 224 px patches per second on one core.

Writes a tiled, JPEG-compressed, pyramidal BigTIFF (SubIFD levels, written tile by tile so
memory stays low) and a her2st-sized JPEG, then times single-threaded ``read_patch`` /
``read_patches`` in raster order, in random order, cold (fresh image, empty cache) and
warm (tiles already cached), with the tifffile, OpenSlide and PIL backends.

    python benchmarks/region_read.py                 # everything in a temporary directory
    python benchmarks/region_read.py --out benchmarks/out --size 10000 --jpeg real.jpg

It prints figures; it asserts nothing and is not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from magnet_st.io.image import SlideImage, open_image


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for the test images (default: a temporary directory, removed afterwards)",
    )
    ap.add_argument("--reuse", action="store_true", help="reuse images already in --out")
    ap.add_argument("--size", type=int, default=20000, help="BigTIFF width and height, px")
    ap.add_argument("--tile", type=int, default=256, help="BigTIFF tile edge, px")
    ap.add_argument("--mpp", type=float, default=0.27, help="microns per pixel of the images")
    ap.add_argument("--quality", type=int, default=85, help="JPEG quality of tiles and JPEG")
    ap.add_argument("--patch", type=int, default=224, help="patch edge, px")
    ap.add_argument("--patch-mpp", type=float, default=0.25, help="patch resolution, um/px")
    ap.add_argument(
        "--grid",
        type=int,
        default=32,
        help="raster reads cover a GRID x GRID block of adjacent patches",
    )
    ap.add_argument(
        "--n-random", type=int, default=1000, help="patches read at random over the whole slide"
    )
    ap.add_argument("--batch", type=int, default=64, help="read_patches batch size")
    ap.add_argument("--cache-mb", type=int, default=256, help="tile cache per image, MiB")
    ap.add_argument(
        "--jpeg",
        type=Path,
        default=None,
        help="existing JPEG for the PIL comparison (default: write a synthetic one of --jpeg-size)",
    )
    ap.add_argument("--jpeg-size", default="9300x9900", help="synthetic JPEG WIDTHxHEIGHT")
    ap.add_argument("--no-openslide", action="store_true", help="skip the OpenSlide backend")
    ap.add_argument("--seed", type=int, default=0, help="random seed")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- test images


def texture(x0: int, y0: int, w: int, h: int, scale: float, noise: np.ndarray) -> np.ndarray:
    """H&E-like texture (pink stroma, purple blobs, grain) for level px ``[x0, x0+w)``."""
    y, x = np.mgrid[y0 : y0 + h, x0 : x0 + w].astype(np.float32) * np.float32(scale)
    stroma = np.sin(x * 0.011) * np.cos(y * 0.017) + 0.5 * np.sin((x + 2 * y) * 0.004)
    nuclei = np.sin(x * 0.21 + np.sin(y * 0.05) * 3) * np.sin(y * 0.19 + np.cos(x * 0.03) * 3)
    nuclei = np.clip(nuclei * 3 - 2, 0, 1)
    r = 225 - 25 * stroma - 90 * nuclei
    g = 170 - 40 * stroma - 110 * nuclei
    b = 205 - 15 * stroma - 50 * nuclei
    rgb = np.stack([r, g, b], axis=-1) + noise[:h, :w]
    return np.clip(rgb, 0, 255).astype(np.uint8)


def tiles(width: int, height: int, tile: int, scale: float, seed: int) -> Iterator[np.ndarray]:
    noise = np.random.default_rng(seed).normal(0, 6, (tile, tile, 3)).astype(np.float32)
    for ty in range(0, height, tile):
        for tx in range(0, width, tile):
            yield texture(tx, ty, tile, tile, scale, noise)


def write_bigtiff(path: Path, size: int, tile: int, mpp: float, quality: int, seed: int) -> None:
    import tifffile

    dims = [(size, size)]
    while max(dims[-1]) > 2 * tile:
        dims.append(((dims[-1][0] + 1) // 2, (dims[-1][1] + 1) // 2))
    opts = {
        "tile": (tile, tile),
        "dtype": np.uint8,
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": quality},
    }
    tmp = path.with_name(path.name + ".part")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for k, (w, h) in enumerate(dims):
            tw.write(
                tiles(w, h, tile, 2.0**k, seed),
                shape=(h, w, 3),
                subifds=len(dims) - 1 if k == 0 else None,
                subfiletype=0 if k == 0 else 1,
                resolution=(1e4 / (mpp * 2**k),) * 2,
                resolutionunit="CENTIMETER",
                **opts,  # type: ignore[arg-type]
            )
    tmp.replace(path)


def write_jpeg(path: Path, width: int, height: int, quality: int, seed: int) -> None:
    from PIL import Image

    noise = np.random.default_rng(seed).normal(0, 6, (512, 512, 3)).astype(np.float32)
    img = np.empty((height, width, 3), np.uint8)
    for y in range(0, height, 512):
        for x in range(0, width, 512):
            h, w = min(512, height - y), min(512, width - x)
            img[y : y + h, x : x + w] = texture(x, y, w, h, 1.0, noise)
    Image.fromarray(img).save(path, quality=quality)


# --------------------------------------------------------------------------- timing


def grid_centers(x0: float, y0: float, step: float, n: int) -> np.ndarray:
    """``n`` x ``n`` adjacent patch centres in raster order, first centre at (x0, y0)."""
    j, i = np.mgrid[0:n, 0:n]
    return np.column_stack([x0 + i.ravel() * step, y0 + j.ravel() * step])


def timed(label: str, n: int, fn: Callable[[], object], img: SlideImage | None = None) -> float:
    """Run ``fn`` once; print and return regions per second (and tile-cache use of ``img``)."""
    cache = getattr(img, "_cache", None)
    hits, misses = (cache.hits, cache.misses) if cache is not None else (0, 0)
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    rate = n / dt
    note = ""
    if cache is not None and cache.hits + cache.misses > hits + misses:
        note = f"  [tiles: {cache.misses - misses} decoded, {cache.hits - hits} cached]"
    print(f"  {label:<48} {n:6d} in {dt:6.2f} s = {rate:7.0f} regions/s{note}", flush=True)
    return rate


def one_by_one(img: SlideImage, centers: np.ndarray, size: int, mpp: float) -> Callable[[], None]:
    def run() -> None:
        for cx, cy in centers:
            img.read_patch(cx, cy, size, mpp)

    return run


def batched(
    img: SlideImage, centers: np.ndarray, size: int, mpp: float, batch: int
) -> Callable[[], None]:
    def run() -> None:
        for i in range(0, len(centers), batch):
            img.read_patches(centers[i : i + batch], size, mpp)

    return run


def bench_image(
    path: Path, args: argparse.Namespace, rng: np.random.Generator, backend: str = "auto"
) -> None:
    cache = args.cache_mb * 2**20
    mk = lambda: open_image(path, args.mpp, backend=backend, cache_bytes=cache)  # noqa: E731
    img = mk()
    w, h = img.size
    print(f"\n{path.name}: {img.backend} backend, {w} x {h} px, levels {img.level_dimensions}")
    size, mpp = args.patch, args.patch_mpp
    step = size * mpp / args.mpp
    n = min(args.grid, int(w // step) - 1, int(h // step) - 1)
    grid = grid_centers(w / 2 - n * step / 2, h / 2 - n * step / 2, step, n)
    shuffled = grid[rng.permutation(len(grid))]
    spread = np.column_stack([rng.uniform(0, w, args.n_random), rng.uniform(0, h, args.n_random)])
    if img.backend == "pil":
        t = time.perf_counter()
        img.read_region(0, 0, 1, 1, (1, 1))
        print(f"  first read decodes the whole image: {time.perf_counter() - t:.2f} s")
    timed(f"raster {n}x{n} grid, cold", len(grid), one_by_one(img, grid, size, mpp), img)
    timed("raster, warm (same grid again)", len(grid), one_by_one(img, grid, size, mpp), img)
    timed("random order over the grid, warm", len(grid), one_by_one(img, shuffled, size, mpp), img)
    native = grid_centers(round(grid[0, 0]), round(grid[0, 1]), size, n)  # integer: no resampling
    one_by_one(img, native, size, args.mpp)()
    timed(
        f"native {args.mpp} um/px (no resampling), warm",
        len(native),
        one_by_one(img, native, size, args.mpp),
        img,
    )
    img.close()
    img = mk()
    timed(
        f"random over whole slide, cold ({args.cache_mb} MiB cache)",
        len(spread),
        one_by_one(img, spread, size, mpp),
        img,
    )
    img.close()
    img = mk()
    timed(
        f"read_patches x{args.batch}, random order over grid, cold",
        len(grid),
        batched(img, shuffled, size, mpp, args.batch),
        img,
    )
    timed(
        f"read_patches x{args.batch}, warm",
        len(grid),
        batched(img, shuffled, size, mpp, args.batch),
        img,
    )
    t = time.perf_counter()
    th, _ = img.thumbnail(1024)
    print(f"  thumbnail(1024) -> {th.shape[1]} x {th.shape[0]}: {time.perf_counter() - t:.2f} s")
    img.close()


def bench_resize(args: argparse.Namespace) -> None:
    """The resampling step alone: PIL bilinear resize of one patch's source region."""
    from PIL import Image

    size = args.patch
    span = size * args.patch_mpp / args.mpp
    region = np.random.default_rng(args.seed).integers(
        0, 256, (int(span) + 6, int(span) + 6, 3), dtype=np.uint8
    )
    box = (2.3, 2.7, 2.3 + span, 2.7 + span)
    reps = 500

    def run() -> None:
        for _ in range(reps):
            np.asarray(Image.fromarray(region).resize((size, size), Image.BILINEAR, box=box))

    print(f"\nresampling alone ({region.shape[1]} px region -> {size} px, PIL bilinear):")
    timed("fromarray + resize + asarray", reps, run)


def machine() -> str:
    import imagecodecs
    import PIL
    import tifffile

    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    return (
        f"{platform.platform()}, {cpu}, {cpus} CPUs ({usable} usable){load}; Python "
        f"{sys.version.split()[0]}, tifffile {tifffile.__version__}, imagecodecs "
        f"{imagecodecs.__version__}, Pillow {PIL.__version__}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print("machine:", machine())
    print(
        f"patches: {args.patch} px at {args.patch_mpp} um/px from a {args.mpp} um/px image, "
        "single thread"
    )
    tmpdir = None
    if args.out is None:
        tmpdir = tempfile.TemporaryDirectory(prefix="magnet-bench-")
        out = Path(tmpdir.name)
    else:
        out = args.out
        out.mkdir(parents=True, exist_ok=True)
    try:
        rng = np.random.default_rng(args.seed)
        btf = out / f"bench_{args.size}_t{args.tile}_q{args.quality}.btf"
        if not (args.reuse and btf.exists()):
            t = time.perf_counter()
            write_bigtiff(btf, args.size, args.tile, args.mpp, args.quality, args.seed)
            print(
                f"wrote {btf.name} ({btf.stat().st_size / 2**20:.0f} MiB) in "
                f"{time.perf_counter() - t:.1f} s"
            )
        bench_image(btf, args, rng)
        if not args.no_openslide:
            try:
                bench_image(btf, args, rng, backend="openslide")
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"\nOpenSlide backend skipped: {exc}")
        jpg = args.jpeg
        if jpg is None:
            jw, jh = (int(v) for v in args.jpeg_size.lower().split("x"))
            jpg = out / f"bench_{jw}x{jh}_q{args.quality}.jpg"
            if not (args.reuse and jpg.exists()):
                t = time.perf_counter()
                write_jpeg(jpg, jw, jh, args.quality, args.seed)
                print(f"\nwrote {jpg.name} in {time.perf_counter() - t:.1f} s")
        bench_image(jpg, args, rng)
        bench_resize(args)
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()


if __name__ == "__main__":
    main()
