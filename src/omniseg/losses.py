"""Training losses: soft Dice + boundary-weighted cross-entropy (the paper's Dice + BCE, 1:1).

Two formulations of the paper's loss, picked by the training config's ``loss.kind``:

``"omniseg"`` (ours, the default; :func:`dice_bce_loss`)
    Dice of the softmax foreground + 2-class softmax cross-entropy, the ring pixels weighted in
    a weighted mean.
``"authors"`` (:func:`authors_dice_bce_loss`)
    What the authors' public code computes: each of the two channels through its own sigmoid
    against the one-hot target (background, foreground), Dice and binary cross-entropy per
    channel, averaged over the two channels.

Shapes: logits ``(B, 2, H, W)`` (background, foreground), targets ``(B, 1, H, W)`` in {0, 1}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def boundary_ring(mask: Tensor, width: int = 2) -> Tensor:
    """Pixels within ``width`` px outside each object: dilation minus the mask.

    The dilation is a ``(2 width + 1)``-square max-pool (chessboard distance), so the ring of an
    isolated ``s x s`` square holds ``(s + 2 width)^2 - s^2`` pixels (48 for ``s = 4``, width 2).
    Pixels beyond the image border do not count.

    Args:
        mask: ``(B, 1, H, W)`` binary (bool or {0, 1} numbers).
        width: ring width in pixels (>= 0).

    Returns:
        ``(B, 1, H, W)`` bool.
    """
    if mask.ndim != 4:
        raise ValueError(f"mask must be (B, 1, H, W), got {tuple(mask.shape)}")
    if width < 0:
        raise ValueError(f"ring width must be >= 0, got {width}")
    m = mask.bool()
    if width == 0:
        return torch.zeros_like(m)
    dil = F.max_pool2d(m.to(torch.float32), 2 * width + 1, stride=1, padding=width) > 0
    return dil & ~m


def soft_dice(prob: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Soft Dice coefficient per sample and channel.

    Args:
        prob: ``(B, C, H, W)`` probabilities.
        target: ``(B, C, H, W)`` {0, 1} (one-hot for several classes).
        smooth: added to numerator and denominator (an empty target and empty prediction give 1).

    Returns:
        ``(B, C)``: ``(2 sum(p t) + smooth) / (sum p + sum t + smooth)`` over ``H, W``.
    """
    if prob.shape != target.shape:
        raise ValueError(
            f"prob {tuple(prob.shape)} and target {tuple(target.shape)} differ in shape"
        )
    target = target.to(prob.dtype)
    dims = tuple(range(2, prob.ndim))
    inter = (prob * target).sum(dims)
    total = prob.sum(dims) + target.sum(dims)
    return (2 * inter + smooth) / (total + smooth)


def group_sums(values: Tensor, groups: Tensor | None) -> Tensor:
    """Sum ``(B, C)`` per-sample values over the samples of each group: ``(G, C)``, groups in
    sorted order (``groups`` ``(B,)`` ids); None: the values as they are."""
    if groups is None:
        return values
    ids, inverse = torch.unique(groups, return_inverse=True)
    return values.new_zeros((len(ids), values.shape[1])).index_add_(0, inverse, values)


def mean_dice(
    prob: Tensor, target: Tensor, groups: Tensor | None = None, smooth: float = 1.0
) -> Tensor:
    """Mean soft Dice over samples (``groups`` None) or over groups of samples, each group's
    pixels pooled (``groups`` ``(B,)``, e.g. the tissue of each sample).

    Per sample, an empty target's Dice is ``1 / (sum p + 1)``: once a head fires on a patch
    without its tissue the term is ~0 whatever it predicts, and its gradient vanishes, so only
    the cross-entropy teaches it to be quiet there. Pooled per tissue, those false positives
    enter the denominator beside the tissue's true objects and keep a gradient.

    Returns:
        scalar: the mean over samples (or groups) and channels.
    """
    if groups is None:
        return soft_dice(prob, target, smooth).mean()
    if prob.shape != target.shape:
        raise ValueError(
            f"prob {tuple(prob.shape)} and target {tuple(target.shape)} differ in shape"
        )
    target = target.to(prob.dtype)
    dims = tuple(range(2, prob.ndim))
    inter = group_sums((prob * target).sum(dims), groups)
    total = group_sums(prob.sum(dims) + target.sum(dims), groups)
    return ((2 * inter + smooth) / (total + smooth)).mean()


#: ``loss.dice`` of the training config: over what a soft Dice is pooled.
#: ``"sample"``: per patch; ``"tissue"``: per tissue over the batch; ``"batch"``: all the batch's
#: patches pooled into one Dice, whatever their tissue. In a mixed batch of 4 patches from 6
#: tissues most tissue groups hold one patch, so a patch without its tissue is usually alone in
#: its group and its false positives get no Dice gradient; pooled over the batch, they always
#: share the denominator with the other patches' objects.
DICE_POOLING = ("sample", "tissue", "batch")


def dice_groups(dice: str, tissue: Tensor) -> Tensor | None:
    """The ``groups`` of :func:`mean_dice` for the ``loss.dice`` setting."""
    if dice not in DICE_POOLING:
        raise ValueError(f"loss dice must be one of {', '.join(DICE_POOLING)}, got {dice!r}")
    if dice == "batch":
        return torch.zeros_like(tissue)
    return tissue if dice == "tissue" else None


