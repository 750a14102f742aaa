"""Classic U-Net (Ronneberger et al. 2015), the network of the Multi U-Net baseline.

Jayapandian et al. (2021) trained one standard U-Net per tissue; here each is a binary model
(2-channel logits) that ignores the tissue id it is queried with (the tissue only selects which
network's file is used, one per tissue).

Architecture (``depth`` levels, base width ``w``, channels ``w * 2**level``):

========= ============================================ ======================
level     encoder                                      decoder
========= ============================================ ======================
0         2 x (3x3 conv -> norm -> ReLU), 3 -> w        up + concat, 2 convs
1 .. d-2  2x2 max-pool, 2 convs, doubling the width     2x2 transposed conv
d-1       2x2 max-pool, 2 convs (the bottleneck)
========= ============================================ ======================

Decoder level ``l``: 2x2 stride-2 transposed conv ``2c -> c``, concatenation with the encoder
output of level ``l`` (``2c`` channels), two 3x3 convs ``2c -> c``. Then a 1x1 conv ``w -> 2``.
Convolutions are 'same'-padded (the original's valid convolutions and crops change only the
output size). The paper's network: ``depth = 5`` (4 poolings, widths 64..1024), BatchNorm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from omniseg.models.blocks import make_norm
from omniseg.models.registry import SegmentationModel, register_model


def double_conv(c_in: int, c_out: int, norm: str) -> nn.Sequential:
    """(3x3 conv -> norm -> ReLU) x 2; ``(B, c_in, H, W) -> (B, c_out, H, W)``."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        make_norm(norm, c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        make_norm(norm, c_out),
        nn.ReLU(inplace=True),
    )


class TissueAgnosticModel(SegmentationModel):
    """A binary model whose output does not depend on the tissue id (one network per tissue).

    :meth:`predict_proba` runs one forward pass and repeats its foreground probability for every
    requested tissue.
    """

    output_kind = "binary"

    def predict_proba(self, x: Tensor, tissues: Sequence[int]) -> Tensor:
        """``(B, T, H, W)``: the foreground probability, once per id in ``tissues``."""
        tissues = [int(t) for t in tissues]
        self.check_input(x)
        self._check_ids(tissues)
        b = x.shape[0]
        if not tissues:
            return x.new_zeros((b, 0, *x.shape[2:]))
        ids = torch.full((b,), tissues[0], dtype=torch.long, device=x.device)
        fg = self(x, ids).softmax(dim=1)[:, 1:]
        return fg.repeat(1, len(tissues), 1, 1)


@register_model("unet")
class UNet(TissueAgnosticModel):
    """Binary classic U-Net.

    Args:
        num_tissues: size of the tissue registry (ids are checked, otherwise ignored).
        width: channels of the first level (64 in the standard U-Net).
        depth: number of resolution levels (5: four poolings); inputs must be multiples of
            ``2 ** (depth - 1)``.
        in_channels: input channels (3, RGB in [0, 1]).
        norm: ``"batch"`` (standard) or ``"group"``.

    ``forward(x, tissue)``: ``x`` ``(B, 3, H, W)`` -> ``(B, 2, H, W)`` logits (background,
    foreground), the same whatever ``tissue`` is.
    """

    def __init__(
        self,
        num_tissues: int = 6,
        width: int = 64,
        depth: int = 5,
        in_channels: int = 3,
        norm: str = "batch",
    ):
        super().__init__()
        if num_tissues < 1 or width < 1 or depth < 2 or in_channels < 1:
            raise ValueError(
                f"UNet needs num_tissues >= 1, width >= 1, depth >= 2, in_channels >= 1; got "
                f"num_tissues={num_tissues}, width={width}, depth={depth}, "
                f"in_channels={in_channels}"
            )
        make_norm(norm, 1)  # fail early on an unknown norm
        self.num_tissues = num_tissues
        self.in_channels = in_channels
        self.size_multiple = 2 ** (depth - 1)
        widths = [width * 2**level for level in range(depth)]
        self.encoder = nn.ModuleList(
            double_conv(c_in, c_out, norm)
            for c_in, c_out in zip([in_channels, *widths[:-1]], widths, strict=True)
        )
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(2 * c, c, 2, stride=2) for c in reversed(widths[:-1])
        )
        self.decoder = nn.ModuleList(double_conv(2 * c, c, norm) for c in reversed(widths[:-1]))
        self.head = nn.Conv2d(width, 2, 1)

    def forward(self, x: Tensor, tissue: Tensor) -> Tensor:
        self.check_input(x, tissue)
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, block, skip in zip(self.up, self.decoder, reversed(skips), strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)
