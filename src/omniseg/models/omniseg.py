"""Omni-Seg: residual U-Net + tissue-conditioned controller + parameter-free dynamic head.

The tissue code enters only at the controller, so the backbone runs once per image and every
tissue's head can be applied to the same features (:meth:`OmniSeg.predict_proba`).

Dynamic head parameter layout (per head, ``c = head_channels``, ``2 (c + 1)^2`` numbers, 162 for
``c = 8``): weights first, then biases, each weight row-major ``(out, in)``::

    [ w1 (c*c) | w2 (c*c) | w3 (2*c) | b1 (c) | b2 (c) | b3 (2) ]

The head is ``1x1 conv c->c, ReLU, 1x1 conv c->c, ReLU, 1x1 conv c->2``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from omniseg.models.blocks import condition_norms, make_norm, window_cells, window_pool
from omniseg.models.registry import SegmentationModel, register_model
from omniseg.models.resunet import DOWNSAMPLE, ResUNet

#: Output channels of every head (background, foreground logits).
NUM_CLASSES = 2

#: Implementations of the batched heads; "bmm" measured faster on CPU (see bench/model.py).
HEAD_IMPLS = ("bmm", "conv")


def head_param_sizes(head_channels: int = 8) -> tuple[list[int], list[int]]:
    """Sizes of the head's (weights, biases): ``([c*c, c*c, 2*c], [c, c, 2])``."""
    c = head_channels
    return [c * c, c * c, NUM_CLASSES * c], [c, c, NUM_CLASSES]


def num_head_params(head_channels: int = 8) -> int:
    """Numbers the controller emits per head: ``2 (c + 1)^2`` (162 for ``c = 8``)."""
    w, b = head_param_sizes(head_channels)
    return sum(w) + sum(b)


def _split_params(params: Tensor, c: int) -> tuple[list[Tensor], list[Tensor]]:
    """``params`` ``(..., P)`` -> weights ``(..., out, in)`` and biases ``(..., out)``."""
    w_sizes, b_sizes = head_param_sizes(c)
    parts = params.split(w_sizes + b_sizes, dim=-1)
    outs = [c, c, NUM_CLASSES]
    lead = params.shape[:-1]
    weights = [p.reshape(*lead, o, c) for p, o in zip(parts[:3], outs, strict=True)]
    return weights, list(parts[3:])


#: Initialisations of the generated head parameters (see :class:`OmniSeg`).
HEAD_INITS = ("he", "default")


def _he_head_params(c: int) -> Tensor:
    """One head's parameters with He-normal weights (std ``sqrt(2 / fan_in)``, fan_in = ``c``)
    and zero biases, in the layout of :func:`head_param_sizes`."""
    w_sizes, b_sizes = head_param_sizes(c)
    std = math.sqrt(2.0 / c)
    weights = [torch.randn(n) * std for n in w_sizes]
    return torch.cat(weights + [torch.zeros(n) for n in b_sizes])


def _act(x: Tensor, negative_slope: float) -> Tensor:
    """The head's hidden activation, in place: ReLU (0, the paper) or a leaky ReLU."""
    return x.relu_() if negative_slope == 0 else F.leaky_relu_(x, negative_slope)


def _hidden_bmm(
    features: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], negative_slope: float
) -> tuple[Tensor, Tensor]:
    """The two hidden layers of ``T`` heads per sample as batched matrix products: features
    ``(B, c, H, W)``, weights ``(B, T, c, c)``, biases ``(B, T, c)`` -> layer 1 ``(B, T*c, HW)``
    and layer 2 ``(B*T, c, HW)``, after their activation."""
    b, c, h, w = features.shape
    (w1, w2), (b1, b2) = weights, biases
    t = w1.shape[1]
    f = features.reshape(b, c, h * w)
    # Layer 1 reads the shared features of each sample: (B, T*c, c) @ (B, c, HW).
    h1 = _act(torch.baddbmm(b1.reshape(b, t * c, 1), w1.reshape(b, t * c, c), f), negative_slope)
    x = h1.reshape(b * t, c, h * w)
    h2 = _act(torch.baddbmm(b2.reshape(b * t, c, 1), w2.reshape(b * t, c, c), x), negative_slope)
    return h1, h2


