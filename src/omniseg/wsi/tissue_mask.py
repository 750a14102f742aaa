"""Where the tissue is: a low-resolution foreground mask of a slide.

A pixel is tissue when its HSV saturation or its mean optical density is above a threshold
(glass is bright and grey; stained tissue is coloured or dark), then the mask is cleaned with a
morphological closing and opening (discs, radii in micrometres) and components smaller than a
minimum area are dropped. All parameters are config values. A user may supply a mask image
instead (:func:`load_mask_image`).

Masks are bool ``(rows, cols)`` at the thumbnail's resolution; the pixel ``(i, j)`` covers the
level-0 pixels ``[i * d, (i + 1) * d) x [j * d, (j + 1) * d)`` with ``d`` the mask's downsample
(level-0 pixels per mask pixel).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from omniseg.io import read_mask

log = logging.getLogger(__name__)

__all__ = ["disc", "load_mask_image", "resize_nearest", "slide_tissue_mask", "tissue_mask"]


def disc(radius: float) -> np.ndarray:
    """Bool disc structuring element of ``radius`` pixels, ``(2r+1, 2r+1)`` with ``r = floor``."""
    r = int(math.floor(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return yy**2 + xx**2 <= radius**2 + 1e-9


def tissue_mask(
    thumb: np.ndarray,
    *,
    saturation_min: float = 0.07,
    od_min: float = 0.15,
    close_um: float = 20.0,
    open_um: float = 10.0,
    min_area_um2: float = 2e4,
    um_per_px: float,
) -> np.ndarray:
    """Foreground (tissue) mask of a low-resolution RGB image.

    Args:
        thumb: RGB uint8 ``(h, w, 3)``.
        saturation_min: HSV saturation ``(max - min) / max`` above which a pixel is tissue.
        od_min: mean optical density ``-log10(I / 255)`` over R, G, B above which a pixel is
            tissue (catches dark, grey-looking tissue such as silver stains).
        close_um: radius of the closing disc (fills small gaps and lumens), micrometres.
        open_um: radius of the opening disc (removes dust and noise), micrometres.
        min_area_um2: components smaller than this (8-connected), in um^2, are dropped.
        um_per_px: pixel size of ``thumb``.

    Returns:
        bool ``(h, w)``.
    """
    if thumb.ndim != 3 or thumb.shape[2] < 3 or thumb.dtype != np.uint8:
        raise ValueError(f"thumbnail must be uint8 (h, w, 3), got {thumb.dtype} {thumb.shape}")
    if not um_per_px > 0:
        raise ValueError(f"um_per_px must be > 0, got {um_per_px}")
    rgb = thumb[:, :, :3].astype(np.float32)
    hi = rgb.max(axis=2)
    lo = rgb.min(axis=2)
    sat = np.where(hi > 0, (hi - lo) / np.maximum(hi, 1.0), 0.0)
    od = -np.log10(np.maximum(rgb, 1.0) / 255.0).mean(axis=2)
    mask = (sat > saturation_min) | (od > od_min)
    r_close = close_um / um_per_px
    r_open = open_um / um_per_px
    if r_close >= 1:
        mask = _closing(mask, disc(r_close))
    if r_open >= 1:
        mask = _opening(mask, disc(r_open))
    return remove_small(mask, min_area_um2 / um_per_px**2)


def _closing(mask: np.ndarray, se: np.ndarray) -> np.ndarray:
    # pad so that objects touching the border are not eroded by the implicit zero border
    p = se.shape[0] // 2 + 1
    padded = np.pad(mask, p, mode="edge")
    return ndi.binary_closing(padded, se)[p:-p, p:-p]


def _opening(mask: np.ndarray, se: np.ndarray) -> np.ndarray:
    p = se.shape[0] // 2 + 1
    padded = np.pad(mask, p, mode="edge")
    return ndi.binary_opening(padded, se)[p:-p, p:-p]


def remove_small(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """Drop 8-connected components of fewer than ``min_pixels`` pixels."""
    if min_pixels <= 1 or not mask.any():
        return mask
    lab, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[lab]


def resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D array: output pixel ``(i, j)`` takes the input pixel
    under its centre, ``floor((i + 0.5) * h / H)``."""
    h, w = mask.shape[:2]
    H, W = int(shape[0]), int(shape[1])
    ri = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.int64), h - 1)
    ci = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.int64), w - 1)
    return mask[ri[:, None], ci[None, :]]


def load_mask_image(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """A user-supplied binary mask image (0/1 or 0/255, covering the whole slide), resized
    (nearest) to ``shape`` ``(rows, cols)``.

    Raises:
        ValueError: naming the file if it is missing, unreadable or not binary, or if its aspect
            ratio differs from ``shape``'s by more than 2% (it cannot cover the same slide).
    """
    mask = read_mask(path)
    h, w = mask.shape
    H, W = int(shape[0]), int(shape[1])
    if abs((w / h) / (W / H) - 1) > 0.02:
        raise ValueError(
            f"tissue mask {path} is {h}x{w} (rows x cols), its aspect ratio does not match the "
            f"slide's ({H}x{W} at mask resolution); a mask image must cover the whole slide"
        )
    return resize_nearest(mask, (H, W))


def slide_tissue_mask(
    slide,
    *,
    um_per_px: float = 4.0,
    mask_image: str | Path | None = None,
    **params,
) -> tuple[np.ndarray, float]:
    """The tissue mask of a :class:`~omniseg.wsi.slide.Slide` at ``um_per_px``.

    Args:
        slide: an open slide.
        um_per_px: resolution of the mask (the slide is read at that pixel size).
        mask_image: a user-supplied mask image instead of the automatic mask.
        **params: keyword arguments of :func:`tissue_mask`.

    Returns:
        ``(mask, downsample)``: bool ``(rows, cols)`` of :meth:`Slide.scaled_size`, and the
        level-0 pixels per mask pixel (``um_per_px / slide.mpp``). An empty mask is logged as
        a warning (the slide then yields empty outputs).
    """
    w, h = slide.scaled_size(um_per_px)
    if mask_image:
        mask = load_mask_image(mask_image, (h, w))
    else:
        thumb = slide.read_scaled_whole(um_per_px)
        mask = tissue_mask(thumb, um_per_px=um_per_px, **params)
    if not mask.any():
        log.warning("slide %s: no tissue found (the tissue mask is empty)", slide.path)
    return mask, um_per_px / slide.mpp
