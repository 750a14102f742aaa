"""Med3D-style multi-head network (Chen et al. 2019): a shared encoder, one decoder per tissue.

The encoder is Omni-Seg's residual U-Net encoder (:mod:`omniseg.models.resunet`: stem, five
stages, bottleneck fusion); each tissue owns a full decoder (four residual levels, as in
:class:`~omniseg.models.resunet.ResUNet`) and a binary head (GN -> ReLU -> 1x1 conv ``w -> 2``).
A batch of tissue ``k`` runs the encoder and decoder ``k`` only, so a training step updates the
shared encoder and head ``k`` only (the other decoders get no gradient); a mixed batch is grouped
by tissue and every group runs its own decoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.models.blocks import ResidualBlock, make_norm, norm_act_conv
from omniseg.models.registry import SegmentationModel, register_model
from omniseg.models.resunet import DOWNSAMPLE, ENCODER_STAGES


class ResUNetEncoder(nn.Module):
    """The encoder half of the residual U-Net (stem, :data:`ENCODER_STAGES`, fusion).

    Shapes: ``(B, in_channels, H, W)`` -> ``(skips, bottleneck)``: the outputs of stages 1-4
    (``w @ 1/1, 2w @ 1/2, 4w @ 1/4, 8w @ 1/8``) and the fused stage-5 output ``(B, 8w, H/16,
    W/16)``.
    """

    def __init__(self, width: int = 32, in_channels: int = 3, norm: str = "group"):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        stages, c_prev = [], width
        for i, (n_blocks, mult) in enumerate(ENCODER_STAGES):
            c = mult * width
            blocks = [ResidualBlock(c_prev, c, 1 if i == 0 else 2, norm)]
            blocks += [ResidualBlock(c, c, norm=norm) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            c_prev = c
        self.stages = nn.ModuleList(stages)
        self.fusion = norm_act_conv(c_prev, c_prev, 1, norm=norm)

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips[:-1], self.fusion(skips[-1])


class ResUNetDecoder(nn.Module):
    """One decoder of the residual U-Net plus a 1x1 head (``out_channels`` logits).

    Shapes: ``(skips, bottleneck)`` from :class:`ResUNetEncoder` -> ``(B, out_channels, H, W)``.
    """

    def __init__(self, width: int = 32, out_channels: int = 2, norm: str = "group"):
        super().__init__()
        skip_widths = [mult * width for _, mult in ENCODER_STAGES[:-1]]  # w, 2w, 4w, 8w
        targets = [width, *skip_widths[:-1]]  # w, w, 2w, 4w
        self.blocks = nn.ModuleList(
            ResidualBlock(c_skip, c_out, norm=norm)
            for c_skip, c_out in zip(reversed(skip_widths), reversed(targets), strict=True)
        )
        self.head = nn.Sequential(
            make_norm(norm, width), nn.ReLU(inplace=True), nn.Conv2d(width, out_channels, 1)
        )

    def forward(self, skips: Sequence[Tensor], bottleneck: Tensor) -> Tensor:
        x = bottleneck
        for block, skip in zip(self.blocks, reversed(skips), strict=True):
            x = block(F.interpolate(x, scale_factor=2.0, mode="nearest") + skip)
        return self.head(x)


@register_model("multihead")
class MultiHead(SegmentationModel):
    """Shared residual U-Net encoder, one decoder + binary head per tissue.

    Args:
        num_tissues: number of decoders (``len(TissueTable)``).
        width: base width ``w`` of the encoder and of every decoder (32 as Omni-Seg).
        in_channels: input channels (3, RGB in [0, 1]).
        norm: ``"group"`` or ``"batch"`` (:func:`~omniseg.models.blocks.make_norm`).

    ``forward(x, tissue)``: ``x`` ``(B, 3, H, W)``, ``H`` and ``W`` multiples of 16; ``tissue``
    ``(B,)`` int64 ids -> ``(B, 2, H, W)`` logits, sample ``b`` from decoder ``tissue[b]``.
    """

    output_kind = "binary"
    size_multiple = DOWNSAMPLE

    def __init__(
        self, num_tissues: int = 6, width: int = 32, in_channels: int = 3, norm: str = "group"
    ):
        super().__init__()
        if num_tissues < 1 or width < 1 or in_channels < 1:
            raise ValueError(
                f"MultiHead needs num_tissues, width and in_channels >= 1, got "
                f"num_tissues={num_tissues}, width={width}, in_channels={in_channels}"
            )
        self.num_tissues = num_tissues
        self.in_channels = in_channels
        self.encoder = ResUNetEncoder(width, in_channels, norm)
        self.decoders = nn.ModuleList(ResUNetDecoder(width, 2, norm) for _ in range(num_tissues))

    def forward(self, x: Tensor, tissue: Tensor) -> Tensor:
        self.check_input(x, tissue)
        skips, bottleneck = self.encoder(x)
        present = tissue.unique().tolist()
        if len(present) == 1:
            return self.decoders[present[0]](skips, bottleneck)
        parts, order = [], []
        for t in present:
            idx = (tissue == t).nonzero()[:, 0]
            parts.append(self.decoders[t]([s[idx] for s in skips], bottleneck[idx]))
            order.append(idx)
        inverse = torch.argsort(torch.cat(order))
        return torch.cat(parts)[inverse]

    def predict_proba(self, x: Tensor, tissues: Sequence[int]) -> Tensor:
        """Encoder once, then every requested decoder on the whole batch.

        Returns:
            ``(B, T, H, W)`` foreground probabilities (softmax channel 1), in ``tissues`` order.
        """
        tissues = [int(t) for t in tissues]
        self.check_input(x)
        self._check_ids(tissues)
        if not tissues:
            return x.new_zeros((x.shape[0], 0, *x.shape[2:]))
        skips, bottleneck = self.encoder(x)
        return torch.stack(
            [self.decoders[t](skips, bottleneck).softmax(dim=1)[:, 1] for t in tissues], dim=1
        )
