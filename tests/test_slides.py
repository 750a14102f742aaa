"""Tests of the synthetic whole slides (omniseg.synthetic.slide)."""

from __future__ import annotations

import hashlib

import h5py
import numpy as np
import openslide
import pytest
import tifffile

from omniseg.synthetic.slide import REGION_DATASET, load_slide_truth, synthesize_slide


@pytest.fixture(scope="module")
def slide(tmp_path_factory, tissues):
    out = tmp_path_factory.mktemp("slide") / "demo.tif"
    return synthesize_slide(
        out, tissues, seed=1, height=1024, width=1536, strips=2, focus=("cap", "ves")
    )


@pytest.fixture(scope="module")
def truth(slide, tissues):
    with h5py.File(slide["truth"], "r") as fh:
        return {k: fh[k][()].astype(bool) for k in [*tissues.keys, REGION_DATASET]}


def test_openslide_reads_a_generic_tiff_pyramid_at_0_25_um(slide):
    assert slide["slide"].name == "demo.tif"
    assert slide["truth"].name == "demo_truth.h5"
    osr = openslide.OpenSlide(str(slide["slide"]))
    assert osr.properties["openslide.vendor"] == "generic-tiff"
    assert osr.properties["openslide.mpp-x"] == "0.25"
    assert osr.properties["openslide.mpp-y"] == "0.25"
    assert osr.level_count >= 3
    assert osr.dimensions == (1536, 1024)
    assert osr.level_dimensions[1] == (768, 512)
    assert osr.level_downsamples[2] == pytest.approx(4.0)
    region = np.asarray(osr.read_region((512, 256), 1, (64, 32)))
    assert region.shape == (32, 64, 4) and (region[:, :, 3] == 255).all()
    osr.close()


def test_levels_are_separate_tiled_pages_not_subifds(slide):
    with tifffile.TiffFile(slide["slide"]) as tif:
        assert len(tif.pages) >= 3
        for k, page in enumerate(tif.pages):
            assert page.is_tiled and page.tilewidth == 512 and page.tilelength == 512
            assert not page.subifds
            assert page.compression == tifffile.COMPRESSION.JPEG
            unit = page.tags["ResolutionUnit"].value
            assert unit == tifffile.RESUNIT.CENTIMETER
            num, den = page.tags["XResolution"].value
            assert num / den == pytest.approx(4e4 / 2**k, rel=1e-6)
        assert tif.pages[0].shape == (1024, 1536, 3)
        assert tif.pages[1].shape == (512, 768, 3)


def test_truth_masks_are_consistent(truth, tissues, slide):
    region = truth[REGION_DATASET]
    assert 0.15 < region.mean() < 0.7  # two strips, glass around them
    for key in tissues.keys:
        assert not (truth[key] & ~region).any(), f"{key} outside the tissue region"
    # focus keys: a glomerulus (capsule containing its tuft) and an artery exist
    assert truth["cap"].any() and truth["tuft"].any() and truth["ves"].any()
    assert not (truth["tuft"] & ~truth["cap"]).any()
    # apart from tuft-in-capsule, no two tissues overlap
    others = [k for k in tissues.keys if k != "tuft"]
    count = sum(truth[k].astype(int) for k in others)
    assert count.max() <= 1
    with h5py.File(slide["truth"], "r") as fh:
        assert fh.attrs["mpp"] == 0.25
        assert tuple(fh.attrs["level0_shape"]) == (1024, 1536)
        assert fh["dt"].chunks is not None


def test_image_agrees_with_truth(slide, truth):
    osr = openslide.OpenSlide(str(slide["slide"]))
    rgb = np.asarray(osr.read_region((0, 0), 0, (1536, 1024)))[:, :, :3].astype(float)
    osr.close()
    region = truth[REGION_DATASET]
    sat = (rgb.max(2) - rgb.min(2)) / rgb.max(2)
    glass = rgb[~region].mean(axis=0)
    assert np.all(np.abs(glass - 240) < 4), glass  # near-white glass
    assert rgb[~region].std() < 6  # slight noise only (JPEG included)
    assert np.median(sat[region]) > 0.15 > np.median(sat[~region])


def test_load_slide_truth_window(slide, truth):
    win = load_slide_truth(slide["truth"], "pt", (100, 300, 200, 700))
    assert win.dtype == bool and win.shape == (200, 500)
    assert np.array_equal(win, truth["pt"][100:300, 200:700])
    with pytest.raises(ValueError, match="has no mask 'nope'"):
        load_slide_truth(slide["truth"], "nope")


def test_deflate_pyramid_is_lossless_and_levels_are_2x2_means(tmp_path, tissues):
    paths = synthesize_slide(
        tmp_path / "z.tif",
        tissues,
        seed=5,
        height=256,
        width=512,
        strips=1,
        compression="deflate",
        tile=128,
    )
    with tifffile.TiffFile(paths["slide"]) as tif:
        l0 = tif.pages[0].asarray().astype(int)
        l1 = tif.pages[1].asarray().astype(int)
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    expect = (l0.reshape(128, 2, 256, 2, 3).sum(axis=(1, 3)) + 2) // 4
    assert np.array_equal(l1, expect)


def test_same_seed_same_slide(tmp_path, tissues):
    def digest(p):
        with h5py.File(p["truth"], "r") as fh:
            masks = b"".join(fh[k][()].tobytes() for k in sorted(fh))
        with tifffile.TiffFile(p["slide"]) as tif:
            pixels = tif.pages[0].asarray().tobytes()
        return hashlib.sha1(masks + pixels).hexdigest()

    kw = dict(height=256, width=512, strips=1, compression="deflate", tile=128)
    a = digest(synthesize_slide(tmp_path / "a.tif", tissues, seed=2, **kw))
    b = digest(synthesize_slide(tmp_path / "b.tif", tissues, seed=2, **kw))
    c = digest(synthesize_slide(tmp_path / "c.tif", tissues, seed=3, **kw))
    assert a == b != c


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"stain": "xx"}, "unknown stain"),
        ({"compression": "lzw"}, "compression"),
        ({"tile": 100}, "multiple of 16"),
        ({"strips": 0}, "strips"),
        ({"height": 100, "strips": 2}, "too small"),
        ({"focus": ["nope"]}, "focus"),
    ],
)
def test_bad_arguments(tmp_path, tissues, kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthesize_slide(tmp_path / "x.tif", tissues, **{"height": 256, "width": 512, **kwargs})
    assert not (tmp_path / "x.tif").exists()


def test_truth_goes_where_it_is_named(tmp_path, tissues, slide):
    """A rule names both outputs; the truth file is not found by a naming convention."""
    out = synthesize_slide(
        tmp_path / "a" / "s.tif", tissues, seed=1, height=1024, width=1536, strips=2,
        focus=("cap", "ves"), truth_h5=tmp_path / "elsewhere" / "t.h5",
    )  # fmt: skip
    assert out["truth"] == tmp_path / "elsewhere" / "t.h5" and out["truth"].is_file()
    assert not (tmp_path / "a" / "s_truth.h5").exists()
    with h5py.File(out["truth"], "r") as a, h5py.File(slide["truth"], "r") as b:
        assert (a["cap"][()] == b["cap"][()]).all()  # same seed, same truth
