"""Tests of the tissue mask (omniseg.wsi.tissue_mask)."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pytest

from omniseg.io import write_png
from omniseg.synthetic.slide import REGION_DATASET, synthesize_slide
from omniseg.tissues import load_tissues
from omniseg.wsi.slide import Slide
from omniseg.wsi.tissue_mask import (
    disc,
    load_mask_image,
    remove_small,
    resize_nearest,
    slide_tissue_mask,
    tissue_mask,
)

ROOT = Path(__file__).resolve().parents[1]


def _glass(h=120, w=160, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(240 + rng.normal(0, 2, (h, w, 1)), 0, 255).repeat(3, 2).astype(np.uint8)


def test_disc():
    assert disc(1).sum() == 5 and disc(1.5).sum() == 9 and disc(2).shape == (5, 5)
    assert disc(0.5).sum() == 1


def test_glass_is_not_tissue():
    assert not tissue_mask(_glass(), um_per_px=8.0).any()


def test_coloured_and_dark_grey_regions_are_tissue_specks_are_not():
    img = _glass()
    img[20:60, 30:90] = (200, 120, 180)  # pink, saturated
    img[80:110, 100:150] = (110, 110, 110)  # grey but dense (OD ~ 0.37)
    img[5:7, 5:7] = (200, 120, 180)  # a 2x2 speck: 4 px * 64 um^2 < min area
    m = tissue_mask(img, um_per_px=8.0, min_area_um2=2000, close_um=0, open_um=0)
    expect = np.zeros(img.shape[:2], bool)
    expect[20:60, 30:90] = True
    expect[80:110, 100:150] = True
    assert np.array_equal(m, expect)
    # thresholds are parameters: raising both drops the grey block, keeps the pink one
    m2 = tissue_mask(img, um_per_px=8.0, saturation_min=0.1, od_min=0.5, close_um=0, open_um=0)
    assert m2[40, 60] and not m2[95, 120]


def test_closing_fills_lumens_opening_removes_threads_border_kept():
    img = _glass()
    img[:, :80] = (200, 120, 180)  # touches the top, bottom and left borders
    img[50:54, 30:34] = 240  # a 4 px lumen (32 um) inside: closed by a 20 um disc
    img[100, 82:150] = (200, 120, 180)  # a 1-px thread: removed by the opening
    m = tissue_mask(img, um_per_px=4.0, close_um=20, open_um=10, min_area_um2=0)
    assert m[50:54, 30:34].all()
    assert not m[100, 100:150].any()
    assert m[0, :80].all() and m[-1, :80].all() and m[:, 0].all()  # no border erosion
    assert not m[:, 90:].any()


def test_remove_small_counts_8_connected_components():
    m = np.zeros((10, 10), bool)
    m[1, 1] = m[2, 2] = m[3, 3] = True  # one diagonal component of 3
    m[7:9, 7:9] = True  # 4 pixels
    assert np.array_equal(remove_small(m, 4), np.pad(np.ones((2, 2), bool), ((7, 1), (7, 1))))
    assert np.array_equal(remove_small(m, 3), m)


def test_resize_nearest_table():
    a = np.arange(6).reshape(2, 3)
    assert resize_nearest(a, (4, 6)).tolist() == [
        [0, 0, 1, 1, 2, 2],
        [0, 0, 1, 1, 2, 2],
        [3, 3, 4, 4, 5, 5],
        [3, 3, 4, 4, 5, 5],
    ]
    assert resize_nearest(a, (1, 3)).tolist() == [[3, 4, 5]]  # row centre 0.5 * 2 = 1


def test_load_mask_image(tmp_path):
    m = np.zeros((20, 30), np.uint8)
    m[5:10, 10:20] = 255
    write_png(tmp_path / "m.png", m)
    got = load_mask_image(tmp_path / "m.png", (40, 60))
    assert got.dtype == bool and got.shape == (40, 60)
    assert got[10:20, 20:40].all() and got.sum() == 200
    with pytest.raises(ValueError, match=r"m.png is 20x30.*aspect ratio"):
        load_mask_image(tmp_path / "m.png", (40, 40))
    write_png(tmp_path / "grey.png", np.full((20, 30), 7, np.uint8))
    with pytest.raises(ValueError, match="not binary"):
        load_mask_image(tmp_path / "grey.png", (20, 30))


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    tissues = load_tissues(ROOT / "config" / "tissues.tsv")
    out = tmp_path_factory.mktemp("mask") / "s.tif"
    return synthesize_slide(out, tissues, seed=7, height=1024, width=1536, strips=2)


def test_mask_of_a_synthetic_slide_matches_its_strips(slide):
    with h5py.File(slide["truth"], "r") as fh:
        region = fh[REGION_DATASET][()].astype(bool)
    with Slide(slide["slide"]) as s:
        mask, ds = slide_tissue_mask(s, um_per_px=4.0, min_area_um2=2000)
    assert mask.shape == (64, 96) and ds == 16.0
    up = resize_nearest(mask, region.shape)
    recall = (up & region).sum() / region.sum()
    precision = (up & region).sum() / up.sum()
    assert recall > 0.9 and precision > 0.8, (recall, precision)


def test_user_mask_and_empty_mask_warning(slide, tmp_path, caplog):
    write_png(tmp_path / "empty.png", np.zeros((32, 48), np.uint8))
    with Slide(slide["slide"]) as s, caplog.at_level(logging.WARNING):
        mask, ds = slide_tissue_mask(s, um_per_px=8.0, mask_image=tmp_path / "empty.png")
    assert mask.shape == (128 // 4, 192 // 4) and not mask.any() and ds == 32.0
    assert "no tissue found" in caplog.text
