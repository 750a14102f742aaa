"""Area resampling: the one function that scales training ROIs and slide regions alike.

Shrinking an image of ``H`` rows to ``h`` rows maps output row ``i`` to the source interval
``[i*f, (i+1)*f)`` with ``f = H / h`` and takes the mean of the source pixels weighted by their
overlap with it (exact area weights, separable, as sparse matrices); integer factors reduce to
an exact block mean. Columns likewise, with their own factor. A uint8 result is rounded half up.
Enlarging (a target finer than the source) is bilinear.

:func:`omniseg.data.patches.downscale_image` (ROIs -> patches) and
:meth:`omniseg.wsi.slide.Slide.read_scaled` (slide -> tiles) both end here, so a patch and a
slide tile of the same pixels at the same scale are the same pixels.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

#: Factors within this (relative) distance of an integer take the exact block-mean path.
INT_TOL = 1e-9


def as_int_factor(factor: float) -> int | None:
    """``factor`` as an int when it is one (within :data:`INT_TOL`), else None."""
    k = round(factor)
    return int(k) if abs(factor - k) < INT_TOL * max(1.0, factor) else None


def area_mean(arr: np.ndarray, out_h: int, out_w: int, factor: float | None = None) -> np.ndarray:
    """Area mean of ``arr`` ``(H, W[, C])`` (any dtype, bool included) on an ``(out_h, out_w)``
    grid: float ``(out_h, out_w[, C])``.

    Args:
        factor: source pixels per output pixel on both axes; None: ``H / out_h`` and
            ``W / out_w`` (the grid spans the whole array). With a factor, source pixels beyond
            ``out * factor`` are left out (the remainder is cropped, never padded).

    Raises:
        ValueError: the output is empty or its grid reaches past the input.
    """
    rows_in, cols_in = arr.shape[:2]
    fr = rows_in / out_h if factor is None and out_h > 0 else factor
    fc = cols_in / out_w if factor is None and out_w > 0 else factor
    if not (
        out_h > 0 and out_w > 0 and fr >= 1 and fc >= 1
        and out_h * fr <= rows_in * (1 + INT_TOL) and out_w * fc <= cols_in * (1 + INT_TOL)
    ):  # fmt: skip
        raise ValueError(
            f"area mean of {rows_in}x{cols_in} pixels to {out_h}x{out_w}"
            + ("" if factor is None else f" at factor {factor}")
            + ": the output must be non-empty and its grid inside the input"
        )
    kr, kc = as_int_factor(fr), as_int_factor(fc)
    if kr is not None and kc is not None:
        return block_sum(arr[: out_h * kr, : out_w * kc], kr, kc) / np.float64(kr * kc)
    rest = arr.shape[2:]
    rows = area_weights(rows_in, out_h, fr)  # (out_h, H)
    cols = area_weights(cols_in, out_w, fc)  # (out_w, W)
    flat = arr.reshape(rows_in, -1).astype(np.float32)
    tmp = np.asarray(rows @ flat).reshape(out_h, cols_in, -1)  # (h, W, C)
    tmp = tmp.transpose(1, 0, 2).reshape(cols_in, -1)  # (W, h*C)
    out = np.asarray(cols @ tmp).reshape(out_w, out_h, -1).transpose(1, 0, 2)  # (h, w, C)
    return out.reshape(out_h, out_w, *rest)


def block_sum(arr: np.ndarray, k: int, k_cols: int | None = None) -> np.ndarray:
    """Sums over ``k x k_cols`` blocks (``k_cols`` None: ``k``) of ``arr`` ``(H, W[, C])``
    -> ``(H // k, W // k_cols[, C])``, uint32 for uint8 or bool input (exact), float64 for any
    other dtype (whose values a uint16 or uint32 sum could overflow or truncate); the remainder
    rows and columns are left out.

    Accumulating ``k`` strided row slices, then ``k_cols`` strided column slices, is ~10x faster
    than ``reshape(h, k, w, k).sum(axis=(1, 3))`` (whose inner axes are short and strided).
    """
    kc = k if k_cols is None else k_cols
    h, w = arr.shape[0] // k, arr.shape[1] // kc
    arr = arr[: h * k, : w * kc]
    small = arr.dtype in (np.uint8, np.bool_)
    acc_dtype = (np.uint16 if k * 255 < 2**16 else np.uint32) if small else np.float64
    out_dtype = np.uint32 if small else np.float64
    rows = arr[0::k].astype(acc_dtype)  # (h, kc*w[, C])
    for i in range(1, k):
        rows += arr[i::k]
    rows = rows.reshape(h, w, kc, *arr.shape[2:])
    out = rows[:, :, 0].astype(out_dtype)
    for j in range(1, kc):
        out += rows[:, :, j]
    return out


def area_weights(n_in: int, n_out: int, factor: float | None = None) -> sp.csr_matrix:
    """Sparse ``(n_out, n_in)`` overlaps of source pixels with the output intervals
    ``[i*f, (i+1)*f)``, divided by ``f`` (``f = n_in / n_out`` unless given): each row sums to 1
    where its interval lies inside the source."""
    f = n_in / n_out if factor is None else factor
    i = np.arange(n_out, dtype=np.float64)
    lo, hi = i * f, (i + 1) * f
    first = np.floor(lo).astype(np.int64)
    span = int(math.ceil(f)) + 1
    r = first[:, None] + np.arange(span)[None, :]  # (n_out, span) candidate source pixels
    overlap = np.minimum(r + 1, hi[:, None]) - np.maximum(r, lo[:, None])
    keep = (overlap > 1e-12) & (r < n_in)
    rows = np.broadcast_to(np.arange(n_out)[:, None], r.shape)[keep]
    return sp.csr_matrix(
        (overlap[keep] / f, (rows, r[keep])), shape=(n_out, n_in), dtype=np.float32
    )


def round_uint8(mean: np.ndarray) -> np.ndarray:
    """Float means in [0, 255] -> uint8, rounded half up."""
    return np.clip(np.floor(mean + 0.5), 0, 255).astype(np.uint8)


def area_resize(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize a uint8 ``(H, W[, C])`` image to ``(out_h, out_w[, C])``: area mean
    (:func:`area_mean`) when shrinking on both axes, bilinear (half-pixel centres, rounded half
    to even) otherwise. The same size returns ``img`` itself."""
    h, w = img.shape[:2]
    if (h, w) == (out_h, out_w):
        return img
    if out_h <= h and out_w <= w:
        return round_uint8(area_mean(img, out_h, out_w))
    return _bilinear(img, out_h, out_w)


def _bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(img))
    t = (t[..., None] if img.ndim == 2 else t).permute(2, 0, 1)[None].float()
    r = F.interpolate(t, size=(out_h, out_w), mode="bilinear", align_corners=False)
    out = r[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out[..., 0] if img.ndim == 2 else out