def dice_bce_loss(
    logits: Tensor,
    target: Tensor,
    boundary_weight: float = 1.2,
    ring_width: int = 2,
    dice_weight: float = 1.0,
    bce_weight: float = 1.0,
    groups: Tensor | None = None,
) -> Tensor:
    """Dice loss of the softmax foreground plus boundary-weighted 2-class cross-entropy.

    ``dice_weight * (1 - mean_b dice_b) + bce_weight * CE``, where ``dice_b`` is the soft Dice
    (smooth 1) of sample ``b`` (of group ``b`` with ``groups``: :func:`mean_dice`) and CE is the
    weighted mean over pixels of the cross-entropy, pixels of the :func:`boundary_ring` weighing
    ``boundary_weight``, all others 1.

    Args:
        logits: ``(B, 2, H, W)``.
        target: ``(B, 1, H, W)`` in {0, 1} (bool, int or float).

    Returns:
        scalar loss.
    """
    if logits.ndim != 4 or logits.shape[1] != 2:
        raise ValueError(f"logits must be (B, 2, H, W), got {tuple(logits.shape)}")
    b, _, h, w = logits.shape
    if tuple(target.shape) != (b, 1, h, w):
        raise ValueError(
            f"target must be ({b}, 1, {h}, {w}) to match logits, got {tuple(target.shape)}"
        )
    logits = logits.float()  # stable under autocast
    fg = target.bool()
    prob = logits.softmax(dim=1)[:, 1:]
    dice = 1 - mean_dice(prob, fg, groups)
    ce = F.cross_entropy(logits, fg[:, 0].long(), reduction="none")  # (B, H, W)
    if boundary_weight != 1.0 and ring_width > 0:
        weight = 1 + (boundary_weight - 1) * boundary_ring(fg, ring_width)[:, 0].to(ce.dtype)
        ce = (ce * weight).sum() / weight.sum()
    else:
        ce = ce.mean()
    return dice_weight * dice + bce_weight * ce


def authors_dice_bce_loss(
    logits: Tensor,
    target: Tensor,
    boundary_weight: float = 1.2,
    ring_width: int = 2,
    dice_weight: float = 1.0,
    bce_weight: float = 1.0,
    groups: Tensor | None = None,
) -> Tensor:
    """The authors' Dice + BCE: sigmoid on both channels against the one-hot target.

    As in the public Omni-Seg code (``DiceLoss4MOTS`` + ``CELoss4MOTS``): the weight map ``w`` is
    ``boundary_weight`` on the :func:`boundary_ring` and 1 elsewhere; for each channel ``c``
    (0 background, 1 foreground) with ``p = sigmoid(logits[:, c])`` and ``t`` the one-hot
    target, ``dice_c = mean_b 2 sum(w p t) / (sum p + sum t + 1)`` (the weight enters the
    numerator only, smooth 1 in the denominator only) and ``bce_c = mean_b mean_pixels w *
    BCE(logits[:, c], t)``. The loss is ``dice_weight * mean_c (1 - dice_c) + bce_weight *
    mean_c bce_c``. The two channels are not tied by a softmax: the prediction is still the
    argmax of the two logits.

    Args:
        logits: ``(B, 2, H, W)``.
        target: ``(B, 1, H, W)`` in {0, 1} (bool, int or float).

    Returns:
        scalar loss.
    """
    _check_pair(logits, target)
    logits = logits.float()  # stable under autocast
    fg = target.bool()
    onehot = torch.cat([~fg, fg], dim=1).to(logits.dtype)  # (B, 2, H, W)
    weight = torch.ones_like(onehot[:, :1])
    if boundary_weight != 1.0 and ring_width > 0:
        weight = weight + (boundary_weight - 1) * boundary_ring(fg, ring_width).to(weight.dtype)
    prob = logits.sigmoid()
    dims = (2, 3)
    inter = group_sums((prob * onehot * weight).sum(dims), groups)
    dice = 2 * inter / (group_sums(prob.sum(dims) + onehot.sum(dims), groups) + 1)
    bce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none") * weight
    return dice_weight * (1 - dice).mean() + bce_weight * bce.mean()


#: ``loss.kind`` of the training config -> the loss on 2-channel logits.
LOSS_KINDS = {"omniseg": dice_bce_loss, "authors": authors_dice_bce_loss}


def binary_loss_of(kind: str):
    """The 2-channel loss named ``kind`` (:data:`LOSS_KINDS`).

    Raises:
        ValueError: an unknown kind (the message lists the known ones).
    """
    try:
        return LOSS_KINDS[kind]
    except (KeyError, TypeError):
        raise ValueError(
            f"loss kind must be one of {', '.join(LOSS_KINDS)}, got {kind!r}"
        ) from None


def _check_pair(logits: Tensor, target: Tensor) -> None:
    if logits.ndim != 4 or logits.shape[1] != 2:
        raise ValueError(f"logits must be (B, 2, H, W), got {tuple(logits.shape)}")
    b, _, h, w = logits.shape
    if tuple(target.shape) != (b, 1, h, w):
        raise ValueError(
            f"target must be ({b}, 1, {h}, {w}) to match logits, got {tuple(target.shape)}"
        )
