"""Building blocks of the residual U-Net: GroupNorm helper and the pre-activation residual block.

All tensors are ``(B, C, H, W)``. Convolutions have no bias (a GroupNorm follows or precedes each).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Number of GroupNorm groups of the paper's network.
GN_GROUPS = 16


def num_groups(channels: int, max_groups: int = GN_GROUPS) -> int:
    """Groups for a GroupNorm over ``channels``: ``min(16, C)`` when that divides ``C``.

    For widths that 16 does not divide (e.g. 24) the largest divisor of ``C`` not above
    ``max_groups`` is used, so any width builds.
    """
    if channels < 1:
        raise ValueError(f"GroupNorm needs at least one channel, got {channels}")
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with :func:`num_groups` groups and affine parameters."""
    return nn.GroupNorm(num_groups(channels), channels)


#: Normalisation layers of the networks: ``"group"`` (the paper's GroupNorm, :func:`group_norm`)
#: or ``"batch"`` (BatchNorm2d; same parameter count, plus running statistics).
NORMS = ("group", "batch")


def make_norm(kind: str, channels: int) -> nn.Module:
    """The normalisation layer ``kind`` (:data:`NORMS`) over ``channels``.

    GroupNorm normalises each image on its own; with ``min(16, C)`` groups on 16 channels (the
    demo width) every channel is normalised over its own pixels (instance normalisation), which
    takes away how much of a feature a patch holds: a patch without glomeruli is stretched like
    one with them. BatchNorm keeps that, at the price of batch statistics.
    """
    if kind == "group":
        return group_norm(channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"unknown norm {kind!r}; known: {', '.join(NORMS)}")


class TissueNorm(nn.Module):
    """A normalisation layer followed by a per-tissue affine (class-conditional normalisation,
    de Vries et al. 2017): ``norm(x) * (1 + k scale[t]) + k shift[t]`` for a sample of tissue
    ``t``.

    ``scale`` and ``shift`` (``(num_tissues, C)``) start at 0, so the layer starts as the plain
    ``norm``; ``k`` (``rate``) multiplies them in the forward pass, so under Adam they move
    ``k`` times faster than the other weights. The tissue of every sample is set on the layer
    (:attr:`tissue`, ``(B,)`` int64) before its forward and cleared after, because the layer
    sits inside ``nn.Sequential`` blocks that pass a single tensor on.
    """

    def __init__(self, norm: nn.BatchNorm2d | nn.GroupNorm, num_tissues: int, rate: float = 1.0):
        super().__init__()
        channels = norm.num_features if isinstance(norm, nn.BatchNorm2d) else norm.num_channels
        self.norm = norm
        self.rate = float(rate)
        self.scale = nn.Parameter(torch.zeros(num_tissues, channels))
        self.shift = nn.Parameter(torch.zeros(num_tissues, channels))
        self.tissue: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.tissue is None:
            raise RuntimeError("TissueNorm: the samples' tissue ids were not set before forward")
        k, t = self.rate, self.tissue
        scale = (1 + k * self.scale[t])[:, :, None, None]
        return torch.addcmul((k * self.shift[t])[:, :, None, None], self.norm(x), scale)


def condition_norms(module: nn.Module, num_tissues: int, rate: float = 1.0) -> list[TissueNorm]:
    """Wrap every BatchNorm2d and GroupNorm inside ``module`` in a :class:`TissueNorm`, in
    place; returns the new layers in module order."""
    layers = []
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d | nn.GroupNorm):
            layer = TissueNorm(child, num_tissues, rate)
            setattr(module, name, layer)
            layers.append(layer)
        else:
            layers += condition_norms(child, num_tissues, rate)
    return layers


def norm_act_conv(
    c_in: int, c_out: int, kernel_size: int, stride: int = 1, norm: str = "group"
) -> nn.Sequential:
    """Norm -> ReLU -> conv (no bias, 'same' padding), the pre-activation unit."""
    return nn.Sequential(
        make_norm(norm, c_in),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_in, c_out, kernel_size, stride, padding=kernel_size // 2, bias=False),
    )


class ResidualBlock(nn.Module):
    """Pre-activation residual block: (GN -> ReLU -> 3x3 conv) x 2 plus a shortcut.

    The shortcut is the identity, or GN -> ReLU -> 1x1 conv (with the block's stride) when the
    stride or the width changes.

    Shapes: ``(B, c_in, H, W) -> (B, c_out, H / stride, W / stride)``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, norm: str = "group"):
        super().__init__()
        self.body = nn.Sequential(
            norm_act_conv(c_in, c_out, 3, stride, norm),
            norm_act_conv(c_out, c_out, 3, norm=norm),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else norm_act_conv(c_in, c_out, 1, stride, norm)
        )

    def forward(self, x: Tensor) -> Tensor:
        # The in-place ReLUs act on GroupNorm outputs, never on x, so the shortcut sees the
        # un-activated input. The in-place sum saves one full-size buffer (conv backward does
        # not need its output).
        return self.body(x).add_(self.shortcut(x))


def window_cells(context: int | None, stride: int) -> int | None:
    """Feature-map cells of a ``context``-pixel window at ``stride`` input pixels per cell
    (None: no window, pool the whole input)."""
    return None if context is None else max(1, int(context) // int(stride))


def window_pool(x: Tensor, cells: int | None, kind: str = "mean") -> Tensor | None:
    """Mean or max of ``x`` ``(B, C, h, w)`` over the ``cells x cells`` window around each
    position, the windows moved inward at the borders so each lies inside ``x``: every
    position gets the pool of a full window, as a training crop of that size would give.

    The networks that pool their whole input (Omni-Seg's controller and presence gate,
    DeepLabV3's image pooling) were trained on crops of one size; on a larger input (a slide
    tile) a window of the training crop's size keeps what they pool what it was in training,
    whatever the tile.

    Args:
        x: features.
        cells: window edge in positions of ``x``; None, or a window that spans ``x`` in
            both dimensions, means the whole input.
        kind: ``"mean"`` or ``"max"``.

    Returns:
        ``(B, C, h, w)``, or None when the window spans the whole input (the caller pools the
        whole input then, at ``(B, C)`` cost).
    """
    if kind not in ("mean", "max"):
        raise ValueError(f"window_pool: kind must be 'mean' or 'max', got {kind!r}")
    h, w = x.shape[2:]
    if cells is None or (cells >= h and cells >= w):
        return None
    kh, kw = min(int(cells), h), min(int(cells), w)
    pool = F.avg_pool2d if kind == "mean" else F.max_pool2d
    valid = pool(x, (kh, kw), stride=1)  # (B, C, h - kh + 1, w - kw + 1): one per window
    rows = (torch.arange(h, device=x.device) - kh // 2).clamp_(0, h - kh)
    cols = (torch.arange(w, device=x.device) - kw // 2).clamp_(0, w - kw)
    return valid[:, :, rows][:, :, :, cols]
