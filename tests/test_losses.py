"""Tests of omniseg.losses with closed-form answers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from omniseg.losses import (
    LOSS_KINDS,
    authors_dice_bce_loss,
    binary_loss_of,
    boundary_ring,
    dice_bce_loss,
    soft_dice,
)


def square(size: int = 16, top: int = 6, side: int = 4, batch: int = 1) -> torch.Tensor:
    m = torch.zeros(batch, 1, size, size)
    m[..., top : top + side, top : top + side] = 1
    return m


def logits_for(prob_fg: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) foreground probability -> (B, 2, H, W) logits with that softmax."""
    p = prob_fg.clamp(1e-6, 1 - 1e-6)
    return torch.cat([torch.zeros_like(p), torch.log(p / (1 - p))], dim=1)


@pytest.mark.parametrize(("width", "count"), [(0, 0), (1, 20), (2, 48), (3, 84)])
def test_ring_of_a_square(width, count):
    # (4 + 2 width)^2 - 16 pixels around an isolated 4x4 square.
    ring = boundary_ring(square(), width)
    assert ring.dtype == torch.bool and ring.shape == (1, 1, 16, 16)
    assert int(ring.sum()) == count
    assert not (ring & square().bool()).any()


def test_ring_exact_pixels_and_border():
    m = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    m[0, 0, 0, 0] = True  # corner pixel: the ring is clipped by the image border
    ring = boundary_ring(m, 2)[0, 0]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[:3, :3] = True
    expected[0, 0] = False
    assert torch.equal(ring, expected)


def test_perfect_prediction_is_near_zero():
    target = square(batch=2)
    logits = 30 * (2 * target - 1)
    logits = torch.cat([-logits, logits], dim=1)
    assert dice_bce_loss(logits, target) < 1e-6
    assert dice_bce_loss(-logits, target) > 1.5  # the opposite is far from 0


def test_zero_logits_closed_form():
    # softmax = 0.5 everywhere: CE = ln 2 whatever the weights; Dice = (S + 1) / (N/2 + S + 1).
    target = square()
    n, s = 16 * 16, 16
    expected = 1 - (s + 1) / (n / 2 + s + 1) + math.log(2)
    for bw in (1.0, 1.2, 5.0):
        loss = dice_bce_loss(torch.zeros(1, 2, 16, 16), target, boundary_weight=bw)
        assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_unweighted_ce_matches_torch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 16, 16, generator=g)
    target = square(batch=2)
    loss = dice_bce_loss(logits, target, boundary_weight=1.0, dice_weight=0.0)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target[:, 0].long()))


def test_soft_dice_known_values():
    a = square(batch=2)
    assert torch.allclose(soft_dice(a, a), torch.ones(2, 1))
    b = torch.roll(a, 8, dims=-1)  # disjoint copy: Dice = smooth / (16 + 16 + smooth)
    torch.testing.assert_close(soft_dice(b, a), torch.full((2, 1), 1 / 33))
    assert soft_dice(torch.rand(3, 4, 5, 5), torch.ones(3, 4, 5, 5)).shape == (3, 4)
    with pytest.raises(ValueError, match="shape"):
        soft_dice(a, a[:1])


def test_boundary_weight_direction():
    # All-background prediction: ring pixels (true background) are right, the object is wrong.
    # Weighting the ring up adds weight to low-CE pixels -> the CE mean goes down; for an
    # all-foreground prediction the ring is wrong -> it goes up.
    target = square()
    for prob, direction in ((0.2, -1), (0.8, +1)):
        logits = logits_for(torch.full_like(target, prob))
        plain = dice_bce_loss(logits, target, boundary_weight=1.0)
        weighted = dice_bce_loss(logits, target, boundary_weight=1.2)
        assert (weighted - plain).sign().item() == direction


def test_gradients_flow():
    logits = torch.randn(2, 2, 16, 16, requires_grad=True)
    dice_bce_loss(logits, square(batch=2)).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_bool_target_and_shape_errors():
    target = square(batch=2)
    logits = torch.randn(2, 2, 16, 16)
    torch.testing.assert_close(dice_bce_loss(logits, target), dice_bce_loss(logits, target.bool()))
    with pytest.raises(ValueError, match="logits"):
        dice_bce_loss(torch.randn(2, 3, 16, 16), target)
    with pytest.raises(ValueError, match="target"):
        dice_bce_loss(logits, target[:, :, :8])


