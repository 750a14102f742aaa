"""Tests of omniseg.augment."""

from __future__ import annotations

import pytest
import torch

from omniseg.augment import Augmenter, coarse_dropout, stain_jitter

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


def test_scale_per_axis_draws_x_and_y_independently():
    # A centred square under a pure zoom: isotropic keeps it square, per-axis does not.
    images = torch.zeros(32, 3, 64, 64)
    masks = torch.zeros(32, 1, 64, 64)
    masks[..., 24:40, 24:40] = 1

    def aspect(per_axis: bool) -> torch.Tensor:
        torch.manual_seed(5)
        aug = Augmenter(
            p_geometric=1, p_color=0, p_noise=0, translate=0, rotate=0, shear=0, hflip=False,
            scale=(0.75, 1.5), scale_per_axis=per_axis,
        )  # fmt: skip
        _, m = aug(images, masks)
        rows = m[:, 0].any(2).sum(1).float()
        cols = m[:, 0].any(1).sum(1).float()
        return rows / cols

    assert (aspect(False) - 1).abs().max() < 0.15
    assert (aspect(True) - 1).abs().max() > 0.3


def test_zero_padding_fills_black():
    torch.manual_seed(6)
    images, masks = torch.ones(8, 3, 32, 32), torch.ones(8, 1, 32, 32)
    # zoomed out to half size: a frame of 8 px all round comes from outside the image
    kw = dict(p_geometric=1, p_color=0, p_noise=0, rotate=0, translate=0, shear=0, scale=(0.5, 0.5))
    out, out_m = Augmenter(**kw, padding_mode="zeros")(images, masks)
    assert (out[..., :6, :] == 0).all() and (out[..., 10:22, 10:22] == 1).all()
    assert (out_m[..., :6, :] == 0).all()
    out, _ = Augmenter(**kw, padding_mode="reflection")(images, masks)
    assert torch.allclose(out, images)


def test_noise_std_range_varies_per_image():
    images, masks = torch.full((64, 3, 32, 32), 0.5), torch.zeros(64, 1, 32, 32)
    kw = dict(p_geometric=0, p_color=0, p_noise=1, dropout_holes=(1, 1), dropout_size=(0, 0))
    kw["blur_sigma"] = (0, 0)
    torch.manual_seed(8)
    fixed, _ = Augmenter(**kw, noise_std=0.05)(images, masks)
    torch.manual_seed(8)
    drawn, _ = Augmenter(**kw, noise_std=(0.0, 0.1))(images, masks)
    s_fixed = (fixed - 0.5).flatten(1).std(1)
    s_drawn = (drawn - 0.5).flatten(1).std(1)
    assert (s_fixed - 0.05).abs().max() < 0.01
    assert s_drawn.min() < 0.02 and s_drawn.max() > 0.08  # Uniform(0, 0.1) per image


def test_gamma_may_start_at_zero():
    torch.manual_seed(9)
    images, masks = batch()
    out, _ = Augmenter(p_geometric=0, p_color=1, p_noise=0, gamma=(0.0, 2.0))(images, masks)
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma": (1.5, 0.5)}, "gamma"),
        ({"gamma": (-0.1, 2.0)}, "gamma"),
        ({"noise_std": -0.1}, "noise_std"),
        ({"noise_std": (0.1, 0.0)}, "noise_std"),
        ({"noise_std": "high"}, "noise_std"),
        ({"scale": (0, 1.5)}, "scale"),
        ({"scale_per_axis": "yes"}, "scale_per_axis"),
        ({"padding_mode": "black"}, "padding_mode"),
        ({"p_stain": 1.5}, "p_stain"),
        ({"stain_sigma": -0.1}, "stain_sigma"),
    ],
)
def test_bad_ranges(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Augmenter(**kwargs)


def test_stain_jitter_scales_each_channels_optical_density():
    """Every pixel's optical density -log(x) is multiplied by one gain per image and channel
    (a stain's strength), so glass stays white, the mask is untouched and the gains differ
    between channels (the hue moves) and between images."""
    torch.manual_seed(5)
    images, masks = batch(6, 16)
    images = images.clamp(0.05, 0.95)
    images[:, :, 0, 0] = 1.0  # glass
    out = stain_jitter(images, 0.2)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out[:, :, 0, 0], torch.ones(6, 3))
    gains = torch.log(out[:, :, 1:]) / torch.log(images[:, :, 1:])  # (6, 3, 15, 16)
    flat = gains.flatten(2)
    torch.testing.assert_close(flat.amax(2), flat.amin(2), rtol=1e-3, atol=1e-4)
    per_channel = flat[:, :, 0]
    assert (per_channel.std(dim=1) > 1e-3).all()  # the channels get different gains
    assert per_channel[:, 0].std() > 1e-3  # and the images
    assert torch.allclose(stain_jitter(images, 0.0), images, atol=1e-6)
    aug_out, aug_masks = Augmenter(p_geometric=0, p_color=0, p_noise=0, p_stain=1)(images, masks)
    assert torch.equal(aug_masks, masks) and (aug_out != images).flatten(1).any(1).all()


def test_stain_jitter_off_draws_nothing():
    """p_stain 0 (the default) leaves the other groups' random draws as they were."""
    images, masks = batch()
    torch.manual_seed(9)
    a = Augmenter(p_geometric=0.5, p_color=0.5, p_noise=0.5)(images, masks)
    torch.manual_seed(9)
    b = Augmenter(p_geometric=0.5, p_color=0.5, p_noise=0.5, p_stain=0.0)(images, masks)
    torch.manual_seed(9)
    c = Augmenter(p_geometric=0.5, p_color=0.5, p_noise=0.5, p_stain=0.5)(images, masks)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
