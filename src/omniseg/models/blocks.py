"""Building blocks of the residual U-Net: GroupNorm helper and the pre-activation residual block.

All tensors are ``(B, C, H, W)``. Convolutions have no bias (a GroupNorm follows or precedes each).
"""

from __future__ import annotations

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