# -- the authors' formulation (sigmoid on both channels) ----------------------------------------
@pytest.mark.parametrize("bw", [1.0, 1.2, 5.0])
def test_authors_zero_logits_closed_form(bw):
    # sigmoid = 0.5 on both channels; 4x4 square in 16x16, ring of 48 px (weight bw), so
    # foreground Dice 2 * 0.5 * 16 / (128 + 16 + 1), background Dice 2 * 0.5 * (192 + 48 bw) /
    # (128 + 240 + 1) (the weight enters the numerator only); BCE = ln 2 * mean weight.
    target = square()
    dice_fg = 16 / 145
    dice_bg = (192 + 48 * bw) / 369
    bce = math.log(2) * (208 + 48 * bw) / 256
    expected = 1 - (dice_fg + dice_bg) / 2 + bce
    loss = authors_dice_bce_loss(torch.zeros(1, 2, 16, 16), target, boundary_weight=bw)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_authors_channels_are_independent_sigmoids():
    # Both logits high: a softmax would say 0.5 / 0.5, the authors' loss sees two confident
    # channels, one of them wrong everywhere: its background Dice term is near 0.
    target = square()
    both_high = torch.full((1, 2, 16, 16), 20.0)
    right = torch.cat([-20 * (2 * target - 1), 20 * (2 * target - 1)], dim=1)
    assert authors_dice_bce_loss(both_high, target) > authors_dice_bce_loss(right, target) + 1
    # ours only sees the difference of the two logits
    assert dice_bce_loss(both_high, target) == pytest.approx(
        dice_bce_loss(torch.zeros(1, 2, 16, 16), target).item()
    )


def test_authors_perfect_prediction_and_weights():
    target = square(batch=2)
    perfect = torch.cat([-30 * (2 * target - 1), 30 * (2 * target - 1)], dim=1)
    # no ring weight: 1 - mean_c 2 S_c / (2 S_c + 1), BCE ~ 0
    expected = 1 - (32 / 33 + 480 / 481) / 2
    assert authors_dice_bce_loss(perfect, target, boundary_weight=1.0).item() == pytest.approx(
        expected, rel=1e-4
    )
    assert authors_dice_bce_loss(
        perfect, target, dice_weight=0.0, bce_weight=1.0
    ).item() == pytest.approx(0.0, abs=1e-9)


def test_authors_gradients_and_errors():
    logits = torch.zeros(2, 2, 8, 8, requires_grad=True)
    authors_dice_bce_loss(logits, square(8, 2, 3, batch=2).bool()).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="logits"):
        authors_dice_bce_loss(torch.zeros(1, 3, 8, 8), square(8))
    with pytest.raises(ValueError, match="target"):
        authors_dice_bce_loss(torch.zeros(1, 2, 8, 8), square(16))


def test_loss_kinds():
    assert set(LOSS_KINDS) == {"omniseg", "authors"}
    assert binary_loss_of("omniseg") is dice_bce_loss
    assert binary_loss_of("authors") is authors_dice_bce_loss
    with pytest.raises(ValueError, match="omniseg, authors"):
        binary_loss_of("paper")


def test_mean_dice_pools_the_pixels_of_each_group():
    from omniseg.losses import mean_dice

    prob = torch.zeros(3, 1, 4, 4)
    target = torch.zeros(3, 1, 4, 4)
    target[0, :, :2] = 1  # 8 foreground pixels, predicted exactly
    prob[0, :, :2] = 1
    prob[1, :, :1] = 1  # 4 false positives on a patch without the tissue
    prob[2, :, :2] = 1  # another tissue, predicted exactly... on an empty mask: 8 FP
    per_sample = mean_dice(prob, target)
    assert per_sample == pytest.approx(((16 + 1) / 17 + 1 / 5 + 1 / 9) / 3)
    pooled = mean_dice(prob, target, torch.tensor([0, 0, 1]))
    # tissue 0: 2*8 / (8 + 4 + 8), smooth 1; tissue 1: 1 / (8 + 1)
    assert pooled == pytest.approx(((16 + 1) / 21 + 1 / 9) / 2)


def test_pooled_dice_keeps_a_gradient_on_false_positives_of_empty_patches():
    """Per sample, a head firing on a patch without its tissue gets (almost) no Dice gradient;
    pooled per tissue it does."""
    from omniseg.losses import mean_dice

    target = torch.zeros(2, 1, 16, 16)
    target[0, :, 4:12, 4:12] = 1
    prob = torch.full((2, 1, 16, 16), 0.5, requires_grad=True)
    mean_dice(prob, target).backward()
    per_sample = prob.grad[1].abs().mean().item()
    prob.grad = None
    mean_dice(prob, target, torch.tensor([3, 3])).backward()
    pooled = prob.grad[1].abs().mean().item()
    assert pooled > 20 * per_sample


def test_batch_pooling_reaches_an_empty_patch_alone_in_its_tissue():
    """In a mixed batch, an empty patch is often the only patch of its tissue: pooled per
    tissue its false positives get (almost) no Dice gradient; pooled over the batch they do."""
    from omniseg.losses import dice_groups, mean_dice

    target = torch.zeros(2, 1, 16, 16)
    target[0, :, 4:12, 4:12] = 1  # tissue 0, with objects; patch 1: tissue 5, empty mask
    tissue = torch.tensor([0, 5])
    grads = {}
    for dice in ("tissue", "batch"):
        prob = torch.full((2, 1, 16, 16), 0.5, requires_grad=True)
        mean_dice(prob, target, dice_groups(dice, tissue)).backward()
        grads[dice] = prob.grad[1].abs().mean().item()
    assert grads["batch"] > 20 * grads["tissue"]
    assert dice_groups("batch", tissue).tolist() == [0, 0]
    assert dice_groups("tissue", tissue) is tissue and dice_groups("sample", tissue) is None
