"""Tests of magnet_st.io.image: region reads from TIFF, OpenSlide and PIL images."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import magnet_st.io.image.base as image_base
import magnet_st.io.image.tiff as image_tiff
from magnet_st.errors import InputError
from magnet_st.io.image import SlideImage, open_image

H, W = 600, 800  # level-0 size of most test images (not a multiple of the tile size)


# --------------------------------------------------------------------------- test images


def detail(h: int, w: int) -> np.ndarray:
    """A pattern that differs pixel to pixel: value is a known function of (row, col)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x % 251, y % 241, (3 * x + 5 * y) % 256], axis=-1).astype(np.uint8)


def smooth(h: int, w: int) -> np.ndarray:
    """Linear colour gradients: resampling them is exact up to rounding."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    rgb = [30 + 200 * x / w, 20 + 210 * y / h, 40 + 100 * (x + y) / (w + h)]
    return np.round(np.stack(rgb, axis=-1)).astype(np.uint8)


def block_mean(a: np.ndarray, f: int) -> np.ndarray:
    h, w = a.shape[0] // f * f, a.shape[1] // f * f
    b = a[:h, :w].astype(np.float64).reshape(h // f, f, w // f, f, -1).mean(axis=(1, 3))
    return np.round(b).astype(np.uint8)


def pyramid(a: np.ndarray, n: int) -> list[np.ndarray]:
    """``n`` levels, each a 2x reduction (PIL box) of the one before."""
    levels = [a]
    for _ in range(n - 1):
        levels.append(np.asarray(Image.fromarray(levels[-1]).reduce(2)))
    return levels


def write_subifd_pyramid(path: Path, levels: list[np.ndarray], **kw: object) -> Path:
    kw.setdefault("compression", "zlib")
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(levels[0], tile=(128, 128), subifds=len(levels) - 1, photometric="rgb", **kw)
        for lv in levels[1:]:
            tw.write(lv, tile=(128, 128), subfiletype=1, photometric="rgb", **kw)  # type: ignore[arg-type]
    return path


def write_multipage_pyramid(path: Path, levels: list[np.ndarray], **kw: object) -> Path:
    with tifffile.TiffWriter(path) as tw:
        for i, lv in enumerate(levels):
            tw.write(
                lv,
                tile=(128, 128),
                photometric="rgb",
                metadata=None,
                subfiletype=0 if i == 0 else 1,
                **kw,  # type: ignore[arg-type]
            )
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("img")
    a = detail(H, W)
    s = smooth(H, W)
    rng = np.random.default_rng(0)
    # levels with unrelated content reveal which level a read used
    tagged = [rng.integers(0, 256, (H // 2**k, W // 2**k, 3), dtype=np.uint8) for k in range(3)]
    paths = {
        "pyramid": write_subifd_pyramid(
            d / "pyramid.ome.tif",
            pyramid(a, 3),
            resolution=(1e4 / 0.5, 1e4 / 0.5),
            resolutionunit="CENTIMETER",
        ),
        "tagged": write_subifd_pyramid(d / "tagged.tif", tagged),
        "multipage": write_multipage_pyramid(d / "multipage.tif", pyramid(a, 3)),
        "smooth": d / "smooth.tif",
        "tiled_none": d / "tiled_none.tif",
        "jpeg_tiles": d / "jpeg_tiles.tif",
        "jpeg_rgb_tiles": d / "jpeg_rgb_tiles.tif",
        "strip_none": d / "strip_none.tif",
        "strip_deflate": d / "strip_deflate.tif",
        "inch": d / "inch.tif",
        "ome": d / "ome.ome.tif",
        "gray": d / "gray.tif",
        "rgba": d / "rgba.tif",
        "png": d / "image.png",
        "png_rgba": d / "rgba.png",
        "jpg": d / "image.jpg",
        "checker": d / "checker.tif",
    }
    tifffile.imwrite(paths["smooth"], s, tile=(128, 128), photometric="rgb", compression="zlib")
    tifffile.imwrite(paths["tiled_none"], a, tile=(64, 64), photometric="rgb")
    tifffile.imwrite(
        paths["jpeg_tiles"], s, tile=(128, 128), photometric="rgb", compression="jpeg"
    )  # stored as YCbCr, subsampled
    tifffile.imwrite(
        paths["jpeg_rgb_tiles"],
        s,
        tile=(128, 128),
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": 95, "outcolorspace": "RGB"},
        subsampling=(1, 1),
    )
    tifffile.imwrite(paths["strip_none"], a, rowsperstrip=7, photometric="rgb")
    tifffile.imwrite(
        paths["strip_deflate"], a, rowsperstrip=16, photometric="rgb", compression="zlib"
    )
    tifffile.imwrite(
        paths["inch"],
        a[:64, :64],
        photometric="rgb",
        resolution=(50800, 50800),
        resolutionunit="INCH",
    )
    tifffile.imwrite(
        paths["ome"],
        a[:64, :64],
        ome=True,
        photometric="rgb",
        metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25},
    )
    tifffile.imwrite(paths["gray"], a[..., 0], tile=(64, 64), photometric="minisblack")
    rgba = np.concatenate([a, np.full((H, W, 1), 255, np.uint8)], axis=-1)
    rgba[:10, :, 3] = 0
    tifffile.imwrite(paths["rgba"], rgba, tile=(64, 64), photometric="rgb", extrasamples=[2])
    Image.fromarray(a).save(paths["png"])
    Image.fromarray(rgba).save(paths["png_rgba"])
    Image.fromarray(s).save(paths["jpg"], quality=95, dpi=(50800, 50800))
    checker = ((np.indices((H, W)).sum(0) % 2) * 255).astype(np.uint8)
    tifffile.imwrite(paths["checker"], checker, tile=(64, 64), compression="zlib")
    return paths


@pytest.fixture(scope="module")
def arr() -> np.ndarray:
    return detail(H, W)


# --------------------------------------------------------------------------- exact reads

LOSSLESS = ["pyramid", "multipage", "tiled_none", "strip_none", "strip_deflate", "png"]


@pytest.mark.parametrize("name", LOSSLESS)
def test_native_read_is_exact(images: dict[str, Path], arr: np.ndarray, name: str) -> None:
    with open_image(images[name]) as img:
        assert img.size == (W, H)
        assert img.level_downsamples[0] == 1.0
        for x, y, w, h in [(0, 0, W, H), (123, 45, 224, 224), (700, 500, 100, 100), (5, 9, 1, 1)]:
            got = img.read_region(x, y, w, h, (w, h))
            assert got.shape == (h, w, 3) and got.dtype == np.uint8
            np.testing.assert_array_equal(got, arr[y : y + h, x : x + w])


@pytest.mark.parametrize("name", LOSSLESS + ["gray"])
def test_reads_past_edge_are_white(images: dict[str, Path], arr: np.ndarray, name: str) -> None:
    expected = arr if name != "gray" else np.repeat(arr[..., :1], 3, -1)
    with open_image(images[name]) as img:
        got = img.read_region(-10, -5, 64, 64, (64, 64))
        assert (got[:5] == 255).all() and (got[:, :10] == 255).all()
        np.testing.assert_array_equal(got[5:, 10:], expected[:59, :54])
        got = img.read_region(W - 20, H - 30, 64, 64, (64, 64))
        np.testing.assert_array_equal(got[:30, :20], expected[H - 30 :, W - 20 :])
        assert (got[30:] == 255).all() and (got[:, 20:] == 255).all()
        assert (img.read_region(W + 5, -500, 50, 40, (25, 20)) == 255).all()
        assert (img.read_region(-1e6, -1e6, 3e3, 3e3, (10, 10)) == 255).all()


def test_fractional_box_interpolates(images: dict[str, Path]) -> None:
    s = smooth(H, W).astype(float)
    with open_image(images["smooth"]) as img:
        got = img.read_region(100.5, 200.5, 50, 40, (50, 40)).astype(float)
    want = s[200:240, 100:150] + s[201:241, 101:151] + s[200:240, 101:151] + s[201:241, 100:150]
    assert np.abs(got - want / 4).max() <= 1.0


# --------------------------------------------------------------------------- levels


def test_choose_level(images: dict[str, Path]) -> None:
    with open_image(images["tagged"]) as img:
        assert img.level_downsamples == [1.0, 2.0, 4.0]
        assert img.level_dimensions == [(W, H), (W // 2, H // 2), (W // 4, H // 4)]
        for ds, level in [
            (0.3, 0),
            (1, 0),
            (1.9, 0),
            (1.99, 1),
            (2, 1),
            (3.9, 1),
            (3.97, 2),
            (4, 2),
            (100, 2),
        ]:
            assert img._choose_level(ds) == level, ds


def test_read_uses_chosen_level(images: dict[str, Path]) -> None:
    rng = np.random.default_rng(0)
    tagged = [rng.integers(0, 256, (H // 2**k, W // 2**k, 3), dtype=np.uint8) for k in range(3)]
    with open_image(images["tagged"]) as img:
        # 4x downsample -> level 2 pixels exactly
        got = img.read_region(40, 80, 400, 200, (100, 50))
        np.testing.assert_array_equal(got, tagged[2][20:70, 10:110])
        got = img.read_region(40, 80, 400, 200, (200, 100))
        np.testing.assert_array_equal(got, tagged[1][40:140, 20:220])
        # just under 4x (within 1%) still uses level 2; 3.9x uses level 1
        used: list[int] = []
        read_level = img._read_level

        def spy(level: int, *args: int) -> np.ndarray:
            used.append(level)
            return read_level(level, *args)

        img._read_level = spy  # type: ignore[method-assign]
        img.read_region(0, 0, 398, 398, (100, 100))
        img.read_region(0, 0, 390, 390, (100, 100))
        img.read_region(0, 0, 100, 100, (100, 100))
        assert used == [2, 1, 0]


@pytest.mark.parametrize("name", ["pyramid", "multipage"])
def test_pyramid_levels_found(images: dict[str, Path], name: str) -> None:
    with open_image(images[name]) as img:
        assert img.backend == "tifffile"
        assert img.level_dimensions == [(800, 600), (400, 300), (200, 150)]
        levels = pyramid(detail(H, W), 3)
        got = img.read_region(0, 0, W, H, (W // 4, H // 4))
        np.testing.assert_array_equal(got, levels[2])


@pytest.mark.parametrize("name", ["smooth", "jpeg_tiles", "jpeg_rgb_tiles", "jpg"])
def test_half_resolution_patch_matches_block_mean(images: dict[str, Path], name: str) -> None:
    s = smooth(H, W)
    with open_image(images[name], microns_per_pixel=0.5) as img:
        assert len(img.level_dimensions) == 1 or img.backend == "pil"
        got = img.read_patch(400, 300, 64, mpp=1.0)  # 128 level-0 px, centred on (400, 300)
    want = block_mean(s[236:364, 336:464], 2)
    diff = np.abs(got.astype(int) - want)
    assert diff.mean() < 1.5 and diff.max() <= 6


@pytest.mark.parametrize("name", ["jpeg_tiles", "jpeg_rgb_tiles"])
def test_jpeg_tiles_decode_to_rgb(images: dict[str, Path], name: str) -> None:
    s = smooth(H, W)
    with open_image(images[name]) as img:
        got = img.read_region(0, 0, W, H, (W, H))
    assert np.abs(got.astype(int) - s).mean() < 2


def test_downsampling_is_antialiased(images: dict[str, Path]) -> None:
    with open_image(images["checker"]) as img:  # 1-px checkerboard, one level
        assert len(img.level_dimensions) == 1
        got = img.read_region(100, 100, 400, 400, (100, 100))
        th, _ = img.thumbnail(50)
    assert np.abs(got.astype(int) - 127.5).max() <= 2
    assert np.abs(th[1:-1, 1:-1].astype(int) - 127.5).max() <= 2


def test_upsampling(images: dict[str, Path]) -> None:
    s = smooth(H, W).astype(int)
    with open_image(images["smooth"], microns_per_pixel=0.5) as img:
        got = img.read_patch(400, 300, 100, mpp=0.25).astype(int)  # 50 px -> 100 px
    small = np.asarray(Image.fromarray(got.astype(np.uint8)).reduce(2)).astype(int)
    assert np.abs(small - s[275:325, 375:425]).max() <= 2


# --------------------------------------------------------------------------- other formats


def test_png_and_jpeg_levels_built_lazily(images: dict[str, Path], arr: np.ndarray) -> None:
    with open_image(images["png"]) as img:
        assert img.backend == "pil"
        assert img.level_dimensions == [(800, 600), (400, 300)]
        assert img._arrays == [None, None]  # nothing decoded yet
        got = img.read_region(0, 0, W, H, (W // 2, H // 2))
        assert img._arrays[1] is not None
        np.testing.assert_array_equal(got, np.asarray(Image.fromarray(arr).reduce(2)))


def test_big_pil_image_levels(tmp_path: Path) -> None:
    p = tmp_path / "big.jpg"
    Image.fromarray(smooth(2100, 3000)).save(p)
    with open_image(p) as img:
        assert img.level_dimensions == [(3000, 2100), (1500, 1050), (750, 525), (375, 263)]
        assert img.level_downsamples == [1.0, 2.0, 4.0, 8.0]
        th, scale = img.thumbnail(300)
        assert th.shape == (210, 300, 3) and scale == pytest.approx(0.1)
        assert img._arrays[3] is not None  # thumbnail came from the coarsest level
        want = smooth(2100, 3000)[5::10, 5::10]  # thumbnail px centres
        assert np.abs(th[1:-1, 1:-1].astype(int) - want[1:-1, 1:-1]).max() <= 4  # JPEG


def test_big_decoded_images_live_in_a_file_map(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arr: np.ndarray
) -> None:
    """A JPEG / PNG decoded whole (and a compressed stripped TIFF page) at SPILL_BYTES or more
    lives in an unlinked temporary file mapped into memory, not in the process's own memory;
    its pixels are the decoded ones, read-only; smaller ones stay in memory."""
    png, tif = tmp_path / "a.png", tmp_path / "strips.tif"
    Image.fromarray(arr).save(png)
    tifffile.imwrite(tif, arr, photometric="rgb", compression="zlib", rowsperstrip=64)
    monkeypatch.setattr(image_base, "SPILL_BYTES", arr.nbytes)  # level 0 only: 1/4 is less

    def mapped(a: np.ndarray) -> bool:
        return isinstance(a, np.memmap) or isinstance(getattr(a, "base", None), np.memmap)

    with open_image(png) as img:
        got = img.read_region(0, 0, W, H, (W, H))
        img.read_region(0, 0, W, H, (W // 2, H // 2))
        level0, level1 = img._arrays
        assert mapped(level0) and not mapped(level1)
        assert not level0.flags.writeable and not level1.flags.writeable
        np.testing.assert_array_equal(level0, arr)
        np.testing.assert_array_equal(got, arr)
    assert img._arrays == []  # closed: the map goes with its last reference
    with open_image(tif) as img:
        assert img.read_region(0, 0, W, H, (W, H)).tobytes() == arr.tobytes()
        assert mapped(img._levels[0].array)


def test_alpha_composited_over_white(images: dict[str, Path], arr: np.ndarray) -> None:
    for name in ["rgba", "png_rgba"]:
        with open_image(images[name]) as img:
            got = img.read_region(0, 0, 100, 30, (100, 30))
        assert (got[:10] == 255).all(), name
        np.testing.assert_array_equal(got[10:], arr[10:30, :100])


def test_grayscale_to_rgb(images: dict[str, Path], arr: np.ndarray) -> None:
    with open_image(images["gray"]) as img:
        got = img.read_region(10, 20, 30, 40, (30, 40))
    np.testing.assert_array_equal(got, np.repeat(arr[20:60, 10:40, :1], 3, axis=-1))


def test_other_sample_layouts(tmp_path: Path, arr: np.ndarray) -> None:
    planar = tmp_path / "planar.tif"
    tifffile.imwrite(
        planar,
        np.moveaxis(arr, -1, 0),
        tile=(64, 64),
        photometric="rgb",
        planarconfig="separate",
        compression="zlib",
    )
    planar_strips = tmp_path / "planar_strips.tif"
    tifffile.imwrite(
        planar_strips,
        np.moveaxis(arr, -1, 0),
        photometric="rgb",
        planarconfig="separate",
        compression="zlib",
        rowsperstrip=32,
    )
    for p in (planar, planar_strips):
        with open_image(p) as img:
            np.testing.assert_array_equal(
                img.read_region(-7, 50, 300, 200, (300, 200))[:, 7:], arr[50:250, :293]
            )
    wide = tmp_path / "uint16.tif"
    tifffile.imwrite(wide, arr.astype(np.uint16) * 257, tile=(64, 64), photometric="rgb")
    with open_image(wide) as img:
        np.testing.assert_array_equal(img.read_region(0, 0, W, H, (W, H)), arr)
    pal = tmp_path / "palette.tif"
    cmap = np.stack([np.arange(256), 255 - np.arange(256), np.full(256, 7)]).astype(np.uint16)
    tifffile.imwrite(pal, arr[..., 0], photometric="palette", colormap=cmap * 257)
    with open_image(pal) as img:
        got = img.read_region(0, 0, W, H, (W, H))
    np.testing.assert_array_equal(got, cmap.T.astype(np.uint8)[arr[..., 0]])


def test_forked_children_reopen(images: dict[str, Path]) -> None:
    import multiprocessing

    img = open_image(images["jpeg_tiles"], microns_per_pixel=0.5)
    centers = np.array([[100.0, 100.0], [400.0, 300.0], [700.0, 500.0]])
    want = img.read_patches(centers, 32, 0.9)  # parent has the file open, cache warm
    global _FORK_IMAGE
    _FORK_IMAGE = img
    with multiprocessing.get_context("fork").Pool(2) as pool:
        got = pool.map(_read_in_child, [tuple(c) for c in centers] * 2)
    for i, (patch, reopened) in enumerate(got):
        assert reopened  # the child opened its own file handle
        np.testing.assert_array_equal(patch, want[i % 3])
    img.close()


_FORK_IMAGE: SlideImage | None = None


def _read_in_child(center: tuple[float, float]) -> tuple[np.ndarray, bool]:
    import os

    assert _FORK_IMAGE is not None
    patch = _FORK_IMAGE.read_patch(center[0], center[1], 32, 0.9)
    return patch, _FORK_IMAGE._pid == os.getpid()


def test_stripped_compressed_read_strip_by_strip(
    images: dict[str, Path], arr: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(image_tiff, "WHOLE_PAGE_BYTES", 0)
    with open_image(images["strip_deflate"]) as img:
        assert img._levels[0].mode == "segments"
        got = img.read_region(100, 100, 50, 20, (50, 20))
        np.testing.assert_array_equal(got, arr[100:120, 100:150])
        assert sorted(img._cache.keys()) == [(0, 6), (0, 7)]  # rows 96..127 only
    monkeypatch.undo()
    with open_image(images["strip_deflate"]) as img:
        assert img._levels[0].mode == "whole"
        np.testing.assert_array_equal(
            img.read_region(-3, 590, 50, 20, (50, 20))[:10, 3:], arr[590:, :47]
        )
    with open_image(images["strip_none"]) as img:
        assert img._levels[0].mode == "memmap"


def test_only_intersecting_tiles_are_decoded(images: dict[str, Path]) -> None:
    with open_image(images["pyramid"]) as img:
        img.read_region(300, 300, 10, 10, (10, 10))
        assert img._cache.keys() == [(0, 2 * 7 + 2)]  # 128-px tiles, 7 across
        img.read_region(250, 120, 10, 10, (10, 10))  # spans 4 tiles
        assert len(img._cache) == 5


def test_tile_cache_is_bounded(images: dict[str, Path]) -> None:
    tile_bytes = 64 * 64 * 3
    with open_image(images["tiled_none"], cache_bytes=5 * tile_bytes) as img:
        for x in range(0, W, 64):
            img.read_region(x, 0, 64, H, (64, H))
        assert img._cache.nbytes <= 5 * tile_bytes and len(img._cache) == 5
    with open_image(images["tiled_none"]) as img:
        img.read_region(0, 0, 224, 224, (224, 224))
        misses = img._cache.misses
        img.read_region(10, 10, 224, 224, (224, 224))
        assert img._cache.misses == misses  # all from the cache


def test_banded_reads_match(images: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    with open_image(images["smooth"]) as img:
        one = img.read_region(3.3, 1.7, 700, 500, (300, 211))
        monkeypatch.setattr(image_base, "MAX_READ_PIXELS", 20_000)
        banded = img.read_region(3.3, 1.7, 700, 500, (300, 211))
    assert np.abs(one.astype(int) - banded).max() <= 1


# --------------------------------------------------------------------------- OpenSlide


def test_openslide_backend(images: dict[str, Path], arr: np.ndarray) -> None:
    with open_image(images["multipage"], backend="openslide") as osl:
        assert osl.backend == "openslide"
        assert osl.level_dimensions == [(800, 600), (400, 300), (200, 150)]
        assert osl._choose_level(4.0) == 2 and osl._choose_level(3.97) == 2
        assert osl._choose_level(3.9) == 1
        np.testing.assert_array_equal(
            osl.read_region(17, 33, 100, 80, (100, 80)), arr[33:113, 17:117]
        )
        edge = osl.read_region(-10, -10, 30, 30, (30, 30))
        assert (edge[:10] == 255).all() and (edge[:, :10] == 255).all()
        with open_image(images["multipage"], backend="tifffile") as tif:
            for box, out in [((10.5, 20.25, 300, 200), (150, 100)), ((0, 0, W, H), (80, 60))]:
                a, b = osl.read_region(*box, out), tif.read_region(*box, out)
                assert np.abs(a.astype(int) - b).max() <= 1


def test_openslide_aperio_mpp(tmp_path: Path) -> None:
    a = smooth(512, 768)
    p = tmp_path / "slide.svs"
    desc = "Aperio Image Library v10.0.50\r\n768x512 [0,0 768x512] (256x256) JPEG/RGB Q=90"
    with tifffile.TiffWriter(p) as tw:
        tw.write(
            a,
            tile=(256, 256),
            photometric="rgb",
            compression="jpeg",
            metadata=None,
            description=desc + "|AppMag = 20|MPP = 0.2520",
        )
    with open_image(p) as img:
        assert img.backend == "openslide" and img.microns_per_pixel == pytest.approx(0.252)
        patch = img.read_patch(384, 256, 100, mpp=0.504)
        assert patch.shape == (100, 100, 3)
        assert np.abs(patch.astype(int) - block_mean(a[156:356, 284:484], 2)).mean() < 2
    with open_image(p, backend="tifffile") as img:  # tifffile reads the Aperio MPP too
        assert img.microns_per_pixel == pytest.approx(0.252)


# --------------------------------------------------------------------------- metadata


def test_mpp_from_metadata(images: dict[str, Path]) -> None:
    assert open_image(images["pyramid"]).microns_per_pixel == pytest.approx(0.5)  # cm
    assert open_image(images["inch"]).microns_per_pixel == pytest.approx(0.5)  # inch
    assert open_image(images["ome"]).microns_per_pixel == pytest.approx(0.25)  # OME
    assert open_image(images["jpg"]).microns_per_pixel == pytest.approx(0.5)  # JFIF dpi
    assert open_image(images["pyramid"], microns_per_pixel=0.3).microns_per_pixel == 0.3
    assert open_image(images["tiled_none"]).microns_per_pixel is None
    assert open_image(images["png"]).microns_per_pixel is None


def test_placeholder_resolution_ignored(tmp_path: Path) -> None:
    p = tmp_path / "dpi72.tif"
    tifffile.imwrite(p, detail(32, 32), resolution=(72, 72), resolutionunit="INCH")
    assert open_image(p).microns_per_pixel is None


def test_read_patch_geometry(images: dict[str, Path], arr: np.ndarray) -> None:
    with open_image(images["pyramid"]) as img:  # 0.5 um/px from its tags
        np.testing.assert_array_equal(img.read_patch(200, 100, 64, mpp=0.5), arr[68:132, 168:232])
        np.testing.assert_array_equal(
            img.read_patch(200, 100, 32, mpp=1.0), pyramid(arr, 2)[1][34:66, 84:116]
        )


def test_thumbnail(images: dict[str, Path], arr: np.ndarray) -> None:
    with open_image(images["pyramid"]) as img:
        th, scale = img.thumbnail(200)
        assert th.shape == (150, 200, 3) and th.dtype == np.uint8
        assert scale == pytest.approx(0.25)
        np.testing.assert_array_equal(th, pyramid(arr, 3)[2])
        th, scale = img.thumbnail(333)
        assert max(th.shape[:2]) <= 333 and th.shape[1] == 333
        assert scale == pytest.approx(333 / 800)
        th, scale = img.thumbnail(5000)
        assert scale == 1.0
        np.testing.assert_array_equal(th, arr)


# --------------------------------------------------------------------------- batches, pickle


def test_read_patches_equals_read_patch(images: dict[str, Path]) -> None:
    rng = np.random.default_rng(1)
    centers = np.column_stack([rng.uniform(-50, W + 50, 25), rng.uniform(-50, H + 50, 25)])
    with open_image(images["jpeg_tiles"], microns_per_pixel=0.5) as img:
        batch = img.read_patches(centers, 48, mpp=0.6)
        assert batch.shape == (25, 48, 48, 3) and batch.dtype == np.uint8
        for i, (cx, cy) in enumerate(centers):
            np.testing.assert_array_equal(batch[i], img.read_patch(cx, cy, 48, mpp=0.6))
        assert img.read_patches(np.zeros((0, 2)), 48, 0.6).shape == (0, 48, 48, 3)


@pytest.mark.parametrize("name", ["pyramid", "png", "strip_none"])
def test_pickle_round_trip(images: dict[str, Path], name: str) -> None:
    img = open_image(images[name], microns_per_pixel=0.5)
    before = img.read_patch(300, 200, 40, mpp=0.8)
    clone = pickle.loads(pickle.dumps(img))
    assert isinstance(clone, SlideImage) and type(clone) is type(img)
    assert not clone._opened  # reopens lazily
    assert clone.path == img.path and clone.microns_per_pixel == 0.5
    assert clone.size == img.size and clone.level_dimensions == img.level_dimensions
    np.testing.assert_array_equal(clone.read_patch(300, 200, 40, mpp=0.8), before)
    img.close()
    np.testing.assert_array_equal(img.read_patch(300, 200, 40, mpp=0.8), before)  # reopens
    clone.close()
    img.close()


def test_pickle_openslide(images: dict[str, Path]) -> None:
    img = open_image(images["multipage"], backend="openslide")
    clone = pickle.loads(pickle.dumps(img))
    np.testing.assert_array_equal(
        clone.read_region(5, 5, 90, 90, (30, 30)), img.read_region(5, 5, 90, 90, (30, 30))
    )


def test_threads_share_one_image(images: dict[str, Path]) -> None:
    rng = np.random.default_rng(2)
    centers = rng.uniform(0, 600, (40, 2))
    with open_image(images["jpeg_tiles"], microns_per_pixel=0.5, cache_bytes=10**5) as img:
        want = img.read_patches(centers, 32, 0.7)
        results: list[np.ndarray] = []

        def work() -> None:
            results.append(img.read_patches(centers, 32, 0.7))

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 4
    for r in results:
        np.testing.assert_array_equal(r, want)


# --------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nothere.tif"):
        open_image(tmp_path / "nothere.tif")


def test_directory(tmp_path: Path) -> None:
    d = tmp_path / "folder.tif"
    d.mkdir()
    with pytest.raises(InputError, match="folder.tif.*directory"):
        open_image(d)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.tif", b""),
        ("garbage.tif", b"this is not an image at all" * 10),
        ("truncated.tif", b"II*\x00\x08\x00\x00\x00\xff\xff"),
        ("bad.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"),
        ("bad.png", b"\x89PNG\r\n\x1a\n broken"),
        ("notes.txt", b"hello"),
        ("slide.svs", b"nope" * 100),
        ("noext", b"\x00\x01\x02" * 50),
    ],
)
def test_corrupt_or_unsupported(tmp_path: Path, name: str, content: bytes) -> None:
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(InputError, match=name):
        open_image(p)


def test_zero_size_image(tmp_path: Path) -> None:
    p = tmp_path / "zero.tif"
    with pytest.warns(UserWarning):
        tifffile.imwrite(p, np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(InputError, match="zero.tif.*zero size"):
        open_image(p)


def test_corrupt_tile_data(tmp_path: Path) -> None:
    p = tmp_path / "badtile.tif"
    tifffile.imwrite(p, smooth(256, 256), tile=(128, 128), photometric="rgb", compression="zlib")
    offset = tifffile.TiffFile(p).pages[0].dataoffsets[3]
    data = bytearray(p.read_bytes())
    data[offset : offset + 40] = b"\x00" * 40
    p.write_bytes(bytes(data))
    with open_image(p) as img:
        img.read_region(0, 0, 100, 100, (100, 100))  # tile 0 is fine
        with pytest.raises(InputError, match="badtile.tif.*tile 3"):
            img.read_region(200, 200, 20, 20, (20, 20))


def test_truncated_jpeg_fails_on_read(tmp_path: Path, images: dict[str, Path]) -> None:
    p = tmp_path / "cut.jpg"
    p.write_bytes(images["jpg"].read_bytes()[:300])
    with pytest.raises(InputError, match="cut.jpg"):
        open_image(p).read_region(0, 0, 10, 10, (10, 10))


def test_read_patch_needs_mpp(images: dict[str, Path]) -> None:
    with (
        open_image(images["tiled_none"]) as img,
        pytest.raises(InputError, match="tiled_none.tif.*microns per pixel"),
    ):
        img.read_patch(10, 10, 32, mpp=0.5)
    with open_image(images["png"]) as img, pytest.raises(InputError, match="image.png"):
        img.read_patches(np.zeros((2, 2)), 32, mpp=0.5)


@pytest.mark.parametrize("mpp", [0, -0.5, float("nan"), float("inf"), "abc"])
def test_bad_mpp(images: dict[str, Path], mpp: object) -> None:
    with pytest.raises(InputError, match="pyramid.ome.tif"):
        open_image(images["pyramid"], microns_per_pixel=mpp)  # type: ignore[arg-type]


def test_bad_arguments(images: dict[str, Path]) -> None:
    with open_image(images["pyramid"]) as img:
        with pytest.raises(ValueError):
            img.read_region(0, 0, 0, 10, (10, 10))
        with pytest.raises(ValueError):
            img.read_region(0, 0, 10, 10, (0, 10))
        with pytest.raises(ValueError):
            img.read_region(float("nan"), 0, 10, 10, (10, 10))
        with pytest.raises(ValueError):
            img.read_patch(0, 0, 10, mpp=-1)
        with pytest.raises(ValueError):
            img.read_patches(np.zeros(3), 10, mpp=1)
    with pytest.raises(ValueError):
        open_image(images["pyramid"], backend="nope")
    with pytest.raises(ValueError):
        open_image(images["pyramid"], resample="fancy")