def run_heads(
    features: Tensor, params: Tensor, impl: str = "bmm", negative_slope: float = 0.0
) -> Tensor:
    """Apply ``T`` dynamic heads per sample, all samples and heads in one batched op per layer.

    Args:
        features: ``(B, c, H, W)`` decoder features.
        params: ``(B, T, 2 (c + 1)^2)`` head parameters; head ``(b, t)`` reads sample ``b``.
        impl: ``"bmm"`` (batched matrix products) or ``"conv"`` (grouped 1x1 convolutions,
            features reshaped to ``(1, B*c, H, W)``, ``groups = B`` then ``B*T``).
        negative_slope: of the two hidden activations: 0 is ReLU (the paper), else a leaky ReLU.

    Returns:
        ``(B, T, 2, H, W)`` logits.
    """
    b, c, h, w = features.shape
    if params.ndim != 3 or params.shape[0] != b or params.shape[2] != num_head_params(c):
        raise ValueError(
            f"head params must be ({b}, T, {num_head_params(c)}) for features "
            f"{tuple(features.shape)}, got {tuple(params.shape)}"
        )
    t = params.shape[1]
    (w1, w2, w3), (b1, b2, b3) = _split_params(params, c)
    if impl == "bmm":
        _, x = _hidden_bmm(features, (w1, w2), (b1, b2), negative_slope)
        x = torch.baddbmm(b3.reshape(b * t, NUM_CLASSES, 1), w3.reshape(b * t, NUM_CLASSES, c), x)
    elif impl == "conv":
        x = features.reshape(1, b * c, h, w)
        x = _act(
            F.conv2d(x, w1.reshape(b * t * c, c, 1, 1), b1.reshape(-1), groups=b), negative_slope
        )
        x = _act(
            F.conv2d(x, w2.reshape(b * t * c, c, 1, 1), b2.reshape(-1), groups=b * t),
            negative_slope,
        )
        x = F.conv2d(x, w3.reshape(b * t * NUM_CLASSES, c, 1, 1), b3.reshape(-1), groups=b * t)
    else:
        raise ValueError(f"unknown head implementation {impl!r}; known: {', '.join(HEAD_IMPLS)}")
    return x.reshape(b, t, NUM_CLASSES, h, w)


def head_hidden(
    features: Tensor, params: Tensor, negative_slope: float = 0.0
) -> tuple[Tensor, Tensor]:
    """The two hidden layers of one head per sample, after their activation (diagnostics:
    ``bench/head_units.py``): features ``(B, c, H, W)``, params ``(B, P)`` -> two
    ``(B, c, H, W)``."""
    (w1, w2, _), (b1, b2, _) = _split_params(params[:, None], features.shape[1])
    h1, h2 = _hidden_bmm(features, (w1, w2), (b1, b2), negative_slope)
    return h1.reshape(features.shape), h2.reshape(features.shape)


def run_heads_loop(features: Tensor, params: Tensor, negative_slope: float = 0.0) -> Tensor:
    """Reference for :func:`run_heads`: one plain conv per sample and head (slow, for tests)."""
    b, c = features.shape[:2]
    (w1, w2, w3), (b1, b2, b3) = _split_params(params, c)
    out = []
    for i in range(b):
        per_head = []
        for j in range(params.shape[1]):
            x = features[i : i + 1]
            x = F.leaky_relu(F.conv2d(x, w1[i, j, :, :, None, None], b1[i, j]), negative_slope)
            x = F.leaky_relu(F.conv2d(x, w2[i, j, :, :, None, None], b2[i, j]), negative_slope)
            per_head.append(F.conv2d(x, w3[i, j, :, :, None, None], b3[i, j])[0])
        out.append(torch.stack(per_head))
    return torch.stack(out)


