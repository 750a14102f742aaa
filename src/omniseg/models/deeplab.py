"""DeepLabV3 (Chen et al. 2017) with a ResNet backbone written here (no torchvision).

The network of the Multi DeepLabV3 baseline: one binary network per tissue; the tissue id it is
queried with is checked and otherwise ignored.

Backbone (ResNet, He et al. 2016), stem then four layers of residual blocks, planes ``w, 2w, 4w,
8w`` (``w = width``, 64 in the standard ResNet), ``expansion`` 1 (basic blocks, depth 18/34) or 4
(bottleneck blocks, depth 50/101, stride on the 3x3 conv):

======== ============================= ====================== ======================
part     layers                        output stride 16       output stride 8
======== ============================= ====================== ======================
stem     7x7 conv s2, norm, ReLU,      1/4                    1/4
         3x3 max-pool s2
layer1   blocks x planes w             1/4                    1/4
layer2   planes 2w, first block s2     1/8                    1/8
layer3   planes 4w                     1/16 (stride 2)        1/8, dilation 2
layer4   planes 8w                     1/16, dilation 2       1/8, dilation 4
======== ============================= ====================== ======================

A layer whose stride is replaced by dilation runs its first block at the previous dilation and the
rest at the doubled one. ASPP on the ``8w * expansion`` features: a 1x1 conv, three 3x3 atrous
convs (rates 6, 12, 18 at output stride 16, doubled at 8) and image pooling (global average ->
1x1 conv with bias -> ReLU -> broadcast; no norm, so a batch of one trains), each ``A`` channels
(``aspp_channels``, 256 in the paper); concatenated -> 1x1 conv ``5A -> A``, norm, ReLU. Head:
3x3 conv ``A -> A``, norm, ReLU, 1x1 conv ``A -> 2`` (with bias), bilinear upsampling to the
input size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.models.blocks import window_cells, window_pool
from omniseg.models.registry import register_model
from omniseg.models.unet import TissueAgnosticModel, make_norm

#: depth -> (block type, blocks per layer).
RESNET_LAYOUTS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
OUTPUT_STRIDES = (8, 16)


def _conv3x3(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (norm, ReLU) plus shortcut, ReLU after the sum; ``expansion = 1``.

    Shapes: ``(B, c_in, H, W) -> (B, planes, H / stride, W / stride)``.
    """

    expansion = 1

    def __init__(
        self, c_in: int, planes: int, stride: int = 1, dilation: int = 1, norm: str = "batch"
    ):
        super().__init__()
        self.body = nn.Sequential(
            _conv3x3(c_in, planes, stride, dilation),
            make_norm(norm, planes),
            nn.ReLU(inplace=True),
            _conv3x3(planes, planes, 1, dilation),
            make_norm(norm, planes),
        )
        self.shortcut = _shortcut(c_in, planes * self.expansion, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 (reduce) -> 3x3 (stride, dilation) -> 1x1 (expand x4), norms and ReLUs, shortcut.

    Shapes: ``(B, c_in, H, W) -> (B, 4 planes, H / stride, W / stride)``.
    """

    expansion = 4

    def __init__(
        self, c_in: int, planes: int, stride: int = 1, dilation: int = 1, norm: str = "batch"
    ):
        super().__init__()
        c_out = planes * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(c_in, planes, 1, bias=False),
            make_norm(norm, planes),
            nn.ReLU(inplace=True),
            _conv3x3(planes, planes, stride, dilation),
            make_norm(norm, planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, c_out, 1, bias=False),
            make_norm(norm, c_out),
        )
        self.shortcut = _shortcut(c_in, c_out, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def _shortcut(c_in: int, c_out: int, stride: int, norm: str) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), make_norm(norm, c_out))


class ResNet(nn.Module):
    """Dilated ResNet feature extractor.

    Args:
        depth: 18, 34, 50 or 101.
        width: planes of layer1 (64 in the standard ResNet).
        output_stride: 8 or 16: resolution of the output relative to the input.
        in_channels: input channels.
        norm: ``"batch"`` or ``"group"``.

    Shapes: ``(B, in_channels, H, W) -> (B, out_channels, H / os, W / os)`` with
    ``out_channels = 8 * width * expansion``.
    """

    def __init__(
        self,
        depth: int = 50,
        width: int = 64,
        output_stride: int = 16,
        in_channels: int = 3,
        norm: str = "batch",
    ):
        super().__init__()
        if depth not in RESNET_LAYOUTS:
            raise ValueError(
                f"ResNet depth must be one of {', '.join(map(str, RESNET_LAYOUTS))}, got {depth}"
            )
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(
                f"output_stride must be one of {', '.join(map(str, OUTPUT_STRIDES))}, "
                f"got {output_stride}"
            )
        kind, counts = RESNET_LAYOUTS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 7, 2, padding=3, bias=False),
            make_norm(norm, width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, padding=1),
        )
        layers, c_in, stride_now, dilation = [], width, 4, 1
        for i, n_blocks in enumerate(counts):
            planes = width * 2**i
            stride = 1 if i == 0 else 2
            first_dilation = dilation
            if stride == 2 and stride_now * 2 > output_stride:
                dilation *= 2  # keep the resolution, widen the receptive field instead
                stride = 1
                first_dilation = dilation // 2
            stride_now *= stride
            blocks = [block(c_in, planes, stride, first_dilation, norm)]
            c_in = planes * block.expansion
            blocks += [block(c_in, planes, 1, dilation, norm) for _ in range(n_blocks - 1)]
            layers.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*layers)
        self.out_channels = c_in
        self.output_stride = output_stride

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(self.stem(x))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: ``(B, c_in, h, w) -> (B, channels, h, w)``."""

    def __init__(self, c_in: int, channels: int, rates: tuple[int, ...], norm: str = "batch"):
        super().__init__()

        def branch(conv: nn.Conv2d) -> nn.Sequential:
            return nn.Sequential(conv, make_norm(norm, channels), nn.ReLU(inplace=True))

        self.branches = nn.ModuleList(
            [branch(nn.Conv2d(c_in, channels, 1, bias=False))]
            + [branch(_conv3x3(c_in, channels, 1, r)) for r in rates]
        )
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(c_in, channels, 1), nn.ReLU(inplace=True)
        )
        self.project = branch(nn.Conv2d(channels * (len(rates) + 2), channels, 1, bias=False))

    def forward(self, x: Tensor, cells: int | None = None) -> Tensor:
        """``cells``: the image pooling averages the ``cells x cells`` window around each
        position instead of the whole input (:func:`~omniseg.models.blocks.window_pool`)."""
        outs = [b(x) for b in self.branches]
        local = window_pool(x, cells, "mean")
        if local is None:
            outs.append(self.pool(x).expand(-1, -1, *x.shape[2:]))
        else:  # the 1x1 conv and ReLU act on each position's window mean
            outs.append(self.pool[1:](local))
        return self.project(torch.cat(outs, dim=1))


