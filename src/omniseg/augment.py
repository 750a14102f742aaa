"""Batched training augmentation on the training device (the paper's three groups).

Each group is applied to a sample with its own probability (0.5 in the paper), every op of the
group together:

* geometric: affine (translate, rotate, x-shear, scale: isotropic, or x and y drawn
  independently as in the authors' code) and horizontal flip; the mask is warped with the image
  (bilinear, then thresholded at 0.5, so it stays {0, 1});
* colour: gamma contrast ``x ** gamma`` and additive brightness;
* stain (not in the paper; off unless ``p_stain > 0``): stain jitter in optical density. Under
  Beer-Lambert a pixel's optical density ``-log(x)`` per RGB channel is the stain amounts times
  their absorbances, so a stronger or weaker stain, or another batch of it, scales the densities:
  each image's are multiplied by ``exp(N(0, stain_sigma))`` per channel and once more for all
  three (Tellez et al. 2018 scale the stain channels after colour deconvolution; per RGB
  channel needs no stain matrix, so it applies to PAS, silver and trichrome as to H&E). Glass
  (density ~0) stays white. It is a gamma per channel, ``x ** g``, where the colour group's gamma
  is one exponent for all three;
* noise: coarse dropout (rectangles set to 0), Gaussian blur, additive Gaussian noise (a fixed
  standard deviation, or one drawn per image from a range as imgaug's
  ``AdditiveGaussianNoise(scale=(0, 0.1))`` does).

The defaults are the demo's (milder than the paper: gamma 0.7-1.5, noise 0.03, isotropic scale,
reflection padding); the authors' public code uses ``gamma=(0, 2)``, ``noise_std=(0, 0.1)``,
``scale_per_axis=True`` and ``padding_mode="zeros"`` (imgaug's black fill), which
``config/paper.yaml`` sets.

Images ``(B, 3, H, W)`` float in [0, 1] stay in [0, 1]; masks ``(B, 1, H, W)`` keep their dtype.
Randomness comes from torch's global generators (seed with ``torch.manual_seed``).
"""

from __future__ import annotations

import math

import kornia.augmentation as K
import torch
from torch import Tensor, nn


def coarse_dropout(
    images: Tensor, holes: tuple[int, int] = (1, 8), size: tuple[float, float] = (0.02, 0.1)
) -> Tensor:
    """Set random rectangles of each image to 0.

    Args:
        images: ``(N, C, H, W)``.
        holes: inclusive range of the number of rectangles per image.
        size: range of a rectangle's side as a fraction of the image side (height and width
            drawn independently).

    Returns:
        ``(N, C, H, W)``, a new tensor.
    """
    n, _, h, w = images.shape
    k = holes[1]
    dev = images.device
    count = torch.randint(holes[0], holes[1] + 1, (n, 1), device=dev)
    active = torch.arange(k, device=dev) < count  # (N, K)
    frac = torch.empty(n, k, 2, device=dev).uniform_(*size)
    side = (frac * torch.tensor([h, w], device=dev)).ceil().clamp(min=1)  # (N, K, 2) rows, cols
    start = (
        torch.rand(n, k, 2, device=dev) * (torch.tensor([h, w], device=dev) - side + 1)
    ).floor()
    rows = torch.arange(h, device=dev)
    cols = torch.arange(w, device=dev)
    in_rows = (rows >= start[..., :1]) & (rows < start[..., :1] + side[..., :1]) & active[..., None]
    in_cols = (cols >= start[..., 1:]) & (cols < start[..., 1:] + side[..., 1:])
    hole = torch.einsum("nkh,nkw->nhw", in_rows.to(images.dtype), in_cols.to(images.dtype)) > 0
    return images.masked_fill(hole[:, None], 0.0)


PADDING_MODES = ("reflection", "zeros", "border")


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _range(name: str, value: object) -> tuple[float, float]:
    """``value`` as a ``(lo, hi)`` pair of finite numbers with ``0 <= lo <= hi``."""
    try:
        lo, hi = value  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a [lo, hi] pair, got {value!r}") from None
    if not (_is_number(lo) and _is_number(hi) and math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} must be a [lo, hi] pair of numbers, got {value!r}")
    if not 0 <= lo <= hi:
        raise ValueError(f"{name} must have 0 <= lo <= hi, got {value!r}")
    return float(lo), float(hi)


