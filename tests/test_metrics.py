"""Tests of omniseg.metrics: closed-form cases, medpy agreement, the empty-mask rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from omniseg.metrics import (
    dice,
    dice_batch,
    empty_flags,
    empty_mask_stats,
    score,
    surface,
    surface_distances,
)


def disc(shape: tuple[int, int], center: tuple[float, float], radius: float) -> np.ndarray:
    rr, cc = np.ogrid[: shape[0], : shape[1]]
    return (rr - center[0]) ** 2 + (cc - center[1]) ** 2 <= radius**2


def square(shape, top, left, size) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[top : top + size, left : left + size] = True
    return m


# -- Dice ------------------------------------------------------------------------------------


def test_dice_known_values():
    a = square((10, 10), 0, 0, 4)  # 16 px
    b = square((10, 10), 0, 2, 4)  # 16 px, overlap 2x4 = 8
    assert dice(a, b) == pytest.approx(50.0)
    assert dice(a, a) == 100.0
    assert dice(a, square((10, 10), 5, 5, 4)) == 0.0
    assert dice(a.astype(np.uint8), b.astype(np.uint8) * 255) == pytest.approx(50.0)


def test_dice_empty_rule():
    empty, full = np.zeros((5, 5), bool), np.ones((5, 5), bool)
    assert dice(empty, empty) == 100.0
    assert dice(empty, full) == 0.0
    assert dice(full, empty) == 0.0


def test_dice_batch_equals_dice_per_item():
    rng = np.random.default_rng(0)
    pred = rng.random((7, 12, 9)) < 0.3
    gt = rng.random((7, 12, 9)) < 0.4
    pred[2] = False
    gt[2] = False  # both empty
    gt[3] = False  # gt empty only
    got = dice_batch(pred, gt)
    assert got.shape == (7,)
    np.testing.assert_allclose(got, [dice(p, g) for p, g in zip(pred, gt, strict=True)])
    assert got[2] == 100.0 and got[3] == 0.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="pred mask is"):
        dice(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="expected"):
        dice_batch(np.zeros((2, 4, 4)), np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="dimensions"):
        score(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), 1.0)


# -- surface distances: closed forms ---------------------------------------------------------


def test_surface_of_square_is_its_ring():
    s = surface(square((8, 8), 2, 2, 4))
    assert s.sum() == 12  # 4x4 square minus its 2x2 interior
    assert not s[3:5, 3:5].any()
    # an object touching the image edge has surface along that edge
    assert surface(np.ones((3, 3), bool)).sum() == 8


@pytest.mark.parametrize("d", [1, 3, 7])
@pytest.mark.parametrize("spacing", [1.0, 0.25, 2.0])
def test_shifted_disc_hausdorff(d, spacing):
    a = disc((64, 64), (32, 25), 10)
    b = disc((64, 64), (32, 25 + d), 10)  # same disc shifted by d columns
    s = score(a, b, spacing)
    assert s["hd"] == pytest.approx(d * spacing)
    assert 0 < s["msd"] <= s["hd"]
    assert s["empty"] == "none"


def test_two_squares():
    # 4x4 square at (2,2) vs 4x4 square at (2,10): every surface pixel of one is 5..8 px
    # from the other's surface along columns, so HD = 8 px (far column to near column)
    a, b = square((10, 20), 2, 2, 4), square((10, 20), 2, 10, 4)
    d_ab, d_ba = surface_distances(a, b, 0.5)
    assert d_ab.size == d_ba.size == 12
    assert d_ab.max() == pytest.approx(8 * 0.5)
    assert d_ab.min() == pytest.approx(5 * 0.5)
    s = score(a, b, 0.5)
    assert s["hd"] == pytest.approx(4.0)
    # symmetric layout: the mean of column distances 5 (4 px), 6,7 (2 px each), 8 (4 px)
    assert s["msd"] == pytest.approx(0.5 * (4 * 5 + 2 * 6 + 2 * 7 + 4 * 8) / 12)
    assert s["dice"] == 0.0


def test_single_pixel():
    a = np.zeros((9, 9), bool)
    b = np.zeros((9, 9), bool)
    a[1, 1] = True
    b[4, 5] = True  # 3 rows, 4 cols away: 5 px
    s = score(a, b, 2.0)
    assert s["hd"] == pytest.approx(10.0)
    assert s["msd"] == pytest.approx(10.0)
    assert score(a, a, 2.0) == {"dice": 100.0, "hd": 0.0, "msd": 0.0, "empty": "none"}


def test_spacing_scales_distances_linearly():
    rng = np.random.default_rng(3)
    a = rng.random((40, 40)) < 0.05
    b = rng.random((40, 40)) < 0.05
    s1, s3 = score(a, b, 1.0), score(a, b, 3.0)
    assert s3["hd"] == pytest.approx(3 * s1["hd"])
    assert s3["msd"] == pytest.approx(3 * s1["msd"])
    assert s3["dice"] == s1["dice"]


def test_bad_spacing_and_empty_surface_distances():
    a = square((6, 6), 1, 1, 2)
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="spacing_um"):
            surface_distances(a, a, bad)
    with pytest.raises(ValueError, match="gt mask is empty"):
        surface_distances(a, np.zeros_like(a), 1.0)


# -- empty-mask rule -------------------------------------------------------------------------


def test_empty_rule():
    empty, obj = np.zeros((6, 6), bool), square((6, 6), 1, 1, 3)
    both = score(empty, empty, 1.0)
    assert both["dice"] == 100.0 and both["empty"] == "both"
    assert math.isnan(both["hd"]) and math.isnan(both["msd"])
    pred_empty = score(empty, obj, 1.0)
    assert pred_empty["dice"] == 0.0 and pred_empty["empty"] == "pred"
    assert math.isnan(pred_empty["hd"]) and math.isnan(pred_empty["msd"])
    gt_empty = score(obj, empty, 1.0)
    assert gt_empty["dice"] == 0.0 and gt_empty["empty"] == "gt"
    assert math.isnan(gt_empty["hd"]) and math.isnan(gt_empty["msd"])


# -- agreement with medpy (the reference implementation of the definitions) ------------------


@pytest.mark.parametrize("seed", range(6))
def test_random_masks_match_medpy(seed):
    binary = pytest.importorskip("medpy.metric.binary")
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(20, 70, size=2))
    # blobs of several sizes, some touching the image edge, plus salt noise
    from scipy import ndimage

    a = ndimage.gaussian_filter(rng.random(shape), 2) > 0.52
    b = ndimage.gaussian_filter(rng.random(shape), 2 + seed % 3) > 0.5
    a |= rng.random(shape) < 0.01
    if not (a.any() and b.any()):
        pytest.skip("degenerate draw")
    spacing = float(rng.choice([0.25, 1.0, 2.0]))
    s = score(a, b, spacing)
    assert s["hd"] == pytest.approx(binary.hd(a, b, voxelspacing=spacing), abs=1e-6)
    assert s["msd"] == pytest.approx(binary.assd(a, b, voxelspacing=spacing), abs=1e-6)
    assert s["dice"] == pytest.approx(100 * binary.dc(a, b), abs=1e-9)


def test_small_objects_in_large_image_match_medpy():
    # exercises the bounding-box crop (objects far from the image edge, one at the edge)
    binary = pytest.importorskip("medpy.metric.binary")
    a = disc((200, 300), (50, 60), 6) | square((200, 300), 190, 0, 10)
    b = disc((200, 300), (55, 70), 8)
    s = score(a, b, 0.25)
    assert s["hd"] == pytest.approx(binary.hd(a, b, voxelspacing=0.25), abs=1e-6)
    assert s["msd"] == pytest.approx(binary.assd(a, b, voxelspacing=0.25), abs=1e-6)


def test_empty_mask_stats_hand_made():
    # 3 patches with the tissue (Dice 80, 40, 0 = missed), 4 without: 1 false positive.
    empty = ["none", "none", "pred", "both", "both", "gt", "both"]
    dice_pct = [80.0, 40.0, 0.0, 100.0, 100.0, 0.0, 100.0]
    gt_empty, pred_empty = empty_flags(empty)
    assert gt_empty.tolist() == [False, False, False, True, True, True, True]
    assert pred_empty.tolist() == [False, False, True, True, True, False, True]
    stats = empty_mask_stats(dice_pct, gt_empty, pred_empty)
    assert stats == {
        "dice_nonempty_pct": pytest.approx(40.0),
        "n_nonempty": 3,
        "n_empty_mask": 4,
        "n_fp_empty": 1,
    }
    assert np.mean(dice_pct) == pytest.approx(60.0)  # the standard mean, lifted by empty masks


def test_empty_mask_stats_from_scores_and_edge_cases():
    blank, blob = np.zeros((8, 8), bool), square((8, 8), 2, 2, 3)
    scores = [score(blob, blank, 1.0), score(blank, blank, 1.0), score(blob, blob, 1.0)]
    g, p = empty_flags([s["empty"] for s in scores])
    stats = empty_mask_stats([s["dice"] for s in scores], g, p)
    assert (stats["n_fp_empty"], stats["n_empty_mask"], stats["n_nonempty"]) == (1, 2, 1)
    assert stats["dice_nonempty_pct"] == pytest.approx(100.0)
    none = empty_mask_stats([100.0], [True], [True])
    assert math.isnan(none["dice_nonempty_pct"]) and none["n_fp_empty"] == 0
    with pytest.raises(ValueError, match="items"):
        empty_mask_stats([1.0, 2.0], [True], [True])
    with pytest.raises(ValueError, match="unknown empty kind"):
        empty_flags(["none", "neither"])


def test_dice_from_counts_matches_dice_of_masks():
    from omniseg.metrics import dice, dice_from_counts

    pred = np.zeros((6, 6), bool)
    gt = np.zeros((6, 6), bool)
    pred[:3, :3] = True
    gt[1:4, 1:4] = True
    tp, fp, fn = int((pred & gt).sum()), int((pred & ~gt).sum()), int((~pred & gt).sum())
    assert dice_from_counts(tp, fp, fn) == pytest.approx(dice(pred, gt))
    assert dice_from_counts(0, 0, 0) == 100.0 and dice_from_counts(0, 3, 0) == 0.0