@register_model("deeplabv3")
class DeepLabV3(TissueAgnosticModel):
    """Binary DeepLabV3 with a dilated ResNet backbone.

    Args:
        num_tissues: size of the tissue registry (ids are checked, otherwise ignored).
        depth: ResNet depth, 18/34 (basic blocks) or 50/101 (bottleneck); 50 in the paper.
        width: planes of the first ResNet layer (64 in the standard ResNet).
        output_stride: 8 or 16.
        aspp_channels: ASPP and head channels (None: ``4 * width``, 256 at width 64).
        in_channels: input channels (3, RGB in [0, 1]).
        norm: ``"batch"`` (standard) or ``"group"``.

    ``forward(x, tissue)``: ``x`` ``(B, 3, H, W)``, ``H`` and ``W`` multiples of 16 ->
    ``(B, 2, H, W)`` logits, the same whatever ``tissue`` is.
    """

    size_multiple = 16

    def __init__(
        self,
        num_tissues: int = 6,
        depth: int = 50,
        width: int = 64,
        output_stride: int = 16,
        aspp_channels: int | None = None,
        in_channels: int = 3,
        norm: str = "batch",
    ):
        super().__init__()
        if num_tissues < 1 or width < 1 or in_channels < 1:
            raise ValueError(
                f"DeepLabV3 needs num_tissues, width and in_channels >= 1, got "
                f"num_tissues={num_tissues}, width={width}, in_channels={in_channels}"
            )
        channels = 4 * width if aspp_channels is None else aspp_channels
        if channels < 1:
            raise ValueError(f"DeepLabV3 needs aspp_channels >= 1, got {aspp_channels}")
        self.num_tissues = num_tissues
        self.in_channels = in_channels
        self.backbone = ResNet(depth, width, output_stride, in_channels, norm)
        rates = tuple(r * 16 // output_stride for r in (6, 12, 18))
        self.aspp = ASPP(self.backbone.out_channels, channels, rates, norm)
        self.head = nn.Sequential(
            _conv3x3(channels, channels),
            make_norm(norm, channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, 2, 1),
        )

    def forward(self, x: Tensor, tissue: Tensor) -> Tensor:
        self.check_input(x, tissue)
        cells = window_cells(self.context, self.backbone.output_stride)
        logits = self.head(self.aspp(self.backbone(x), cells))
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)