@register_model("omniseg")
class OmniSeg(SegmentationModel):
    """Omni-Seg (Deng et al., MIDL 2022): one dynamic network for all tissues.

    Args:
        num_tissues: length of the one-hot tissue code (``len(TissueTable)``).
        width: base width ``w`` of the residual U-Net (32 in the paper).
        in_channels: input channels (3, RGB in [0, 1]).
        head_channels: channels of the decoder output and of the dynamic head (8).
        feature_init_scale: the controller's weights on the pooled image features are scaled by
            this at initialisation (its weights on the tissue code are not): 1.0 is PyTorch's
            default init (the paper); 0.1 makes the heads tissue-specific from the first steps.
        head_init: ``"he"``: the controller's bias is drawn so that the generated head weights
            start He-normal (std ``sqrt(2 / fan_in)``) and the head biases at 0, so the three
            chained layers pass the features on with unit gain; ``"default"``: PyTorch's
            default init of the controller (the paper), whose generated weights have a std of
            ~0.05 and give the head a near-zero gain.
        code_scale: the one-hot tissue code is multiplied by this before the controller, and the
            controller's weights on it divided by it at initialisation (the same initial
            output): the code's weights then move ``code_scale`` times faster relative to
            the image-feature weights, which is what separates tissues that look alike (distal
            and proximal tubules) in a short schedule. 1.0 is the paper.
        feature_scale: the pooled image features are multiplied by this before the controller,
            and the controller's weights on them divided by it at initialisation (the same
            initial output). The pooled features are means of ReLU outputs, all positive, so
            under Adam (every weight steps by about the learning rate) the ``8w`` weights of
            one generated number move together and the number moves ``8w`` times the rate per
            step: the generated heads jitter from step to step. ``1 / (8w)`` makes the image
            path move the heads about as fast as the controller's bias does. 1.0 is the paper.
        norm: normalisation of the backbone and the controller's input: ``"group"`` (the
            paper's GroupNorm) or ``"batch"`` (:func:`~omniseg.models.blocks.make_norm`).
        image_conditioning: the controller reads the image's pooled bottleneck features beside
            the tissue code (the paper). ``False``: it reads the code only, so each tissue has
            one head for every image: a head whose parameters follow the image can flip a whole
            patch (or slide tile) to foreground when its pooled features stray from what it
            was trained on, which shows as square blocks of one label on a slide.
        head_prior: foreground probability every generated head starts at, set through the
            controller's bias for the last layer (background 0, foreground ``logit(prior)``),
            as in RetinaNet's prior initialisation: a head then starts near-empty and
            learns where its tissue is, instead of unlearning false positives over the whole
            image. ``None``: the last-layer biases of ``head_init`` (about 0.5, the paper).
        presence: a class-aware presence gate (not in the paper): a linear read-out per tissue
            of the image's mean- and max-pooled bottleneck features gives a logit ``s`` that the
            tissue is in the image at all, and the head's foreground odds are multiplied by
            ``sigmoid(s)`` (foreground logit ``+ logsigmoid(s)``) at inference. Trained with a
            per-image binary cross-entropy on "the mask is not empty" beside the heads' loss on
            the logits before the gate (:meth:`forward_with_presence`,
            :func:`omniseg.partial_labels.binary_loss`): one decision per image, with the full
            weight of a patch, where a pixel loss spreads a patch without its tissue over its
            pixels. Off: the paper's network.
        head_negative_slope: slope of the dynamic head's two hidden activations below 0: 0 is
            the paper's ReLU. With 8 hidden units per layer and one controller bias shared by
            every tissue, a ReLU unit that goes negative for all pixels is dead for every
            tissue at once and gets no gradient to come back (on the demo's default model 1-5
            of the second layer's 8 units fire on fewer than 1% of a tissue's pixels,
            ``bench/head_units.py``); a leaky unit keeps a gradient.
        decoder_conditioning: the decoder is conditioned on the tissue as well (not in the
            paper): each of its normalisation layers is followed by a per-tissue scale and
            shift per channel (:class:`~omniseg.models.blocks.TissueNorm`, class-conditional
            normalisation: ``76w`` numbers per tissue over its 12 norms, 0 at initialisation,
            7,296 at the demo's ``w = 16`` and 6 tissues), so the 8 features
            the heads read can differ by tissue. The encoder still runs once per image; the
            decoder runs once per requested tissue at inference (:meth:`heads_logits`).
        decoder_code_scale: the per-tissue scales and shifts are multiplied by this in the
            forward pass, so under Adam they move this many times faster than the
            other weights, as ``code_scale`` does for the controller's code weights.
        decoder_skip, decoder_upsample: how the backbone's decoder joins each skip (``"add"``,
            the paper, or ``"concat"``) and upsamples (``"nearest"``, the paper, or
            ``"bilinear"``); :class:`~omniseg.models.resunet.ResUNetDecoder`.

    ``forward(x, tissue)``: ``x`` ``(B, 3, H, W)``, ``H`` and ``W`` multiples of 16; ``tissue``
    ``(B,)`` int64 ids -> ``(B, 2, H, W)`` logits.

    Inference on inputs larger than the training patch (:meth:`predict_proba`,
    :meth:`heads_logits` on slide tiles): with :attr:`context` set (``load_model`` sets it to
    the checkpoint's patch size), every 16-px block gets the heads and gate generated from the
    ``context``-pixel window around it instead of from the whole input.
    """

    output_kind = "binary"
    size_multiple = DOWNSAMPLE
    #: Batched head implementation, one of :data:`HEAD_IMPLS`.
    head_impl = "bmm"

    def __init__(
        self,
        num_tissues: int = 6,
        width: int = 32,
        in_channels: int = 3,
        head_channels: int = 8,
        feature_init_scale: float = 0.1,
        head_init: str = "he",
        code_scale: float = 10.0,
        feature_scale: float = 1.0,
        norm: str = "group",
        image_conditioning: bool = True,
        head_prior: float | None = None,
        presence: bool = False,
        head_negative_slope: float = 0.0,
        decoder_conditioning: bool = False,
        decoder_code_scale: float = 1.0,
        decoder_skip: str = "add",
        decoder_upsample: str = "nearest",
    ):
        super().__init__()
        if num_tissues < 1 or head_channels < 1:
            raise ValueError(
                f"OmniSeg needs num_tissues >= 1 and head_channels >= 1, got "
                f"num_tissues={num_tissues}, head_channels={head_channels}"
            )
        if head_init not in HEAD_INITS:
            raise ValueError(
                f"OmniSeg: unknown head_init {head_init!r}; known: {', '.join(HEAD_INITS)}"
            )
        scales = (feature_init_scale, code_scale, feature_scale, decoder_code_scale)
        if not all(v > 0 for v in scales):
            raise ValueError(
                "OmniSeg: feature_init_scale, code_scale, feature_scale and decoder_code_scale "
                f"must be > 0, got {', '.join(str(v) for v in scales)}"
            )
        if not 0 <= head_negative_slope < 1:
            raise ValueError(
                f"OmniSeg: head_negative_slope must be in [0, 1), got {head_negative_slope}"
            )
        if head_prior is not None and not 0 < head_prior < 1:
            raise ValueError(f"OmniSeg: head_prior must be in (0, 1) or None, got {head_prior}")
        self.num_tissues = num_tissues
        self.in_channels = in_channels
        self.head_channels = head_channels
        self.code_scale = float(code_scale)
        self.feature_scale = float(feature_scale)
        self.image_conditioning = bool(image_conditioning)
        self.head_negative_slope = float(head_negative_slope)
        self.backbone = ResUNet(
            width, in_channels, head_channels, norm, decoder_skip, decoder_upsample
        )
        # the decoder's norms, each with a per-tissue affine (decoder_conditioning only)
        self._tissue_norms = (
            condition_norms(self.backbone.decoder, num_tissues, decoder_code_scale)
            if decoder_conditioning
            else []
        )
        pooled = self.backbone.bottleneck_channels
        c = pooled if image_conditioning else 0
        self.controller_norm = (
            nn.Sequential(make_norm(norm, pooled), nn.ReLU())
            if image_conditioning or presence
            else nn.Identity()
        )
        # per tissue: a logit that the tissue is in the image, from mean- and max-pooled features
        self.presence = nn.Linear(2 * pooled, num_tissues) if presence else None
        self.controller = nn.Conv2d(c + num_tissues, num_head_params(head_channels), 1)
        # Conditioning first: at initialisation the heads depend mostly on the tissue code and
        # only a little on the image, so tissues whose labels conflict on the same appearance
        # (distal vs proximal tubule at 10x) get distinct heads from the first steps. With the
        # default init, the image-feature part dominates and short schedules stall on them
        # (bench/training_variants.py measures it).
        with torch.no_grad():
            self.controller.weight[:, :c] *= feature_init_scale / self.feature_scale
            self.controller.weight[:, c:] /= self.code_scale
            if head_init == "he":
                self.controller.bias.copy_(_he_head_params(head_channels))
            if head_prior is not None:  # b3 = (background, foreground): the last two numbers
                self.controller.bias[-NUM_CLASSES:] = torch.tensor(
                    [0.0, math.log(head_prior / (1 - head_prior))]
                )

    # -- pieces ---------------------------------------------------------------------------------
    def encode(self, x: Tensor, tissue: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The backbone: tissue-independent, unless the decoder is conditioned on the tissue
        (``decoder_conditioning``), which then needs the ids ``tissue`` ``(B,)``.

        Returns:
            ``(features (B, 8, H, W), bottleneck (B, 8w, H/16, W/16))``.
        """
        self.check_input(x)
        if not self._tissue_norms:
            return self.backbone(x)
        if tissue is None:
            raise ValueError(
                "this OmniSeg's decoder is conditioned on the tissue (decoder_conditioning): "
                "encode needs the samples' tissue ids"
            )
        skips, bottleneck = self.backbone.encoder(x)
        return self._decode(skips, bottleneck, tissue), bottleneck

    def _decode(self, skips: Sequence[Tensor], bottleneck: Tensor, tissue: Tensor) -> Tensor:
        """The conditioned decoder on the encoder's outputs for samples of tissues ``tissue``."""
        for layer in self._tissue_norms:
            layer.tissue = tissue
        try:
            return self.backbone.decoder(skips, bottleneck)
        finally:
            for layer in self._tissue_norms:
                layer.tissue = None

    @property
    def has_presence(self) -> bool:
        """Whether this network has the presence gate (``presence=True``)."""
        return self.presence is not None

    def _controller_input(self, mean: Tensor) -> Tensor:
        """``mean``: the mean-pooled :attr:`controller_norm` of the bottleneck ``(N, 8w)`` ->
        itself, or ``(N, 0)`` when the controller reads the code alone."""
        return mean if self.image_conditioning else mean.new_zeros((mean.shape[0], 0))

    def _presence(self, mean: Tensor, peak: Tensor) -> Tensor:
        """Mean- and max-pooled :attr:`controller_norm` of the bottleneck ``(N, 8w)`` each ->
        presence logits ``(N, num_tissues)``."""
        return self.presence(torch.cat([mean, peak], dim=1))

    def _presence_from(self, normed: Tensor) -> Tensor:
        """``normed``: :attr:`controller_norm` of the bottleneck -> ``(B, num_tissues)``."""
        return self._presence(normed.mean(dim=(2, 3)), normed.amax(dim=(2, 3)))

    def presence_logits(self, bottleneck: Tensor) -> Tensor:
        """``(B, num_tissues)`` logits that each tissue is in the image (``presence`` only)."""
        if self.presence is None:
            raise RuntimeError("this OmniSeg has no presence gate (presence=False)")
        return self._presence_from(self.controller_norm(bottleneck))

    @staticmethod
    def gate(logits: Tensor, presence: Tensor) -> Tensor:
        """Multiply the foreground odds of ``logits`` ``(..., 2, H, W)`` by ``sigmoid(presence)``
        (``presence`` ``(...)``, one logit per head): foreground logit ``+ logsigmoid``."""
        shift = F.logsigmoid(presence.to(logits.dtype))[..., None, None]
        return torch.stack([logits[..., 0, :, :], logits[..., 1, :, :] + shift], dim=-3)

    def _controller(self, pooled: Tensor, tissue: Tensor) -> Tensor:
        """``pooled`` ``(N, 8w)``, ``tissue`` ``(N,)`` -> head params ``(N, P)``."""
        code = F.one_hot(tissue, self.num_tissues).to(pooled.dtype) * self.code_scale
        z = torch.cat([pooled * self.feature_scale, code], dim=1)[:, :, None, None]
        return self.controller(z)[:, :, 0, 0]

    def controller_params(self, bottleneck: Tensor, tissue: Tensor) -> Tensor:
        """Head parameters ``(B, 162)`` from the bottleneck ``(B, 8w, h, w)`` and ids ``(B,)``."""
        mean = self.controller_norm(bottleneck).mean(dim=(2, 3))
        return self._controller(self._controller_input(mean), tissue)

    def dynamic_head(self, features: Tensor, params: Tensor) -> Tensor:
        """Per-sample heads: features ``(B, 8, H, W)``, params ``(B, 162)`` -> ``(B, 2, H, W)``."""
        return run_heads(features, params[:, None], self.head_impl, self.head_negative_slope)[:, 0]

    # -- API ------------------------------------------------------------------------------------
    def forward(self, x: Tensor, tissue: Tensor) -> Tensor:
        logits, presence = self.forward_with_presence(x, tissue)
        return logits if presence is None else self.gate(logits, presence)

    def forward_with_presence(self, x: Tensor, tissue: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(logits (B, 2, H, W) before the gate, presence logits (B,) or None)``."""
        self.check_input(x, tissue)
        features, bottleneck = self.encode(x, tissue)
        normed = self.controller_norm(bottleneck)  # once: its BatchNorm counts each batch once
        params = self._controller(self._controller_input(normed.mean(dim=(2, 3))), tissue)
        logits = self.dynamic_head(features, params)
        if self.presence is None:
            return logits, None
        return logits, self._presence_from(normed).gather(1, tissue[:, None])[:, 0]

    def predict_proba(self, x: Tensor, tissues: Sequence[int]) -> Tensor:
        """Backbone once (the decoder once per tissue with ``decoder_conditioning``), then all
        ``T`` requested heads of all samples in one batched op.

        Returns:
            ``(B, T, H, W)`` foreground probabilities (softmax channel 1), in ``tissues`` order.
        """
        tissues = [int(t) for t in tissues]
        if not tissues:
            self.check_input(x)
            return x.new_zeros((x.shape[0], 0, *x.shape[2:]))
        return self.heads_logits(x, tissues).softmax(dim=2)[:, :, 1]

    def heads_logits(self, x: Tensor, tissues: Sequence[int]) -> Tensor:
        """Logits ``(B, T, 2, H, W)`` of the ``T`` requested heads for every sample, backbone
        once (gated when the network has a presence gate); differentiable, so a loss can read
        heads other than each patch's own (:func:`omniseg.partial_labels.implied_label_loss`)."""
        tissues = [int(t) for t in tissues]
        self.check_input(x)
        self._check_ids(tissues)
        if not tissues:
            raise ValueError("heads_logits needs at least one tissue id")
        if self._tissue_norms:  # encoder once, the decoder once per tissue
            skips, bottleneck = self.backbone.encoder(x)
            normed = self.controller_norm(bottleneck)
            out = []
            for t in tissues:
                ids = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
                out.append(self._heads(self._decode(skips, bottleneck, ids), normed, [t]))
            return torch.cat(out, dim=1)
        features, bottleneck = self.backbone(x)
        return self._heads(features, self.controller_norm(bottleneck), tissues)

    def _heads(self, features: Tensor, normed: Tensor, tissues: Sequence[int]) -> Tensor:
        """Logits ``(B, T, 2, H, W)`` of the heads ``tissues`` on ``features``, generated (and
        gated) from ``normed``, the :attr:`controller_norm` of the bottleneck."""
        local = self._windowed_heads(features, normed, tissues)
        if local is not None:
            return local
        peak = normed.amax(dim=(2, 3)) if self.presence is not None else None
        return self._pooled_heads(features, normed.mean(dim=(2, 3)), peak, tissues)

    def _pooled_heads(
        self, features: Tensor, mean: Tensor, peak: Tensor | None, tissues: Sequence[int]
    ) -> Tensor:
        """Logits ``(N, T, 2, H, W)`` of the ``T`` heads generated (and gated) from each
        sample's pooled features: ``features`` ``(N, c, H, W)``, ``mean`` and ``peak`` (the
        mean- and max-pooled normed bottleneck, ``(N, 8w)``; ``peak`` only with the gate)."""
        n, t = features.shape[0], len(tissues)
        pooled = self._controller_input(mean)
        ids = torch.tensor(tissues, dtype=torch.long, device=features.device)
        params = self._controller(pooled.repeat_interleave(t, dim=0), ids.repeat(n))
        logits = run_heads(
            features, params.reshape(n, t, -1), self.head_impl, self.head_negative_slope
        )
        if self.presence is not None:
            logits = self.gate(logits, self._presence(mean, peak)[:, ids])
        return logits

    def _windowed_heads(
        self, features: Tensor, normed: Tensor, tissues: Sequence[int]
    ) -> Tensor | None:
        """Logits ``(B, T, 2, H, W)`` of an input larger than :attr:`context`: each
        ``DOWNSAMPLE``-pixel block gets the heads (and gate) generated from the
        ``context``-pixel window around it (:func:`~omniseg.models.blocks.window_pool`), not from
        the whole input; None when the input fits the context (one head per input, the paper).

        A head generated from a whole slide tile larger than the training crop pools a context
        it was never trained on (demo slides, 256-px tiles, 128-px training crops: 53.1 mean
        Dice pooling the tile, 69.9 pooling the window around each block; README, "Slide
        tiles").
        """
        cells = window_cells(self.context, DOWNSAMPLE)
        mean = window_pool(normed, cells, "mean")
        if mean is None:
            return None
        b, c, hh, ww = features.shape
        h, w = normed.shape[2:]
        s, t = hh // h, len(tissues)
        n = b * h * w  # one "sample" per block, with its own window's pooled features

        def per_block(pooled: Tensor) -> Tensor:  # (b, C, h, w) -> (b h w, C)
            return pooled.permute(0, 2, 3, 1).reshape(n, -1)

        peak = window_pool(normed, cells, "max") if self.presence is not None else None
        blocks = features.reshape(b, c, h, s, w, s).permute(0, 2, 4, 1, 3, 5).reshape(n, c, s, s)
        logits = self._pooled_heads(
            blocks, per_block(mean), None if peak is None else per_block(peak), tissues
        )
        # (b h w, T, 2, s, s) -> (b, T, 2, h s, w s)
        logits = logits.reshape(b, h, w, t, NUM_CLASSES, s, s).permute(0, 3, 4, 1, 5, 2, 6)
        return logits.reshape(b, t, NUM_CLASSES, hh, ww)
