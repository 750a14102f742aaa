"""One area resampling for training patches and slide tiles (omniseg.resample)."""

from __future__ import annotations

import numpy as np
import pytest

from omniseg.data.patches import downscale_image, downscale_mask
from omniseg.io import write_png
from omniseg.resample import area_mean, area_resize, area_weights, block_sum
from omniseg.wsi.slide import Slide


@pytest.mark.parametrize(
    "target_um, x0, y0, n_out",
    [(1.0, 8, 12, 30), (2.0, 16, 0, 20), (0.7, 14, 28, 40), (0.625, 5, 10, 50)],
    ids=["factor4", "factor8", "factor2.8", "factor2.5"],
)
def test_a_slide_tile_and_a_training_patch_of_the_same_region_are_the_same_pixels(
    tmp_path, target_um, x0, y0, n_out
):
    """The same 40x pixels scaled to a tissue's scale by the patch extractor and by the slide
    reader give identical pixels, at integer and non-integer factors."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (200, 240, 3), dtype=np.uint8)
    write_png(tmp_path / "slide.png", img)
    f = target_um / 0.25
    side = round(n_out * f)  # a region whose size is a whole number of output pixels
    assert side == pytest.approx(n_out * f)
    with Slide(tmp_path / "slide.png", mpp=0.25) as slide:
        tile = slide.read_scaled(x0, y0, side, side, target_um)
    patch = downscale_image(img[y0 : y0 + side, x0 : x0 + side], f)
    assert tile.shape == patch.shape == (n_out, n_out, 3)
    assert np.array_equal(tile, patch)


def test_area_mean_is_exact_area_weighting():
    arr = np.arange(5 * 5, dtype=np.float64).reshape(5, 5)
    # 5 -> 2 rows: output row 0 covers rows 0, 1 and half of row 2
    expect_row0 = (arr[0] + arr[1] + 0.5 * arr[2]) / 2.5
    out = area_mean(arr, 2, 5)
    assert np.allclose(out[0], expect_row0, atol=1e-4)
    assert np.allclose(area_weights(5, 2).sum(axis=1), 1.0)
    assert np.array_equal(block_sum(np.ones((6, 9), np.uint8), 2, 3), np.full((3, 3), 6))
    # the integer path with different factors per axis is the block mean
    img = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    assert np.array_equal(
        area_resize(img, 2, 2), (img.astype(int).reshape(2, 2, 2, 3, 3).sum((1, 3)) + 3) // 6
    )


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.int32])
def test_area_mean_at_an_integer_factor_takes_any_dtype(dtype):
    """The block-sum path is exact for arrays other than uint8 too: floats (it raised a
    casting error) and integers above 255 (a uint16 sum would wrap)."""
    rng = np.random.default_rng(0)
    arr = (rng.random((16, 24)) * 60000).astype(dtype)
    expect = arr.astype(np.float64).reshape(2, 8, 3, 8).mean(axis=(1, 3))
    np.testing.assert_allclose(area_mean(arr, 2, 3), expect, rtol=1e-12)


def test_area_mean_rejects_a_grid_outside_the_image():
    with pytest.raises(ValueError, match="grid inside the input"):
        area_mean(np.zeros((10, 10)), 5, 5, factor=2.5)
    with pytest.raises(ValueError, match="non-empty"):
        area_mean(np.zeros((10, 10)), 0, 5)


def test_masks_follow_the_image_grid():
    mask = np.zeros((50, 50), bool)
    mask[10:30, 5:45] = True
    small = downscale_mask(mask, 2.5)
    assert small.shape == downscale_image(np.zeros((50, 50), np.uint8), 2.5).shape == (20, 20)
    assert small[4:12, 2:18].all() and not small[:3].any()
