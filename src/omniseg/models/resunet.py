"""The 2D residual U-Net backbone of Omni-Seg (tissue-independent).

Encoder (blocks x channels @ resolution, relative to the input):

====== ======== ========== ==========
stage  blocks   channels   resolution
====== ======== ========== ==========
stem   1 conv   w          1/1
1      1        w          1/1
2      2        2w         1/2
3      2        4w         1/4
4      2        8w         1/8
5      2        8w         1/16
====== ======== ========== ==========

The first block of stages 2-5 has stride 2. Stage 5 is followed by the bottleneck fusion
(GN -> ReLU -> 1x1 conv, 8w -> 8w).

Decoder skip wiring (each level: nearest upsample x2, add the skip of that resolution, one
residual block); the skip of a level is the output of the encoder stage at the same resolution,
whose width equals the upsampled tensor's width, so the sum is well defined:

======= =================== ======================= ===============
level   upsampled input     skip (encoder stage)    residual block
======= =================== ======================= ===============
1       8w @ 1/8            stage 4: 8w @ 1/8       8w -> 4w
2       4w @ 1/4            stage 3: 4w @ 1/4       4w -> 2w
3       2w @ 1/2            stage 2: 2w @ 1/2       2w -> w
4       w  @ 1/1            stage 1: w  @ 1/1       w  -> w
======= =================== ======================= ===============

Then GN -> ReLU -> 1x1 conv ``w -> out_channels`` (with bias): the per-pixel features the dynamic
heads read.

Two options of the decoder are not in the paper (:data:`DECODER_SKIPS`, :data:`DECODER_UPSAMPLES`):
``skip="concat"`` concatenates the skip to the upsampled tensor (as the classic U-Net does), so
each level's residual block reads ``2c`` channels and keeps the encoder's fine detail apart from
the coarse context instead of summing the two; ``upsample="bilinear"`` interpolates instead of
repeating each coarse value over a 2 x 2 block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.models.blocks import ResidualBlock, make_norm, norm_act_conv

#: (number of residual blocks, channel multiplier of w) per encoder stage; stages 2.. have stride 2.
ENCODER_STAGES: tuple[tuple[int, int], ...] = ((1, 1), (2, 2), (2, 4), (2, 8), (2, 8))

#: Input height and width must be multiples of this (four stride-2 stages).
DOWNSAMPLE = 2 ** (len(ENCODER_STAGES) - 1)

#: How each decoder level joins the skip: ``"add"`` (the paper) or ``"concat"``.
DECODER_SKIPS = ("add", "concat")

#: How each decoder level upsamples: ``"nearest"`` (the paper) or ``"bilinear"``.
DECODER_UPSAMPLES = ("nearest", "bilinear")


def check_decoder_options(skip: str, upsample: str) -> None:
    """Raise ``ValueError`` naming an unknown decoder ``skip`` or ``upsample``."""
    if skip not in DECODER_SKIPS:
        raise ValueError(f"unknown decoder skip {skip!r}; known: {', '.join(DECODER_SKIPS)}")
    if upsample not in DECODER_UPSAMPLES:
        raise ValueError(
            f"unknown decoder upsample {upsample!r}; known: {', '.join(DECODER_UPSAMPLES)}"
        )


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
        #: Channels of the bottleneck (``8w``).
        self.out_channels = c_prev
        self.fusion = norm_act_conv(c_prev, c_prev, 1, norm=norm)

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips[:-1], self.fusion(skips[-1])


class ResUNetDecoder(nn.Module):
    """The decoder half of the residual U-Net (the skip wiring above) and its output layer,
    GN -> ReLU -> 1x1 conv ``w -> out_channels``.

    Args:
        skip: ``"add"`` (the paper) or ``"concat"`` (:data:`DECODER_SKIPS`).
        upsample: ``"nearest"`` (the paper) or ``"bilinear"`` (:data:`DECODER_UPSAMPLES`).

    Shapes: ``(skips, bottleneck)`` from :class:`ResUNetEncoder` -> ``(B, out_channels, H, W)``.
    """

    def __init__(
        self,
        width: int = 32,
        out_channels: int = 2,
        norm: str = "group",
        skip: str = "add",
        upsample: str = "nearest",
    ):
        super().__init__()
        check_decoder_options(skip, upsample)
        self.skip, self.upsample = skip, upsample
        # Level k consumes the skip of encoder stage (n-1-k) and ends at the width of the skip
        # one level finer (the last level keeps w).
        skip_widths = [mult * width for _, mult in ENCODER_STAGES[:-1]]  # w, 2w, 4w, 8w
        targets = [width, *skip_widths[:-1]]  # w, w, 2w, 4w
        joined = 2 if skip == "concat" else 1
        self.blocks = nn.ModuleList(
            ResidualBlock(joined * c_skip, c_out, norm=norm)
            for c_skip, c_out in zip(reversed(skip_widths), reversed(targets), strict=True)
        )
        self.head = nn.Sequential(
            make_norm(norm, width), nn.ReLU(inplace=True), nn.Conv2d(width, out_channels, 1)
        )

    def forward(self, skips: Sequence[Tensor], bottleneck: Tensor) -> Tensor:
        x = bottleneck
        for block, skip in zip(self.blocks, reversed(skips), strict=True):
            x = F.interpolate(x, scale_factor=2.0, mode=self.upsample)
            x = block(torch.cat([x, skip], dim=1) if self.skip == "concat" else x + skip)
        return self.head(x)


#: Parameter names of the residual U-Net before it was composed of encoder and decoder (files
#: written then still load): old prefix -> new prefix, relative to the ResUNet.
_OLD_KEYS = (
    ("stem.", "encoder.stem."),
    ("encoder.", "encoder.stages."),
    ("fusion.", "encoder.fusion."),
    ("decoder.", "decoder.blocks."),
    ("out.", "decoder.head."),
)


class ResUNet(nn.Module):
    """Residual U-Net backbone: :class:`ResUNetEncoder` and one :class:`ResUNetDecoder`.

    Args:
        width: base width ``w`` (32 in the paper).
        in_channels: input channels (3 for RGB).
        out_channels: channels of the full-resolution output features (8 for Omni-Seg).
        norm: ``"group"`` (the paper) or ``"batch"`` (:func:`~omniseg.models.blocks.make_norm`).
        decoder_skip, decoder_upsample: the decoder's ``skip`` and ``upsample``
            (:class:`ResUNetDecoder`; the paper: ``"add"``, ``"nearest"``).

    Shapes: ``forward(x)`` with ``x`` ``(B, in_channels, H, W)``, ``H`` and ``W`` multiples of 16,
    returns ``(features (B, out_channels, H, W), bottleneck (B, 8w, H/16, W/16))``.
    """

    def __init__(
        self,
        width: int = 32,
        in_channels: int = 3,
        out_channels: int = 8,
        norm: str = "group",
        decoder_skip: str = "add",
        decoder_upsample: str = "nearest",
    ):
        super().__init__()
        if width < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"ResUNet needs positive sizes, got width={width}, in_channels={in_channels}, "
                f"out_channels={out_channels}"
            )
        self.width = width
        self.encoder = ResUNetEncoder(width, in_channels, norm)
        self.bottleneck_channels = self.encoder.out_channels
        self.decoder = ResUNetDecoder(width, out_channels, norm, decoder_skip, decoder_upsample)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        skips, bottleneck = self.encoder(x)
        return self.decoder(skips, bottleneck), bottleneck

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Files from before the split into encoder and decoder name the parameters
        # stem/encoder.N/fusion/decoder.N/out: rename them in place.
        if f"{prefix}stem.weight" in state_dict:
            for key in [k for k in state_dict if k.startswith(prefix)]:
                rest = key[len(prefix) :]
                for old, new in _OLD_KEYS:
                    if rest.startswith(old):
                        state_dict[prefix + new + rest[len(old) :]] = state_dict.pop(key)
                        break
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
