"""Med3D-style multi-head network (Chen et al. 2019): a shared encoder, one decoder per tissue.

The encoder is Omni-Seg's residual U-Net encoder (:class:`~omniseg.models.resunet.ResUNetEncoder`:
stem, five stages, bottleneck fusion); each tissue owns a full decoder with a binary head
(:class:`~omniseg.models.resunet.ResUNetDecoder`, ``w -> 2``), the halves Omni-Seg's
:class:`~omniseg.models.resunet.ResUNet` is made of.
A batch of tissue ``k`` runs the encoder and decoder ``k`` only, so a training step updates the
shared encoder and head ``k`` only (the other decoders get no gradient); a mixed batch is grouped
by tissue and every group runs its own decoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from omniseg.models.registry import SegmentationModel, register_model
from omniseg.models.resunet import DOWNSAMPLE, ResUNetDecoder, ResUNetEncoder


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
