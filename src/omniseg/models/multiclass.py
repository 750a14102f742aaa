"""One network with a softmax over background + every tissue (TAL and Multi-class baselines).

The backbone is Omni-Seg's residual U-Net (:class:`~omniseg.models.resunet.ResUNet`, width ``w``)
whose 1x1 output conv gives ``num_tissues + 1`` logits per pixel: channel 0 = background, channel
``id + 1`` = tissue ``id``. The two baselines differ only in their training loss
(:mod:`omniseg.partial_labels`: ``"tal"`` marginal loss, ``"multiclass"`` naive partial labels).
A tissue ``k`` is predicted as ``p_k = softmax(logits)[k + 1] > 0.5`` (k against all other classes
merged).
"""

from __future__ import annotations

from torch import Tensor

from omniseg.models.registry import SegmentationModel, register_model
from omniseg.models.resunet import DOWNSAMPLE, ResUNet


@register_model("multiclass")
class MultiClass(SegmentationModel):
    """Residual U-Net with a ``num_tissues + 1``-way softmax output.

    Args:
        num_tissues: number of tissue classes (``len(TissueTable)``).
        width: base width ``w`` of the residual U-Net (32, as Omni-Seg).
        in_channels: input channels (3, RGB in [0, 1]).
        norm: ``"group"`` or ``"batch"`` (:func:`~omniseg.models.blocks.make_norm`).

    ``forward(x, tissue)``: ``x`` ``(B, 3, H, W)``, ``H`` and ``W`` multiples of 16 ->
    ``(B, num_tissues + 1, H, W)`` logits; ``tissue`` is checked, otherwise ignored.
    """

    output_kind = "multiclass"
    size_multiple = DOWNSAMPLE

    def __init__(
        self, num_tissues: int = 6, width: int = 32, in_channels: int = 3, norm: str = "group"
    ):
        super().__init__()
        if num_tissues < 1:
            raise ValueError(f"MultiClass needs num_tissues >= 1, got {num_tissues}")
        self.num_tissues = num_tissues
        self.in_channels = in_channels
        self.backbone = ResUNet(width, in_channels, num_tissues + 1, norm)

    def forward(self, x: Tensor, tissue: Tensor) -> Tensor:
        self.check_input(x, tissue)
        logits, _bottleneck = self.backbone(x)
        return logits
