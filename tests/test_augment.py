"""Tests of omniseg.augment."""

from __future__ import annotations

import pytest
import torch

from omniseg.augment import Augmenter, coarse_dropout

torch.set_num_threads(1)


def batch(b: int = 8, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(b, 1, size, size)
    masks[..., 4:14, 6:20] = 1  # asymmetric, so rotations and flips show
    masks[..., 20:24, 2:6] = 1
    images = torch.rand(b, 3, size, size, generator=g)
    return images, masks


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bool, torch.uint8])
def test_shapes_ranges_binary_mask(mask_dtype):
    torch.manual_seed(0)
    images, masks = batch()
    masks = masks.to(mask_dtype)
    out, out_m = Augmenter(p_geometric=1, p_color=1, p_noise=1)(images, masks)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert out_m.shape == masks.shape and out_m.dtype == mask_dtype
    assert out.min() >= 0 and out.max() <= 1
    assert set(torch.unique(out_m.float()).tolist()) <= {0.0, 1.0}
    assert not torch.equal(out, images)


def test_zero_probability_is_identity():
    images, masks = batch()
    out, out_m = Augmenter(p_geometric=0, p_color=0, p_noise=0)(images, masks)
    assert torch.equal(out, images) and torch.equal(out_m, masks)


def test_inputs_not_modified():
    images, masks = batch()
    i0, m0 = images.clone(), masks.clone()
    Augmenter(p_geometric=1, p_color=1, p_noise=1)(images, masks)
    assert torch.equal(images, i0) and torch.equal(masks, m0)


def test_geometry_identical_for_image_and_mask():
    torch.manual_seed(1)
    images, masks = batch(16)
    images[:, 0] = masks[:, 0]
    out, out_m = Augmenter(p_geometric=1, p_color=0, p_noise=0)(images, masks)
    assert torch.equal(out[:, 0] > 0.5, out_m[:, 0] > 0.5)
    moved = (out_m != masks).flatten(1).any(1)
    assert moved.sum() >= 14  # the affine moves (almost) every mask


def test_colour_and_noise_leave_mask_alone():
    torch.manual_seed(2)
    images, masks = batch()
    out, out_m = Augmenter(p_geometric=0, p_color=1, p_noise=1)(images, masks)
    assert torch.equal(out_m, masks)
    assert (out != images).flatten(1).any(1).all()


def test_group_probability_per_sample():
    torch.manual_seed(3)
    images, masks = batch(64, 16)
    out, _ = Augmenter(p_geometric=0, p_color=0.5, p_noise=0)(images, masks)
    changed = int((out != images).flatten(1).any(1).sum())
    assert 16 <= changed <= 48  # Binomial(64, 0.5): P(outside) < 1e-4


def test_deterministic_under_seed():
    images, masks = batch()
    aug = Augmenter(p_geometric=0.5, p_color=0.5, p_noise=0.5)
    torch.manual_seed(7)
    a = aug(images, masks)
    torch.manual_seed(7)
    b = aug(images, masks)
    torch.manual_seed(8)
    c = aug(images, masks)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_coarse_dropout_known_area():
    # One hole of exactly half the side: 8 x 8 = 64 zeroed pixels in every image and channel.
    torch.manual_seed(4)
    out = coarse_dropout(torch.ones(5, 3, 16, 16), holes=(1, 1), size=(0.5, 0.5))
    zeros = (out == 0).sum(dim=(2, 3))
    assert torch.equal(zeros, torch.full((5, 3), 64))
    rows = (out[:, 0] == 0).any(2).sum(1)
    assert torch.equal(rows, torch.full((5,), 8))  # a rectangle, not scattered pixels


def test_bad_arguments():
    with pytest.raises(ValueError, match="p_color"):
        Augmenter(p_color=1.5)
    images, masks = batch()
    with pytest.raises(ValueError, match="masks"):
        Augmenter()(images, masks[:, :, :8])
