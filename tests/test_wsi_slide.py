"""Tests of slide reading (omniseg.wsi.slide) and the slide sheet (omniseg.wsi.sheet)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import pytest
import tifffile

from omniseg.synthetic.slide import synthesize_slide
from omniseg.tissues import load_tissues
from omniseg.wsi.sheet import load_slide_sheet
from omniseg.wsi.slide import Slide, area_resize

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    tissues = load_tissues(ROOT / "config" / "tissues.tsv")
    out = tmp_path_factory.mktemp("wsi") / "s.tif"
    return synthesize_slide(
        out, tissues, seed=4, height=1024, width=1536, strips=2, compression="deflate"
    )["slide"]


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (96, 160, 3), dtype=np.uint8)


# -- OpenSlide backend ------------------------------------------------------------------------
def test_openslide_backend(slide_path):
    with Slide(slide_path) as s:
        assert s.backend == "openslide"
        assert s.mpp == 0.25
        assert s.dimensions == (1536, 1024)
        assert s.level_count >= 3 and s.level_downsamples[:3] == (1.0, 2.0, 4.0)
        assert s.level_mpp(2) == 1.0
        assert [s.best_level(u) for u in (0.25, 0.3, 0.5, 1.0, 2.0)] == [0, 0, 1, 2, 2]
        osr = openslide.OpenSlide(str(slide_path))
        ref = np.asarray(osr.read_region((300, 200), 1, (50, 40)))[:, :, :3]
        assert np.array_equal(s.read_region(300, 200, 50, 40, level=1), ref)
        # an exact level: read_scaled is that level, pixel for pixel
        assert np.array_equal(s.read_scaled(300, 200, 100, 80, 0.5), ref)
        # 2 um/px from level 2 (1 um/px) by 2x2 means
        l2 = s.read_region(0, 0, 384, 256, 2).astype(int)
        at2 = s.read_scaled(0, 0, 1536, 1024, 2.0).astype(int)
        assert at2.shape == (128, 192, 3)
        assert np.abs(at2 - (l2.reshape(128, 2, 192, 2, 3).sum((1, 3)) + 2) // 4).max() <= 1
        osr.close()


def test_outside_reads_white_and_mpp_override(slide_path):
    for bad in (-1, 0, float("nan"), "x", 1e6):
        with pytest.raises(ValueError, match="mpp must be a number"):
            Slide(slide_path, mpp=bad)
    with Slide(slide_path, mpp=0.5) as s:
        assert s.mpp == 0.5
        corner = s.read_region(-10, -10, 20, 20)
        assert (corner[:10, :10] == 255).all()
        assert (s.read_region(1530, 1020, 20, 20)[10:, 10:] == 255).all()


def test_thumbnail_and_whole_slide_reads(slide_path):
    with Slide(slide_path) as s:
        assert s.thumbnail(300).shape == (200, 300, 3)
        assert s.scaled_size(2.0) == (192, 128)
        assert s.scaled_size(3.0) == (128, 86)  # ceil(1024 / 12)
        whole = s.read_scaled_whole(2.0, band_pixels=5000)  # many bands
        assert np.array_equal(whole, s.read_scaled(0, 0, 1536, 1024, 2.0))


# -- plain images -------------------------------------------------------------------------------
def test_uncompressed_tiff_is_memory_mapped_with_mpp_from_tags(tmp_path, image):
    p = tmp_path / "plain.tif"
    tifffile.imwrite(p, image, resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    with Slide(p) as s:
        assert s.backend == "memmap" and s.mpp == pytest.approx(0.5)
        assert s.dimensions == (160, 96)
        assert np.array_equal(s.read_region(10, 20, 30, 40), image[20:60, 10:40])
        out = s.read_region(150, 90, 20, 10)
        assert np.array_equal(out[:6, :10], image[90:, 150:]) and (out[6:] == 255).all()
        assert s.read_scaled(0, 0, 160, 96, 1.0).shape == (48, 80, 3)


def test_inch_resolution_and_implausible_dpi(tmp_path, image):
    p = tmp_path / "inch.tif"
    tifffile.imwrite(p, image, resolution=(25400 / 0.25, 25400 / 0.25), resolutionunit="INCH")
    assert Slide(p).mpp == pytest.approx(0.25)
    q = tmp_path / "dpi72.tif"
    tifffile.imwrite(q, image, resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(ValueError, match=r"dpi72.tif has no pixel size.*mpp"):
        Slide(q)
    assert Slide(q, mpp=0.25).mpp == 0.25


def test_compressed_plain_tiff_size_cap(tmp_path, image):
    p = tmp_path / "z.tif"
    tifffile.imwrite(p, image, compression="zlib")
    with Slide(p, mpp=0.25) as s:
        assert s.backend == "memory"
        assert np.array_equal(s.read_region(0, 0, 160, 96), image)
    with pytest.raises(
        ValueError,
        match=r"z.tif is a plain 160x96 image.*cap of 1,000 pixels"
        r".*tiled pyramidal TIFF",
    ):
        Slide(p, mpp=0.25, max_plain_pixels=1000)


def _png_with_phys(image: np.ndarray, um: float) -> bytes:
    data = imagecodecs.png_encode(image)
    ppm = round(1e6 / um)
    body = b"pHYs" + struct.pack(">IIB", ppm, ppm, 1)
    chunk = struct.pack(">I", 9) + body + struct.pack(">I", zlib.crc32(body))
    return data[:33] + chunk + data[33:]  # after the signature and IHDR


def test_png_with_and_without_mpp(tmp_path, image):
    p = tmp_path / "a.png"
    p.write_bytes(_png_with_phys(image, 0.5))
    with Slide(p) as s:
        assert s.backend == "memory" and s.mpp == pytest.approx(0.5, rel=1e-5)
        assert np.array_equal(s.read_region(0, 0, 160, 96), image)
    q = tmp_path / "b.png"
    q.write_bytes(imagecodecs.png_encode(image))
    with pytest.raises(ValueError, match="b.png has no pixel size"):
        Slide(q)
    with pytest.raises(ValueError, match="cap"):
        Slide(q, mpp=1.0, max_plain_pixels=100)


def test_unreadable_slides_name_the_file(tmp_path, slide_path):
    with pytest.raises(ValueError, match="does not exist"):
        Slide(tmp_path / "missing.tif")
    data = slide_path.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="cut.tif"):
        with Slide(cut) as s:
            s.read_region(0, 0, *s.dimensions)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, np.zeros((300, 400, 3), np.uint8))
    data = plain.read_bytes()
    (tmp_path / "plaincut.tif").write_bytes(data[:-5000])
    with pytest.raises(ValueError, match=r"plaincut.tif is truncated"):
        Slide(tmp_path / "plaincut.tif", mpp=1.0)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(ValueError, match="junk.png"):
        Slide(junk, mpp=1.0)
    other = tmp_path / "x.svgz"
    other.write_bytes(b"nothing")
    with pytest.raises(ValueError, match="not a TIFF or PNG"):
        Slide(other, mpp=1.0)


def test_area_resize():
    img = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    half = area_resize(img, 2, 3)
    expect = (img.astype(int).reshape(2, 2, 3, 2, 3).sum((1, 3)) + 2) // 4
    assert np.array_equal(half, expect)
    assert area_resize(img, 4, 6) is img
    assert area_resize(img, 3, 5).shape == (3, 5, 3)
    flat = np.full((10, 10, 3), 77, np.uint8)
    assert (area_resize(flat, 3, 7) == 77).all() and (area_resize(flat, 20, 25) == 77).all()


# -- slide sheet ----------------------------------------------------------------------------------
def _sheet(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg" / "slides.tsv"
    p.parent.mkdir(exist_ok=True)
    p.write_text(text)
    return p


def test_slide_sheet_resolves_paths_and_parses_mpp(tmp_path):
    (tmp_path / "cfg" / "data").mkdir(parents=True)
    for name in ("a.svs", "b.png", "b_mask.png"):
        (tmp_path / "cfg" / "data" / name).write_bytes(b"x")
    sheet = _sheet(
        tmp_path,
        "slide_id\tpath\tmpp\tmask\na\tdata/a.svs\t\t\nb-2\tdata/b.png\t0.5\tdata/b_mask.png\n",
    )
    df = load_slide_sheet(sheet)
    assert list(df["slide_id"]) == ["a", "b-2"]
    assert df["path"][0] == str((tmp_path / "cfg/data/a.svs").resolve())
    assert df["mpp"][0] is None and df["mpp"][1] == 0.5
    assert df["mask"][0] == "" and df["mask"][1].endswith("b_mask.png")
    assert list(df["truth"]) == ["", ""]


def test_slide_sheet_reports_every_problem(tmp_path):
    sheet = _sheet(tmp_path, "slide_id\tpath\tmpp\na b\tx.svs\tfast\nok\t\t0\nok\ty.svs\t\n")
    with pytest.raises(ValueError) as err:
        load_slide_sheet(sheet)
    msg = str(err.value)
    assert msg.startswith(f"slide sheet {sheet}:")
    assert "row 1 (slide_id 'a b'): column slide_id" in msg
    assert "column mpp: 'fast' is not a number" in msg
    assert "row 2 (slide_id 'ok'): column path: is empty" in msg
    assert "column mpp: must be > 0" in msg
    assert "duplicate slide_id 'ok'" in msg
    assert "x.svs does not exist" in msg and "y.svs does not exist" in msg
    with pytest.raises(FileNotFoundError):
        load_slide_sheet(sheet.with_name("none.tsv"))
    bad = _sheet(tmp_path, "slide\tpath\nx\ty\n")
    with pytest.raises(ValueError, match="missing column"):
        load_slide_sheet(bad, check_files=False)


def test_tiffs_too_large_to_decode_whole_are_read_tile_by_tile(tmp_path, image):
    """The one slide reader (also the QuPath importer's): a compressed tiled or stripped TIFF
    over the decode cap is read by decoding only the segments a region needs."""
    strips = tmp_path / "s.tif"  # (a tiled TIFF goes to OpenSlide)
    tifffile.imwrite(strips, image, photometric="rgb", compression="zlib", rowsperstrip=4)
    for path in (strips,):
        with Slide(path, mpp=0.25, max_plain_pixels=1100) as s:
            assert s.backend == "segments" and s.dimensions == (160, 96)
            assert np.array_equal(s.read_region(0, 0, 160, 96), image)
            assert np.array_equal(s.read_region(37, 11, 50, 40), image[11:51, 37:87])
            edge = s.read_region(150, 90, 20, 20)  # partly outside: white there
            assert np.array_equal(edge[:6, :10], image[90:, 150:]) and (edge[6:] == 255).all()
    with Slide(strips, mpp=0.25) as s:  # under the cap: decoded whole, as before
        assert s.backend == "memory"


def test_planar_jpeg_and_slides_without_a_pixel_size(tmp_path, image):
    planar = tmp_path / "p.tif"
    tifffile.imwrite(planar, np.moveaxis(image, -1, 0), photometric="rgb", planarconfig="separate",
                     compression="zlib")  # fmt: skip
    with Slide(planar, mpp=0.25) as s:
        assert np.array_equal(s.read_region(5, 7, 30, 20), image[7:27, 5:35])
    jpeg = tmp_path / "a.jpg"
    smooth = np.broadcast_to(np.linspace(0, 255, 160, dtype=np.uint8)[None, :, None], image.shape)
    jpeg.write_bytes(imagecodecs.jpeg_encode(np.ascontiguousarray(smooth), level=95))
    with Slide(jpeg, require_mpp=False) as s:
        assert s.mpp is None and s.dimensions == (160, 96)
        assert np.abs(s.read_region(0, 0, 160, 96).astype(int) - smooth).mean() < 3
    with pytest.raises(ValueError, match="no pixel size"):
        Slide(jpeg)