#: Lowest intensity the stain jitter reads (optical density at most ``-log`` of it, ~5.5).
_MIN_INTENSITY = 1.0 / 255.0


def stain_jitter(images: Tensor, sigma: float) -> Tensor:
    """Scale each image's optical density ``-log(x)`` by ``exp(N(0, sigma))`` per RGB channel
    times ``exp(N(0, sigma))`` for all channels: ``(N, C, H, W)`` in [0, 1] -> the same shape,
    in [0, 1]. White (density 0) stays white; a pixel's hue and depth change as a stain's
    strength does."""
    n, c = images.shape[:2]
    gains = torch.randn(n, c, 1, 1, device=images.device) + torch.randn(
        n, 1, 1, 1, device=images.device
    )
    density = -torch.log(images.clamp(_MIN_INTENSITY, 1.0))
    return torch.exp(-density * torch.exp(sigma * gains).to(images.dtype)).clamp(0.0, 1.0)


class Augmenter(nn.Module):
    """The paper's augmentation, batched, image and mask together.

    Args:
        p_geometric, p_color, p_noise: per-sample probability of each group.
        translate: max shift as a fraction of width / height.
        rotate: max rotation in degrees (either sign).
        shear: max x-shear in degrees (either sign).
        scale: zoom range.
        scale_per_axis: draw the x and y zoom independently from ``scale`` (imgaug's
            ``ScaleX`` + ``ScaleY``, the authors' code); False: one isotropic zoom.
        hflip: flip horizontally with probability 0.5 inside the geometric group.
        gamma: range of the gamma exponent (``0 <= lo <= hi``; 0 turns the image white).
        brightness: max absolute brightness offset (either sign, image in [0, 1]).
        dropout_holes: inclusive range of rectangles per image.
        dropout_size: rectangle side range as a fraction of the image side.
        blur_sigma: Gaussian blur sigma range in pixels (0 means no blur).
        noise_std: standard deviation of the additive Gaussian noise (image in [0, 1]): a
            number, or a ``(lo, hi)`` range from which each image draws its own.
        padding_mode: how the affine fills pixels from outside the image
            (``"reflection"``, ``"zeros"`` or ``"border"``), for image and mask alike.
        p_stain: per-sample probability of the stain jitter (0: off, the paper).
        stain_sigma: standard deviation of the log gains of the stain jitter (per channel and
            overall).
    """

    def __init__(
        self,
        p_geometric: float = 0.5,
        p_color: float = 0.5,
        p_noise: float = 0.5,
        translate: float = 0.2,
        rotate: float = 180.0,
        shear: float = 16.0,
        scale: tuple[float, float] = (0.75, 1.5),
        scale_per_axis: bool = False,
        hflip: bool = True,
        gamma: tuple[float, float] = (0.7, 1.5),
        brightness: float = 0.1,
        dropout_holes: tuple[int, int] = (1, 8),
        dropout_size: tuple[float, float] = (0.02, 0.1),
        blur_sigma: tuple[float, float] = (0.0, 1.0),
        noise_std: float | tuple[float, float] = 0.03,
        padding_mode: str = "reflection",
        p_stain: float = 0.0,
        stain_sigma: float = 0.1,
    ):
        super().__init__()
        probabilities = (
            ("p_geometric", p_geometric),
            ("p_color", p_color),
            ("p_noise", p_noise),
            ("p_stain", p_stain),
        )
        for name, p in probabilities:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if not 0.0 <= stain_sigma <= 1.0:
            raise ValueError(f"stain_sigma must be in [0, 1], got {stain_sigma}")
        if not 0.0 <= brightness <= 1.0:
            raise ValueError(f"brightness must be in [0, 1], got {brightness}")
        if not (1 <= dropout_holes[0] <= dropout_holes[1]):
            raise ValueError(f"dropout_holes must be 1 <= lo <= hi, got {dropout_holes}")
        if not (0 <= blur_sigma[0] <= blur_sigma[1]):
            raise ValueError(f"blur_sigma must be 0 <= lo <= hi, got {blur_sigma}")
        gamma = _range("gamma", gamma)
        scale = _range("scale", scale)
        if scale[0] <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        noise = (noise_std, noise_std) if _is_number(noise_std) else _range("noise_std", noise_std)
        if noise[0] < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        if not isinstance(scale_per_axis, bool):
            raise ValueError(f"scale_per_axis must be true or false, got {scale_per_axis!r}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(
                f"padding_mode must be one of {', '.join(PADDING_MODES)}, got {padding_mode!r}"
            )
        self.p_geometric, self.p_color, self.p_noise = p_geometric, p_color, p_noise
        self.affine = K.RandomAffine(
            degrees=rotate,
            translate=(translate, translate),
            scale=(*scale, *scale) if scale_per_axis else scale,
            shear=shear,
            padding_mode=padding_mode,
            p=1.0,
        )
        self.flip = K.RandomHorizontalFlip(p=0.5) if hflip else None
        self.gamma = K.RandomGamma(gamma=gamma, p=1.0)
        self.brightness = K.RandomBrightness(brightness=(1 - brightness, 1 + brightness), p=1.0)
        self.dropout_holes = tuple(dropout_holes)
        self.dropout_size = tuple(dropout_size)
        # kornia rejects sigma 0; a 1e-3 px sigma is the identity kernel.
        sig = (max(blur_sigma[0], 1e-3), max(blur_sigma[1], 1e-3))
        ksize = 2 * math.ceil(3 * sig[1]) + 1
        self.blur = K.RandomGaussianBlur(ksize, sig, p=1.0) if blur_sigma[1] > 0 else None
        self.noise_std = noise
        self.p_stain, self.stain_sigma = float(p_stain), float(stain_sigma)

    @staticmethod
    def _pick(n: int, p: float, device: torch.device) -> Tensor:
        return torch.nonzero(torch.rand(n, device=device) < p)[:, 0]

    def forward(self, images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        """Augment a batch.

        Args:
            images: ``(B, 3, H, W)`` float in [0, 1].
            masks: ``(B, 1, H, W)`` {0, 1} (bool, integer or float).

        Returns:
            ``(images, masks)``: new tensors of the same shapes and dtypes.
        """
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(
                f"images must be float (B, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        b, c, h, w = images.shape
        if tuple(masks.shape) != (b, 1, h, w):
            raise ValueError(f"masks must be ({b}, 1, {h}, {w}), got {tuple(masks.shape)}")
        dev = images.device
        img = images.clone()
        msk = masks.to(images.dtype, copy=True)

        idx = self._pick(b, self.p_geometric, dev)
        if idx.numel():
            both = self.affine(torch.cat([img[idx], msk[idx]], dim=1))
            if self.flip is not None:
                both = self.flip(both)
            img[idx] = both[:, :c]
            msk[idx] = (both[:, c:] > 0.5).to(msk.dtype)

        idx = self._pick(b, self.p_color, dev)
        if idx.numel():
            x = self.gamma(img[idx].clamp(0.0, 1.0))
            img[idx] = self.brightness(x).clamp(0.0, 1.0)

        if self.p_stain > 0:  # no draw when off: the other groups' random stream is unchanged
            idx = self._pick(b, self.p_stain, dev)
            if idx.numel():
                img[idx] = stain_jitter(img[idx], self.stain_sigma)

        idx = self._pick(b, self.p_noise, dev)
        if idx.numel():
            x = coarse_dropout(img[idx], self.dropout_holes, self.dropout_size)
            if self.blur is not None:
                x = self.blur(x)
            lo, hi = self.noise_std
            std = torch.empty(x.shape[0], 1, 1, 1, device=dev).uniform_(lo, hi) if hi > lo else lo
            x = x + std * torch.randn_like(x)
            img[idx] = x.clamp(0.0, 1.0)

        return img.clamp_(0.0, 1.0), msk.to(masks.dtype)
